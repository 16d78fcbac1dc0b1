"""Device backends behind one interface (:class:`~workers.devices.base.Device`).

:func:`open_device` imports a backend only in the branch that chooses it, so ``pynvml`` is
imported only when an expert asks for ``nvml``.
"""

from __future__ import annotations

import time
from collections.abc import Callable

from wattserve.errors import DeviceError
from wattserve.specs import DeviceSpec
from workers.devices.base import Device

__all__ = ["Device", "open_device"]


def open_device(spec: DeviceSpec, *, model_params: int = 0,
                clock: Callable[[], float] | None = None, include_child_processes: bool = False) -> Device:
    """Open the device ``spec`` names.

    ``model_params`` (parameters held on this device) is required by ``simulated`` devices,
    which turn each step's tokens into modeled seconds and joules. ``clock`` (seconds,
    monotonic) defaults to ``time.monotonic``; tests and simulations inject their own.
    ``include_child_processes``: the ``cpu`` device also charges the CPU time of this process's
    descendants (engines such as vLLM compute in child processes).
    Raises :class:`DeviceError` when the backend cannot be opened.
    """
    clock = clock or time.monotonic
    if spec.backend == "cpu":
        from workers.devices.cpu import CpuDevice

        return CpuDevice(spec.watts_per_core, spec.idle_power_w, clock=clock,
                         include_children=include_child_processes)
    if spec.backend == "nvml":
        from workers.devices.nvml import NvmlDevice

        return NvmlDevice(spec.index, clock=clock)
    if spec.backend == "simulated":
        from workers.devices.simulated import SimulatedDevice, load_profile

        if model_params <= 0:
            raise DeviceError(
                f"device simulated:{spec.profile} needs the model's parameter count "
                "(open_device(..., model_params=N)) to model step latency and energy"
            )
        return SimulatedDevice(load_profile(spec.profile or ""), model_params, clock=clock,
                               actuation_delay_s=spec.actuation_delay_s)
    raise DeviceError(f"unknown device backend {spec.backend!r}")
