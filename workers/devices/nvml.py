"""NVIDIA GPUs through NVML: measured energy, power, power limit and SM clock.

The only module in the repository that imports ``pynvml`` (nvidia-ml-py), and the one place
where NVML error codes become :class:`DeviceError` with a message that says what to do.

Energy comes from ``nvmlDeviceGetTotalEnergyConsumption`` (millijoules since the driver was
loaded; Volta and later): the counter is read at open and subtracted, and the source is
``measured:nvml``. A background thread reads it every ``sample_interval_s`` (a read takes ~4 ms
on an H100 host, too slow for the metering path) and extends the last reading by the board
power until the next one (see :class:`_CounterReader`). GPUs without that counter fall back to integrating
``nvmlDeviceGetPowerUsage`` samples taken by a background thread (``measured:nvml-power``),
which misses power spikes shorter than the sampling interval.

Several replicas on one GPU (separate processes) each open the same counter. With the counter,
each device joins the GPU's :class:`~workers.devices.gpu_share.GpuEnergyShare` and reports its
share: what the GPU drew while it stepped, split equally with replicas stepping at the same
time, plus an equal part of the idle energy, so the replicas' totals add up to the GPU's. Alone
on its GPU a device gets the whole counter, as before. (The power-integrating fallback has no
common counter to split and meters the whole GPU in every process.)

Control (the power governor's actuators): ``nvmlDeviceSetGpuLockedClocks`` keeps the SM clock in
``[lowest supported, ceiling]`` MHz (a ceiling, not a pin, so an idle GPU still clocks down),
``nvmlDeviceResetGpuLockedClocks`` removes it, and ``nvmlDeviceSetPowerManagementLimit`` takes
**milliwatts**. Both need root on most drivers: a NO_PERMISSION or NOT_SUPPORTED answer becomes
:class:`ActuationUnavailable`, is remembered, and :meth:`NvmlDevice.control` then reports that
this GPU cannot be capped and why.
"""

from __future__ import annotations

import abc
import logging
import threading
import time
from collections.abc import Callable
from typing import Any

from wattserve.devices import NvmlDeviceSpec
from wattserve.errors import ActuationUnavailable, DeviceError, InvalidRequest
from wattserve.power import DeviceControl
from workers.devices.base import Device, DeviceContext
from workers.devices.gpu_share import GpuEnergyShare

log = logging.getLogger(__name__)

try:
    import pynvml
except ImportError:  # nvidia-ml-py is a dependency; keep the error readable if it is missing
    pynvml = None  # type: ignore[assignment]

NO_NVML = "NVML is not available on this host (no NVIDIA driver): use device: cpu or simulated:<profile>"


def open_from_spec(spec: NvmlDeviceSpec, context: DeviceContext) -> NvmlDevice:
    """The ``nvml`` backend's factory (``workers.devices.BACKENDS``)."""
    return NvmlDevice(spec.index, clock=context.clock)


def nvml_error(exc: Exception, what: str, index: int) -> DeviceError:
    """Translate an ``NVMLError`` raised while doing ``what`` on GPU ``index``."""
    code = getattr(exc, "value", None)
    err = {name: getattr(pynvml, f"NVML_ERROR_{name}", object()) for name in (
        "LIBRARY_NOT_FOUND", "DRIVER_NOT_LOADED", "NO_PERMISSION", "NOT_SUPPORTED",
        "FUNCTION_NOT_FOUND", "GPU_IS_LOST", "INVALID_ARGUMENT", "NOT_FOUND")}
    if code in (err["LIBRARY_NOT_FOUND"], err["DRIVER_NOT_LOADED"]):
        message = NO_NVML
    elif code == err["NO_PERMISSION"]:
        message = (f"NVML denied permission for {what} on GPU {index}: run as a user allowed to "
                   "read GPU telemetry, or use device: cpu")
    elif code == err["NOT_SUPPORTED"]:
        message = f"GPU {index} does not support {what}"
    elif code == err["FUNCTION_NOT_FOUND"]:
        message = f"the NVIDIA driver on this host is too old for {what}: update it or use device: cpu"
    elif code == err["GPU_IS_LOST"]:
        message = f"GPU {index} has fallen off the bus ({what}): the host needs attention"
    elif code in (err["INVALID_ARGUMENT"], err["NOT_FOUND"]):
        message = f"no GPU with index {index} ({what})"
    else:
        message = f"NVML error while {what} on GPU {index}: {exc}"
    return DeviceError(message, nvml_code=code, index=index)


def visible_gpu_count() -> int:
    """How many GPUs NVML sees on this host (all of them: NVML ignores CUDA_VISIBLE_DEVICES).

    Raises :class:`DeviceError` where NVML is unavailable.
    """
    if pynvml is None:
        raise DeviceError(NO_NVML)
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        raise nvml_error(exc, "initialising NVML", 0) from exc
    try:
        return int(pynvml.nvmlDeviceGetCount())
    finally:
        pynvml.nvmlShutdown()


CONTROL_DENIED = ("NVML denied permission for {what} on GPU {index}: clock locks and power limits need "
                  "root (run the wattserve node agent as root), so the governor cannot cap this GPU")


class NvmlDevice(Device):
    """GPU ``index`` as NVML sees it. ``clock`` (seconds) times the power-sampling fallback."""

    def __init__(self, index: int = 0, *, clock: Callable[[], float] = time.monotonic,
                 sample_interval_s: float = 0.05) -> None:
        self.index = index
        self._clock = clock
        self._sampler: _BackgroundSampler | None = None
        self._locked_mhz: float | None = None
        self._min_clock_mhz: float | None = None
        self._denied: dict[str, str] = {}  # "clock" / "limit" -> why control is impossible
        self._initialised = False
        self._last_j = 0.0
        self._share: GpuEnergyShare | None = None  # joined at the first energy reading or step
        self._share_reader: Callable[[], float] | None = None  # the counter since driver load
        self._share_lock = threading.Lock()
        self._call("initialising NVML", "nvmlInit")
        self._initialised = True
        try:
            count = self._call("counting GPUs", "nvmlDeviceGetCount")
            if not 0 <= index < count:
                raise DeviceError(f"no GPU with index {index}: NVML sees {count} GPU(s)", index=index)
            self._handle = self._call(f"opening GPU {index}", "nvmlDeviceGetHandleByIndex", index)
            raw = self._call("reading the GPU name", "nvmlDeviceGetName", self._handle)
            self._name = f"{raw.decode() if isinstance(raw, bytes) else raw} #{index}"
            self._sampler = self._open_energy_counter(sample_interval_s)
        except BaseException:
            self.close()
            raise

    def _open_energy_counter(self, sample_interval_s: float) -> _BackgroundSampler:
        try:
            start_mj = self._counter_mj()
        except DeviceError as exc:
            unsupported = (getattr(pynvml, "NVML_ERROR_NOT_SUPPORTED", None),
                           getattr(pynvml, "NVML_ERROR_FUNCTION_NOT_FOUND", None))
            if exc.details.get("nvml_code") not in unsupported:
                raise
            # Pre-Volta GPUs (and some vGPU setups) have no energy counter: integrate power instead.
            sampler: _BackgroundSampler = _PowerIntegrator(self.power_w, self._clock, sample_interval_s)
        else:
            sampler = _CounterReader(lambda: (self._counter_mj() - start_mj) / 1000.0, self.power_w,
                                     self._clock, sample_interval_s)
            self._share_reader = lambda: start_mj / 1000.0 + sampler.energy_j()
        sampler.start()
        return sampler

    def _counter_mj(self) -> int:
        return self._call("reading the total energy counter", "nvmlDeviceGetTotalEnergyConsumption", self._handle)

    def _call(self, what: str, function: str, *args: Any) -> Any:
        if pynvml is None:
            raise DeviceError(NO_NVML, index=self.index)
        try:
            return getattr(pynvml, function)(*args)
        except pynvml.NVMLError as exc:
            raise nvml_error(exc, what, self.index) from exc

    @property
    def name(self) -> str:
        return self._name

    @property
    def energy_source(self) -> str:
        return "measured:nvml-power" if isinstance(self._sampler, _PowerIntegrator) else "measured:nvml"

    def energy_j(self) -> float:
        """Joules since open, from the hardware counter (this replica's share of it where several
        meter one GPU) or the power integral, see module doc; never waits on NVML: a background
        thread reads it."""
        share = self._joined_share()
        joules = self._sampler.energy_j() if share is None else share.energy_j()
        self._last_j = max(self._last_j, joules)  # a driver reload would reset the counter
        return self._last_j

    def sync(self) -> None:
        """Read the counter (or power) now instead of waiting for the background thread."""
        if self._sampler is not None:
            self._sampler.sample()

    def power_w(self) -> float:
        """Board power in watts as NVML reports it (on A100/H100, a ~1 s average)."""
        return self._call("reading power", "nvmlDeviceGetPowerUsage", self._handle) / 1000.0

    def power_limit_w(self) -> float:
        """The enforced power limit in watts (the lowest of all limits in effect)."""
        return self._call("reading the power limit", "nvmlDeviceGetEnforcedPowerLimit",
                          self._handle) / 1000.0

    def sm_clock_mhz(self) -> float:
        """The current SM clock in MHz."""
        return float(self._call("reading the SM clock", "nvmlDeviceGetClockInfo", self._handle,
                                pynvml.NVML_CLOCK_SM))

    def max_sm_clock_mhz(self) -> float:
        """The highest SM clock this GPU supports, in MHz."""
        return float(self._call("reading the max SM clock", "nvmlDeviceGetMaxClockInfo",
                                self._handle, pynvml.NVML_CLOCK_SM))

    def uuid(self) -> str:
        try:
            raw = self._call("reading the GPU UUID", "nvmlDeviceGetUUID", self._handle)
        except DeviceError:
            return ""
        return raw.decode() if isinstance(raw, bytes) else str(raw)

    def min_sm_clock_mhz(self) -> float | None:
        """The lowest supported graphics clock at the highest memory clock, in MHz (cached)."""
        if self._min_clock_mhz is None:
            try:
                mem = max(self._call("listing memory clocks", "nvmlDeviceGetSupportedMemoryClocks", self._handle))
                clocks = self._call("listing SM clocks", "nvmlDeviceGetSupportedGraphicsClocks", self._handle, mem)
                self._min_clock_mhz = float(min(clocks))
            except (DeviceError, ValueError):
                return None
        return self._min_clock_mhz

    def default_power_limit_w(self) -> float:
        """The power limit the board boots with, in watts."""
        return self._call("reading the default power limit", "nvmlDeviceGetPowerManagementDefaultLimit",
                          self._handle) / 1000.0

    def power_limit_range_w(self) -> tuple[float, float]:
        """The (min, max) power limit this GPU accepts, in watts."""
        lo, hi = self._call("reading the power limit range", "nvmlDeviceGetPowerManagementLimitConstraints",
                            self._handle)
        return lo / 1000.0, hi / 1000.0

    # -- control ------------------------------------------------------------------------------
    def control(self) -> DeviceControl:
        reasons = "; ".join(self._denied.values())
        return DeviceControl(can_lock_sm_clock="clock" not in self._denied,
                             can_set_power_limit="limit" not in self._denied, reason=reasons)

    def locked_sm_clock_mhz(self) -> float | None:
        """The ceiling this process set (NVML cannot read back locked clocks on every driver)."""
        return self._locked_mhz

    def lock_sm_clock_mhz(self, max_mhz: float) -> None:
        top = self.max_sm_clock_mhz()
        floor = self.min_sm_clock_mhz()
        if not (floor or 0.0) <= max_mhz <= top:
            raise InvalidRequest(f"GPU {self.index}: SM clock {max_mhz:g} MHz outside [{floor or 0:g}, {top:g}] MHz")
        hi = int(round(max_mhz))
        lo = int(min(hi, floor if floor is not None else hi))
        self._control("clock", "locking the SM clock", "nvmlDeviceSetGpuLockedClocks", self._handle, lo, hi)
        self._locked_mhz = float(hi)

    def unlock_sm_clock(self) -> None:
        self._control("clock", "unlocking the SM clock", "nvmlDeviceResetGpuLockedClocks", self._handle)
        self._locked_mhz = None

    def set_power_limit_w(self, limit_w: float) -> None:
        lo, hi = self.power_limit_range_w()
        if not lo <= limit_w <= hi:
            raise InvalidRequest(f"GPU {self.index}: power limit {limit_w:g} W outside [{lo:g}, {hi:g}] W")
        # NVML takes milliwatts as an unsigned int.
        self._control("limit", "setting the power limit", "nvmlDeviceSetPowerManagementLimit", self._handle,
                      int(round(limit_w * 1000.0)))

    def reset_power_limit(self) -> None:
        default_mw = self._call("reading the default power limit", "nvmlDeviceGetPowerManagementDefaultLimit",
                                self._handle)
        self._control("limit", "resetting the power limit", "nvmlDeviceSetPowerManagementLimit", self._handle,
                      int(default_mw))

    def _control(self, kind: str, what: str, function: str, *args: Any) -> None:
        if kind in self._denied:
            raise ActuationUnavailable(self._denied[kind], index=self.index)
        try:
            self._call(what, function, *args)
        except DeviceError as exc:
            code = exc.details.get("nvml_code")
            if code == getattr(pynvml, "NVML_ERROR_NO_PERMISSION", object()):
                message = CONTROL_DENIED.format(what=what, index=self.index)
            elif code in (getattr(pynvml, "NVML_ERROR_NOT_SUPPORTED", object()),
                          getattr(pynvml, "NVML_ERROR_FUNCTION_NOT_FOUND", object())):
                message = f"GPU {self.index} does not support {what}, so the governor cannot cap it"
            else:
                raise  # transient (GPU busy, lost): the governor retries on its next tick
            self._denied[kind] = message
            raise ActuationUnavailable(message, nvml_code=code, index=self.index) from exc

    def _joined_share(self) -> GpuEnergyShare | None:
        """This GPU's energy share, joined on first use: only a process that meters energy (an
        expert, not the power governor's node agent reading power) takes shares."""
        if self._share is None and self._share_reader is not None:
            with self._share_lock:
                if self._share is None and self._share_reader is not None:
                    key = self.uuid() or f"index-{self.index}"
                    try:
                        self._share = GpuEnergyShare(key, self._share_reader)
                    except OSError as exc:
                        log.warning("GPU %s: cannot share its energy counter with other replicas (%s); "
                                    "this replica meters the whole GPU", key, exc)
                        self._share_reader = None
        return self._share

    def begin_step(self) -> None:
        share = self._joined_share()
        if share is not None:
            share.set_busy(True)

    def end_step(self, work) -> None:
        share = self._joined_share()
        if share is not None:
            share.set_busy(False)

    def close(self) -> None:
        with self._share_lock:
            self._share_reader = None
            if self._share is not None:
                self._share.close()
                self._share = None
        if self._sampler is not None:
            self._sampler.stop()
        if self._initialised:
            self._initialised = False
            try:
                pynvml.nvmlShutdown()
            except pynvml.NVMLError:
                pass  # nothing useful to do about a failed shutdown while closing


class _BackgroundSampler(abc.ABC):
    """Calls ``sample()`` every ``interval_s`` in a daemon thread; a device error stops it and is
    raised by the next :meth:`energy_j`."""

    def __init__(self, clock: Callable[[], float], interval_s: float) -> None:
        self._clock, self._interval_s = clock, interval_s
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._returned = 0.0
        self._error: DeviceError | None = None
        self._thread = threading.Thread(target=self._run, name="nvml-sampler", daemon=True)

    @abc.abstractmethod
    def sample(self) -> None:
        """Read the GPU once (called by the thread)."""

    @abc.abstractmethod
    def _joules_now(self) -> float:
        """Joules since open, extended to now; called under the lock."""

    def start(self) -> None:
        self._thread.start()

    def energy_j(self) -> float:
        if self._error is not None:
            raise DeviceError(f"energy sampling stopped: {self._error}")
        with self._lock:
            # never below an earlier answer: the ledger meters differences of these values
            self._returned = max(self._returned, self._joules_now())
            return self._returned

    def stop(self) -> None:
        self._stop.set()
        if self._thread.is_alive():
            self._thread.join(timeout=5 * self._interval_s + 1.0)

    def _run(self) -> None:
        while not self._stop.wait(self._interval_s):
            try:
                self.sample()
            except DeviceError as exc:
                self._error = exc
                return


class _CounterReader(_BackgroundSampler):
    """The hardware energy counter, read off the metering path.

    One counter read costs ~4 ms on an H100 host (measured; a power read ~2 us), and the engine
    loop meters every step twice, so reading it inline slowed decoding by a third. A thread reads
    it every ``interval_s``; between reads the last reading is extended by the board power times
    the time since. Totals stay anchored to the counter (each new reading replaces the
    extension), so only the split between adjacent steps and requests is estimated, to within
    one interval.
    """

    def __init__(self, read_counter_j: Callable[[], float], read_power_w: Callable[[], float],
                 clock: Callable[[], float], interval_s: float) -> None:
        super().__init__(clock, interval_s)
        self._read_j, self._read_w = read_counter_j, read_power_w
        self._j, self._t, self._p = 0.0, clock(), read_power_w()  # the counter is relative to now

    def sample(self) -> None:
        joules, power, now = self._read_j(), self._read_w(), self._clock()
        with self._lock:
            self._j, self._t, self._p = joules, now, power

    def _joules_now(self) -> float:
        return self._j + self._p * max(0.0, self._clock() - self._t)


class _PowerIntegrator(_BackgroundSampler):
    """Integrates ``read_power_w()`` over ``clock`` time (trapezoids) in a daemon thread."""

    def __init__(self, read_power_w: Callable[[], float], clock: Callable[[], float],
                 interval_s: float) -> None:
        super().__init__(clock, interval_s)
        self._read = read_power_w
        self._t, self._p = clock(), read_power_w()
        self._joules = 0.0

    def sample(self) -> None:
        power, now = self._read(), self._clock()
        with self._lock:
            self._joules += 0.5 * (self._p + power) * max(0.0, now - self._t)
            self._t, self._p = now, power

    def _joules_now(self) -> float:
        # Extend the last sample to now so short steps between samples still see energy.
        return self._joules + self._p * max(0.0, self._clock() - self._t)
