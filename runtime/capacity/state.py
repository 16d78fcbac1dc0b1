"""The capacity picture operators see: per expert what the controller wants and runs, and its
decisions. The controller writes it; the admin façade and the Prometheus exporter read it.
Standard library only, so the gateway can hold one whether or not the controller runs."""

from __future__ import annotations

from collections import deque
from dataclasses import dataclass, field


@dataclass(slots=True, frozen=True)
class CapacityEvent:
    """One decision: what changed for an expert, and the planner's reason."""

    at_unix_s: float
    expert: str
    action: str  # scale_up, scale_down, scale_to_zero, wake, clock, start_failed, started, removed
    replicas_from: int
    replicas_to: int
    target_clock_mhz: float | None  # recorded only: clocks are not actuated by the controller
    reason: str


@dataclass(slots=True)
class ExpertCapacityState:
    """One expert under the controller (replica counts, clock target, estimates)."""

    expert: str
    wanted: int = 0
    running: int = 0  # healthy replicas taking calls
    starting: int = 0
    cold_starts: int = 0  # replicas started by the controller (waking ones included)
    cold_start_s: float = 0.0  # measured (EWMA) or configured until measured
    target_clock_mhz: float | None = None  # the planner's clock; None where the device has no clock
    clock_applied: bool = False  # never actuated by the controller (recorded for operators)
    # Estimate: the replicas' idle power x replica-seconds not running, against max_replicas always on
    saved_energy_j: float = 0.0
    idle_power_w: float = 0.0
    energy_source: str = ""  # of the profile the plans used
    last_reason: str = ""


@dataclass(slots=True)
class CapacityState:
    """Every sized expert, and the last ``events`` decisions."""

    enabled: bool = False
    experts: dict[str, ExpertCapacityState] = field(default_factory=dict)
    events: deque[CapacityEvent] = field(default_factory=lambda: deque(maxlen=500))
