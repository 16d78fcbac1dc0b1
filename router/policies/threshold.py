"""``threshold``: RouteLLM-style two-model router (Ong et al. 2024, our reading).

The strong expert answers when the gate predicts it gains at least ``settings.threshold`` in
quality over the weak one; the weak one otherwise.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..base import Candidate, Plan, RequestFeatures
from .base import Policy
from .registry import register


@register
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
