"""The MoE² selector equals the exhaustive optimum and never exceeds a budget."""

from __future__ import annotations

import random

import pytest

from router.selector import EPS, Item, exhaustive_subset, select_subset, subset_costs


def _instance(rng: random.Random, n: int, ties: bool):
    if ties:  # few distinct numbers: many sets of equal value, energy and latency
        items = [Item(rng.choice([0.0, 0.5, 1.0]), rng.choice([0.0, 1.0, 2.0]), rng.choice([10.0, 20.0])) for _ in range(n)]
    else:
        items = [Item(rng.random(), rng.uniform(0.01, 5.0), rng.uniform(1.0, 500.0)) for _ in range(n)]
    total_e = sum(it.energy_j for it in items)
    energy = rng.choice([None, rng.uniform(0, total_e), rng.uniform(0, 0.3 * total_e + 1e-9), 0.0])
    latency = rng.choice([None, rng.uniform(0, 600.0), 5.0])
    agg = rng.choice([0.0, 0.0, rng.uniform(0, 100.0)])
    return items, energy, latency, agg


def _feasible(items, sel, energy, latency, agg):
    v, e, lat = subset_costs(items, sel.indices, agg)
    assert v == pytest.approx(sel.value) and e == pytest.approx(sel.energy_j) and lat == pytest.approx(sel.latency_ms)
    if energy is not None:
        assert e <= energy * (1 + 1e-9)
    if latency is not None:
        assert lat <= latency


@pytest.mark.parametrize("ties", [False, True])
def test_equals_exhaustive_on_thousands_of_random_instances(ties):
    rng = random.Random(1234 + ties)
    empty = 0
    for _ in range(2500):
        items, energy, latency, agg = _instance(rng, rng.randint(0, 10), ties)
        fast = select_subset(items, energy, latency, agg)
        ref = exhaustive_subset(items, energy, latency, agg)
        assert abs(fast.value - ref.value) <= 1e-9 * max(1.0, ref.value), (items, energy, latency, agg, fast, ref)
        assert bool(fast.indices) == bool(ref.indices)
        if fast.indices:
            _feasible(items, fast, energy, latency, agg)
        else:
            empty += 1
    assert empty > 50  # the empty feasible set was exercised


def test_prefers_cheaper_set_among_equal_value_singles():
    items = [Item(1.0, 2.0, 10.0), Item(1.0, 1.0, 10.0)]
    sel = select_subset(items, 2.5, None)  # both do not fit together
    assert sel.indices == (1,)


def test_aggregation_time_only_for_sets_and_latency_filters():
    items = [Item(0.6, 1.0, 90.0), Item(0.5, 1.0, 50.0)]
    # alone each fits 100 ms; together 90 + 20 > 100 so the best single is taken
    assert select_subset(items, None, 100.0, aggregation_ms=20.0).indices == (0,)
    assert select_subset(items, None, 120.0, aggregation_ms=20.0).indices == (0, 1)
    assert select_subset(items, None, 40.0).indices == ()


def test_zero_value_experts_are_not_added():
    items = [Item(0.0, 1.0, 1.0), Item(0.3, 1.0, 1.0), Item(0.2, 1.0, 1.0)]
    sel = select_subset(items, None, None)
    assert sel.indices == (1, 2)
    assert sel.value == pytest.approx(0.5)


def test_many_identical_experts_stay_fast():
    items = [Item(0.5, 1.0, 10.0)] * 32
    sel = select_subset(items, 16.0, None)
    assert len(sel.indices) == 16 and sel.nodes < 5000
    assert sel.value == pytest.approx(8.0, abs=EPS * 10)
