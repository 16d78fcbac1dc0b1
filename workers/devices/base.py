"""The one door to hardware: every device backend implements :class:`Device`.

An engine loop brackets each step with :meth:`Device.begin_step` / :meth:`Device.end_step` and
reads the cumulative :meth:`Device.energy_j` counter before and after; the difference is split
over the requests in the step (``workers/energy.py``). Measured backends ignore the step hooks
and read hardware counters; modeled backends use them to turn the step's work into joules.

Every backend says where its joules come from in :attr:`Device.energy_source`:
``measured:<sensor>`` only when a hardware counter was read, ``modeled:<model>`` otherwise.
"""

from __future__ import annotations

import abc

from wattserve.types import StepWork


class Device(abc.ABC):
    """One accelerator, or the CPU share of one process, that an expert runs on."""

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
