"""The MoE² policy: gate -> cost model -> subset selection under the request's budgets.

Per request (DESIGN.md section 4):

1. the gate gives each expert a weight g_i(x) and a predicted quality q_i(x) (``router/gate.py``);
2. the cost model predicts each expert's energy E_i and latency L_i for this prompt on its least
   loaded replica, from live profiles (``router/cost.py``);
3. the selector picks S maximising Q(S) = sum g_i q_i within ``energy_budget_j`` and
   ``latency_budget_ms`` (``router/selector.py``). With a price of energy ``quality_per_j`` > 0,
   experts not worth their joules are left out first (``_worth_their_energy``: the Lagrangian
   of an average energy budget, which keeps the problem monotone);
4. Generate answers from the highest-weight expert of S (k=1; the rest of S are its fall-backs,
   in weight order); Score runs all of S and mixes their answers with the weights renormalised
   over S (``combine``).

Nothing fits: ``infeasible: reject`` raises :class:`BudgetInfeasible` naming the cheapest budget
that would be feasible; ``serve_cheapest`` serves the lowest-energy expert and flags
``budget_exceeded``.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from wattserve.errors import BudgetInfeasible

from .base import Candidate, Plan, RequestFeatures
from .cost import CostEstimate
from .gate import GateOutput
from .policies import Policy, by_expert, predict
from .selector import Item, select_subset


@dataclass(slots=True, frozen=True)
class _Option:
    expert: str
    replica: Candidate
    weight: float
    quality: float
    cost: CostEstimate | None


class MoE2(Policy):
    name = "moe2"
    uses_gate = True

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        groups = by_expert(pool)
        gate = self.quality(request, sorted(groups))
        options = [self._option(request, e, reps, gate) for e, reps in sorted(groups.items())]
        score = request.mode == "score"
        known = [o for o in options if o.cost is not None]
        budgeted = request.energy_budget_j is not None or request.latency_budget_ms is not None
        usable = known if budgeted else options  # unknown costs cannot be checked against a budget
        lam = self.settings.quality_per_j
        worth = _worth_their_energy(usable, lam, score) if lam > 0 else usable
        items = [
            Item(o.weight * o.quality, o.cost.energy_j if o.cost else 0.0, o.cost.latency_ms if o.cost else 0.0)
            for o in worth
        ]
        sel = select_subset(items, request.energy_budget_j, request.latency_budget_ms,
                            self.settings.aggregation_ms if score else 0.0)
        if not sel.indices:
            return self._infeasible(request, options, groups, gate, lam)
        chosen = sorted((worth[i] for i in sel.indices), key=lambda o: (-o.weight, _energy(o), o.expert))
        return self._plan(request, chosen, groups, gate, sel.value, budget_exceeded=False)

    def _option(self, request: RequestFeatures, expert: str, reps: list[Candidate], gate: GateOutput) -> _Option:
        # The replica that would answer soonest represents the expert.
        costs = [(predict(self.cost, request, c), c) for c in reps]
        with_cost = [(est, c) for est, c in costs if est is not None]
        est, rep = min(with_cost, key=lambda x: (x[0].latency_ms, x[1].replica)) if with_cost else (None, reps[0])
        return _Option(expert, rep, gate.weights.get(expert, 0.0), gate.quality.get(expert, 0.0), est)

    def _plan(self, request, chosen: list[_Option], groups, gate: GateOutput, value: float, *, budget_exceeded: bool) -> Plan:
        subset = tuple(o.expert for o in chosen)
        weights = gate.renormalised(subset)
        ranked = tuple(o.replica for o in chosen) + tuple(
            c for o in chosen for c in groups[o.expert] if c is not o.replica
        )
        if request.mode == "score":
            energy = math.fsum(_energy(o) for o in chosen)
            latency = max(o.cost.latency_ms if o.cost else 0.0 for o in chosen)
            latency += self.settings.aggregation_ms if len(chosen) > 1 else 0.0
        else:
            energy = _energy(chosen[0]) if chosen[0].cost else None
            latency = chosen[0].cost.latency_ms if chosen[0].cost else None
        cascade = self._cascade(request, chosen)
        return Plan(
            ranked=ranked, policy=self.name, subset=subset, weights=weights, gate=gate.source,
            predicted_energy_j=energy if energy is None or math.isfinite(energy) else None,
            predicted_latency_ms=latency, budget_exceeded=budget_exceeded,
            reason=self._reason(request, chosen, weights, gate, value, budget_exceeded)
            + (f"; cascade {cascade[0]} -> {cascade[1]} below mean log p {self.settings.cascade_below_logprob:g}" if cascade else ""),
            cascade=cascade, cascade_below_logprob=self.settings.cascade_below_logprob if cascade else None,
        )

    def _cascade(self, request: RequestFeatures, chosen: list[_Option]) -> tuple[str, ...]:
        """Generate with cascading on: try the cheapest expert of S first, the top one if unsure.

        Both are in S, so their predicted energies together fit the budget; the latency budget
        is checked for the two answers in a row.
        """
        if request.mode != "generate" or self.settings.cascade_below_logprob is None or len(chosen) < 2:
            return ()
        top = chosen[0]
        first = min(chosen, key=lambda o: (_energy(o), o.expert))
        if first is top or first.cost is None or top.cost is None:
            return ()
        if request.latency_budget_ms is not None and first.cost.latency_ms + top.cost.latency_ms > request.latency_budget_ms:
            return ()
        return (first.expert, top.expert)

    def _reason(self, request, chosen, weights, gate, value, budget_exceeded) -> str:
        def fmt(o: _Option) -> str:
            c = f"{o.cost.energy_j:.3g} J, {o.cost.latency_ms:.0f} ms" if o.cost else "cost unknown"
            return f"{o.expert} w={weights[o.expert]:.2f} q={o.quality:.2f} ({c})"

        budgets = []
        if request.energy_budget_j is not None:
            budgets.append(f"{request.energy_budget_j:.3g} J")
        if request.latency_budget_ms is not None:
            budgets.append(f"{request.latency_budget_ms:.0f} ms")
        head = "moe2 [gate " + gate.source.split(":")[0] + "]"
        if budget_exceeded:
            head += " BUDGET EXCEEDED: nothing fits " + " / ".join(budgets) + "; serving the cheapest"
        else:
            head += f": S={{{', '.join(o.expert for o in chosen)}}} Q={value:.3f}"
            head += (" within " + " / ".join(budgets)) if budgets else " (no budget)"
        if request.throttled:
            head += f" ({request.throttle_reason}: cheapest expert only)"
        return head + "; " + "; ".join(fmt(o) for o in chosen)

    def _infeasible(self, request, options: list[_Option], groups, gate: GateOutput, lam: float) -> Plan:
        known = [o for o in options if o.cost is not None]
        if self.settings.infeasible == "serve_cheapest":
            pick = min(known, key=lambda o: (o.cost.energy_j, o.expert)) if known else min(
                options, key=lambda o: (o.replica.profile.params if o.replica.profile else 0, o.expert))
            return self._plan(request, [pick], groups, gate, pick.weight * pick.quality, budget_exceeded=True)
        asked = []
        if request.energy_budget_j is not None:
            asked.append(f"energy_budget_j={request.energy_budget_j:.4g}")
        if request.latency_budget_ms is not None:
            asked.append(f"latency_budget_ms={request.latency_budget_ms:.4g}")
        param = asked[0].split("=")[0] if asked else None  # the field the caller should change
        if not known:
            unknown = ", ".join(o.expert for o in options)
            raise BudgetInfeasible(
                f"cannot check {' and '.join(asked)}: no cost measured yet for {unknown} and no "
                "router.cost_priors configured; retry after a first request or drop the budget", param=param,
            )
        cheap = min(known, key=lambda o: (o.cost.energy_j, o.cost.latency_ms))
        fast = min(known, key=lambda o: (o.cost.latency_ms, o.cost.energy_j))
        raise BudgetInfeasible(
            f"no expert fits {' and '.join(asked)}: {_feasible_hint(request, cheap, fast, lam)}",
            cheapest_energy_j=cheap.cost.energy_j, cheapest_latency_ms=fast.cost.latency_ms, param=param,
        )


def _feasible_hint(request: RequestFeatures, cheap: _Option, fast: _Option, lam: float) -> str:
    """What to send instead: the cheapest feasible budget for the constraints the caller set."""
    def plan(o: _Option) -> str:
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


def _worth_their_energy(options: list[_Option], lam: float, score: bool) -> list[_Option]:
    """Drop experts whose quality is not worth their joules at ``lam`` quality units per joule.

    Both rules are the Lagrangian of an *average* energy budget for the mode's objective and
    keep the selection monotone. Score (the ensemble, Q = sum g_i q_i, separable): keep i if
    g_i q_i >= lam E_i. Generate (k = 1, the answer's quality is q of the top expert): drop i if a
    cheaper expert j has q_j - lam E_j > q_i - lam E_i, so the top of any subset of the rest is
    the Lagrangian optimum argmax q_i - lam E_i among what fits the hard budgets. With two
    experts this is RouteLLM's threshold rule with threshold lam (E_strong - E_weak).
    """
    if score:
        return [o for o in options if o.cost is None or o.weight * o.quality >= lam * o.cost.energy_j]
    known = [o for o in options if o.cost is not None]
    return [
        o for o in options
        if o.cost is None or not any(
            j.cost.energy_j < o.cost.energy_j and j.quality - lam * j.cost.energy_j > o.quality - lam * o.cost.energy_j
            for j in known
        )
    ]


def _energy(o: _Option) -> float:
    return o.cost.energy_j if o.cost else math.inf


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
