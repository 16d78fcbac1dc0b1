"""Messages of the power governor: device control capabilities, per-GPU telemetry samples, cap
commands, events and the status operators read.

Standard library only: these cross process boundaries (expert actors -> node agents -> the
governor -> the gRPC servicer) and are pickled by Ray. Units are in the field names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field


class CapLevel(enum.IntEnum):
    """How hard a row is being capped. Each level has its own per-priority clock targets."""

    NONE = 0  # no caps
    T1 = 1  # above T1: low-priority GPUs locked
    T2 = 2  # above T2: low-priority lower, high-priority moderately
    BRAKE = 3  # at or above the budget: every GPU at its lowest clock


@dataclass(slots=True, frozen=True)
class DeviceControl:
    """What the governor may do to a device. ``reason`` says why not, when it may not."""

    can_lock_sm_clock: bool = False
    can_set_power_limit: bool = False
    reason: str = ""

    @property
    def can_actuate(self) -> bool:
        return self.can_lock_sm_clock


@dataclass(slots=True, frozen=True)
class DeviceSample:
    """One device as its owner (an expert actor or a node agent's NVML handle) sees it now.

    ``None`` readings mean the backend cannot know them; ``error`` says why a read failed.
    ``low_requests`` / ``other_requests`` count requests the expert started within the
    governor's priority window (0 for a GPU no expert uses).
    """

    device: str  # human-readable device name
    power_w: float | None
    sm_clock_mhz: float | None = None
    max_sm_clock_mhz: float | None = None
    min_sm_clock_mhz: float | None = None
    locked_sm_clock_mhz: float | None = None  # the clock ceiling in effect; None when unlocked
    power_limit_w: float | None = None
    default_power_limit_w: float | None = None  # nameplate-like limit the device resets to
    min_power_limit_w: float | None = None  # the lowest limit the device accepts (the brake's)
    control: DeviceControl = field(default_factory=DeviceControl)
    uuid: str = ""  # NVML UUID, so node agents can match an expert to the GPU they read
    priority_class: str = "high"  # configured on the expert ("high" where no expert)
    low_requests: int = 0
    other_requests: int = 0
    error: str = ""


@dataclass(slots=True, frozen=True)
class GpuSample:
    """A device sample tagged with where it lives, as the governor receives it."""

    gpu: str  # stable id: "<expert>/<replica>" for expert-owned devices, "<node>/nvml:<i>" else
    node: str
    expert: str  # "" when no expert uses the GPU
    replica: int
    time_unix_s: float
    sample: DeviceSample


@dataclass(slots=True, frozen=True)
class PowerCap:
    """What one GPU should run at: an SM clock ceiling (None: unlocked) and optionally a board
    power limit (None: leave the limit alone, or restore the default if ``reset_power_limit``)."""

    sm_clock_mhz: float | None = None
    power_limit_w: float | None = None
    reset_power_limit: bool = False
    reason: str = ""


@dataclass(slots=True, frozen=True)
class CapResult:
    """The outcome of applying a :class:`PowerCap` to one GPU."""

    gpu: str
    applied: bool
    locked_sm_clock_mhz: float | None = None
    power_limit_w: float | None = None
    error: str = ""
    permanent: bool = False  # the device can never be capped as asked (no control, no permission)


class EventKind(enum.StrEnum):
    CAP = "cap"  # a GPU's clock was locked lower
    UNCAP = "uncap"  # a GPU's clock was raised or unlocked
    BRAKE = "brake"  # a row reached its budget: power brake on
    BRAKE_RELEASE = "brake_release"
    LEVEL = "level"  # a row changed cap level (up or down)
    ALERT = "alert"  # telemetry lost, actuation impossible, agent unreachable
    RECOVERED = "recovered"  # the condition of an earlier alert cleared
    BUDGET = "budget"  # an operator changed a budget


@dataclass(slots=True, frozen=True)
class PowerEvent:
    """One entry of the governor's bounded event log. ``reason`` is for humans."""

    time_unix_s: float
    kind: EventKind
    row: str
    reason: str
    gpu: str = ""
    row_power_w: float | None = None
    provisioned_power_w: float | None = None
    from_sm_clock_mhz: float | None = None
    to_sm_clock_mhz: float | None = None


@dataclass(slots=True, frozen=True)
class GpuStatus:
    gpu: str
    node: str
    row: str
    expert: str
    replica: int
    device: str
    priority: str  # "low" or "high" as the governor classifies it now
    power_w: float | None
    sm_clock_mhz: float | None
    max_sm_clock_mhz: float | None
    locked_sm_clock_mhz: float | None  # what the device reports as in effect
    target_sm_clock_mhz: float | None  # what the policy wants
    power_limit_w: float | None
    can_actuate: bool
    control_reason: str
    sample_age_s: float | None  # None: never sampled
    error: str = ""


@dataclass(slots=True, frozen=True)
class RowStatus:
    name: str
    provisioned_power_w: float | None  # None: monitor only (no budget set)
    power_w: float
    level: CapLevel
    t1_w: float | None
    t2_w: float | None
    brake_w: float | None
    telemetry_ok: bool
    gpus: int
    capped_s: float  # seconds spent at a level above NONE since the governor started


@dataclass(slots=True, frozen=True)
class PowerStatus:
    """What ``Admin.GetPowerStatus`` returns. ``counters`` only ever grow (export as metrics)."""

    enabled: bool
    policy: str
    interval_s: float
    rows: tuple[RowStatus, ...] = ()
    gpus: tuple[GpuStatus, ...] = ()
    events: tuple[PowerEvent, ...] = ()
    counters: dict[str, int] = field(default_factory=dict)
    alerts: tuple[str, ...] = ()  # conditions in effect now
