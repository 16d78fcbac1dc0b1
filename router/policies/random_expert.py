"""``random``: an expert uniformly at random (seeded by the router's ``rng``)."""

from __future__ import annotations

from collections.abc import Sequence

from ..base import Candidate, Plan, RequestFeatures
from .base import Policy
from .registry import register


@register
class RandomExpert(Policy):
    name = "random"

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        chosen = self.rng.choice(sorted({c.expert for c in pool}))
        return self.plan_for(request, pool, chosen, f"random: {chosen}")
