"""The capacity planner's invariants, on the tabulated A100 profile (70B over 8 GPUs)."""

from __future__ import annotations

import numpy as np
import pytest
from pydantic import ValidationError

from runtime.capacity.planner import (
    SLO,
    PlannerConfig,
    PoolLoad,
    PoolSpec,
    PoolState,
    merge_loads,
    plan_pool,
    plan_sharing,
    predict,
)
from runtime.capacity.profile import replica_profile_from_device


@pytest.fixture(scope="module")
def profile():
    return replica_profile_from_device("a100", gpus=8, model_params=70e9, max_batch=64)


def spec(**kw) -> PoolSpec:
    base = dict(name="hp", priority="high", slo=SLO(ttft_ms=2000, tpot_ms=100), min_replicas=1, max_replicas=20,
                cold_start_s=60.0, cold_start_energy_j=1e5)
    return PoolSpec(**{**base, **kw})


def load(rate: float, **kw) -> PoolLoad:
    return PoolLoad(rate, rate, 1155.0, 4142.0, 211.0, **kw)


CFG = PlannerConfig(scale_down_delay_s=0.0)


@pytest.mark.parametrize("rate", [0.2, 1.0, 4.0, 10.0, 25.0])
def test_chosen_clock_is_the_lowest_meeting_the_slo(profile, rate):
    s = spec()
    plan = plan_pool(load(rate), PoolState(0.0, 5), s, profile, CFG)
    assert plan.slo_met
    ci = int(np.searchsorted(profile.clocks_mhz, plan.clock_mhz))
    planned = rate * CFG.load_headroom
    pred = predict(profile, planned, load(rate), plan.replicas, ci)
    assert pred.ttft_s[0] * 1e3 <= CFG.slo_margin * s.slo.ttft_ms
    assert pred.tpot_s[0] * 1e3 <= CFG.slo_margin * s.slo.tpot_ms
    assert plan.predicted_tpot_ms == pytest.approx(pred.tpot_s[0] * 1e3)
    if ci > 0:  # one step lower misses the SLO (or a limit) with the same replicas
        lower = predict(profile, planned, load(rate), plan.replicas, ci - 1)
        assert (lower.ttft_s[0] * 1e3 > CFG.slo_margin * s.slo.ttft_ms
                or lower.tpot_s[0] * 1e3 > CFG.slo_margin * s.slo.tpot_ms
                or lower.prefill_fraction[0] > CFG.max_prefill_fraction
                or lower.batch[0] > CFG.max_batch_fill * profile.max_batch)


def test_more_load_never_fewer_replicas(profile):
    counts = [plan_pool(load(r), PoolState(0.0, 1), spec(), profile, CFG).replicas
              for r in (0.1, 0.5, 1, 2, 4, 8, 16, 32)]
    assert counts == sorted(counts)
    assert counts[0] < counts[-1]


@pytest.mark.parametrize("budget_w", [2500.0, 6000.0, 15000.0])
@pytest.mark.parametrize("rate", [1.0, 8.0, 30.0])
def test_never_plans_above_the_power_budget(profile, budget_w, rate):
    plan = plan_pool(load(rate), PoolState(0.0, 3), spec(), profile, CFG, power_budget_w=budget_w)
    assert plan.predicted_power_w <= budget_w
    unconstrained = plan_pool(load(rate), PoolState(0.0, 3), spec(), profile, CFG)
    if unconstrained.predicted_power_w > budget_w:
        assert plan.predicted_power_w < unconstrained.predicted_power_w


def test_budget_fraction_leaves_headroom(profile):
    cfg = CFG.model_copy(update={"budget_fraction": 0.8})
    plan = plan_pool(load(8.0), PoolState(0.0, 3), spec(), profile, cfg, power_budget_w=10000.0)
    assert plan.predicted_power_w <= 8000.0


def test_unreachable_slo_is_best_effort_and_says_so(profile):
    plan = plan_pool(load(200.0), PoolState(0.0, 3), spec(max_replicas=2), profile, CFG)
    assert not plan.slo_met and plan.replicas == 2 and plan.clock_mhz == profile.clocks_mhz[-1]
    assert "best effort" in plan.reason


def test_scale_to_zero_only_after_the_idle_delay(profile):
    s, cfg = spec(min_replicas=0), PlannerConfig(scale_to_zero_after_s=300.0)
    quiet = load(0.0)
    early = plan_pool(quiet, PoolState(1000.0, 1, idle_since_s=701.0), s, profile, cfg)
    late = plan_pool(quiet, PoolState(1000.0, 1, idle_since_s=700.0), s, profile, cfg)
    assert early.replicas >= 1 and late.replicas == 0
    assert "release every replica" in late.reason and late.predicted_power_w == 0.0
    # the waking request's TTFT counts the cold start
    assert late.predicted_ttft_ms >= s.cold_start_s * 1e3
    # work in flight or a min of one keeps a replica
    assert plan_pool(load(0.0, busy=True), PoolState(1000.0, 1, idle_since_s=0.0), s, profile, cfg).replicas >= 1
    assert plan_pool(quiet, PoolState(1000.0, 1, idle_since_s=0.0), spec(min_replicas=1), profile, cfg).replicas == 1


def test_cold_pool_counts_the_start_in_predicted_ttft(profile):
    warm = plan_pool(load(2.0), PoolState(0.0, 2), spec(), profile, CFG)
    cold = plan_pool(load(2.0), PoolState(0.0, 0, replicas_starting=2, cold_start_left_s=40.0), spec(), profile, CFG)
    assert cold.predicted_ttft_ms == pytest.approx(warm.predicted_ttft_ms + 40e3, rel=0.05)
    assert "cold" in cold.reason and not cold.slo_met  # 40 s of start-up > the 2 s TTFT SLO
    zero = plan_pool(load(2.0), PoolState(0.0, 0), spec(min_replicas=0), profile, CFG)
    assert zero.replicas >= 1 and zero.predicted_ttft_ms >= 60e3


def test_scale_down_waits_for_the_delay(profile):
    cfg = PlannerConfig(scale_down_delay_s=120.0)
    first = plan_pool(load(0.5), PoolState(0.0, 10), spec(), profile, cfg)
    assert first.replicas == 10 and first.shrink_since_s == 0.0 and "holding" in first.reason
    later = plan_pool(load(0.5), PoolState(130.0, 10, shrink_since_s=first.shrink_since_s), spec(), profile, cfg)
    assert later.replicas < 10


def test_consolidation_fewer_fuller_replicas_at_low_load(profile):
    plan = plan_pool(load(1.0), PoolState(0.0, 10), spec(max_replicas=10), profile, CFG)
    spread = predict(profile, 1.0 * CFG.load_headroom, load(1.0), 10, int(np.searchsorted(profile.clocks_mhz,
                                                                                            plan.clock_mhz)))
    assert plan.replicas < 10 and plan.predicted_power_w < spread.power_w[0]


def test_policy_switches_pin_count_or_clock(profile):
    clocks_only = plan_pool(load(1.0), PoolState(0.0, 20), spec(), profile, CFG, scale=False)
    assert clocks_only.replicas == 20 and clocks_only.clock_mhz < profile.clocks_mhz[-1]
    count_only = plan_pool(load(1.0), PoolState(0.0, 20), spec(), profile, CFG, dvfs=False)
    assert count_only.clock_mhz == profile.clocks_mhz[-1] and count_only.replicas < 20


def test_queue_raises_the_plan(profile):
    calm = plan_pool(load(2.0), PoolState(0.0, 1), spec(), profile, CFG)
    queued = plan_pool(load(2.0, queued_requests=200.0), PoolState(0.0, 1), spec(), profile, CFG)
    assert queued.replicas > calm.replicas


def test_config_is_strict():
    with pytest.raises(ValidationError):
        PlannerConfig(headroom=2.0)
    with pytest.raises(ValidationError):
        spec(min_replicas=5, max_replicas=2)
    with pytest.raises(ValidationError):
        SLO(ttft_ms=0, tpot_ms=50)


def test_profile_tables_follow_the_device_model(profile):
    # decode is memory-bound: a lower clock barely slows it; prefill slows ~1/clock
    assert profile.decode_step_s[0, 8] / profile.decode_step_s[-1, 8] < 1.1
    ratio = profile.clocks_mhz[-1] / profile.clocks_mhz[0]
    assert profile.prefill_s_per_token[0] / profile.prefill_s_per_token[-1] == pytest.approx(ratio, rel=0.1)
    # J per decoded token falls with batch
    j_tok = profile.decode_power_w[-1, 1:] * profile.decode_step_s[-1, 1:] / np.arange(1, 65)
    assert j_tok[-1] < j_tok[0] / 10
    assert profile.energy_source == "modeled:a100"


def test_memory_clock_sensitivity_lowers_decode_power_at_low_clock(profile):
    flat = profile
    scaled = replica_profile_from_device("a100", gpus=8, model_params=70e9, max_batch=64, mem_clock_power_exponent=1.0)
    assert scaled.energy_source == "modeled:a100-memclock1"
    np.testing.assert_allclose(scaled.decode_power_w[-1], flat.decode_power_w[-1])  # same at the max clock
    assert scaled.decode_power_w[0, 8] < 0.8 * flat.decode_power_w[0, 8]
    np.testing.assert_allclose(scaled.decode_step_s, flat.decode_step_s)  # latency unchanged


def test_a_feasible_clock_is_kept_unless_changing_saves_enough(profile):
    free = plan_pool(load(4.0), PoolState(0.0, 3), spec(), profile, CFG)
    higher = float(profile.clocks_mhz[int(np.searchsorted(profile.clocks_mhz, free.clock_mhz)) + 1])
    sticky = CFG.model_copy(update={"clock_change_min_saving": 0.5})
    kept = plan_pool(load(4.0), PoolState(0.0, free.replicas, clock_mhz=higher), spec(), profile, sticky)
    assert kept.clock_mhz == higher and "clock kept" in kept.reason
    eager = CFG.model_copy(update={"clock_change_min_saving": 0.0})
    moved = plan_pool(load(4.0), PoolState(0.0, free.replicas, clock_mhz=higher), spec(), profile, eager)
    assert moved.clock_mhz == free.clock_mhz


def test_pinned_count_plans_only_the_clock(profile):
    plan = plan_pool(load(6.0), PoolState(0.0, 4), spec(), profile, CFG, replicas=4)
    assert plan.replicas == 4
    busier = plan_pool(load(12.0), PoolState(0.0, 4), spec(), profile, CFG, replicas=4)
    assert busier.replicas == 4 and busier.clock_mhz >= plan.clock_mhz
    with pytest.raises(ValueError):
        plan_pool(load(1.0), PoolState(0.0, 0), spec(), profile, CFG, replicas=0)


def low_spec(**kw) -> PoolSpec:
    return spec(name="lp", priority="low", slo=SLO(ttft_ms=10000, tpot_ms=200), min_replicas=0, **kw)


def test_merged_load_adds_rates_and_keeps_the_larger_p99():
    a = PoolLoad(1.0, 2.0, 1000.0, 4000.0, 100.0, queued_requests=1.0, arrival_rate_peak_rps=3.0)
    b = PoolLoad(1.0, 2.0, 2000.0, 7000.0, 300.0, busy=True, arrival_rate_peak_rps=1.0)
    m = merge_loads(a, b)
    assert (m.arrival_rate_rps, m.arrival_rate_ewma_rps, m.arrival_rate_peak_rps) == (2.0, 4.0, 4.0)
    assert m.prompt_tokens_mean == pytest.approx(1500.0) and m.prompt_tokens_p99 == 7000.0
    assert m.output_tokens_mean == pytest.approx(200.0) and m.queued_requests == 1.0 and m.busy


def test_sharing_at_low_load_waits_for_its_delay_then_shares(profile):
    cfg = PlannerConfig(scale_down_delay_s=120.0)
    quiet = load(0.3)
    first = plan_sharing(quiet, quiet, spec(), low_spec(), profile, cfg, shared=False, now_s=0.0, wanted_since_s=None)
    assert not first.shared and first.wanted_since_s == 0.0 and "wanted for" in first.reason
    later = plan_sharing(quiet, quiet, spec(), low_spec(), profile, cfg, shared=False, now_s=130.0,
                         wanted_since_s=first.wanted_since_s)
    assert later.shared and "share" in later.reason
    # one shared replica draws less than one per class: that is the whole point
    assert "1 shared replica(s)" in later.reason


def test_sharing_splits_at_once_when_the_load_rises(profile):
    busy = load(12.0)
    d = plan_sharing(busy, busy, spec(), low_spec(), profile, CFG, shared=True, now_s=0.0, wanted_since_s=0.0,
                     max_shared_replicas=1)
    assert not d.shared and d.wanted_since_s is None and d.reason.startswith("split")


def test_sharing_never_with_a_low_class_floor(profile):
    d = plan_sharing(load(0.1), load(0.1), spec(), low_spec().model_copy(update={"min_replicas": 1}), profile, CFG,
                     shared=False, now_s=1e4, wanted_since_s=0.0)
    assert not d.shared and "never shared" in d.reason


@pytest.mark.parametrize("ready", [0, 2])
def test_starting_replicas_count_their_start_up_power_against_the_budget(profile, ready):
    # a replica loading its weights draws cold_start_energy_j / cold_start_s on top of the pool's
    # serving power; a scale-up from a cold (or small) pool must fit the budget with it, or a burst's
    # scale-up is the row's peak (the four brakes of both+polca on the code trace)
    s = spec(cold_start_energy_j=9.6e4, max_replicas=9)  # 1600 W while starting: 8 x A100 at half TDP
    budget = 8000.0
    plan = plan_pool(load(13.0), PoolState(0.0, ready), s, profile, CFG, power_budget_w=budget)
    starting_w = max(0, plan.replicas - ready) * s.cold_start_energy_j / s.cold_start_s
    assert plan.startup_power_w == pytest.approx(starting_w)
    assert plan.predicted_power_w + starting_w <= budget
    assert plan.replicas > ready and f"+{starting_w:.0f} W until ready" in plan.reason
    free = plan_pool(load(13.0), PoolState(0.0, ready), s.model_copy(update={"cold_start_energy_j": 0.0}), profile,
                     CFG, power_budget_w=budget)
    assert free.replicas > plan.replicas  # with free starts the same budget buys more replicas


def test_replicas_already_starting_are_held_not_cancelled_for_their_start_up_power(profile):
    # 2 ready, 3 starting (priced when they were started); the load now fits fewer: the scale-down
    # delay holds all 5 while their serving power fits the budget, rather than cancelling the three
    # to shed start-up power and starting them again at the next rise
    s = spec(cold_start_energy_j=9.6e4, max_replicas=9)
    cfg = PlannerConfig(scale_down_delay_s=120.0)
    state = PoolState(100.0, 2, replicas_starting=3, cold_start_left_s=30.0)
    budget = plan_pool(load(4.0), state, s, profile, cfg, replicas=5).predicted_power_w + 2000.0
    plan = plan_pool(load(4.0), state, s, profile, cfg, power_budget_w=budget)
    assert plan.replicas == 5 and "holding 5" in plan.reason
    assert plan.predicted_power_w <= budget < plan.predicted_power_w + 3 * 1600.0
