"""MoE²'s selection maths as pure functions over :class:`Option` values (one per expert).

The policy that uses them is ``router/policies/moe2.py`` (the algorithm is described there);
``router.quality.combine`` mixes Score answers with the plan's weights.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from .base import Candidate, RequestFeatures
from .cost import CostEstimate
from .ensemble import EnsembleGains


@dataclass(slots=True, frozen=True)
class Option:
    """One expert as MoE² weighs it: the replica the request would go to (the first in the replica
    order), its gate weight and predicted quality, and that replica's predicted cost (None: unknown)."""

    expert: str
    replica: Candidate
    weight: float
    quality: float
    cost: CostEstimate | None


def feasible_hint(request: RequestFeatures, cheap: Option, fast: Option, lam: float) -> str:
    """What to send instead: the cheapest feasible budget for the constraints the caller set."""
    def plan(o: Option) -> str:
        return f"{o.expert} ({o.cost.energy_j:.4g} J, {o.cost.latency_ms:.0f} ms predicted)"

    e_set, l_set = request.energy_budget_j is not None, request.latency_budget_ms is not None
    if e_set and not l_set:
        hint = f"the cheapest plan is {plan(cheap)}; send energy_budget_j >= {cheap.cost.energy_j:.4g}"
    elif l_set and not e_set:
        hint = f"the fastest plan is {plan(fast)}; send latency_budget_ms >= {fast.cost.latency_ms:.0f}"
    else:
        hint = (f"the cheapest plan is {plan(cheap)}: send energy_budget_j >= {cheap.cost.energy_j:.4g} with "
                f"latency_budget_ms >= {cheap.cost.latency_ms:.0f}")
        if fast is not cheap:
            hint += (f"; the fastest is {plan(fast)}: energy_budget_j >= {fast.cost.energy_j:.4g} with "
                     f"latency_budget_ms >= {fast.cost.latency_ms:.0f}")
    if lam > 0:
        hint += f" (experts not worth their energy at quality_per_j={lam:g} were left out)"
    return hint + ", or let the server serve the cheapest expert anyway (router.infeasible: serve_cheapest)"


def worth_their_energy(options: list[Option], lam: float) -> list[Option]:
    """Score without measured ensembles: drop experts whose ensemble value is not worth their
    joules at ``lam`` quality units per joule (keep i if g_i q_i >= lam E_i). Q = sum g_i q_i is
    separable, so this is the Lagrangian of an *average* energy budget, and the selection stays
    monotone (a higher ``lam`` only removes experts). Separability is MoE²'s assumption, not a
    measurement: it credits every member with its own g_i q_i, although a mix of answers is not
    right more often than the sum of its members' weights; :func:`marginal_subset` replaces it
    wherever the gain of mixing was measured."""
    return [o for o in options if o.cost is None or o.weight * o.quality >= lam * o.cost.energy_j]


def least_loss(options: list[Option], request: RequestFeatures, lam: float) -> list[Option]:
    """Score when no expert is worth its joules at ``lam``: the price ranks experts, it does not
    refuse a request (a long few-shot prompt made every expert's g_i q_i < lam E_i, and requests
    with no budget were rejected). Answer from the one expert that fits with the highest
    g_i q_i - lam E_i, as Generate would; none fits: the budget, not the price, refuses it."""
    fits = [o for o in options if o.cost is None or fits_budgets(o.cost, request)]
    if not fits:
        return []
    best = max(fits, key=lambda o: (o.weight * o.quality - (lam * o.cost.energy_j if o.cost else 0.0),
                                    -option_energy(o), o.expert))
    return [best]


@dataclass(slots=True, frozen=True)
class Marginal:
    """Score's choice by marginal value: the experts (first the single best), the predicted
    quality of their mix, and per expert left out why (for the routing reason)."""

    chosen: tuple[Option, ...]
    quality: float
    left_out: tuple[str, ...] = ()


def marginal_subset(options: list[Option], request: RequestFeatures, lam: float, gains: EnsembleGains,
                    aggregation_ms: float) -> Marginal | None:
    """Score when the gain of mixing experts was measured (``router/ensemble.py``).

    Start from the single best expert that fits the budgets alone, argmax q_i - lam E_i (as
    Generate: one expert's answer has its quality q_i). Then add, one at a time, the expert j
    with the largest dq_j - lam E_j while dq_j > 0, dq_j >= lam E_j and the set still fits
    (sum of E <= energy budget, slowest member + ``aggregation_ms`` <= latency budget), where
    dq_j = q_{S+j}(x) - q_S(x) with q_S(x) = max_{i in S} q_i(x) + lift(S) (the measured lift).
    A set whose lift was not measured is never formed. None: nothing fits the budgets.

    Monotonicity, honestly: the first expert's energy is non-increasing in ``lam`` (an argmax of
    q - lam E), and for a fixed first expert a higher ``lam`` only removes additions (each needs
    dq_j >= lam E_j). Across a change of first expert the total can move either way: dq is not
    separable (it depends on who is already in S), so the separable rule's Lagrangian argument
    (one threshold per expert) does not carry over. Greedy, not exhaustive: a pair of cheap
    experts whose measured mix beats the single best is not searched for (with the two default
    experts there is no such case).
    """
    fits = [o for o in options if o.cost is None or fits_budgets(o.cost, request)]
    if not fits:
        return None
    first = min(fits, key=lambda o: (-net_value(o, lam), option_energy(o), o.expert))
    quality = {o.expert: o.quality for o in options}
    chosen = [first]
    value = first.quality
    left_out: list[str] = []
    while True:
        best, best_net, best_dq, notes = None, -math.inf, 0.0, []
        for o in fits:
            if o in chosen:
                continue
            dq = gains.gain(quality, [c.expert for c in chosen], o.expert)
            extra = lam * o.cost.energy_j if o.cost else 0.0
            if dq is None:
                notes.append(f"{o.expert} not added: mix not measured")
            elif dq <= 0 or dq < extra:
                notes.append(f"{o.expert} not added: measured gain {dq:+.3f} < price x {option_energy(o):.3g} J = {extra:.3f}")
            elif not _set_fits([*chosen, o], request, aggregation_ms):
                notes.append(f"{o.expert} not added: the set would exceed the budget")
            elif dq - extra > best_net:
                best, best_net, best_dq = o, dq - extra, dq
        if best is None:
            left_out = notes
            break
        value += best_dq
        chosen.append(best)
    return Marginal(tuple(chosen), value, tuple(left_out))


def _set_fits(chosen: list[Option], request: RequestFeatures, aggregation_ms: float) -> bool:
    """Whether a Score set fits: joules add up, latency is the slowest member's plus aggregation."""
    if request.energy_budget_j is not None:
        if any(o.cost is None for o in chosen):
            return False
        if math.fsum(o.cost.energy_j for o in chosen) > request.energy_budget_j * (1 + 1e-12):
            return False
    if request.latency_budget_ms is not None:
        if any(o.cost is None for o in chosen):
            return False
        slowest = max(o.cost.latency_ms for o in chosen) + (aggregation_ms if len(chosen) > 1 else 0.0)
        if slowest > request.latency_budget_ms:
            return False
    return True


def option_energy(o: Option) -> float:
    """Predicted joules of ``o``; infinite when unknown, so unknown costs sort last."""
    return o.cost.energy_j if o.cost else math.inf


def net_value(o: Option, lam: float) -> float:
    """q - lam E: an expert with no cost estimate yet (no prior, nothing measured) pays nothing."""
    return o.quality - (lam * o.cost.energy_j if o.cost else 0.0)


def fits_budgets(cost: CostEstimate, request: RequestFeatures) -> bool:
    """Whether ``cost`` fits the request's energy (J) and latency (ms) budgets alone."""
    # the relative slack keeps a budget set to exactly the predicted joules feasible after rounding
    e, lat = request.energy_budget_j, request.latency_budget_ms
    return (e is None or cost.energy_j <= e * (1 + 1e-12)) and (lat is None or cost.latency_ms <= lat)
