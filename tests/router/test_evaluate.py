"""Offline evaluation: replay through the serving policies, baselines paired with the cheapest
expert, kNN/MLP routers, AIQ and the oracle's saving, data reading, energy profiles and the PNG."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest

from router.eval_baselines import choose_by_price, knn_predict, mlp_predict, price_curve
from router.eval_data import prompt_sha1, read_eval_data
from router.eval_profiles import load_experts
from router.evaluate import Curve, EvalExpert, energy_ties, evaluate, metrics, pair, plot, summary
from router.gate import gate_output
from wattserve.errors import InvalidRequest

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
    curves = evaluate([WEAK, STRONG], gates, quality, {"weak": 0.5, "strong": 1.0}, output_tokens=10, steps=11)
    by = {c.policy: c for c in curves}
    assert by["cheapest"].points[0][:2] == pytest.approx((10.0, quality[:, 0].mean()))
    assert by["strongest"].points[0][:2] == pytest.approx((100.0, 1.0))
    top = max(by["oracle"].points, key=lambda p: p[1])
    assert top[1] == 1.0 and top[0] == pytest.approx(10 + 90 * (quality[:, 0] == 0).mean())
    # an informed gate reaches the strong model's quality at the oracle's energy; random does not
    assert by["moe2"].energy_for(0.99) == pytest.approx(top[0], rel=0.1)
    assert by["threshold"].energy_for(0.99) == pytest.approx(top[0], rel=0.1)
    assert by["random"].energy_for(0.99) > 90.0
    m = metrics(curves, [WEAK, STRONG], quality, "strong", 10)
    assert m["policies"]["moe2"]["oracle_saving_share"] > 0.9
    assert m["policies"]["random"]["oracle_saving_share"] < 0.3  # ~(100 - 91) / (100 - 50.5)
    assert m["policies"]["strongest"]["oracle_saving_share"] == pytest.approx(0.0)
    assert m["policies"]["cheapest"]["e95_j"] is None
    # AIQ: the informed router's area beats random's
    assert m["policies"]["moe2"]["aiq"] > m["policies"]["random"]["aiq"] > 0.5
    assert m["policies"]["strongest"]["aiq"] is None  # one point: nothing to integrate
    assert sum(m["policies"]["moe2"]["shares_at_e95"].values()) == pytest.approx(1.0)
    lines = summary(curves, m)
    assert lines[0].startswith("policy") and "AIQ" in lines[0] and any(line.startswith("moe2") for line in lines)


def test_baselines_pair_the_strongest_with_the_cheapest_not_the_worst():
    # 'bad' is the lowest quality but as expensive as 'strong': pairing with it would collapse
    # threshold and random onto one energy.
    bad = EvalExpert("bad", "b", j_per_token=10.0, tpot_ms=20.0, batch=1, max_batch=1, source="test")
    experts = [WEAK, STRONG, bad]
    prior = {"weak": 0.5, "strong": 1.0, "bad": 0.1}
    assert pair(experts, prior) == ("strong", "weak")
    assert energy_ties(experts) == [("strong", "bad")]
    gates, q2 = _rows(100)
    quality = np.concatenate([q2, np.zeros((100, 1), dtype=np.float32)], axis=1)
    gates = [gate_output([*[g.quality[n] for n in ("weak", "strong")], 0.01], ["w", "s", "b"],
                         {"weak": "w", "strong": "s", "bad": "b"}, "test") for g in gates]
    by = {c.policy: c for c in evaluate(experts, gates, quality, prior, output_tokens=10, steps=5)}
    for name in ("threshold", "random"):
        energies = sorted(e for e, _, _ in by[name].points)
        assert energies[0] == pytest.approx(10.0) and energies[-1] == pytest.approx(100.0)
        assert {k for sh in by[name].shares for k, v in sh.items() if v > 0} == {"weak", "strong"}


def test_curve_hull_interpolation_and_aiq():
    c = Curve("x", [(10.0, 0.5, ""), (20.0, 0.7, ""), (15.0, 0.4, ""), (30.0, 0.9, "")])
    assert c.pareto() == [(10.0, 0.5), (20.0, 0.7), (30.0, 0.9)]
    assert c.quality_at(25.0) == pytest.approx(0.8)
    assert c.quality_at(5.0) is None and c.quality_at(99.0) == pytest.approx(0.9)
    assert c.energy_for(0.6) == pytest.approx(15.0)
    assert c.energy_for(0.5) == pytest.approx(10.0)
    assert c.energy_for(0.95) is None
    # a point under the chord is not on the hull: mixing its neighbours does better
    d = Curve("y", [(0.0, 0.0, ""), (5.0, 0.1, ""), (10.0, 1.0, "")])
    assert d.hull() == [(0.0, 0.0), (10.0, 1.0)] and d.quality_at(5.0) == pytest.approx(0.5)
    assert d.aiq(0.0, 10.0) == pytest.approx(0.5, abs=1e-3)
    # below its cheapest point a policy scores 0
    assert Curve("z", [(5.0, 1.0, "")]).aiq(0.0, 10.0) == pytest.approx(0.5, abs=1e-3)


def test_knn_mlp_and_price_rule():
    rng = np.random.default_rng(0)
    # two clusters of prompts: expert 0 is right on cluster A, expert 1 on cluster B
    centers = np.array([[1.0, 0.0, 0.0], [0.0, 1.0, 0.0]])
    lab = rng.integers(0, 2, 300)
    x = centers[lab] + rng.normal(0, 0.1, (300, 3))
    q = np.stack([lab == 0, lab == 1], axis=1).astype(np.float32)
    for pred in (knn_predict(x[:200], q[:200], x[200:], k=10), mlp_predict(x[:200], q[:200], x[200:], epochs=100)):
        assert (pred.argmax(axis=1) == q[200:].argmax(axis=1)).mean() > 0.95
    energy = np.array([1.0, 2.0])
    assert choose_by_price(np.array([[0.5, 0.5]]), energy, 0.0).tolist() == [0]  # ties go to the cheaper
    assert choose_by_price(np.array([[0.2, 0.9]]), energy, 0.1).tolist() == [1]
    assert choose_by_price(np.array([[0.2, 0.9]]), energy, 1.0).tolist() == [0]
    pts = price_curve(q[200:].astype(float), q[200:], energy, ["a", "b"], steps=5)
    assert max(p[1] for p in pts) == 1.0 and min(p[0] for p in pts) == 1.0


def test_read_eval_data_blank_cells_tasks_and_routerbench_layout(tmp_path):
    f = tmp_path / "rb.csv"
    f.write_text(
        "sample_id,prompt,eval_name,m1,m2,m1|model_response,m1|total_cost,m2|total_cost\n"
        "a.0,\"['first turn', 'second turn']\",mmlu,1,0,yes,0.1,0.2\n"
        "a.1,what is 2+2,gsm8k,0,1,4,0.1,0.2\n"
        "a.2,blank here,gsm8k,,1,x,0.1,0.2\n"
    )
    with pytest.raises(InvalidRequest, match=r"row 4, column 'm1' is blank; pass --skip-blank"):
        read_eval_data(f)
    d = read_eval_data(f, skip_blank=True)
    assert d.experts == ["m1", "m2"] and d.skipped_blank == 1
    assert d.prompts == ["first turn\nsecond turn", "what is 2+2"] and d.tasks == ["mmlu", "gsm8k"]
    assert d.quality.tolist() == [[1.0, 0.0], [0.0, 1.0]]
    bad = tmp_path / "bad.csv"
    bad.write_text("prompt,a,b\nx,1,maybe\n")
    with pytest.raises(InvalidRequest, match=r"row 2, column 'b': 'maybe' is not a quality"):
        read_eval_data(bad, ["a", "b"])
    assert prompt_sha1("what is 2+2") == hashlib.sha1(b"what is 2+2").hexdigest()[:16]



def test_read_eval_data_scores_share_one_scale_and_percentages_are_read(tmp_path):
    # 1-10 judge scores where expert b never reached 10 in these rows: its 9 is not a's 10
    judged = tmp_path / "judged.csv"
    judged.write_text("question_id,prompt,a,b\n1,p1,10,9\n2,p2,5,9\n3,p3,8,6\n")
    d = read_eval_data(judged)
    assert np.allclose(d.quality, [[1.0, 0.9], [0.5, 0.9], [0.8, 0.6]])
    pct = tmp_path / "pct.csv"
    pct.write_text("prompt,a,b\np1,87%,100%\np2,0%, 12.5 %\n")
    assert np.allclose(read_eval_data(pct).quality, [[0.87, 1.0], [0.0, 0.125]])
    renamed = tmp_path / "renamed.csv"
    renamed.write_text("question,a,b\nq1,1,0\n")
    with pytest.raises(InvalidRequest, match=r"columns found: 'question', 'a', 'b'"):
        read_eval_data(renamed)

def test_energy_profiles_are_labelled_by_where_they_come_from(tmp_path):
    header = ("source,task,model,total_params_B,active_params_B,precision,gpu,num_gpus,tp,pp,max_batch_size,avg_batch_size,"
              "energy_per_request_J,avg_output_tokens,energy_per_output_token_J,throughput_output_tok_s,avg_tpot_or_itl_ms,"
              "p99_itl_ms,avg_power_W_all_gpus,power_is_derived\n")
    rows = [("m/small", 2, 0.1, 40), ("m/mid", 8, 0.4, 50), ("m/big", 32, 1.6, 60), ("m/llava-13b", 13, 9.0, 99)]
    body = "".join(f"v2,chat,{m},{p},,,H100,1,1,1,128,100,1,1,{j},1,{t},,1,True\n" for m, p, j, t in rows)
    (tmp_path / "e.csv").write_text(header + body)
    spec = {"mlenergy_csv": "e.csv", "by_size": {"source": "v2", "task": "chat", "gpu": "H100", "max_batch_size": 128},
            "experts": [{"name": "a", "column": "a", "params_b": 4},
                        {"name": "b", "column": "b", "mlenergy": {"model": "m/big", "gpu": "H100", "max_batch_size": 128}},
                        {"name": "c", "column": "c", "mlenergy": {"model": "m/mid", "gpu": "H100", "max_batch_size": 128, "stand_in": True}},
                        {"name": "d", "column": "d", "j_per_token": 1, "tpot_ms": 5}]}
    a, b, c, d = load_experts(spec, tmp_path, None)
    # J/token = 0.05 * P (exact power law on the dense rows; the multimodal row is left out)
    assert a.j_per_token == pytest.approx(0.2) and a.energy_source == "modeled:mlenergy-by-size"
    assert b.j_per_token == pytest.approx(1.6) and b.energy_source == "measured:mlenergy"
    assert c.energy_source == "modeled:mlenergy-stand-in" and "stand-in" in c.source
    assert d.energy_source == "modeled:profile-file"
    with pytest.raises(InvalidRequest, match="unique"):
        load_experts({"experts": [{"name": "a", "column": "a", "j_per_token": 1, "tpot_ms": 5}] * 2}, tmp_path, None)


def test_the_plot(tmp_path):
    png = tmp_path / "out" / "curve.png"
    plot([Curve("moe2", [(1.0, 0.5, ""), (2.0, 0.6, "")]), Curve("cheapest", [(1.0, 0.5, "")])], png, "t")
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_attainable_share_uses_the_most_saving_ceiling_curve():
    experts = [WEAK, STRONG]
    quality = np.array([[1.0, 1.0], [0.0, 1.0]] * 10)
    e_strong = STRONG.j_per_token * 10
    e_weak = WEAK.j_per_token * 10
    oracle = Curve("oracle", [(e_weak * 0.5 + e_strong * 0.5, 1.0, "")])
    mine = Curve("moe2", [(e_strong, 1.0, "")])
    ceil_a = Curve("ceiling_a", [(e_strong * 0.9, 1.0, "")])
    ceil_b = Curve("ceiling_b", [(e_strong * 0.8, 1.0, "")])
    m = metrics([oracle, mine, ceil_a, ceil_b], experts, quality, "strong", 10)
    assert m["attainable_e95_j"] == pytest.approx(e_strong * 0.8)
    assert m["policies"]["ceiling_b"]["attainable_saving_share"] == pytest.approx(1.0)
    assert m["policies"]["ceiling_a"]["attainable_saving_share"] == pytest.approx(0.5)
    assert m["policies"]["moe2"]["attainable_saving_share"] == 0.0
