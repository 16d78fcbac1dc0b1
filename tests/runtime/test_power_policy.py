"""The POLCA policy as pure code: thresholds, priorities, hysteresis, brake, fail-safe, delay."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from runtime.power.config import PowerConfig
from runtime.power.policy import HIGH, LOW, PolicyConfig, PowerPolicy, classify_priority
from wattserve.errors import InvalidRequest
from wattserve.power import CapLevel, EventKind
from wattserve.types import StepWork
from workers.devices.simulated import SimulatedDevice

P = 1000.0  # provisioned budget in W: T1 = 800, T2 = 890, brake = 1000
A100 = dict(max_sm_clock_mhz=1410.0, min_sm_clock_mhz=210.0)
H100 = dict(max_sm_clock_mhz=1980.0, min_sm_clock_mhz=345.0)


def policy(**overrides) -> PowerPolicy:
    return PowerPolicy(PolicyConfig(**{"dwell_s": 10.0, "settle_s": 2.0, **overrides}), P)


def feed(pol: PowerPolicy, readings, start_s: float = 0.0, step_s: float = 2.0) -> list:
    """Feed one reading per ``step_s``; returns the level after each."""
    return [pol.update(start_s + i * step_s, w).level for i, w in enumerate(readings)]


def clocks(pol: PowerPolicy, gpu=A100) -> tuple[float | None, float | None]:
    return (pol.target(LOW, gpu["max_sm_clock_mhz"], gpu["min_sm_clock_mhz"]).sm_clock_mhz,
            pol.target(HIGH, gpu["max_sm_clock_mhz"], gpu["min_sm_clock_mhz"]).sm_clock_mhz)


def test_threshold_crossings_and_priority_order():
    pol = policy()
    assert feed(pol, [500, 799]) == [CapLevel.NONE, CapLevel.NONE]
    assert clocks(pol) == (None, None)
    pol.update(10.0, 800)  # at T1: low priority first, high untouched
    assert pol.level == CapLevel.T1 and clocks(pol) == (1275.0, None)
    pol.update(12.0, 889)
    assert pol.level == CapLevel.T1
    pol.update(14.0, 890)  # at T2: low lower, high moderately
    assert pol.level == CapLevel.T2 and clocks(pol) == (1110.0, 1305.0)
    low, high = clocks(pol)
    assert low < high  # low priority is always capped at least as hard as high


def test_jump_straight_to_t2_and_events_carry_reasons():
    pol = policy()
    decision = pol.update(0.0, 950)
    assert decision.level == CapLevel.T2 and decision.previous == CapLevel.NONE and decision.changed
    [(kind, reason)] = decision.events
    assert kind == EventKind.LEVEL and "NONE -> T2" in reason and "950 W" in reason and "0.89 P" in reason


def test_clock_targets_scale_to_each_gpu_and_clamp():
    pol = policy()
    pol.update(0.0, 900)
    low, high = clocks(pol, H100)
    assert low == pytest.approx(round(1110 * 1980 / 1410)) and high == pytest.approx(round(1305 * 1980 / 1410))
    tiny = pol.target(LOW, max_sm_clock_mhz=1300.0, min_sm_clock_mhz=1100.0)  # floor above the scaled target
    assert tiny.sm_clock_mhz == 1100.0


def test_hysteresis_no_oscillation_on_a_signal_hovering_at_t1():
    pol = policy()
    hovering = [795, 805, 798, 802, 790, 810, 799, 801] * 10  # +-10 W around T1 = 800 W for 160 s
    levels = feed(pol, hovering)
    assert levels[0] == CapLevel.NONE and set(levels[1:]) == {CapLevel.T1}  # capped once, never released
    # the same signal without margin and dwell flaps at almost every reading
    bare = feed(policy(release_margin_fraction=0.0, dwell_s=0.0, settle_s=0.0), hovering)
    assert sum(1 for a, b in zip(bare, bare[1:], strict=False) if a != b) > 40


def test_release_needs_margin_and_dwell_one_level_at_a_time():
    pol = policy(dwell_s=10.0, settle_s=0.0)
    pol.update(0.0, 950)
    assert pol.level == CapLevel.T2
    # 845 W is below T2 but not 5% (50 W) below it: no release however long it lasts
    assert set(feed(pol, [845] * 20, start_s=2.0)) == {CapLevel.T2}
    # 840 W is: released to T1 only after 10 s there
    levels = feed(pol, [840] * 7, start_s=50.0)
    assert levels[:5] == [CapLevel.T2] * 5 and levels[5] == CapLevel.T1
    # then T1 needs <= 750 W for another 10 s
    assert set(feed(pol, [760] * 10, start_s=70.0)) == {CapLevel.T1}
    levels = feed(pol, [740] * 6, start_s=100.0)
    assert levels[:5] == [CapLevel.T1] * 5 and levels[5] == CapLevel.NONE


def test_a_spike_during_dwell_restarts_it():
    pol = policy(dwell_s=6.0, settle_s=0.0)
    pol.update(0.0, 820)
    levels = feed(pol, [700, 700, 780, 700, 700, 700, 700], start_s=2.0)
    assert levels[:6] == [CapLevel.T1] * 6  # 780 W > 750 W reset the dwell clock
    assert levels[6] == CapLevel.NONE


def test_settle_time_blocks_release_right_after_a_change():
    pol = policy(dwell_s=0.0, settle_s=5.0)
    pol.update(0.0, 820)
    assert pol.update(2.0, 100).level == CapLevel.T1  # actuation has not shown in power yet
    assert pol.update(4.0, 100).level == CapLevel.T1
    assert pol.update(6.0, 100).level == CapLevel.NONE


def test_power_brake_at_budget_and_its_release():
    pol = policy(dwell_s=4.0, settle_s=0.0)
    decision = pol.update(0.0, 1000.0)
    assert decision.level == CapLevel.BRAKE
    assert [k for k, _ in decision.events] == [EventKind.BRAKE, EventKind.LEVEL]
    low = pol.target(LOW, 1410.0, 210.0, min_power_limit_w=100.0)
    high = pol.target(HIGH, 1410.0, 210.0, min_power_limit_w=100.0)
    assert low == high and low.sm_clock_mhz == 210.0 and low.power_limit_w == 100.0
    levels = feed(pol, [960, 940, 940, 940], start_s=2.0)  # <= 950 W (P - 5%) for 4 s
    assert levels == [CapLevel.BRAKE, CapLevel.BRAKE, CapLevel.BRAKE, CapLevel.T2]
    assert pol.braked_s == pytest.approx(8.0)


def test_lost_telemetry_fails_safe():
    pol = policy(dwell_s=2.0, settle_s=0.0)
    pol.update(0.0, 900)
    decision = pol.update(2.0, 100.0, telemetry_ok=False)
    assert decision.level == CapLevel.T2
    assert [k for k, _ in decision.events] == [EventKind.ALERT]  # raised once...
    for t in range(4, 60, 2):  # ...and caps stay however low the partial reading is
        d = pol.update(float(t), 100.0, telemetry_ok=False)
        assert d.level == CapLevel.T2 and not d.events
    assert pol.update(60.0, None).level == CapLevel.T2  # nothing known at all: hold too
    d = pol.update(62.0, 1005.0, telemetry_ok=False)  # what is known can still tighten
    assert d.level == CapLevel.BRAKE
    d = pol.update(64.0, 100.0)  # telemetry back: recovered, and release starts from now
    assert EventKind.RECOVERED in [k for k, _ in d.events] and d.level == CapLevel.BRAKE
    assert pol.update(66.0, 100.0).level == CapLevel.T2


def test_presets_are_the_baselines():
    lp_only = policy(preset="lp-only")
    lp_only.update(0.0, 950)
    assert lp_only.level == CapLevel.T2 and clocks(lp_only) == (1110.0, None)
    one = policy(preset="all-one-threshold")
    one.update(0.0, 820)
    assert clocks(one) == (1110.0, 1110.0)
    one.update(2.0, 950)  # no second threshold
    assert one.level == CapLevel.T1
    none = policy(preset="none")
    assert feed(none, [850, 950, 999]) == [CapLevel.NONE] * 3
    assert none.update(8.0, 1001).level == CapLevel.BRAKE


def test_budget_changes_at_run_time_and_monitor_only():
    pol = policy(dwell_s=0.0, settle_s=0.0)
    pol.update(0.0, 850)
    assert pol.level == CapLevel.T1
    pol.set_budget(2000.0)  # more headroom: 850 W is far below the new T1
    assert pol.update(2.0, 850).level == CapLevel.NONE
    pol.set_budget(None)
    assert pol.update(4.0, 5000).level == CapLevel.NONE and pol.threshold_w(CapLevel.T1) is None
    with pytest.raises(InvalidRequest, match="must be > 0"):
        pol.set_budget(0.0)


def test_capped_time_is_accounted():
    pol = policy(dwell_s=0.0, settle_s=0.0)
    feed(pol, [850, 850, 850, 100, 100])
    assert pol.capped_s == pytest.approx(6.0)


@pytest.mark.parametrize(("cls", "low", "other", "expected"), [
    ("low", 0, 5, LOW), ("high", 3, 0, LOW), ("high", 3, 1, HIGH), ("high", 0, 0, HIGH), ("low", 0, 0, LOW),
])
def test_priority_classification(cls, low, other, expected):
    assert classify_priority(cls, low, other) == expected


def test_config_validation():
    with pytest.raises(ValueError, match="t1_fraction < t2_fraction"):
        PolicyConfig(t1_fraction=0.9, t2_fraction=0.85)
    with pytest.raises(ValueError, match="above reference_max_sm_clock_mhz"):
        PolicyConfig(lp_t1_sm_clock_mhz=1500)
    with pytest.raises(ValueError, match="extra"):
        PolicyConfig(t3_fraction=0.95)
    with pytest.raises(ValueError, match="not 'cluster'"):
        PowerConfig(rows=[{"name": "cluster"}])
    cfg = PowerConfig(provisioned_power_w=5000, rows=[{"name": "r2", "nodes": ["10.0.0.2"], "provisioned_power_w": 900}])
    assert cfg.row_of("abc", "10.0.0.2") == "r2" and cfg.row_of("abc", "10.0.0.3") == "cluster"
    assert cfg.budgets() == {"cluster": 5000, "r2": 900}


def test_actuation_delay_with_an_injected_clock():
    """A lock takes effect only after the device's actuation delay; the policy holds meanwhile."""
    now = [0.0]
    dev = SimulatedDevice("a100", 8_000_000_000, clock=lambda: now[0], actuation_delay_s=3.0)
    pol = policy(dwell_s=0.0, settle_s=3.0)
    prefill = StepWork(prefill_tokens=2048, batch_size=1)
    uncapped_w = dev.step_power_w(prefill)
    pol.update(now[0], 850.0)
    dev.lock_sm_clock_mhz(pol.target(LOW, **{k: v for k, v in A100.items()}).sm_clock_mhz)
    assert dev.locked_sm_clock_mhz() is None and dev.step_power_w(prefill) == uncapped_w
    now[0] = 2.0
    assert dev.locked_sm_clock_mhz() is None
    assert pol.update(2.0, 100.0).level == CapLevel.T1  # power not yet lower: no premature release
    now[0] = 3.0
    assert dev.locked_sm_clock_mhz() == 1275.0 and dev.step_power_w(prefill) < uncapped_w


def test_policy_module_is_pure():
    """Shared by the live governor and the simulator: no Ray, gRPC, runtime actors or I/O."""
    source = (Path(__file__).resolve().parents[2] / "runtime" / "power" / "policy.py").read_text()
    imported = {n.module for n in ast.walk(ast.parse(source)) if isinstance(n, ast.ImportFrom)}
    imported |= {a.name for n in ast.walk(ast.parse(source)) if isinstance(n, ast.Import) for a in n.names}
    assert not any(m and m.split(".")[0] in {"ray", "grpc", "workers", "asyncio", "time"} for m in imported)


# --- the forecast preset: cap on the learned rise over the actuation horizon ---------------------


def forecast_policy(**overrides) -> PowerPolicy:
    # guard 930 W, T2 at a forecast of 1130 W; rises over 3 s = two readings 2 s apart
    return policy(**{"preset": "forecast", "forecast_min_samples": 10, **overrides})


def test_forecast_does_not_cap_a_steady_load_between_t1_and_p():
    warm_up = [500.0 + (5 if i % 2 else -5) for i in range(40)]  # learn the row's noise
    ramp = [500.0 + 10 * i for i in range(1, 41)]  # a slow climb to 900 W = 0.90 P
    steady = [900.0 + (5 if i % 2 else -5) for i in range(200)]  # 0.895-0.905 P, far above T1
    readings = warm_up + ramp + steady
    pol = forecast_policy()
    assert set(feed(pol, readings)) == {CapLevel.NONE}
    assert pol.capped_s == 0.0 and pol.rises.samples > 200
    assert pol.threshold_w(CapLevel.T1) > 905  # the learned rise is small: the threshold moved up
    polca = policy()
    assert polca.level == CapLevel.NONE and CapLevel.T2 in feed(polca, readings)  # fixed T1/T2 cap it


def test_forecast_caps_before_a_burst_its_statistics_predict():
    pol = forecast_policy()
    # what the row's telemetry showed so far: from 600 W, bursts to 900 W within the horizon
    pattern = [600.0, 600.0, 900.0, 600.0, 600.0]
    for i, watts in enumerate(pattern * 12):
        pol.rises.observe(2.0 * i, watts, int(CapLevel.NONE))
    assert pol.rises.quantile_w(0.999) == pytest.approx(300.0)
    # the base load creeps up to 660 W, still well under POLCA's T1 (800 W): a 300 W burst from here
    # would cross the guard before a later cap could act, so the forecast caps now
    decision = pol.update(200.0, 660.0)
    assert decision.level == CapLevel.T1 and clocks(pol) == (1275.0, None)  # low priority only
    [(kind, reason)] = decision.events
    assert kind == EventKind.LEVEL and "expected rise 300 W" in reason and "q0.999 of" in reason
    assert policy().update(200.0, 660.0).level == CapLevel.NONE  # POLCA waits for 800 W
    # 700 + 300 W: past P, yet short of the T2 line (guard + 0.20 P = 1130 W): T1 holds
    assert pol.update(202.0, 700.0).level == CapLevel.T1
    # with a T2 step of 0.05 P (T2 at 980 W) the same forecast locks low priority lower; high
    # priority stays free unless forecast_cap_high_priority asks for POLCA's table
    for cap_hp, hp_clock in ((False, None), (True, 1305.0)):
        deeper = forecast_policy(forecast_t2_step_fraction=0.05, forecast_cap_high_priority=cap_hp)
        for i, watts in enumerate(pattern * 12):
            deeper.rises.observe(2.0 * i, watts, int(CapLevel.NONE))
        assert deeper.update(200.0, 700.0).level == CapLevel.T2 and clocks(deeper) == (1110.0, hp_clock)
    # and the brake stays the last resort on the reading itself
    assert pol.update(204.0, 1001.0).level == CapLevel.BRAKE


def test_forecast_prior_is_as_cautious_as_polca_until_rises_are_learned():
    pol = forecast_policy(forecast_min_samples=1000)
    assert pol.update(0.0, 790.0).level == CapLevel.NONE
    assert pol.update(2.0, 800.0).level == CapLevel.T1  # 800 + 0.13 P reaches the 0.93 P guard
    assert pol.expected_rise_w() == pytest.approx(130.0)


def test_forecast_hysteresis_releases_only_with_margin_and_dwell():
    pol = forecast_policy(dwell_s=10.0, settle_s=2.0)
    steady = [700.0 + 5 * (i % 3) for i in range(30)]
    ramp = [700.0 + 10 * i for i in range(1, 23)]  # +20 W per horizon up to 920 W
    levels = feed(pol, steady + ramp)
    capped_at = (steady + ramp)[levels.index(CapLevel.T1)]
    assert 905 <= capped_at < 930 and CapLevel.T2 not in levels  # 910 + 20 reaches the 930 W guard
    t = 2.0 * len(levels)
    # a signal hovering just under the guard is capped once and stays capped: release needs the
    # cap's own saving (0.05 P) and the margin (0.05 P) to fit under the guard as well
    for i in range(30):
        assert pol.update(t + 2 * i, 915.0 if i % 2 else 925.0).level == CapLevel.T1
    t += 60.0
    # 800 W + its learned rise (20 W) + saving (50 W) + margin (50 W) fits under the guard
    levels = feed(pol, [800.0] * 8, start_s=t)
    assert levels[:5] == [CapLevel.T1] * 5 and levels[-1] == CapLevel.NONE  # after dwell_s, not before
    decisions = [pol.update(t + 16 + 2 * i, 790.0) for i in range(3)]
    assert all(not d.changed for d in decisions)  # no flapping once released


def test_forecast_lost_telemetry_fails_safe_and_is_not_learned():
    pol = forecast_policy(dwell_s=2.0, settle_s=0.0)
    feed(pol, [700.0 + 5 * (i % 3) for i in range(30)])
    pol.update(60.0, 975.0)
    assert pol.level == CapLevel.T2
    learned = pol.rises.samples
    for t in range(62, 100, 2):  # partial readings: caps hold however low they read
        assert pol.update(float(t), 100.0, telemetry_ok=False).level == CapLevel.T2
    assert pol.update(100.0, None).level == CapLevel.T2
    assert pol.rises.samples == learned  # nothing learned from incomplete telemetry
    pol.update(102.0, 700.0)  # back: the first complete reading starts a new series, no rise across the gap
    assert pol.rises.samples == learned


def test_forecast_is_deterministic_with_an_injected_clock():
    import random

    rng = random.Random(7)
    readings = [600 + 300 * (rng.random() < 0.1) + rng.uniform(-20, 20) for _ in range(400)]
    runs = []
    for _ in range(2):
        pol = forecast_policy()
        now = iter(range(0, 10_000, 2))
        runs.append([(pol.update(float(next(now)), w).level, round(pol.expected_rise_w(), 6)) for w in readings])
    assert runs[0] == runs[1]
    assert {lv for lv, _ in runs[0]} >= {CapLevel.NONE, CapLevel.T1}


def test_rise_statistics_window_bands_and_quantiles():
    from runtime.power.forecast import RiseStatistics

    stats = RiseStatistics(horizon_s=3.0, window_samples=5, min_samples=3, band_w=100.0)
    assert stats.observe(0.0, 100.0, 0) is None and stats.observe(2.0, 150.0, 0) is None  # not 3 s yet
    assert stats.observe(4.0, 400.0, 0) == 300.0  # vs the reading at 0 s (the newest >= 3 s old)
    assert stats.observe(6.0, 420.0, 0) == 270.0  # vs 2 s
    assert stats.observe(8.0, 430.0, 1) is None  # the level changed in between: a cap's effect, not load
    assert stats.quantile_w(0.5) is None  # 2 < min_samples
    for t in (10.0, 12.0, 14.0, 16.0, 18.0, 20.0):  # 10 s spans the level change: no sample
        stats.observe(t, 430.0, 1)
    assert stats.samples == 5  # the window keeps the newest 5: 300 and 270 are gone
    assert stats.quantile_w(0.999) == 0.0 and stats.forecast_w(0.999, 450.0) == 450.0
    assert stats.observe(20.0, 999.0, 1) is None  # time must advance
    with pytest.raises(ValueError):
        RiseStatistics(horizon_s=0.0, window_samples=5, min_samples=3, band_w=100.0)


def test_forecast_goes_to_t2_when_t1_does_not_bring_a_steady_load_under_the_guard():
    pol = forecast_policy(forecast_t2_sustain_s=20.0, dwell_s=10.0, settle_s=2.0)
    readings = ([700.0 + 5 * (i % 3) for i in range(30)] + [700.0 + 10 * i for i in range(1, 24)]
                + [935.0 + 5 * (i % 3) for i in range(30)])  # a slow climb to a steady 0.94 P
    levels = feed(pol, readings)
    first_t1, first_t2 = levels.index(CapLevel.T1), levels.index(CapLevel.T2)
    over_guard = next(i for i, w in enumerate(readings) if w >= 930.0)
    # T1 from the forecast before the guard; T2 once T1 has left the reading above the guard for 20 s
    assert first_t1 < over_guard and first_t2 - over_guard == 10
    # T2 holds until the load is under T1's release line, not merely under T2's
    assert feed(pol, [900.0] * 10, start_s=200.0) == [CapLevel.T2] * 10
    assert CapLevel.T1 in feed(pol, [780.0] * 8, start_s=240.0)
    # a burst that T1 brings under the guard within the sustain time never reaches T2
    burst = forecast_policy(forecast_t2_sustain_s=20.0)
    levels = feed(burst, readings[:53] + [935.0] * 5 + [900.0] * 20)
    assert CapLevel.T1 in levels and CapLevel.T2 not in levels
    never = forecast_policy(forecast_t2_sustain_s=None)
    assert CapLevel.T2 not in feed(never, readings + [935.0] * 30)
