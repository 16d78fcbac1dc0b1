"""A day of load from one hour of an Azure LLM inference trace.

The 2023 traces cover about an hour each. A day is made of 24 replays of that hour, each
rate-scaled through a diurnal curve (:class:`DayShape`) with ``runtime.power.workload.scale_trace``
(replicated copies shifted by up to a minute, thinned to the hour's rate, priority drawn per
request), so every hour keeps the trace's own minute-scale bursts and token sizes.

The curve is an assumption, not a measurement in our data: a raised cosine between
``trough_fraction`` x peak (at ``peak_hour`` - 12 h) and the peak (at ``peak_hour``, local 14:00 by
default); 0.35 gives a 2.9x peak-to-trough ratio. The week-long Azure 2024 traces that would let
us fit it are not in ``shared/data`` (only their description is), so this is a labelled choice:
change it with ``--trough-fraction`` / ``--peak-hour``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from runtime.power.workload import Trace, Workload, scale_trace

HOUR_S = 3600.0


@dataclass(frozen=True, slots=True)
class DayShape:
    """Load multiplier over the day, 1.0 at the peak hour."""

    trough_fraction: float = 0.35
    peak_hour: float = 14.0

    def __post_init__(self) -> None:
        if not 0 < self.trough_fraction <= 1:
            raise ValueError(f"trough_fraction must be in (0, 1] (got {self.trough_fraction})")

    def multiplier(self, hour: float) -> float:
        """Fraction of the peak rate at ``hour`` (0-24, may be fractional)."""
        wave = 0.5 * (1.0 + math.cos(2.0 * math.pi * (hour - self.peak_hour) / 24.0))
        return self.trough_fraction + (1.0 - self.trough_fraction) * wave


def day_workload(trace: Trace, peak_rate_rps: float, *, hp_fraction: float, seed: int, hours: float = 24.0,
                 shape: DayShape | None = None, start_hour: float = 0.0) -> Workload:
    """``hours`` of load starting at ``start_hour``: hour ``h`` replays the trace at
    ``peak_rate_rps x shape.multiplier(h + 0.5)``, stretched onto a full hour."""
    shape = shape or DayShape()
    if hours <= 0:
        raise ValueError(f"hours must be > 0 (got {hours})")
    span = trace.duration_s
    stretch = HOUR_S / span  # the trace hour is a little under 3600 s; its rate is kept
    parts = []
    for i in range(math.ceil(hours)):
        length = min(1.0, hours - i) * HOUR_S
        hour = start_hour + i
        rate = peak_rate_rps * shape.multiplier((hour + 0.5) % 24.0) * stretch
        w = scale_trace(trace, rate, hp_fraction=hp_fraction, seed=seed + i)
        at = w.arrival_s * stretch
        keep = at < length
        parts.append((at[keep] + i * HOUR_S, w.prompt_tokens[keep], w.output_tokens[keep], w.high_priority[keep]))
    arrival, prompt, output, hp = (np.concatenate(x) for x in zip(*parts, strict=True))
    return Workload(name=trace.name, arrival_s=arrival, prompt_tokens=prompt, output_tokens=output, high_priority=hp)
