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
