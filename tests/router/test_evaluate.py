"""Offline evaluation: replay through the serving policies, curves, summary and the PNG."""

from __future__ import annotations

import numpy as np
import pytest

from router.evaluate import Curve, EvalExpert, evaluate, load_experts, plot, summary
from router.gate import gate_output

WEAK = EvalExpert("weak", "w", j_per_token=1.0, tpot_ms=10.0, batch=8, max_batch=8, source="test")
STRONG = EvalExpert("strong", "s", j_per_token=10.0, tpot_ms=20.0, batch=8, max_batch=8, source="test")


def _rows(n=400, seed=0):
    """Half the prompts are easy (both right), half hard (only strong right); the gate knows which."""
    rng = np.random.default_rng(seed)
    hard = rng.random(n) < 0.5
    quality = np.stack([np.where(hard, 0.0, 1.0), np.ones(n)], axis=1).astype(np.float32)
    logits = np.stack([np.where(hard, -2.0, 2.0), np.full(n, 2.0)], axis=1) + rng.normal(0, 0.1, (n, 2))
    gates = [gate_output(row, ["w", "s"], {"weak": "w", "strong": "s"}, "fitted:test") for row in logits]
    return gates, quality


def test_policies_replayed_with_measured_costs():
    gates, quality = _rows()
    curves = {c.policy: c for c in evaluate([WEAK, STRONG], gates, quality, {"weak": 0.5, "strong": 1.0}, output_tokens=10, steps=11)}
    assert curves["cheapest"].points[0][:2] == pytest.approx((10.0, quality[:, 0].mean()))
    assert curves["strongest"].points[0][:2] == pytest.approx((100.0, 1.0))
    oracle = curves["oracle"].points[0]
    assert oracle[1] == 1.0 and oracle[0] == pytest.approx(10 + 90 * (quality[:, 0] == 0).mean())
    # an informed gate reaches the strong model's quality at the oracle's energy; random does not
    assert curves["moe2"].energy_for(0.99) == pytest.approx(oracle[0], rel=0.1)
    assert curves["threshold"].energy_for(0.99) == pytest.approx(oracle[0], rel=0.1)
    assert curves["random"].energy_for(0.99) > 90.0
    lines = summary(list(curves.values()), strong_quality=1.0, strong_energy=100.0)
    assert lines[0].startswith("policy") and any(line.startswith("moe2") for line in lines)


def test_curve_interpolation():
    c = Curve("x", [(10.0, 0.5, ""), (20.0, 0.7, ""), (15.0, 0.4, ""), (30.0, 0.9, "")])
    assert c.pareto() == [(10.0, 0.5), (20.0, 0.7), (30.0, 0.9)]
    assert c.quality_at(25.0) == pytest.approx(0.8)
    assert c.quality_at(5.0) is None and c.quality_at(99.0) == pytest.approx(0.9)
    assert c.energy_for(0.6) == pytest.approx(15.0)
    assert c.energy_for(0.5) == pytest.approx(10.0)
    assert c.energy_for(0.95) is None


def test_profiles_without_mlenergy_and_the_plot(tmp_path):
    spec = {"experts": [{"name": "a", "column": "a", "j_per_token": 1, "tpot_ms": 5},
                        {"name": "b", "column": "b", "j_per_token": 3, "tpot_ms": 9}]}
    experts = load_experts(spec, tmp_path, None)
    assert [e.j_per_token for e in experts] == [1.0, 3.0]
    png = tmp_path / "out" / "curve.png"
    plot([Curve("moe2", [(1.0, 0.5, ""), (2.0, 0.6, "")]), Curve("cheapest", [(1.0, 0.5, "")])], png, "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
