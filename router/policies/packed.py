"""``packed``: bin packing at admission over every eligible replica, for energy at low load.

Each request goes to the FULLEST replica that still has batch room (its occupancy plus this
request within ``FILL`` of its batch) and meets the request's latency budget where one is given;
none with room: the least loaded. This is :func:`order_replicas`'s ``packed`` order applied to the
whole pool (every expert's replicas), the rule the other policies apply to their chosen expert's
replicas with ``gateway.replica_order: packed`` (docs/capacity.md, decode packing).
"""

from __future__ import annotations

from collections.abc import Sequence

from ..base import Candidate, Plan, RequestFeatures
from .base import Policy, load_fraction, order_replicas, packs, predict
from .registry import register


@register
class Packed(Policy):
    """Send each request to the fullest replica with batch room (within the latency budget);
    ties: expert name, then replica index (deterministic)."""

    name = "packed"

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        ranked = tuple(order_replicas(pool, "packed", request=request, cost=self.cost))
        best = ranked[0]
        est = predict(self.cost, request, best)
        why = (f"packed: {best.expert}/{best.replica}, the fullest with room, at {load_fraction(best):.2f} of its batch"
               if packs(request, best, self.cost) else f"packed: no replica with room; least loaded "
               f"{best.expert}/{best.replica} at {load_fraction(best):.2f} of its batch")
        return Plan(
            ranked=ranked, policy=self.name, subset=(best.expert,), weights={best.expert: 1.0},
            reason=why + (f" ({request.throttle_reason}: cheapest expert only)" if request.throttled else ""),
            predicted_energy_j=est.energy_j if est else None, predicted_latency_ms=est.latency_ms if est else None,
        )
