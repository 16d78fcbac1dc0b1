"""What every routing policy shares: eligibility, throttling, cost prediction, the replica order
(least loaded or packed, :func:`order_replicas`) and a plan that ranks one expert's replicas first.

The baselines ignore per-request budgets (that is what they are baselines for) but all of them obey
tenant/cluster throttling: a throttled request only sees the cheapest expert's replicas.
"""

from __future__ import annotations

import random
from collections.abc import Sequence

from wattserve.errors import NoHealthyExpert

from ..base import REPLICA_ORDERS, Candidate, Plan, ReplicaOrder, RequestFeatures, RouterSettings
from ..cost import CostEstimate, CostModel
from ..gate import GateOutput, PriorGate


def eligible(request: RequestFeatures, candidates: Sequence[Candidate]) -> list[Candidate]:
    """Healthy replicas that may serve ``request`` (only the pinned expert's, if pinned)."""
    pool = [c for c in candidates if request.expert is None or c.expert == request.expert]
    healthy = [c for c in pool if c.healthy]
    if not healthy:
        what = f"expert {request.expert!r}" if request.expert else "any expert"
        # What the replicas say about themselves (a failed engine start, a dead engine) is the
        # readable part of this error for an operator.
        reasons = sorted({f"{c.expert}/{c.replica}: {c.profile.error}" for c in pool if c.profile and c.profile.error})
        detail = f": {'; '.join(reasons)[:600]}" if reasons else ""
        raise NoHealthyExpert(
            f"no healthy replica of {what} ({len(pool)} known, all unhealthy or starting){detail}; retry shortly"
        )
    return healthy


def load_fraction(c: Candidate) -> float:
    """Occupancy of a replica: what it is running or queueing, relative to its batch size.

    The gateway's own in-flight count is fresher than the replica's last published queue, so the
    larger of the two is used. A cold replica (none running: a request would wait for its start)
    ranks after every warm one.
    """
    if c.cold_start_ms:
        return float("inf")
    queued = c.profile.queue_depth if c.profile else 0
    batch = c.profile.max_batch if c.profile else 1
    return max(c.inflight, queued) / max(1, batch)


def predict(cost: CostModel, request: RequestFeatures, c: Candidate) -> CostEstimate | None:
    """Predicted cost of ``request`` on replica ``c`` (a cold replica's start included in its latency)."""
    est = cost.predict(c.profile, c.expert, request.tokens_in, request.tokens_out,
                       inflight=c.inflight, queue=request.mode == "generate", scored_tokens=request.scored_tokens)
    return est.waiting(c.cold_start_ms) if est is not None and c.cold_start_ms else est


#: most of a replica's batch packing fills it to (the capacity planner's ``max_batch_fill`` default)
FILL = 0.9


def has_room(c: Candidate, fill: float = FILL) -> bool:
    """Whether ``c`` takes one more request within ``fill`` of its batch (a cold replica: no)."""
    if c.cold_start_ms:
        return False
    batch = max(1, c.profile.max_batch if c.profile else 1)
    return load_fraction(c) * batch + 1 <= fill * batch


def packs(request: RequestFeatures | None, c: Candidate, cost: CostModel | None) -> bool:
    """Whether packing may put ``request`` on ``c``: batch room (:func:`has_room`) and, where the
    request gives ``latency_budget_ms`` and its latency can be predicted, a prediction within it."""
    if not has_room(c):
        return False
    if request is None or request.latency_budget_ms is None or cost is None:
        return True
    est = predict(cost, request, c)
    return est is None or est.latency_ms <= request.latency_budget_ms


def order_replicas(replicas: Sequence[Candidate], order: ReplicaOrder = "least_loaded", *,
                   request: RequestFeatures | None = None, cost: CostModel | None = None) -> list[Candidate]:
    """The replica-ordering rule every policy uses: which replica a request tries first.

    ``least_loaded``: the lowest occupancy first (spreads the load: every replica stays busy at a
    small batch). ``packed``: bin packing at admission (docs/capacity.md, decode packing): the
    FULLEST replica that :func:`packs` the request first, then the rest least loaded first. A
    sequence never moves once it runs (its KV cache lives on its replica), so packing has to happen
    when a request is admitted; the replicas it leaves without work idle and are the ones the
    capacity controller releases (``release_order``: emptiest first). Ties: expert name, then
    replica index (deterministic).
    """
    if order == "least_loaded":
        return sorted(replicas, key=lambda c: (load_fraction(c), c.expert, c.replica))
    if order != "packed":
        raise ValueError(f"unknown replica order {order!r}; known: {', '.join(REPLICA_ORDERS)}")
    room = [c for c in replicas if packs(request, c, cost)]
    taken = {c.key for c in room}
    rest = [c for c in replicas if c.key not in taken]
    return (sorted(room, key=lambda c: (-load_fraction(c), c.expert, c.replica))
            + sorted(rest, key=lambda c: (load_fraction(c), c.expert, c.replica)))


def by_expert(pool: Sequence[Candidate], order: ReplicaOrder = "least_loaded", *,
              request: RequestFeatures | None = None, cost: CostModel | None = None) -> dict[str, list[Candidate]]:
    """Replicas grouped by expert, each group in ``order`` (:func:`order_replicas`)."""
    groups: dict[str, list[Candidate]] = {}
    for c in pool:
        groups.setdefault(c.expert, []).append(c)
    return {e: order_replicas(g, order, request=request, cost=cost) for e, g in groups.items()}


def throttle(request: RequestFeatures, pool: list[Candidate], cost: CostModel) -> list[Candidate]:
    """A throttled request may only use the expert with the lowest predicted energy."""
    if not request.throttled or request.expert is not None:
        return pool
    energies = {}
    for c in pool:
        est = predict(cost, request, c)
        energies[c.expert] = min(energies.get(c.expert, float("inf")), est.energy_j if est else float("inf"))
    cheapest = min(energies, key=lambda e: (energies[e], e))
    return [c for c in pool if c.expert == cheapest]


class Policy:
    """Shared plumbing: eligibility, throttling, and a plan that ranks one expert's replicas first."""

    name = "base"
    uses_gate = False  # whether the gateway must run the (fitted) gate for this policy

    def __init__(self, *, rng: random.Random | None = None, cost: CostModel | None = None,
                 settings: RouterSettings | None = None) -> None:
        # The cost model is shared with whoever teaches it (the gateway's routing service), so
        # it is given here once and never swapped afterwards.
        self.rng = rng or random.Random()
        self.cost = cost or CostModel()
        self.settings = settings or RouterSettings()

    def pool(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> list[Candidate]:
        return throttle(request, eligible(request, candidates), self.cost)

    def quality(self, request: RequestFeatures, experts: Sequence[str]) -> GateOutput:
        if request.gate is not None:
            return request.gate
        prior = {e: self.settings.quality_prior.get(e, 0.5) for e in experts}
        return PriorGate(prior)("")

    def replica_groups(self, request: RequestFeatures, pool: Sequence[Candidate]) -> dict[str, list[Candidate]]:
        """The pool's replicas by expert, each expert's in the configured ``replica_order``."""
        return by_expert(pool, self.settings.replica_order, request=request, cost=self.cost)

    def order_note(self) -> str:
        """What a plan's reason says of the replica order (nothing for the default spread)."""
        return "; replicas packed (fullest with room first)" if self.settings.replica_order == "packed" else ""

    def plan_for(self, request: RequestFeatures, pool: list[Candidate], chosen: str, reason: str) -> Plan:
        groups = self.replica_groups(request, pool)
        order = [chosen] + sorted(e for e in groups if e != chosen)
        ranked = tuple(c for e in order for c in groups[e])
        est = predict(self.cost, request, groups[chosen][0])
        why = reason + (f" ({request.throttle_reason}: cheapest expert only)" if request.throttled else "")
        why += self.order_note()
        return Plan(
            ranked=ranked, policy=self.name, reason=why, subset=(chosen,), weights={chosen: 1.0},
            predicted_energy_j=est.energy_j if est else None, predicted_latency_ms=est.latency_ms if est else None,
            gate=request.gate.source if self.uses_gate and request.gate else "",
        )
