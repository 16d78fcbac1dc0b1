"""The price of energy: fixed, or the dual of an energy budget moved by the burn rate."""

from __future__ import annotations

import pytest

from router.price import DEFAULT_QUALITY_PER_J, EnergyPrice, PriceSettings
from tests.fakes import FakeClock


def test_a_fixed_price_never_moves():
    clock = FakeClock(1000.0)
    p = EnergyPrice(0.01, clock=clock)
    for _ in range(10):
        p.charge(1e6)
        clock.advance(100)
        assert p.value(budget_w=1.0) == 0.01
    with pytest.raises(ValueError):
        EnergyPrice(-1.0)


def test_without_a_budget_the_auto_price_is_the_documented_default():
    clock = FakeClock(1000.0)
    p = EnergyPrice(None, clock=clock)
    assert p.auto and p.value(None) == DEFAULT_QUALITY_PER_J
    p.charge(5000.0)
    clock.advance(60)
    assert p.value(None) == DEFAULT_QUALITY_PER_J and p.updates == 1


def test_the_dual_rises_over_budget_falls_under_it_and_stays_bounded():
    clock = FakeClock(1000.0)
    s = PriceSettings(default_quality_per_j=0.005, step=0.002, max_quality_per_j=0.02, interval_s=10.0)
    p = EnergyPrice(None, s, clock=clock)
    # burn 200 W against a 100 W budget: +step per interval (100 % over)
    for k in range(1, 4):
        p.charge(2000.0)
        clock.advance(10)
        assert p.value(budget_w=100.0) == pytest.approx(0.005 + 0.002 * k)
    assert "auto" in p.describe() and "200 W" in p.describe()
    # far over: capped at max_quality_per_j
    for _ in range(20):
        p.charge(1e5)
        clock.advance(10)
        p.value(100.0)
    assert p.lam == s.max_quality_per_j
    # idle (0 W) against the budget: -step per interval, down to 0 and not below
    for _ in range(20):
        clock.advance(10)
        p.value(100.0)
    assert p.lam == 0.0
    # between intervals the price does not move, whatever is charged
    p.charge(1e9)
    clock.advance(5)
    assert p.value(100.0) == 0.0
    clock.advance(5)
    assert p.value(100.0) == s.max_quality_per_j  # the burst lands in the next move


def test_the_step_is_relative_to_the_budget_so_scale_does_not_matter():
    small, big = FakeClock(1000.0), FakeClock(1000.0)
    a, b = EnergyPrice(None, clock=small), EnergyPrice(None, clock=big)
    a.charge(150.0 * 30)
    b.charge(150_000.0 * 30)
    small.advance(30)
    big.advance(30)
    assert a.value(100.0) == pytest.approx(b.value(100_000.0))
    assert a.lam == pytest.approx(DEFAULT_QUALITY_PER_J + 0.5 * 0.002)  # 50 % over


def test_bad_settings_are_refused():
    with pytest.raises(ValueError):
        PriceSettings(default_quality_per_j=0.5, max_quality_per_j=0.1)
    with pytest.raises(ValueError):
        PriceSettings(interval_s=0)
