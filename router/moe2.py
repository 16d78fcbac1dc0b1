"""MoE²'s selection maths as pure functions over :class:`Option` values (one per expert).

The policy that uses them is ``router/policies/moe2.py`` (the algorithm is described there);
:func:`combine` mixes Score answers with the plan's weights.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from .base import Candidate, RequestFeatures
from .cost import CostEstimate


@dataclass(slots=True, frozen=True)
class Option:
    """One expert as MoE² weighs it: the replica that would answer soonest, its gate weight and
    predicted quality, and that replica's predicted cost (None: unknown)."""

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
    """Score: drop experts whose ensemble value is not worth their joules at ``lam`` quality units
    per joule (keep i if g_i q_i >= lam E_i). Q = sum g_i q_i is separable, so this is the
    Lagrangian of an *average* energy budget, and the selection stays monotone."""
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


def combine(weights: Mapping[str, float], logprobs: Mapping[str, Sequence[float]]) -> list[float]:
    """The MoE² ensemble over choices: sum_i w_i * softmax_k(logprob_i[k]), w renormalised over the
    experts that answered. Returns a probability per choice (sums to 1)."""
    experts = [e for e in logprobs if e in weights]
    total = sum(weights[e] for e in experts)
    if not experts or total <= 0:
        raise ValueError("combine needs at least one answering expert with positive weight")
    n = len(next(iter(logprobs.values())))
    mix = [0.0] * n
    for e in experts:
        row = list(logprobs[e])
        top = max(row)
        exp = [math.exp(v - top) for v in row]
        z = sum(exp)
        for k in range(n):
            mix[k] += weights[e] / total * exp[k] / z
    return mix
