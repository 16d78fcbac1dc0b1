"""The power governor's door to an expert replica's device, shared by text and image experts.

Node agents (``runtime/power/agent.py``) call ``power_sample`` and ``apply_power_cap`` on the
expert actors whose device lives inside the actor (simulated GPUs); the replica also remembers
the priorities of the requests it started, so the governor can tell an expert that serves only
low-priority work.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time

from wattserve.power import CapResult, DeviceSample, PowerCap
from wattserve.types import Priority

from .devices.control import apply_cap, sample_device

log = logging.getLogger(__name__)

#: request priorities remembered for the power governor's "serves only low priority" test
PRIORITY_MEMORY = 4096


class GovernedDevice:
    """Mixin: needs ``self.device``, ``self.spec`` (name, priority_class) and ``self.replica``."""

    def _init_governed(self) -> None:
        self._priorities: collections.deque[tuple[float, Priority]] = collections.deque(maxlen=PRIORITY_MEMORY)

    def note_priority(self, priority: Priority) -> None:
        self._priorities.append((time.monotonic(), priority))

    async def power_sample(self, window_s: float = 60.0) -> DeviceSample:
        """This replica's device reading, its configured priority class and how many requests it
        started in the last ``window_s`` seconds at LOW and at higher priority."""
        since = time.monotonic() - window_s
        recent = [p for t, p in list(self._priorities) if t >= since]
        low = sum(1 for p in recent if p == Priority.LOW)
        return await asyncio.to_thread(
            sample_device, self.device, priority_class=self.spec.priority_class,
            low_requests=low, other_requests=len(recent) - low,
        )

    async def apply_power_cap(self, cap: PowerCap, gpu: str = "") -> CapResult:
        """Lock/unlock the SM clock and set/reset the power limit of this replica's device."""
        result = await asyncio.to_thread(apply_cap, self.device, cap, gpu or f"{self.spec.name}/{self.replica}")
        if result.applied:
            log.info("expert %s/%d: power cap %s (%s)", self.spec.name, self.replica, cap, cap.reason)
        else:
            log.warning("expert %s/%d: cannot apply power cap: %s", self.spec.name, self.replica, result.error)
        return result
