"""``packed``: bin packing at admission, for energy at low load (docs/capacity.md, decode packing).

A sequence never moves once it runs (its KV cache lives on its replica), so packing has to happen
when a request is admitted: it goes to the FULLEST replica that still has batch room (its
occupancy plus this request within ``FILL`` of its batch) and meets the request's latency budget
where one is given; none with room: the least loaded. The replicas left without work idle (a
decode step reads every weight once whatever the batch, so one full batch costs far less per token
than several small ones) and are the ones the capacity controller can release. ``least_loaded``
does the opposite: it spreads the load, every replica stays busy at a small batch.
"""

from __future__ import annotations

from collections.abc import Sequence

from ..base import Candidate, Plan, RequestFeatures
from .base import Policy, load_fraction, predict
from .registry import register

#: most of a replica's batch a packed replica is filled to (the capacity planner's max_batch_fill)
FILL = 0.9


def has_room(c: Candidate, fill: float = FILL) -> bool:
    """Whether ``c`` takes one more request within ``fill`` of its batch (a cold replica: no)."""
    if c.cold_start_ms:
        return False
    batch = c.profile.max_batch if c.profile else 1
    return load_fraction(c) * max(1, batch) + 1 <= fill * max(1, batch)


@register
class Packed(Policy):
    """Send each request to the fullest replica with batch room (within the latency budget);
    ties: expert name, then replica index (deterministic)."""

    name = "packed"

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        pool = self.pool(request, candidates)
        estimates = {c.key: predict(self.cost, request, c) for c in pool}

        def fits(c: Candidate) -> bool:
            est = estimates[c.key]
            return has_room(c) and (request.latency_budget_ms is None or est is None
                                    or est.latency_ms <= request.latency_budget_ms)

        room = sorted((c for c in pool if fits(c)), key=lambda c: (-load_fraction(c), c.expert, c.replica))
        rest = sorted((c for c in pool if not fits(c)), key=lambda c: (load_fraction(c), c.expert, c.replica))
        ranked = tuple(room + rest)
        best = ranked[0]
        est = estimates[best.key]
        why = (f"packed: {best.expert}/{best.replica}, the fullest with room, at {load_fraction(best):.2f} of its batch"
               if room else f"packed: no replica with room; least loaded {best.expert}/{best.replica} at "
               f"{load_fraction(best):.2f} of its batch")
        return Plan(
            ranked=ranked, policy=self.name, subset=(best.expert,), weights={best.expert: 1.0},
            reason=why + (f" ({request.throttle_reason}: cheapest expert only)" if request.throttled else ""),
            predicted_energy_j=est.energy_j if est else None, predicted_latency_ms=est.latency_ms if est else None,
        )
