"""``strongest``: the highest configured quality prior (the same expert for every prompt)."""

from __future__ import annotations

from collections.abc import Sequence

from ..base import Candidate, Plan, RequestFeatures
from .base import Policy
from .registry import register


@register
class Strongest(Policy):
    name = "strongest"

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        experts = sorted({c.expert for c in pool})
        q = {e: self.settings.quality_prior.get(e, 0.5) for e in experts}
        chosen = max(experts, key=lambda e: (q.get(e, 0.0), e))
        return self.plan_for(request, pool, chosen, f"strongest: {chosen} (quality {q.get(chosen, 0.0):.2f})")
