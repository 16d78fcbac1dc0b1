"""Early exit through the torch engine: continuous batching, per-request operating points,
accounting (usage, histogram, step work for modeled devices) and max_exit_layer."""

from __future__ import annotations

import math

import pytest

from tests.workers.engine_helpers import EXIT_PROMPTS, TV_MEDIANS, exit_engine, make_engine, run
from wattserve.types import GenerateCall, SamplingParams


def _call(rid, prompt, n=12, **kw):
    return GenerateCall(rid, prompt, max_tokens=n, sampling=SamplingParams(ignore_eos=True), **kw)


def _run_collect(engine, calls, join_at=None):
    """``run`` plus the final outputs and each step's work."""
    finals, works = {}, []
    real_step = engine.step

    def step(now):
        res = real_step(now)
        works.append((res.work, dict(res.exit_counts)))
        finals.update({o.request_id: o for o in res.outputs if o.finish_reason is not None})
        return res

    engine.step = step
    try:
        _, ids, _, _ = run(engine, calls, join_at)
    finally:
        del engine.step
    return ids, finals, works


def test_exits_off_by_default_equal_the_plain_engine_token_for_token(deep_llama):
    plain = make_engine(deep_llama)
    exits = exit_engine(deep_llama, thresholds=TV_MEDIANS, default_compute_budget=1.0)
    calls = [_call(f"r{i}", p) for i, p in enumerate(EXIT_PROMPTS)]
    ref, _, _ = _run_collect(plain, calls)
    # requests asking for full depth, and an expert whose default is full depth
    explicit = [_call(c.request_id, c.prompt, compute_budget=1.0) for c in calls]
    got, finals, works = _run_collect(exits, explicit)
    assert got == ref
    assert all(w.layer_fraction == 1.0 and w.weight_fraction == 1.0 for w, _ in works)
    assert {f.exits.operating_point for f in finals.values()} == {"full"}
    assert all(f.exits.avg_exit_layer == 8 and f.exits.layers_skipped == 0 for f in finals.values())
    no_exits = make_engine(deep_llama, engine={"early_exit": {"exit_every": 2}})
    assert _run_collect(no_exits, calls)[0] == ref


def test_zero_thresholds_are_full_depth_and_infinite_ones_the_first_exit(deep_llama):
    ref, _, _ = _run_collect(make_engine(deep_llama), [_call("a", EXIT_PROMPTS[0])])
    got, finals, works = _run_collect(exit_engine(deep_llama, thresholds=[0.0, 0.0, 0.0]), [_call("a", EXIT_PROMPTS[0])])
    assert got == ref and finals["a"].exits.avg_exit_layer == 8
    _, finals, works = _run_collect(exit_engine(deep_llama, thresholds=[math.inf] * 3), [_call("a", EXIT_PROMPTS[0])])
    u = finals["a"].exits
    assert u.operating_point == "inline"
    assert u.avg_exit_layer == pytest.approx((8 + 2 * 11) / 12)  # first token from prefill, then layer 2
    assert u.layers_skipped == 11 * 6
    decode = [(w, c) for w, c in works if w.prefill_tokens == 0 and w.decode_tokens]
    assert decode and all(c == {2: 1} for _, c in decode)
    # K/V propagation still reads the K/V projections of skipped layers: compute above 2/8
    assert all(2 / 8 < w.layer_fraction < 0.4 and w.weight_fraction == w.layer_fraction for w, _ in decode)


@pytest.mark.parametrize("kv_fill", ["propagate", "deferred"])
def test_batched_requests_with_different_exits_equal_each_alone(deep_llama, kv_fill):
    # requests join and finish at different steps, so slots move while tokens wait (deferred)
    engine = exit_engine(deep_llama, thresholds=TV_MEDIANS, kv_fill=kv_fill)
    budgets = [None, 1.0, None, None]  # one request at full depth beside early-exiting ones
    calls = [_call(f"r{i}", p, compute_budget=b) for i, (p, b) in enumerate(zip(EXIT_PROMPTS, budgets, strict=True))]
    alone = {c.request_id: _run_collect(engine, [c])[0][c.request_id] for c in calls}
    together, finals, works = _run_collect(engine, calls[:2], join_at={2: [calls[2]], 4: [calls[3]]})
    assert together == alone
    assert finals["r1"].exits.avg_exit_layer == 8
    assert {f.exits.operating_point for f in finals.values()} == {"inline", "full"}
    mixed = [c for w, c in works if w.prefill_tokens == 0 and len(c) > 1]
    assert mixed, "some decode step must have rows leaving at different exits"
    for w, counts in works:
        assert sum(counts.values()) == w.decode_tokens
        if w.prefill_tokens == 0 and w.decode_tokens and kv_fill == "propagate":
            assert w.layer_fraction <= w.weight_fraction <= 1.0
        elif w.prefill_tokens == 0 and w.decode_tokens:  # filled layers add compute, never weight reads
            assert w.weight_fraction <= 1.0


def test_deferred_tokens_catch_up_at_full_depth_with_the_full_models_answer(deep_llama):
    import torch

    engine = exit_engine(deep_llama, thresholds=[math.inf] * 3, kv_fill="deferred", max_deferred_tokens=3)
    ids, finals, works = _run_collect(engine, [_call("a", EXIT_PROMPTS[0])])
    decode = [(w, c) for w, c in works if w.prefill_tokens == 0 and w.decode_tokens]
    # three tokens leave at the first exit; the fourth runs every layer and fills their 3 x 6
    assert [next(iter(c)) for _, c in decode] == [2, 2, 2, 8, 2, 2, 2, 8, 2, 2, 2]
    for w, c in decode:
        full = next(iter(c)) == 8
        assert w.weight_fraction == (1.0 if full else 2 / 8)  # no K/V-only layers: nothing is propagated
        assert w.layer_fraction == pytest.approx((8 + 3 * 6) / 8 if full else 2 / 8)
    u = finals["a"].exits
    assert u.avg_exit_layer == pytest.approx((8 + 9 * 2 + 2 * 8) / 12)
    assert u.compute_fraction == pytest.approx((8 + 9 * 2 + 2 * 26) / 8 / 12)  # 3 last tokens never filled
    # a full-depth token saw exact K/V at every layer: it is the plain model's greedy token
    prompt = engine.validate(_call("a", EXIT_PROMPTS[0]), 0.0).prompt_ids
    out = ids["a"]
    with torch.no_grad():
        plain = engine.model(torch.tensor([prompt + out[:-1]])).logits[0].argmax(-1).tolist()
    for step in (4, 8):  # decode step k produced output token k (token 0 came from prefill)
        assert out[step] == plain[len(prompt) + step - 1]


def test_max_exit_layer_loads_fewer_layers(deep_llama):
    full = make_engine(deep_llama)
    capped = exit_engine(deep_llama, max_exit_layer=4, thresholds=[0.0])
    assert capped.info.num_layers == 4 and len(capped.runner.layers) == 4
    per_layer = sum(p.numel() for p in full.model.model.layers[0].parameters())
    assert full.info.params - capped.info.params == 4 * per_layer
    _, finals, _ = _run_collect(capped, [_call("a", EXIT_PROMPTS[0])])
    assert finals["a"].exits.num_layers == 4 and finals["a"].exits.avg_exit_layer == 4


def test_energy_budgets_map_to_depth_through_measured_joules(deep_llama, tmp_path):
    from workers.engines.torch_engine.early_exit.points import ExitProfile, OperatingPoint

    engine = exit_engine(deep_llama)
    exits = engine.exits
    points = [
        OperatingPoint(f"L{d}", (t, t, t, math.inf), d, d, c, None, (0.25,) * 4, 1.0)
        for d, t, c in ((3.0, 0.5, 0.45), (6.0, 0.2, 0.8))
    ]
    profile = ExitProfile(exits.fingerprint, "tv", 2, None, exits.layout.exits, exits.kv_share, (), None, points)
    engine = exit_engine(deep_llama, thresholds_path=str(profile.save(tmp_path / "p.json")))
    prompt_ids = len(engine.tokenizer(EXIT_PROMPTS[0]).input_ids)
    engine.observe_energy(0.001, 0.01)
    # 0.01 J per layer-token measured at full depth also paid the LM head (head layer
    # equivalents per token), so a layer costs 0.01 * 8 / (8 + head); 12 tokens at compute 0.8
    # cost 12 * (0.8 * 8 + head) layers of it, after the prompt's 8 * 0.001 J per token
    head = engine.exits.head_layers
    assert 0.1 < head < 8  # the tiny model's head is a fraction of its 8 layers
    per_layer_j = 0.01 * 8 / (8 + head)
    budget = prompt_ids * 8 * 0.001 + 12 * (0.8 * 8 + head) * per_layer_j
    _, finals, _ = _run_collect(engine, [_call("rich", EXIT_PROMPTS[0], energy_budget_j=budget),
                                         _call("poor", EXIT_PROMPTS[0], energy_budget_j=budget / 2),
                                         _call("free", EXIT_PROMPTS[0], energy_budget_j=100.0)])
    assert finals["rich"].exits.operating_point == "L6.0"
    assert finals["poor"].exits.operating_point == "L3.0"
    assert finals["free"].exits.operating_point == "full"
    saved = finals["poor"].exits
    assert saved.layers_skipped > 0 and saved.compute_fraction < 1
    # the estimate: compute skipped (K/V propagation netted out) at the per-layer rate
    assert saved.energy_saved_j == pytest.approx(12 * (1 - saved.compute_fraction) * 8 * per_layer_j)
    # exactly L6's cost if energy fell in proportion to depth (no head): short of it now
    proportional = prompt_ids * 8 * 0.001 + 12 * 0.8 * 8 * 0.01
    _, finals, _ = _run_collect(engine, [_call("tight", EXIT_PROMPTS[0], energy_budget_j=proportional)])
    assert finals["tight"].exits.operating_point == "L3.0"


def test_profile_tracks_joules_per_layer_token_and_the_exit_histogram():
    from wattserve.types import StepWork
    from workers.engines.base import StepTimings
    from workers.profile import ProfileTracker

    prof = ProfileTracker(alpha=1.0, num_layers=8)
    prof.observe(StepTimings(prefill_s=0.1, prefill_tokens=10), 0.8, 10, StepWork(prefill_tokens=10))
    assert prof.prefill_j_per_layer_token == pytest.approx(0.8 / 80) and prof.decode_j_per_layer_token is None
    # 4 decode tokens at a quarter of full compute: 4 * 0.25 * 8 = 8 layer-tokens
    prof.observe(StepTimings(decode_s=0.01, decode_batch=4), 0.4, 4,
                 StepWork(decode_tokens=4, layer_fraction=0.25), {2: 4})
    assert prof.decode_j_per_layer_token == pytest.approx(0.05)
    prof.observe(StepTimings(), 1.0, 5, StepWork(prefill_tokens=1, decode_tokens=4), {8: 4})  # mixed: skipped
    assert prof.decode_j_per_layer_token == pytest.approx(0.05)
    assert {d: n for d, n in prof.exit_histogram.items() if n} == {2: 4, 8: 4}
