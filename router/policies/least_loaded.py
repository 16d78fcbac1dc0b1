"""``least_loaded``: the replica with the lowest occupancy relative to its batch."""

from __future__ import annotations

from collections.abc import Sequence

from ..base import Candidate, Plan, RequestFeatures
from .base import Policy, load_fraction
from .registry import register


@register
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
