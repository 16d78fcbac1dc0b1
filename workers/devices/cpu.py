"""CPU energy, modeled from this process's CPU time.

This host exposes no energy counter (no RAPL, no hwmon: see ENVIRONMENT.md), so the joules are
an estimate and labelled ``modeled:cpu``::

    energy_j = watts_per_core * cpu_seconds_since_open + idle_power_w * wall_seconds_since_open

``cpu_seconds`` is user + system time of every thread of this process (``time.process_time``),
so a step that keeps two cores busy for one second is charged two core-seconds. Work done by
child processes or by other processes on the host is not charged: this device accounts for
the expert that owns it, not for the machine.

It cannot be capped: its "power" is a model of CPU time, and CPU frequency control is the
operating system's business, not this process's. :meth:`CpuDevice.control` says so, and the
control methods raise :class:`~wattserve.errors.ActuationUnavailable`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from wattserve.power import DeviceControl
from workers.devices.base import Device


class CpuDevice(Device):
    """Modeled CPU energy of the current process. ``clock`` and ``cpu_seconds`` are injectable."""

    def __init__(
        self,
        watts_per_core: float = 4.4,
        idle_power_w: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu_seconds: Callable[[], float] = time.process_time,
    ) -> None:
        if watts_per_core <= 0 or idle_power_w < 0:
            raise ValueError("watts_per_core must be > 0 and idle_power_w >= 0")
        self.watts_per_core = watts_per_core
        self.idle_power_w = idle_power_w
        self._clock = clock
        self._cpu_seconds = cpu_seconds
        self._t0 = clock()
        self._cpu0 = cpu_seconds()
        self._last_j = 0.0
        # power_w() averages over the interval since its previous call.
        self._power_mark = (self._t0, 0.0)
        self._last_power_w = idle_power_w

    @property
    def name(self) -> str:
        return f"cpu (pid {os.getpid()})"

    @property
    def energy_source(self) -> str:
        return "modeled:cpu"

    def control(self) -> DeviceControl:
        return DeviceControl(reason="device cpu cannot be capped: its power is modeled from CPU time and "
                                    "it has no SM clock or power limit (use nvml or simulated:<profile>)")

    def energy_j(self) -> float:
        """Joules since open: active CPU time at ``watts_per_core`` plus idle power x wall time."""
        cpu_s = max(0.0, self._cpu_seconds() - self._cpu0)
        wall_s = max(0.0, self._clock() - self._t0)
        # Both inputs are monotone; the max() only guards a clock source that is not.
        self._last_j = max(self._last_j, self.watts_per_core * cpu_s + self.idle_power_w * wall_s)
        return self._last_j

    def power_w(self) -> float:
        """Average watts since the previous call (since open on the first call).

        Calls closer together than 1 ms return the previous average: the CPU-time counters tick
        too coarsely for a shorter window to mean anything.
        """
        now, energy = self._clock(), self.energy_j()
        t_prev, e_prev = self._power_mark
        if now - t_prev >= 1e-3:
            self._last_power_w = (energy - e_prev) / (now - t_prev)
            self._power_mark = (now, energy)
        return self._last_power_w
