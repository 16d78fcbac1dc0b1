"""Early exit's energy saving: the gross estimate beside the saving net of measured joules."""

from __future__ import annotations

import math
from functools import partial

import pytest

from tests.fakes import Collector, FakeDevice
from tests.workers.engine_helpers import EXIT_PROMPTS, exit_engine
from wattserve.types import GenerateCall, SamplingParams, StepWork
from workers.energy import ExitSavingMeter
from workers.loop import EngineLoop


def test_meter_compares_early_exit_steps_with_full_depth_ones_of_the_same_batch():
    meter = ExitSavingMeter(alpha=1.0)
    meter.observe(2.0, 0, {"a": 1, "b": 1}, probed=False)  # full depth, batch 2: 1 J per row
    meter.observe(2.4, 0, {"a": 1, "b": 1}, probed=True)  # early exit cost more: -0.2 J per row
    meter.observe(1.0, 0, {"a": 1, "b": 1}, probed=True)  # +0.5 J per row
    meter.observe(9.0, 5, {"a": 1, "c": 5}, probed=True)  # prefilled too: no reference
    meter.observe(0.3, 0, {"a": 1, "b": 1, "c": 1}, probed=True)  # batch 3 never ran at full depth
    assert meter.close("a") == pytest.approx(0.3) and meter.close("b") == pytest.approx(0.3)
    assert meter.close("c") is None and meter.close("a") is None  # closed once


def decode_cost_j(fixed_j: float, per_layer_j: float, work: StepWork) -> float:
    """A modeled step: ``fixed_j + per_layer_j * layer_fraction`` per decode token, ``fixed_j``
    being what early exit cannot skip (head, probes, launch overhead); prefill 0.01 J a token."""
    cost_j = 0.01 * work.prefill_tokens
    if work.decode_tokens and not work.prefill_tokens:
        cost_j += work.decode_tokens * (fixed_j + per_layer_j * work.layer_fraction)
    return cost_j


def serve_one(loop, rid, **kw):
    sink = Collector()
    loop.submit(GenerateCall(rid, EXIT_PROMPTS[0], max_tokens=12, sampling=SamplingParams(ignore_eos=True), **kw), sink)
    assert sink.done.wait(60) and sink.error is None
    return sink.usage.exits


@pytest.mark.parametrize(("fixed_j", "per_layer_j"), [(1.0, 0.0), (0.2, 1.0)])
def test_gross_estimate_and_net_saving_on_a_device_that_saves_nothing_or_something(deep_llama, fixed_j, per_layer_j):  # noqa: F811
    engine = exit_engine(deep_llama, thresholds=[math.inf] * 3)  # every early-exit token leaves at layer 2
    loop = EngineLoop(engine, FakeDevice(partial(decode_cost_j, fixed_j, per_layer_j)), max_queue=2)
    loop.start()
    try:
        full = serve_one(loop, "full", compute_budget=1.0)  # batch 1 at full depth: the reference
        early = serve_one(loop, "early")
    finally:
        loop.stop()
    assert full.operating_point == "full" and full.energy_saved_j == 0.0
    assert full.energy_saved_net_j is None  # never probed: nothing to compare
    assert early.layers_skipped > 0 and early.energy_saved_j > 0.1  # the gross estimate claims a saving
    reference_j = fixed_j + per_layer_j  # one full-depth decode token
    decode_tokens = 11  # the first token came from prefill
    if per_layer_j == 0.0:
        # depth does not change what this device draws: measured, nothing was saved
        assert early.energy_saved_net_j == pytest.approx(0.0, abs=1e-9)
    else:
        # batch 1: each decode step's layer_fraction is its row's; compute_fraction averages the
        # prefill token (1.0) with the 11 decode tokens' fractions
        spent = decode_tokens * fixed_j + per_layer_j * (12 * early.compute_fraction - 1.0)
        assert early.energy_saved_net_j == pytest.approx(decode_tokens * reference_j - spent, rel=1e-6)
        assert 0 < early.energy_saved_net_j < early.energy_saved_j + decode_tokens * fixed_j
