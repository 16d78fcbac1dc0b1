"""``cheapest``: the expert with the lowest predicted energy for this request."""

from __future__ import annotations

from collections.abc import Sequence

from ..base import Candidate, Plan, RequestFeatures
from .base import Policy, predict
from .registry import register


@register
class Cheapest(Policy):
    name = "cheapest"

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        groups = self.replica_groups(request, pool)
        energy = {}
        for e, reps in groups.items():
            est = predict(self.cost, request, reps[0])
            energy[e] = est.energy_j if est else float("inf")
        chosen = min(energy, key=lambda e: (energy[e], e))
        return self.plan_for(request, pool, chosen, f"cheapest: {chosen} ({energy[chosen]:.3g} J predicted)")
