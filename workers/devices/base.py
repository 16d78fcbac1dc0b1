"""The one door to hardware: every device backend implements :class:`Device`.

An engine loop brackets each step with :meth:`Device.begin_step` / :meth:`Device.end_step` and
reads the cumulative :meth:`Device.energy_j` counter at its end (the previous reading is its
start); the difference is split over the requests in the step (``workers/energy.py``). Measured backends ignore the step hooks
and read hardware counters; modeled backends use them to turn the step's work into joules.

Every backend says where its joules come from in :attr:`Device.energy_source`:
``measured:<sensor>`` only when a hardware counter was read, ``modeled:<model>`` otherwise.

Control (used by the power governor): :meth:`Device.control` says what a backend can do;
:meth:`Device.lock_sm_clock_mhz` / :meth:`Device.unlock_sm_clock` set and clear an SM clock
ceiling, :meth:`Device.set_power_limit_w` / :meth:`Device.reset_power_limit` the board power
limit. A backend that cannot do one raises :class:`~wattserve.errors.ActuationUnavailable`
(permanent: no control, no permission) and never crashes its caller's process.
"""

from __future__ import annotations

import abc
from collections.abc import Callable
from dataclasses import dataclass

from wattserve.errors import ActuationUnavailable
from wattserve.power import DeviceControl
from wattserve.types import StepWork


@dataclass(frozen=True, slots=True)
class DeviceContext:
    """What opening a device may need besides its spec."""

    model_params: int  # parameters held on the device (a modeled device's work model needs them)
    clock: Callable[[], float]  # seconds, monotonic
    include_child_processes: bool  # cpu: also charge the CPU time of this process's descendants


class Device(abc.ABC):
    """One accelerator, or the CPU share of one process, that an expert runs on."""

    #: whether energy and latency are modeled from the work each step describes (StepWork), so
    #: an engine must describe it (FLOPs, tokens) rather than just bracket the step
    models_step_work: bool = False

    @property
    @abc.abstractmethod
    def name(self) -> str:
        """Human-readable identity, e.g. ``NVIDIA H100 80GB HBM3 #0`` or ``cpu (pid 4242)``."""

    @property
    @abc.abstractmethod
    def energy_source(self) -> str:
        """``measured:nvml``, ``modeled:cpu``, ``modeled:h100``, ... (see module docstring)."""

    @abc.abstractmethod
    def energy_j(self) -> float:
        """Cumulative energy in joules since the device was opened; never decreases."""

    def sync(self) -> None:
        """Bring :meth:`energy_j` up to the hardware's counter now, blocking if need be.

        Backends that read their counter off the metering path (NVML, every 50 ms) may answer
        :meth:`energy_j` a little behind; the engine loop calls this before its first and last
        readings so a whole run's total matches the counter's own delta. Others need not care.
        """

    @abc.abstractmethod
    def power_w(self) -> float:
        """Current (or most recent average) power draw in watts."""

    def begin_step(self) -> None:
        """An engine step starts now. Measured devices need not care."""

    def end_step(self, work: StepWork) -> None:
        """The step begun by :meth:`begin_step` finished having computed ``work``."""

    def close(self) -> None:
        """Release handles (NVML shutdown, sampler threads)."""

    # Read-only telemetry the power governor uses; None where a backend cannot know it.

    def power_limit_w(self) -> float | None:
        """The enforced board power limit in watts, or None if unknown."""
        return None

    def sm_clock_mhz(self) -> float | None:
        """The current SM clock in MHz, or None if unknown."""
        return None

    def max_sm_clock_mhz(self) -> float | None:
        """The highest SM clock the device runs at uncapped, in MHz, or None if unknown."""
        return None

    def uuid(self) -> str:
        """A stable hardware identity (the NVML UUID), or "" where there is none."""
        return ""

    def min_sm_clock_mhz(self) -> float | None:
        """The lowest SM clock a lock may ask for, in MHz, or None if unknown."""
        return None

    def power_limit_range_w(self) -> tuple[float, float] | None:
        """The (lowest, highest) power limit :meth:`set_power_limit_w` accepts, in watts."""
        return None

    def default_power_limit_w(self) -> float | None:
        """The power limit :meth:`reset_power_limit` restores, in watts, or None if unknown."""
        return None

    # Control. The defaults say "cannot"; backends override what they support.

    def control(self) -> DeviceControl:
        """What the governor may do to this device now (and why not, where it may not)."""
        return DeviceControl(reason=f"{self.name}: this device backend has no clock or power-limit control")

    def locked_sm_clock_mhz(self) -> float | None:
        """The SM clock ceiling in effect (after any actuation delay), or None when unlocked."""
        return None

    def lock_sm_clock_mhz(self, max_mhz: float) -> None:
        """Keep the SM clock at or below ``max_mhz`` (the GPU may still clock down when idle)."""
        raise ActuationUnavailable(self.control().reason or f"{self.name} cannot lock its SM clock")

    def unlock_sm_clock(self) -> None:
        """Remove the SM clock ceiling set by :meth:`lock_sm_clock_mhz`."""
        raise ActuationUnavailable(self.control().reason or f"{self.name} cannot lock its SM clock")

    def set_power_limit_w(self, limit_w: float) -> None:
        """Hold board power at or below ``limit_w`` watts."""
        raise ActuationUnavailable(self.control().reason or f"{self.name} cannot set a power limit")

    def reset_power_limit(self) -> None:
        """Restore the default power limit."""
        raise ActuationUnavailable(self.control().reason or f"{self.name} cannot set a power limit")

    def cap_slowdown_s(self, work: StepWork) -> tuple[float, float]:
        """Extra (prefill, decode) seconds ``work`` takes because of a cap, beyond what the host
        just spent computing it.

        Real devices slow down by themselves, so they return zeros. A modeled device computes on
        a host that is not capped; it returns the modeled difference between its capped and
        uncapped step latency so the engine loop can wait it out, and served latencies and
        measured profiles follow the cap as they would on the real device.
        """
        return 0.0, 0.0
