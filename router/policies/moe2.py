"""``moe2``, the MoE² policy: gate -> cost model -> the best expert (Generate) or subset (Score) under budgets.

Per request (DESIGN.md sections 4 and 10):

1. the gate gives each expert a weight g_i(x) and a predicted quality q_i(x) (``router/gate.py``),
   corrected by online feedback where the gateway has any (``router/feedback.py``);
2. the cost model predicts each expert's energy E_i and latency L_i for this prompt on the replica
   the request would use, from live profiles (``router/cost.py``): the first in the replica order
   (``order_replicas``), the least loaded or, with ``gateway.replica_order: packed``, the fullest
   with batch room;
3. **Generate** answers from one expert (k = 1), so the objective is that expert's quality less
   the price of its energy: argmax_i q_i - lam E_i over the experts that fit
   ``energy_budget_j`` and ``latency_budget_ms`` alone. ``lam`` (quality units per joule) is the
   request's price (per tenant, fixed or derived online from the energy budget: ``router/price.py``)
   or ``quality_per_j``. The other feasible experts follow as fall-backs, in the same order. With
   ``explore_share`` > 0 a request is sometimes answered by another feasible expert, so feedback
   can correct an expert the router has stopped using;
4. **Score** runs a subset S and mixes the answers with the gate weights renormalised over S
   (``combine`` in ``router/quality.py``). Where what mixing adds was measured
   (``settings.ensemble``, ``router/ensemble.py``): S starts from the single best expert that fits,
   argmax q_i - lam E_i, and grows only by experts whose predicted gain over S is worth their
   joules (``marginal_subset``). Without measurements, MoE²'s separable objective: S maximises
   Q(S) = sum g_i q_i within the budgets (``router/selector.py``; with a price, experts with
   g_i q_i < lam E_i are left out first, and when none is worth its joules ``least_loss`` answers).
   Cascades take the cheapest feasible expert and the top one, when both together fit.

Nothing fits: ``infeasible: reject`` raises :class:`BudgetInfeasible` naming the cheapest budget
that would be feasible; ``serve_cheapest`` serves the lowest-energy expert and flags
``budget_exceeded``.
"""

from __future__ import annotations

import math
from collections.abc import Sequence

from wattserve.errors import BudgetInfeasible

from ..base import Candidate, Plan, RequestFeatures
from ..gate import GateOutput
from ..moe2 import (
    Option,
    feasible_hint,
    fits_budgets,
    least_loss,
    marginal_subset,
    net_value,
    option_energy,
    worth_their_energy,
)
from ..selector import Item, select_subset
from .base import Policy, predict
from .registry import register


@register
class MoE2(Policy):
    name = "moe2"
    uses_gate = True

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        groups = self.replica_groups(request, pool)
        gate = self.quality(request, sorted(groups))
        options = [self._option(request, e, reps, gate) for e, reps in sorted(groups.items())]
        known = [o for o in options if o.cost is not None]
        budgeted = request.energy_budget_j is not None or request.latency_budget_ms is not None
        usable = known if budgeted else options  # unknown costs cannot be checked against a budget
        lam = self.price(request)
        if request.mode == "generate":
            return self._generate(request, usable, options, groups, gate, lam)
        if self.settings.ensemble:
            return self._score_marginal(request, usable, options, groups, gate, lam)
        worth = worth_their_energy(usable, lam) if lam > 0 else usable
        if not worth:
            worth = least_loss(usable, request, lam)
        items = [
            Item(o.weight * o.quality, o.cost.energy_j if o.cost else 0.0, o.cost.latency_ms if o.cost else 0.0)
            for o in worth
        ]
        sel = select_subset(items, request.energy_budget_j, request.latency_budget_ms, self.settings.aggregation_ms)
        if not sel.indices:
            return self._infeasible(request, options, groups, gate, lam)
        chosen = sorted((worth[i] for i in sel.indices), key=lambda o: (-o.weight, option_energy(o), o.expert))
        return self._plan(request, chosen, groups, gate, sel.value, budget_exceeded=False)

    def price(self, request: RequestFeatures) -> float:
        """The price of energy for this request (quality units per joule): the request's own (the
        gateway fills it per tenant, fixed or derived online), else the configured one."""
        lam = request.quality_per_j if request.quality_per_j is not None else self.settings.quality_per_j
        return max(0.0, lam)

    def _generate(self, request, usable: list[Option], options, groups, gate: GateOutput, lam: float) -> Plan:
        """Generate answers from ONE expert: argmax_i q_i - lam E_i over those that fit the budgets.

        Subsets are for ensembles: with k = 1 the answer's quality is the answering expert's, so a
        set of two cheap experts must never beat one better expert that fits alone. The other
        feasible experts follow in the same order as fall-backs (replicas full).
        """
        fits = [o for o in usable if o.cost is None or fits_budgets(o.cost, request)]
        if not fits:
            return self._infeasible(request, options, groups, gate, lam)
        ranked = sorted(fits, key=lambda o: (-net_value(o, lam), option_energy(o), o.expert))
        explored = self._explore(request, ranked)
        if explored is not None:
            ranked.remove(explored)
            ranked.insert(0, explored)
        return self._plan(request, ranked, groups, gate, net_value(ranked[0], lam), budget_exceeded=False,
                          lam=lam, explored=explored is not None)

    def _score_marginal(self, request, usable: list[Option], options, groups, gate: GateOutput, lam: float) -> Plan:
        """Score by marginal value: the single best expert, plus others only where their measured
        gain over it pays for their joules (``router.moe2.marginal_subset``)."""
        pick = marginal_subset(usable, request, lam, self.settings.ensemble, self.settings.aggregation_ms)
        if pick is None:
            return self._infeasible(request, options, groups, gate, lam)
        chosen = sorted(pick.chosen, key=lambda o: (-o.weight, option_energy(o), o.expert))
        return self._plan(request, chosen, groups, gate, pick.quality, budget_exceeded=False, lam=lam,
                          notes=pick.left_out)

    def _explore(self, request: RequestFeatures, ranked: list[Option]) -> Option | None:
        """With probability ``explore_share``, answer from another expert that fits the budgets
        (uniformly): feedback can only correct the estimate of an expert that is sometimes used.
        Never for a pinned or throttled request, and never outside the request's budgets."""
        share = request.explore_share
        if share <= 0 or len(ranked) < 2 or request.expert is not None or request.throttled:
            return None
        if self.rng.random() >= share:
            return None
        return self.rng.choice(ranked[1:])

    def _option(self, request: RequestFeatures, expert: str, reps: list[Candidate], gate: GateOutput) -> Option:
        """The expert as one option, represented (and priced) by the replica the request goes to:
        the first of ``reps``, which come in the configured replica order (``order_replicas``).
        An expert's replicas run one spec, so their predictions differ only by measurement noise
        and by telemetry that has not yet seen the gateway's latest dispatches: picking the soonest
        among them would pile requests onto whichever replica measured a little faster."""
        return Option(expert, reps[0], gate.weights.get(expert, 0.0), gate.quality.get(expert, 0.0),
                      predict(self.cost, request, reps[0]))

    def _plan(self, request, chosen: list[Option], groups, gate: GateOutput, value: float, *, budget_exceeded: bool,
              lam: float = 0.0, explored: bool = False, notes: tuple[str, ...] = ()) -> Plan:
        subset = tuple(o.expert for o in chosen)
        weights = gate.renormalised(subset)
        ranked = tuple(o.replica for o in chosen) + tuple(
            c for o in chosen for c in groups[o.expert] if c is not o.replica
        )
        if request.mode == "score":
            energy = math.fsum(option_energy(o) for o in chosen)
            latency = max(o.cost.latency_ms if o.cost else 0.0 for o in chosen)
            latency += self.settings.aggregation_ms if len(chosen) > 1 else 0.0
        else:
            energy = option_energy(chosen[0]) if chosen[0].cost else None
            latency = chosen[0].cost.latency_ms if chosen[0].cost else None
        cascade = () if explored else self._cascade(request, chosen)  # an exploration answers as drawn
        return Plan(
            ranked=ranked, policy=self.name, subset=subset, weights=weights, gate=gate.source,
            predicted_energy_j=energy if energy is None or math.isfinite(energy) else None,
            predicted_latency_ms=latency, budget_exceeded=budget_exceeded,
            reason=self._reason(request, chosen, weights, gate, value, budget_exceeded, lam, explored)
            + "".join(f"; {n}" for n in notes) + self.order_note()
            + (f"; cascade {cascade[0]} -> {cascade[1]} below mean log p {self.settings.cascade_below_logprob:g}" if cascade else ""),
            cascade=cascade, cascade_below_logprob=self.settings.cascade_below_logprob if cascade else None,
        )

    def _cascade(self, request: RequestFeatures, chosen: list[Option]) -> tuple[str, ...]:
        """Generate with cascading on: try the cheapest expert of S first, the top one if unsure.

        Both fit the request's budgets alone; their predicted energies together and the two
        answers' latencies in a row are checked against the budgets too.
        """
        if request.mode != "generate" or self.settings.cascade_below_logprob is None or len(chosen) < 2:
            return ()
        top = chosen[0]
        first = min(chosen, key=lambda o: (option_energy(o), o.expert))
        if first is top or first.cost is None or top.cost is None:
            return ()
        if request.latency_budget_ms is not None and first.cost.latency_ms + top.cost.latency_ms > request.latency_budget_ms:
            return ()
        if request.energy_budget_j is not None and first.cost.energy_j + top.cost.energy_j > request.energy_budget_j:
            return ()
        return (first.expert, top.expert)

    def _reason(self, request, chosen, weights, gate, value, budget_exceeded, lam=0.0, explored=False) -> str:
        def fmt(o: Option) -> str:
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
        elif request.mode == "generate":
            head += (f": {chosen[0].expert} answers, " + ("exploring (feedback)" if explored else "argmax q - price x E")
                     + f" at price {lam:.4g}/J, value {value:.3f}")
            head += (" within " + " / ".join(budgets)) if budgets else " (no budget)"
        elif self.settings.ensemble:
            head += (f": S={{{', '.join(o.expert for o in chosen)}}} predicted q={value:.3f} "
                     f"(best single, then measured ensemble gains) at price {lam:.4g}/J")
            head += (" within " + " / ".join(budgets)) if budgets else " (no budget)"
        else:
            head += f": S={{{', '.join(o.expert for o in chosen)}}} Q={value:.3f}"
            head += (" within " + " / ".join(budgets)) if budgets else " (no budget)"
        if request.throttled:
            head += f" ({request.throttle_reason}: cheapest expert only)"
        return head + "; " + "; ".join(fmt(o) for o in chosen)

    def _infeasible(self, request, options: list[Option], groups, gate: GateOutput, lam: float) -> Plan:
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
            f"no expert fits {' and '.join(asked)}: {feasible_hint(request, cheap, fast, lam)}",
            cheapest_energy_j=cheap.cost.energy_j, cheapest_latency_ms=fast.cost.latency_ms, param=param,
        )
