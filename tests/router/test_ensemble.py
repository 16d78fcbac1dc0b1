"""Measured ensemble lifts: counting the mix against its best member, the marginal gain, the file."""

from __future__ import annotations

import json

import pytest

from router.ensemble import EnsembleGains, EnsembleMeasure, measure, mixed_choice
from router.quality import LabelledItem
from wattserve.errors import ConfigError


def mc(i: int, gold: int, choices=(" a", " b", " c")) -> LabelledItem:
    return LabelledItem(f"q{i}", "t", "mc", f"prompt {i}", choices=tuple(choices), gold=gold)


SURE, UNSURE = -0.1, -3.0


def lps(pick: int, *, sure: bool, n: int = 3) -> list[float]:
    """Log-likelihoods preferring ``pick``: by a wide margin when ``sure``, barely otherwise."""
    return [(SURE if sure else -1.0) if k == pick else (-5.0 if sure else -1.1) for k in range(n)]


def test_mixed_choice_follows_the_confident_expert_and_the_weights():
    item = mc(0, 0)
    both = {"a": lps(0, sure=True), "b": lps(1, sure=False)}
    assert mixed_choice(item, both) == 0  # the sure one wins an equal-weight mix
    assert mixed_choice(item, both, weights={"a": 0.01, "b": 0.99}) == 1
    # per-character normalisation: a long choice is not penalised for its length
    long = mc(1, 1, choices=(" x", " a much longer answer"))
    assert mixed_choice(long, {"a": [-2.0, -6.0]}, "per_char") == 1
    assert mixed_choice(long, {"a": [-2.0, -6.0]}, "sum") == 0


def test_measure_counts_wins_and_losses_against_the_best_member():
    items = [mc(i, 0) for i in range(10)]
    lp = {}
    for i in range(10):
        # a: right on 0-4, sure only on 0-3; b: right on 4-9 and sure there, unsure where wrong
        lp[(f"q{i}", "a")] = lps(0 if i < 5 else 1, sure=i < 4)
        lp[(f"q{i}", "b")] = lps(0 if i >= 4 else 2, sure=i >= 4)
    gains = measure(items, lp, ["a", "b"])
    m = gains.measures[frozenset({"a", "b"})]
    assert (m.n, m.best) == (10, "b") and m.best_accuracy == pytest.approx(0.6)
    # the mix follows whoever is sure: right on 0-3 (a sure, b wrong) and 4-9 (b sure)
    assert (m.wins, m.losses) == (4, 0) and m.accuracy == pytest.approx(1.0)
    assert m.lift == pytest.approx(0.4) and 0 < m.lift_se < 0.4
    # an item only one expert scored is left out of the pair
    lp[("q10", "a")] = lps(0, sure=True)
    assert measure([*items, mc(10, 0)], lp, ["a", "b"]).measures[frozenset({"a", "b"})].n == 10


def test_a_mix_that_spoils_answers_has_a_negative_lift():
    items = [mc(i, 0) for i in range(4)]
    lp = {}
    for i in range(4):
        lp[(f"q{i}", "a")] = lps(0, sure=False)  # a: always right, never sure
        lp[(f"q{i}", "b")] = lps(1, sure=True)  # b: always wrong, always sure
    m = measure(items, lp, ["a", "b"]).measures[frozenset({"a", "b"})]
    assert m.best == "a" and (m.wins, m.losses) == (0, 4) and m.lift == pytest.approx(-1.0)


def test_gain_is_the_better_member_plus_the_change_of_lift():
    g = EnsembleGains([EnsembleMeasure(("a", "b"), 100, 0.5, "b", 0.45, 8, 3)])
    q = {"a": 0.30, "b": 0.42, "c": 0.9}
    # a first: b is better on this prompt by 0.12, and the mix adds 0.05 over its best member
    assert g.gain(q, ["a"], "b") == pytest.approx(0.12 + 0.05)
    # b first: a adds only the measured lift
    assert g.gain(q, ["b"], "a") == pytest.approx(0.05)
    # sets never measured have no predicted gain
    assert g.gain(q, ["a"], "c") is None and g.gain(q, ["a", "b"], "c") is None
    assert g.lift(["a"]) == 0.0 and g.lift(["a", "b"]) == pytest.approx(0.05)


def test_save_load_and_rename_to_serving_experts(tmp_path):
    g = EnsembleGains([EnsembleMeasure(("cloud_col", "edge_col"), 50, 0.4, "cloud_col", 0.38, 3, 2)])
    g.save(tmp_path / "ensemble.json", data="x.jsonl")
    back = EnsembleGains.load(tmp_path / "ensemble.json")
    assert back.lift(["edge_col", "cloud_col"]) == pytest.approx(0.02)
    served = back.renamed({"edge": "edge_col", "cloud": "cloud_col", "other": "other_col"})
    assert served.lift(["edge", "cloud"]) == pytest.approx(0.02) and served.measures[frozenset({"edge", "cloud"})].best == "cloud"
    assert not back.renamed({"edge": "edge_col"})  # a set naming an unmapped column is dropped
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"sets": [{"experts": ["a", "b"], "n": 3, "accuracy": 0.5, "best": "a",
                                         "best_accuracy": 0.5, "wins": 3, "losses": 2}]}))
    with pytest.raises(ConfigError, match="not a valid measurement"):
        EnsembleGains.load(bad)
    (tmp_path / "junk.json").write_text("{")
    with pytest.raises(ConfigError, match="cannot read"):
        EnsembleGains.load(tmp_path / "junk.json")
