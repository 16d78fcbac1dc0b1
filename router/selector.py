"""MoE² subset selection: the most valuable set of experts that fits an energy and a latency budget.

Problem (DESIGN.md section 4; Jin et al. 2025, arXiv 2501.09410, our reading)::

    maximise   Q(S) = sum_{i in S} v_i                       (v_i = g_i(x) * q_i(x) >= 0)
    subject to E(S) = sum_{i in S} e_i            <= energy_budget_j
               L(S) = max_{i in S} l_i + agg(S)   <= latency_budget_ms
               agg(S) = aggregation_ms if |S| > 1 else 0

Q is non-decreasing in S and both costs are non-decreasing, so the feasible sets are closed under
taking subsets and an optimum is always a *maximal* feasible set. :func:`select_subset` searches
only those: a depth-first branch and bound over experts sorted by value per joule, that never
visits a set it can prove dominated (fractional-knapsack upper bound) and always extends the
current set greedily first, so the first leaves it reaches are maximal sets. The latency
constraint is separable: a single expert needs ``l_i <= L``, a set of two or more needs every
member to satisfy ``l_i + aggregation_ms <= L``; the search runs the knapsack over the experts that
qualify for sets and compares with the best single expert.

:func:`exhaustive_subset` enumerates all 2^n sets; tests check the two agree.
Ties in Q are broken by lower energy, then lower latency, then fewer experts, then lower indices
between candidate sets; inside the knapsack an equal-value set found later is not explored
(exploring ties is exponential), so two optimal sets of equal Q may differ between the two.
"""

from __future__ import annotations

import itertools
import math
from collections.abc import Sequence
from dataclasses import dataclass

#: values closer than this are equal (sums of floats taken in different orders differ slightly)
EPS = 1e-12


@dataclass(slots=True, frozen=True)
class Item:
    """One expert as the selector sees it: value (quality units), energy (J), latency (ms)."""

    value: float
    energy_j: float
    latency_ms: float


@dataclass(slots=True, frozen=True)
class Selection:
    """The chosen indices (ascending) and their totals; ``indices == ()`` when nothing fits."""

    indices: tuple[int, ...]
    value: float
    energy_j: float
    latency_ms: float
    nodes: int = 0  # search nodes visited (for benchmarks)


def subset_costs(items: Sequence[Item], indices: Sequence[int], aggregation_ms: float) -> tuple[float, float, float]:
    """(Q, E in J, L in ms) of a set; summed in index order so every caller gets the same floats."""
    idx = sorted(indices)
    value = math.fsum(items[i].value for i in idx)
    energy = math.fsum(items[i].energy_j for i in idx)
    latency = max((items[i].latency_ms for i in idx), default=0.0)
    if len(idx) > 1:
        latency += aggregation_ms
    return value, energy, latency


def _better(a: tuple, b: tuple | None) -> bool:
    """Compare (value, energy, latency, size, indices): higher value, then cheaper, faster, smaller, lower ids."""
    if b is None:
        return True
    if abs(a[0] - b[0]) > EPS * max(1.0, abs(a[0]), abs(b[0])):
        return a[0] > b[0]
    return a[1:] < b[1:]


def _key(items, indices, aggregation_ms) -> tuple:
    idx = tuple(sorted(indices))
    v, e, lat = subset_costs(items, idx, aggregation_ms)
    return (v, e, lat, len(idx), idx)


def _fits(energy_j: float, budget_j: float | None) -> bool:
    return budget_j is None or energy_j <= budget_j * (1 + 1e-12)


def exhaustive_subset(
    items: Sequence[Item],
    energy_budget_j: float | None,
    latency_budget_ms: float | None,
    aggregation_ms: float = 0.0,
) -> Selection:
    """Reference implementation: try every non-empty set (2^n); for tests and small n only."""
    best = None
    for size in range(1, len(items) + 1):
        for combo in itertools.combinations(range(len(items)), size):
            v, e, lat = subset_costs(items, combo, aggregation_ms)
            if not _fits(e, energy_budget_j) or (latency_budget_ms is not None and lat > latency_budget_ms):
                continue
            key = (v, e, lat, size, combo)
            if _better(key, best):
                best = key
    if best is None:
        return Selection((), 0.0, 0.0, 0.0)
    return Selection(best[4], best[0], best[1], best[2])


def select_subset(
    items: Sequence[Item],
    energy_budget_j: float | None,
    latency_budget_ms: float | None,
    aggregation_ms: float = 0.0,
) -> Selection:
    """The optimum of the problem in the module docstring, searching maximal feasible sets only."""
    n = len(items)
    lat_ok = [latency_budget_ms is None or it.latency_ms <= latency_budget_ms for it in items]
    alone = [i for i in range(n) if lat_ok[i] and _fits(items[i].energy_j, energy_budget_j)]
    if not alone:
        return Selection((), 0.0, 0.0, 0.0)
    best = None
    for i in alone:  # the best single expert (also the answer when sets cannot meet the latency)
        key = _key(items, (i,), aggregation_ms)
        if _better(key, best):
            best = key
    group = [
        i for i in alone
        if latency_budget_ms is None or items[i].latency_ms + aggregation_ms <= latency_budget_ms
    ]
    nodes = len(alone)
    if len(group) > 1:
        found, visited = _knapsack(items, group, energy_budget_j)
        nodes += visited
        key = _key(items, found, aggregation_ms)
        if len(found) > 1 and _better(key, best):
            best = key
    return Selection(best[4], best[0], best[1], best[2], nodes)


def _knapsack(items: Sequence[Item], group: list[int], budget_j: float | None) -> tuple[tuple[int, ...], int]:
    """Best set of ``group`` under the energy budget (branch and bound over maximal sets)."""
    # Zero-value experts never raise Q; they would only add energy (and lose ties), so drop them.
    group = [i for i in group if items[i].value > 0]
    if budget_j is None or math.fsum(items[i].energy_j for i in group) <= budget_j:
        return tuple(group), 1  # everything fits: the only maximal set
    # Densest first: the fractional relaxation (the bound) is then a prefix sum.
    order = sorted(group, key=lambda i: (-_density(items[i]), i))
    values = [items[i].value for i in order]
    energies = [items[i].energy_j for i in order]
    state = _Search(values, energies, budget_j)
    state.dfs(0, 0.0, 0.0, [])
    chosen = tuple(sorted(order[k] for k in state.best_set))
    return chosen, state.nodes


def _density(it: Item) -> float:
    return math.inf if it.energy_j <= 0 else it.value / it.energy_j


class _Search:
    """Depth-first include/exclude search with a fractional-knapsack bound."""

    __slots__ = ("values", "energies", "budget", "best_value", "best_energy", "best_set", "nodes", "n")

    def __init__(self, values: list[float], energies: list[float], budget: float) -> None:
        self.values, self.energies, self.budget = values, energies, budget
        self.n = len(values)
        self.best_value, self.best_energy, self.best_set = -1.0, math.inf, []
        self.nodes = 0

    def bound(self, k: int, value: float, room: float) -> float:
        for j in range(k, self.n):
            e = self.energies[j]
            if e <= room:
                room -= e
                value += self.values[j]
            else:
                return value + self.values[j] * room / e
        return value

    def dfs(self, k: int, value: float, energy: float, chosen: list[int]) -> None:
        self.nodes += 1
        if k == self.n:
            if value > self.best_value + EPS:
                self.best_value, self.best_energy, self.best_set = value, energy, list(chosen)
            return
        # A branch that can at best tie is pruned too: exploring ties is exponential when many
        # experts look alike. Among equal-value sets the first found wins; the densest-first order
        # makes that the one built from the most joule-efficient experts.
        if self.bound(k, value, self.budget - energy) <= self.best_value + EPS:
            return
        e = self.energies[k]
        if energy + e <= self.budget * (1 + 1e-12):
            chosen.append(k)
            self.dfs(k + 1, value + self.values[k], energy + e, chosen)
            chosen.pop()
        self.dfs(k + 1, value, energy, chosen)
