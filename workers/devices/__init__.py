"""Device backends behind one interface (:class:`~workers.devices.base.Device`).

:data:`BACKENDS` maps each backend name to its spec class (``wattserve/devices.py``) and the
module whose ``open_from_spec`` builds it. :func:`open_device` imports that module only when an
expert asks for the backend, so ``pynvml`` is imported only for ``nvml``.
"""

from __future__ import annotations

import importlib
import time
from collections.abc import Callable
from dataclasses import dataclass

from wattserve.devices import CpuDeviceSpec, DeviceSpecBase, NvmlDeviceSpec, SimulatedDeviceSpec
from wattserve.errors import DeviceError
from workers.devices.base import Device, DeviceContext

__all__ = ["BACKENDS", "Backend", "Device", "DeviceContext", "open_device"]


@dataclass(frozen=True, slots=True)
class Backend:
    """One device backend: the spec it is configured by and the module that opens it."""

    spec: type[DeviceSpecBase]
    module: str  # defines ``open_from_spec(spec, context) -> Device``

    def factory(self) -> Callable[[DeviceSpecBase, DeviceContext], Device]:
        return importlib.import_module(self.module).open_from_spec


BACKENDS: dict[str, Backend] = {
    "cpu": Backend(CpuDeviceSpec, "workers.devices.cpu"),
    "nvml": Backend(NvmlDeviceSpec, "workers.devices.nvml"),
    "simulated": Backend(SimulatedDeviceSpec, "workers.devices.simulated"),
}


def open_device(spec: DeviceSpecBase, *, model_params: int = 0,
                clock: Callable[[], float] | None = None, include_child_processes: bool = False) -> Device:
    """Open the device ``spec`` names.

    ``model_params`` (parameters held on this device) is required by ``simulated`` devices,
    which turn each step's tokens into modeled seconds and joules. ``clock`` (seconds,
    monotonic) defaults to ``time.monotonic``; tests and simulations inject their own.
    ``include_child_processes``: the ``cpu`` device also charges the CPU time of this process's
    descendants (engines such as vLLM compute in child processes).
    Raises :class:`DeviceError` when the backend cannot be opened.
    """
    backend = BACKENDS.get(spec.backend)
    if backend is None or not isinstance(spec, backend.spec):
        raise DeviceError(f"unknown device backend {spec.backend!r}; known: {', '.join(BACKENDS)}")
    context = DeviceContext(model_params, clock or time.monotonic, include_child_processes)
    return backend.factory()(spec, context)
