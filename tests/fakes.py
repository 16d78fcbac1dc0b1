"""Test doubles shared by the suite: each stands where the real thing cannot run in a unit test
(a clock that moves only when told, pynvml without a driver, a Ray actor handle without Ray, a
device whose joules the test decides, MiniLM without its weights)."""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Callable

import numpy as np
import pynvml

from wattserve.types import StepWork
from workers.devices.base import Device


class FakeClock:
    """A clock that moves only when told to. It starts away from 0 so code that takes 0 for
    'never' shows up."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakePynvml:
    """Stands in for the pynvml module where no NVIDIA driver exists (patched where it is used)."""

    NVMLError = pynvml.NVMLError

    def __init__(self, *, fail: dict[str, int] | None = None, energy_mj=(1_000_000,),
                 power_mw: int = 250_000, count: int = 1) -> None:
        self.fail = dict(fail or {})
        self.energy_mj = list(energy_mj)
        self.power_mw = power_mw
        self.count = count
        self.shutdowns = 0

    def __getattr__(self, name: str):
        if name.startswith("NVML_"):  # constants: the real module's values
            return getattr(pynvml, name)
        raise AttributeError(name)

    def _check(self, function: str) -> None:
        if function in self.fail:
            raise pynvml.NVMLError(self.fail[function])

    def nvmlInit(self):
        self._check("nvmlInit")

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-0000000{handle[1]}-fake"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self._check("nvmlDeviceGetTotalEnergyConsumption")
        return self.energy_mj.pop(0) if len(self.energy_mj) > 1 else self.energy_mj[0]

    def nvmlDeviceGetPowerUsage(self, handle):
        self._check("nvmlDeviceGetPowerUsage")
        return self.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetClockInfo(self, handle, clock_type):
        assert clock_type == pynvml.NVML_CLOCK_SM
        return 1755


class ControlFakePynvml(FakePynvml):
    """FakePynvml plus the control calls, recording every call with its arguments."""

    def __init__(self, *, deny: set[str] = frozenset(), **kw) -> None:
        super().__init__(**kw)
        self.calls: list[tuple] = []
        self.deny = deny

    def _control(self, name, *args):
        if name in self.deny:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        self.calls.append((name, *args))

    def nvmlDeviceSetGpuLockedClocks(self, handle, lo, hi):
        self._control("nvmlDeviceSetGpuLockedClocks", handle, lo, hi)

    def nvmlDeviceResetGpuLockedClocks(self, handle):
        self._control("nvmlDeviceResetGpuLockedClocks", handle)

    def nvmlDeviceSetPowerManagementLimit(self, handle, limit_mw):
        self._control("nvmlDeviceSetPowerManagementLimit", handle, limit_mw)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle):
        return 700_000

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle):
        return 200_000, 700_000

    def nvmlDeviceGetMaxClockInfo(self, handle, clock_type):
        return 1980

    def nvmlDeviceGetSupportedMemoryClocks(self, handle):
        return [2619, 1593]

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle, mem_mhz):
        assert mem_mhz == 2619  # the graphics clocks listed at the highest memory clock
        return [1980, 1965, 900, 345]

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{1234 + handle[1]}".encode()


class FakeActor:
    """Stands for a Ray actor handle over a plain object: ``handle.method.remote(*a)`` returns an
    awaitable of the method's result (awaited too when the method is a coroutine)."""

    def __init__(self, obj) -> None:
        self._obj = obj

    def __getattr__(self, name):
        method = getattr(self._obj, name)

        class _Method:
            @staticmethod
            def remote(*args, **kwargs):
                async def call():
                    result = method(*args, **kwargs)
                    return await result if asyncio.iscoroutine(result) else result
                return call()

        return _Method()


class FakeDevice(Device):
    """A device whose joule counter the test drives: by hand (``joules``) or per step
    (``step_cost_j(work)``, booked at ``end_step``). Records the step hooks a modeled device gets."""

    def __init__(self, step_cost_j: Callable[[StepWork], float] | None = None) -> None:
        self.joules = 0.0
        self.step_cost_j = step_cost_j
        self.hooks: list[tuple[str, StepWork | None]] = []

    @property
    def name(self) -> str:
        return "fake"

    @property
    def energy_source(self) -> str:
        return "modeled:fake"

    def energy_j(self) -> float:
        return self.joules

    def power_w(self) -> float:
        return 0.0

    def begin_step(self) -> None:
        self.hooks.append(("begin", None))

    def end_step(self, work: StepWork) -> None:
        self.hooks.append(("end", work))
        if self.step_cost_j is not None:
            self.joules += self.step_cost_j(work)


class FakeEncoder:
    """Bag of hashed words, 384 dims, L2-normalised: stands in for MiniLM where speed matters."""

    dim = 384

    def encode(self, texts, batch_size=32):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


class Collector:
    """An engine loop's sink that keeps every chunk and the error, and says when the request ended."""

    def __init__(self):
        self.events = []
        self.error = None
        self.done = threading.Event()

    def __call__(self, item):
        if isinstance(item, BaseException):
            self.error = item
            self.done.set()
            return
        self.events.extend(item)
        if item[-1].usage is not None:
            self.done.set()

    @property
    def usage(self):
        return self.events[-1].usage if self.events else None
