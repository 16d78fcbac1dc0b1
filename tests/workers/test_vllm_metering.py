"""The vLLM engine's per-step metering, driven with recorded-shape step data (no engine needed):
vLLM's output batches and scheduler stats are plain values here, the device a counter we move."""

from __future__ import annotations

import random
import threading
from types import SimpleNamespace

import pytest

from tests.fakes import FakeDevice
from wattserve.types import StepWork
from workers.energy import EnergyLedger
from workers.engines.vllm_engine.metering import StepMeter, tap_outputs
from workers.profile import ProfileTracker


def state(rid: str, prefilling: bool, prompt_len: int = 5):
    """What vLLM's OutputProcessor keeps per request (the fields the meter reads)."""
    return SimpleNamespace(is_prefilling=prefilling, prompt_len=prompt_len, external_req_id=rid)


def output(internal_id: str, tokens: int = 1, computed: int | None = None):
    stats = None if computed is None else SimpleNamespace(num_computed_tokens=computed)
    return SimpleNamespace(request_id=internal_id, new_token_ids=[7] * tokens, prefill_stats=stats)


def stats(ctx_tokens=0, ctx_reqs=0, gen_tokens=0, gen_reqs=0, elapsed_ms=10.0, running=0, waiting=0, kv=0.0):
    details = SimpleNamespace(num_ctx_tokens=ctx_tokens, num_ctx_requests=ctx_reqs, num_generation_tokens=gen_tokens,
                              num_generation_requests=gen_reqs, elapsed_ms=elapsed_ms, is_dummy=False)
    return SimpleNamespace(iteration_details=details, num_running_reqs=running, num_waiting_reqs=waiting,
                           kv_cache_usage=kv)


@pytest.fixture
def meter():
    device = FakeDevice()
    m = StepMeter(device, EnergyLedger(device.energy_source), ProfileTracker(alpha=1.0), threading.Lock())
    m.start()
    return m


def step(meter, states, outputs, scheduler_stats, joules, still_busy=True):
    """One vLLM step: the device spends ``joules``, the outputs are processed, stats recorded."""
    meter.device.joules += joules
    meter.on_outputs(outputs, states)
    for out in outputs:  # vLLM's OutputProcessor marks the prefill done after the first output
        states[out.request_id].is_prefilling = False
    meter.on_step(scheduler_stats, still_busy=still_busy)


def test_prefill_and_decode_steps_split_energy_by_tokens(meter):
    states = {"a-x1": state("a", True), "b-x2": state("b", True, prompt_len=9)}
    meter.work_arrived()
    # step 1: a's prompt (5 tokens, all computed) and its first token
    step(meter, states, [output("a-x1", computed=5)], stats(ctx_tokens=5, ctx_reqs=1), 6.0)
    assert meter.ledger.charged("a") == pytest.approx(6.0)
    # step 2: a decodes one token, b's 9-token prompt (3 were prefix-cache hits) gives its first
    step(meter, states, [output("a-x1"), output("b-x2", computed=6)],
         stats(ctx_tokens=6, ctx_reqs=1, gen_tokens=1, gen_reqs=1, running=2, kv=0.25), 8.0)
    assert meter.ledger.charged("a") == pytest.approx(6.0 + 8.0 * 1 / 8)
    assert meter.ledger.charged("b") == pytest.approx(8.0 * 7 / 8)
    assert meter.load.running == 2 and meter.load.kv_cache_usage == 0.25
    totals = meter.ledger.totals()
    assert totals.requests_j + totals.idle_j == pytest.approx(totals.device_j) == pytest.approx(14.0)


def test_profile_takes_the_cores_step_time_and_leaves_mixed_steps_out_of_phase_figures(meter):
    states = {"a": state("a", True), "b": state("b", True)}
    meter.work_arrived()
    step(meter, states, [output("a", computed=10)], stats(ctx_tokens=10, ctx_reqs=1, elapsed_ms=50.0), 1.0)
    assert meter.profile.prefill_ms_per_token == pytest.approx(5.0)
    step(meter, states, [output("a")], stats(gen_tokens=1, gen_reqs=1, elapsed_ms=20.0), 1.0)
    assert meter.profile.decode_ms_per_token == pytest.approx(20.0)
    assert meter.profile.decode_ms_by_batch == {1: pytest.approx(20.0)}
    step(meter, states, [output("a"), output("b", computed=4)],
         stats(ctx_tokens=4, ctx_reqs=1, gen_tokens=1, gen_reqs=1, elapsed_ms=400.0), 6.0)
    assert meter.profile.prefill_ms_per_token == pytest.approx(5.0)  # mixed: not a prefill figure
    assert meter.profile.decode_ms_per_token == pytest.approx(20.0)
    assert meter.profile.j_per_token == pytest.approx(6.0 / 5)  # ... but it does count for J/token
    assert meter.profile.busy_power_w == pytest.approx(6.0 / 0.4)


def test_a_prefill_chunk_without_output_is_carried_to_the_step_that_answers(meter):
    states = {"long": state("long", True, prompt_len=3000)}
    meter.work_arrived()
    step(meter, states, [], stats(ctx_tokens=2048, ctx_reqs=1), 5.0)  # chunked prefill, no output yet
    assert meter.ledger.totals().device_j == 0.0  # carried, not idle
    step(meter, states, [output("long", computed=3000)], stats(ctx_tokens=952, ctx_reqs=1), 3.0)
    assert meter.ledger.charged("long") == pytest.approx(8.0)
    assert meter.ledger.totals().idle_j == 0.0


def test_finish_books_the_rest_so_the_run_matches_the_counter(meter):
    states = {"a": state("a", True, prompt_len=4)}
    meter.work_arrived()
    step(meter, states, [], stats(ctx_tokens=2, ctx_reqs=1), 5.0)  # carried: no output yet
    meter.device.joules += 1.5  # the engine stops mid-request, after the last step's reading
    meter.finish()
    totals = meter.ledger.totals()
    assert totals.requests_j + totals.idle_j == pytest.approx(meter.device.joules)  # 6.5 J drawn since start
    assert meter.device.hooks[-1][0] == "end"  # the modeled step was closed


def test_idle_time_is_booked_apart_and_a_step_without_work_is_idle(meter):
    meter.device.joules += 2.0
    meter.idle_tick()
    assert meter.ledger.totals().idle_j == pytest.approx(2.0)
    meter.work_arrived()
    step(meter, {}, [], stats(), 1.0, still_busy=False)  # vLLM reported stats, computed nothing
    assert meter.ledger.totals().idle_j == pytest.approx(3.0)


def test_finished_requests_wait_until_their_last_step_is_booked(meter):
    states = {"a": state("a", True)}
    meter.work_arrived()
    seen = []
    meter.device.joules += 4.0
    meter.on_outputs([output("a", computed=5)], states)  # the step is open
    meter.when_metered(lambda: seen.append(meter.ledger.close("a")))
    assert seen == []  # the consumer got the final output before vLLM recorded the step
    meter.on_step(stats(ctx_tokens=5, ctx_reqs=1), still_busy=False)
    assert seen == [pytest.approx(4.0)]
    meter.when_metered(lambda: seen.append("now"))  # no step open: at once
    assert seen[-1] == "now"


def test_modeled_devices_get_one_step_per_vllm_step_and_settle_after_an_abort(meter):
    states = {"a": state("a", True)}
    meter.work_arrived()
    step(meter, states, [output("a", computed=5)], stats(ctx_tokens=5, ctx_reqs=1), 1.0)
    step(meter, states, [output("a")], stats(gen_tokens=1, gen_reqs=1), 1.0)
    # the request is aborted between steps: vLLM sends nothing more
    meter.device.joules += 0.5
    meter.settle()
    hooks = meter.device.hooks
    assert [h for h, _ in hooks] == ["begin", "end", "begin", "end", "begin", "end"]
    assert hooks[1][1] == StepWork(prefill_tokens=5, decode_tokens=0, batch_size=1)
    assert hooks[3][1] == StepWork(prefill_tokens=0, decode_tokens=1, batch_size=1)
    assert hooks[5][1].tokens == 0
    assert meter.ledger.totals().idle_j == pytest.approx(0.5)


def test_conservation_over_a_random_history(meter):
    rng = random.Random(3)
    states: dict = {}
    spent = 0.0
    closed = 0.0
    meter.work_arrived()
    for k in range(500):
        if rng.random() < 0.2:
            states[f"r{k}"] = state(f"r{k}", True, prompt_len=rng.randint(1, 300))
        outs = [output(rid, computed=s.prompt_len if s.is_prefilling else None) for rid, s in states.items()
                if rng.random() < 0.9]
        joules = rng.random() * 2
        spent += joules
        ctx = sum(s.prompt_len for rid, s in states.items() if s.is_prefilling)
        step(meter, states, outs, stats(ctx_tokens=ctx, ctx_reqs=1 if ctx else 0, gen_tokens=len(outs), gen_reqs=len(outs)),
             joules, still_busy=bool(states))
        for rid in list(states):
            if rng.random() < 0.1:
                closed += meter.ledger.close(rid)
                del states[rid]
        if rng.random() < 0.05:
            idle = rng.random()
            spent += idle
            meter.device.joules += idle
            meter.settle()
    totals = meter.ledger.totals()
    open_j = sum(meter.ledger.charged(r) for r in states)
    # the last steps may still be carried (prefill chunks without output): they are not lost
    assert totals.device_j + meter._carry_j == pytest.approx(spent, rel=1e-9)
    assert closed + open_j + totals.idle_j == pytest.approx(totals.device_j, rel=1e-9)


def test_tap_refuses_a_vllm_without_the_hooked_interface():
    with pytest.raises(RuntimeError, match="supports the vLLM 0.32 line"):
        tap_outputs(SimpleNamespace(output_processor=SimpleNamespace()), lambda outs, states: None)
    seen = []
    processor = SimpleNamespace(request_states={"x": 1}, process_outputs=lambda outs, *a, **k: ("done", outs))
    tap_outputs(SimpleNamespace(output_processor=processor), lambda outs, states: seen.append((outs, states)))
    assert processor.process_outputs(["o"], 1.0, None) == ("done", ["o"])
    assert seen == [(["o"], {"x": 1})]
