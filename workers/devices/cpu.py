"""CPU energy, modeled from this process's CPU time.

This host exposes no energy counter (no RAPL, no hwmon: see ENVIRONMENT.md), so the joules are
an estimate and labelled ``modeled:cpu``::

    energy_j = watts_per_core * cpu_seconds_since_open + idle_power_w * wall_seconds_since_open

``cpu_seconds`` is user + system time of every thread of this process (``time.process_time``),
so a step that keeps two cores busy for one second is charged two core-seconds. Work done by
other processes on the host is not charged: this device accounts for the expert that owns it,
not for the machine. An engine that computes in child processes (vLLM runs its engine core and
workers as children of the expert) opens the device with ``include_children=True``: then the
CPU time of every descendant process counts too (:class:`ProcessTreeCpuTime`).

It cannot be capped: its "power" is a model of CPU time, and CPU frequency control is the
operating system's business, not this process's. :meth:`CpuDevice.control` says so, and the
control methods raise :class:`~wattserve.errors.ActuationUnavailable`.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable

from wattserve.devices import CpuDeviceSpec
from wattserve.power import DeviceControl
from workers.devices.base import Device, DeviceContext


def open_from_spec(spec: CpuDeviceSpec, context: DeviceContext) -> CpuDevice:
    """The ``cpu`` backend's factory (``workers.devices.BACKENDS``)."""
    return CpuDevice(spec.watts_per_core, spec.idle_power_w, clock=context.clock,
                     include_children=context.include_child_processes)


class ProcessTreeCpuTime:
    """User + system CPU seconds of a process and all its descendants, never decreasing.

    A descendant that exits takes its counters with it, so the last reading of every process
    seen is remembered and departed ones stay in the sum. CPU time a child spends between our
    last reading and its exit is lost (at most one reading interval of that child).
    """

    def __init__(self, pid: int | None = None) -> None:
        import psutil  # a declared dependency; imported here so plain CPU devices need not load it

        self._psutil = psutil
        self._root = psutil.Process(pid or os.getpid())
        self._seen: dict[tuple[int, float], float] = {}  # (pid, create_time) -> last cpu seconds

    def __call__(self) -> float:
        procs = [self._root]
        try:
            procs += self._root.children(recursive=True)
        except self._psutil.Error:
            pass  # the tree is changing under us; the root's own time still counts
        for proc in procs:
            try:
                with proc.oneshot():
                    t = proc.cpu_times()
                    key = (proc.pid, proc.create_time())
            except self._psutil.Error:
                continue  # exited between listing and reading: its last reading stays
            self._seen[key] = max(self._seen.get(key, 0.0), t.user + t.system)
        return sum(self._seen.values())


class CpuDevice(Device):
    """Modeled CPU energy of the current process (and, with ``include_children``, of its
    descendants). ``clock`` and ``cpu_seconds`` are injectable."""

    def __init__(
        self,
        watts_per_core: float = 4.4,
        idle_power_w: float = 0.0,
        *,
        clock: Callable[[], float] = time.monotonic,
        cpu_seconds: Callable[[], float] | None = None,
        include_children: bool = False,
    ) -> None:
        if watts_per_core <= 0 or idle_power_w < 0:
            raise ValueError("watts_per_core must be > 0 and idle_power_w >= 0")
        self.watts_per_core = watts_per_core
        self.idle_power_w = idle_power_w
        self.include_children = include_children
        if cpu_seconds is None:
            cpu_seconds = ProcessTreeCpuTime() if include_children else time.process_time
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
        return f"cpu (pid {os.getpid()}{' and its child processes' if self.include_children else ''})"

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
