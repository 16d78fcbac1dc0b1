"""``round_robin``: the eligible experts in turn."""

from __future__ import annotations

import itertools
from collections.abc import Sequence

from ..base import Candidate, Plan, RequestFeatures
from .base import Policy
from .registry import register


@register
class RoundRobin(Policy):
    name = "round_robin"

    def __init__(self, **kw) -> None:
        super().__init__(**kw)
        self._turn = itertools.count()

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        experts = sorted({c.expert for c in pool})
        chosen = experts[next(self._turn) % len(experts)]
        return self.plan_for(request, pool, chosen, f"round robin: {chosen}")
