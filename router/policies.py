"""Routing policies behind one interface: MoE² (``router/moe2.py``) and the baselines it must beat.

Every policy ranks replicas for a request from plain values and returns a :class:`Plan`. The
baselines ignore per-request budgets (that is what they are baselines for) but all of them obey
tenant/cluster throttling: a throttled request only sees the cheapest expert's replicas.

- ``least_loaded``: the replica with the lowest occupancy.
- ``random``: an expert uniformly at random.
- ``round_robin``: experts in turn.
- ``cheapest``: the lowest predicted energy.
- ``strongest``: the highest configured quality prior (the same expert for every prompt).
- ``threshold``: RouteLLM-style two-model router, the strong expert when the gate predicts it
  gains at least ``threshold`` in quality over the weak one (Ong et al. 2024, our reading).
"""

from __future__ import annotations

import itertools
import random
from collections.abc import Sequence

from wattserve.errors import NoHealthyExpert

from .base import Candidate, Plan, RequestFeatures, RouterSettings
from .cost import CostEstimate, CostModel
from .gate import GateOutput, PriorGate


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
                       inflight=c.inflight, queue=request.mode == "generate")
    return est.waiting(c.cold_start_ms) if est is not None and c.cold_start_ms else est


def by_expert(pool: Sequence[Candidate]) -> dict[str, list[Candidate]]:
    """Replicas grouped by expert, each group least loaded first (ties: lower replica index)."""
    groups: dict[str, list[Candidate]] = {}
    for c in pool:
        groups.setdefault(c.expert, []).append(c)
    return {e: sorted(g, key=lambda c: (load_fraction(c), c.replica)) for e, g in groups.items()}


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

    def __init__(self, rng: random.Random | None = None, cost: CostModel | None = None,
                 settings: RouterSettings | None = None) -> None:
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

    def plan_for(self, request: RequestFeatures, pool: list[Candidate], chosen: str, reason: str) -> Plan:
        groups = by_expert(pool)
        order = [chosen] + sorted(e for e in groups if e != chosen)
        ranked = tuple(c for e in order for c in groups[e])
        est = predict(self.cost, request, groups[chosen][0])
        why = reason + (f" ({request.throttle_reason}: cheapest expert only)" if request.throttled else "")
        return Plan(
            ranked=ranked, policy=self.name, reason=why, subset=(chosen,), weights={chosen: 1.0},
            predicted_energy_j=est.energy_j if est else None, predicted_latency_ms=est.latency_ms if est else None,
            gate=request.gate.source if self.uses_gate and request.gate else "",
        )


class LeastLoaded(Policy):
    """Send each request to the replica with the lowest occupancy; ties broken at random."""

    name = "least_loaded"

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        jitter = {c.key: self.rng.random() for c in pool}
        ranked = tuple(sorted(pool, key=lambda c: (load_fraction(c), jitter[c.key])))
        best = ranked[0]
        plan = self.plan_for(request, list(ranked), best.expert, "")
        return Plan(
            ranked=ranked, policy=self.name, subset=(best.expert,), weights={best.expert: 1.0},
            reason=f"least loaded: {best.expert}/{best.replica} at {load_fraction(best):.2f} of its batch"
            + (f" ({request.throttle_reason}: cheapest expert only)" if request.throttled else ""),
            predicted_energy_j=plan.predicted_energy_j, predicted_latency_ms=plan.predicted_latency_ms,
        )


class RandomExpert(Policy):
    name = "random"

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        chosen = self.rng.choice(sorted({c.expert for c in pool}))
        return self.plan_for(request, pool, chosen, f"random: {chosen}")


class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, *args, **kw) -> None:
        super().__init__(*args, **kw)
        self._turn = itertools.count()

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        experts = sorted({c.expert for c in pool})
        chosen = experts[next(self._turn) % len(experts)]
        return self.plan_for(request, pool, chosen, f"round robin: {chosen}")


class Cheapest(Policy):
    name = "cheapest"

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        groups = by_expert(pool)
        energy = {}
        for e, reps in groups.items():
            est = predict(self.cost, request, reps[0])
            energy[e] = est.energy_j if est else float("inf")
        chosen = min(energy, key=lambda e: (energy[e], e))
        return self.plan_for(request, pool, chosen, f"cheapest: {chosen} ({energy[chosen]:.3g} J predicted)")


class Strongest(Policy):
    name = "strongest"

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        experts = sorted({c.expert for c in pool})
        q = {e: self.settings.quality_prior.get(e, 0.5) for e in experts}
        chosen = max(experts, key=lambda e: (q.get(e, 0.0), e))
        return self.plan_for(request, pool, chosen, f"strongest: {chosen} (quality {q.get(chosen, 0.0):.2f})")


class Threshold(Policy):
    name = "threshold"
    uses_gate = True

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        experts = sorted({c.expert for c in pool})
        gate = self.quality(request, experts)
        strong, weak = self.pair(experts)
        if strong not in experts or weak not in experts:
            chosen = strong if strong in experts else (weak if weak in experts else experts[0])
            return self.plan_for(request, pool, chosen, f"threshold: only {chosen} available")
        gain = gate.quality.get(strong, 0.0) - gate.quality.get(weak, 0.0)
        chosen = strong if gain >= self.settings.threshold else weak
        return self.plan_for(
            request, pool, chosen,
            f"threshold: predicted gain of {strong} over {weak} {gain:+.3f} vs {self.settings.threshold:+.3f} -> {chosen}",
        )

    def pair(self, experts: Sequence[str]) -> tuple[str, str]:
        s = self.settings
        prior = s.quality_prior
        ranked = sorted(prior, key=lambda e: (prior[e], e)) if prior else sorted(experts)
        return s.strong or ranked[-1], s.weak or ranked[0]


def _policies() -> dict[str, type[Policy]]:
    from .moe2 import MoE2

    return {p.name: p for p in (LeastLoaded, RandomExpert, RoundRobin, Cheapest, Strongest, Threshold, MoE2)}


POLICY_NAMES = ("least_loaded", "random", "round_robin", "cheapest", "strongest", "threshold", "moe2")


def make_policy(name: str, rng: random.Random | None = None, cost: CostModel | None = None,
                settings: RouterSettings | None = None) -> Policy:
    try:
        cls = _policies()[name]
    except KeyError:
        raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(sorted(POLICY_NAMES))}") from None
    return cls(rng=rng, cost=cost, settings=settings)
