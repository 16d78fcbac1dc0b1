"""The cluster power picture that operators see: the provisioned budget and the caps in force.

One object per gateway (``Gateway.power``). The power governor writes it (budget, cap events,
which replica is capped how); the Prometheus exporter (``runtime/metrics.py``) and the admin
surfaces read it. Device readings (power, power limit, SM clock) are not here: they come with
each replica's profile.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field


@dataclass(slots=True)
class PowerState:
    """What the governor decided, in watts and named cap levels.

    ``budget_w`` is the provisioned power budget (None: no governor budget set).
    ``cap_events`` counts actuations by kind (e.g. ``t1``, ``t2``, ``brake``, ``uncap``).
    ``caps`` maps ``(expert, replica)`` to the cap it is under now (e.g. ``sm_clock:1275``).
    """

    budget_w: float | None = None
    cap_events: Counter[str] = field(default_factory=Counter)
    caps: dict[tuple[str, int], str] = field(default_factory=dict)

    def mirror(self, status) -> None:
        """Copy what the governor reports (a ``wattserve.power.PowerStatus``) into this picture."""
        budgets = [r.provisioned_power_w for r in status.rows if r.provisioned_power_w is not None]
        self.budget_w = sum(budgets) if budgets else None
        self.cap_events = Counter(status.counters)
        self.caps = {
            (g.expert, g.replica): f"sm_clock:{g.locked_sm_clock_mhz:g}"
            for g in status.gpus
            if g.expert and g.locked_sm_clock_mhz is not None
        }

    def record_cap_event(self, kind: str, count: int = 1) -> None:
        """Count ``count`` actuations of ``kind`` (monotonic: exported as a Prometheus counter)."""
        self.cap_events[kind] += count
