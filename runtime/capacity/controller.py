"""The live capacity controller: an asyncio task in the server process that, every
``capacity.interval_s``, measures each sized expert's load, asks :func:`plan_pool` for replicas and
a clock, and applies the replica count through the gateway's replica sets and the pool's actors.

Measure (per expert, over the last interval): arrivals (counted where calls are dispatched, on
the expert's :class:`ReplicaSet`), their moving average and the busiest minute of the planner's
peak window, prompt and output tokens of finished calls, the replicas' queues (``waiting``) and
whether work is in flight. Decide: ``plan_pool`` with the expert's :func:`live_profile`, its SLOs,
min/max replicas, the measured cold start, and the power governor's budget (when it runs) as a
ceiling, shared equally among the sized experts. Apply: scale up = start a replica in the
background (the pool's actor, then ``Replicas.add`` once it answers ready), scale down = drain it
through ``Replicas.remove`` then release its actor. Clocks are only recorded (a target, labelled
not applied): nothing here actuates a device.

A cold expert (``min_replicas: 0``, no replica) stays routable: its set's waker is :meth:`wake`,
which starts one replica (once, however many requests wait) and returns when it is healthy. A
request whose woken replica failed before its first token wakes again, passing the replica it
failed on, so that one does not count as the healthy replica it waits for.

Every decision goes to the event log (``CapacityState.events``, bounded) and the log, with the
planner's reason. No Ray here: the pool's actions come in through :class:`PoolActions`.
"""

from __future__ import annotations

import asyncio
import functools
import logging
import math
import time
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from wattserve.errors import ExpertUnavailable
from wattserve.specs import ExpertSpec

from ..gateway.replicas import ReplicaClient, Replicas, ReplicaSet
from .config import CapacityConfig, ExpertCapacity
from .live_profile import CLOCK_NOT_CONTROLLED, live_profile
from .planner import Plan, PlannerConfig, PoolLoad, PoolSpec, PoolState, plan_pool
from .state import CapacityEvent, CapacityState, ExpertCapacityState

log = logging.getLogger(__name__)

#: the planner's "busiest minute"
PEAK_MINUTE_S = 60.0
#: how often a waking request looks again at a started replica that is not yet healthy
WAKE_POLL_S = 0.05


class PoolActions(Protocol):
    """What hosts the replicas (``runtime/cluster.py``'s ExpertPool over Ray; fakes in tests)."""

    async def start_replica(self, expert: str, timeout_s: float) -> ReplicaClient:
        """Start one replica of ``expert`` and return its client once it is ready (raises if it is not
        within ``timeout_s``)."""
        ...

    def remove(self, expert: str, index: int) -> None:
        """Release replica ``index`` (already drained)."""
        ...


@dataclass(slots=True)
class _Meter:
    """What the controller remembers of one expert between intervals."""

    arrivals_seen: int = 0
    last_s: float = 0.0
    ewma_rps: float = 0.0
    history: deque = field(default_factory=deque)  # (time, arrivals in the interval ending then)
    idle_since_s: float | None = None
    shrink_since_s: float | None = None
    clock_mhz: float | None = None
    starts: dict[asyncio.Task, float] = field(default_factory=dict)  # start task -> when it began
    stopping: set[int] = field(default_factory=set)
    waiters: int = 0  # requests waiting for a wake
    measured_starts: int = 0


class CapacityController:
    def __init__(self, config: CapacityConfig, experts: dict[str, ExpertSpec], replicas: Replicas,
                 actions: PoolActions, state: CapacityState, *,
                 power_budget_w: Callable[[], float | None] = lambda: None,
                 on_replicas_changed: Callable[[], Awaitable[None]] | None = None,
                 clock: Callable[[], float] = time.monotonic, wall: Callable[[], float] = time.time) -> None:
        self.config = config
        self.specs = {name: experts[name] for name in config.experts}
        self.replicas = replicas
        self.actions = actions
        self.state = state
        self.power_budget_w = power_budget_w
        self.on_replicas_changed = on_replicas_changed  # e.g. the power governor learning them
        self.clock = clock
        self.wall = wall
        self._meters = {name: _Meter() for name in self.specs}
        self._tasks: set[asyncio.Task] = set()
        self._loop: asyncio.Task | None = None
        state.enabled = True
        state.events = deque(state.events, maxlen=config.events_kept)
        now = clock()
        replicas.wake_timeout_s = config.wake_timeout_s
        replicas.wakes_per_request = config.wakes_per_request
        for name, cap in config.experts.items():
            state.experts[name] = ExpertCapacityState(name, cold_start_s=cap.cold_start_s)
            self._meters[name].last_s = now
            rs = replicas.sets.setdefault(name, ReplicaSet(name, self.specs[name].modality))
            rs.cold_start_ms = 1e3 * cap.cold_start_s
            if cap.min_replicas == 0:
                rs.waker = functools.partial(self.wake, name)

    # -- the loop -------------------------------------------------------------------------------
    async def start(self) -> None:
        self._loop = asyncio.create_task(self._run(), name="capacity-controller")

    async def stop(self) -> None:
        """Stop planning; starts and drains in progress are cancelled (the pool releases its actors)."""
        tasks = [t for t in (self._loop, *self._tasks) if t is not None]
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self._loop = None
        for rs in self.replicas.sets.values():
            rs.waker = None

    async def _run(self) -> None:
        while True:
            await asyncio.sleep(self.config.interval_s)
            try:
                self.tick()
            except Exception:  # noqa: BLE001 - a bad plan must not stop the controller
                log.exception("capacity plan failed")

    def tick(self) -> list[Plan]:
        """Plan and apply every sized expert once (the loop's body; tests call it directly)."""
        return [self._tick(name) for name in self.specs]

    def _tick(self, name: str) -> Plan:
        now, spec, cap = self.clock(), self.specs[name], self.config.experts[name]
        m, rs, st = self._meters[name], self.replicas.sets[name], self.state.experts[name]
        load, pool_state, dt = self._measure(name, now)
        telemetry = next((s.profile for s in rs.states.values() if s.profile is not None), rs.last_profile)
        profile = live_profile(spec, telemetry, self.config)
        pool = PoolSpec(name=name, priority=spec.priority_class, slo=cap.slo, min_replicas=cap.min_replicas,
                        max_replicas=cap.max_replicas, cold_start_s=st.cold_start_s)
        plan = plan_pool(load, pool_state, pool, profile, self._planner(cap), power_budget_w=self._budget_share())
        m.shrink_since_s = plan.shrink_since_s
        running = len(self._serving(name))
        st.saved_energy_j += max(0, cap.max_replicas - running) * profile.idle_power_w * dt
        st.idle_power_w, st.energy_source, st.last_reason = profile.idle_power_w, profile.energy_source, plan.reason
        st.wanted = plan.replicas
        self._apply(name, plan, pool_state.replicas, now)
        self._count(name)
        return plan

    def _count(self, name: str) -> None:
        st = self.state.experts[name]
        st.running = sum(s.healthy for s in self._serving(name))
        st.starting = len(self._meters[name].starts)

    def _planner(self, cap: ExpertCapacity) -> PlannerConfig:
        update = {"interval_s": self.config.interval_s, "scale_to_zero_after_s": cap.scale_to_zero_after_s}
        if cap.scale_down_delay_s is not None:
            update["scale_down_delay_s"] = cap.scale_down_delay_s
        return self.config.planner.model_copy(update=update)

    def _budget_share(self) -> float | None:
        budget = self.power_budget_w()
        return None if budget is None else budget / max(1, len(self.specs))

    # -- measuring ------------------------------------------------------------------------------
    def _serving(self, name: str) -> list:
        """Replicas of ``name`` taking calls (not draining, not being removed)."""
        m = self._meters[name]
        return [s for i, s in self.replicas.sets[name].states.items() if not s.removing and i not in m.stopping]

    def _measure(self, name: str, now: float) -> tuple[PoolLoad, PoolState, float]:
        m, rs = self._meters[name], self.replicas.sets[name]
        dt = max(1e-6, now - m.last_s)
        arrived = rs.arrivals - m.arrivals_seen
        m.arrivals_seen, prev_s, m.last_s = rs.arrivals, m.last_s, now
        rate = arrived / dt
        m.ewma_rps += (1.0 - math.exp(-dt / self.config.planner.ewma_s)) * (rate - m.ewma_rps)
        peak = self._peak_rps(m, now, arrived)
        serving = self._serving(name)
        queued = sum(s.profile.waiting for s in serving if s.profile is not None)
        busy = any(s.inflight for s in rs.states.values()) or any(
            s.profile.running for s in serving if s.profile is not None)
        quiet = arrived == 0 and not busy and not queued and not m.starts and not m.waiters
        m.idle_since_s = (prev_s if m.idle_since_s is None else m.idle_since_s) if quiet else None
        prompt_mean, prompt_p99, output_mean = self._tokens(rs)
        load = PoolLoad(rate, m.ewma_rps, prompt_mean, prompt_p99, output_mean, queued_requests=float(queued),
                        busy=busy or m.waiters > 0, arrival_rate_peak_rps=peak)
        left = [max(0.0, self.state.experts[name].cold_start_s - (now - t0)) for t0 in m.starts.values()]
        state = PoolState(now, len(serving), len(m.starts), min(left, default=0.0), m.idle_since_s,
                          m.shrink_since_s, m.clock_mhz)
        return load, state, dt

    def _peak_rps(self, m: _Meter, now: float, arrived: int) -> float:
        """The busiest minute's rate among the intervals of the peak window."""
        window = self.config.planner.peak_window_s
        m.history.append((now, arrived))
        while m.history and m.history[0][0] < now - max(window, PEAK_MINUTE_S):
            m.history.popleft()
        if window <= 0:
            return 0.0
        times = np.array([t for t, _ in m.history])
        counts = np.cumsum([c for _, c in m.history])
        starts = np.searchsorted(times, times - PEAK_MINUTE_S, side="right")
        in_minute = counts - np.where(starts > 0, counts[np.maximum(starts - 1, 0)], 0)
        return float(in_minute.max()) / PEAK_MINUTE_S

    def _tokens(self, rs: ReplicaSet) -> tuple[float, float, float]:
        if not rs.tokens:
            p, o = float(self.config.assumed_prompt_tokens), float(self.config.assumed_output_tokens)
            return p, p, o
        arr = np.array(rs.tokens, dtype=float)
        return float(arr[:, 0].mean()), float(np.percentile(arr[:, 0], 99)), float(max(1.0, arr[:, 1].mean()))

    # -- applying -------------------------------------------------------------------------------
    def _apply(self, name: str, plan: Plan, have: int, now: float) -> None:
        m, st = self._meters[name], self.state.experts[name]
        if plan.replicas > have:
            self._event(name, "scale_up", have, plan.replicas, plan)
            for _ in range(plan.replicas - have):
                self._start(name)
        elif plan.replicas < have:
            # Replicas still starting are left to finish (counted as serving at the next plan).
            leaving = release_order(self._serving(name))[: have - plan.replicas]
            if leaving:
                after = have - len(leaving)
                self._event(name, "scale_to_zero" if after == 0 else "scale_down", have, after, plan)
            for state in leaving:
                self._remove(name, state.client.index)
        target = None if plan.clock_mhz == CLOCK_NOT_CONTROLLED or plan.replicas == 0 else plan.clock_mhz
        if target is not None and target != m.clock_mhz and plan.replicas == have:
            self._event(name, "clock", have, have, plan)
        if target is not None:
            m.clock_mhz = st.target_clock_mhz = target

    def _start(self, name: str) -> asyncio.Task:
        task = asyncio.create_task(self._start_one(name), name=f"capacity-start-{name}")
        self._meters[name].starts[task] = self.clock()
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)
        return task

    async def _start_one(self, name: str) -> None:
        m, st, rs = self._meters[name], self.state.experts[name], self.replicas.sets[name]
        t0 = self.clock()
        try:
            client = await self.actions.start_replica(name, self.config.ready_timeout_s)
            self.replicas.add(client, self.specs[name].modality)
            await self.replicas.poll(client.key)
            await self._changed(name)
            took = self.clock() - t0
            m.measured_starts += 1
            # the first measured start replaces the configured guess; later ones are averaged
            st.cold_start_s = took if m.measured_starts == 1 else 0.7 * st.cold_start_s + 0.3 * took
            rs.cold_start_ms = 1e3 * st.cold_start_s
            st.cold_starts += 1
            where = f" on node {client.node}" if client.node else ""
            self._log(name, "started",
                      f"{client.name} serving{where} after {took:.1f} s (cold start now {st.cold_start_s:.1f} s)")
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - a failed start is an event, not a dead controller
            self._log(name, "start_failed", f"a replica of {name} did not start: {exc}", level=logging.WARNING)
        finally:
            m.starts.pop(asyncio.current_task(), None)
            self._count(name)

    def _remove(self, name: str, index: int) -> None:
        self._meters[name].stopping.add(index)
        state = self.replicas.state((name, index))
        if state is not None:
            state.removing = True  # no new call from now, not from when the drain task first runs
        task = asyncio.create_task(self._remove_one(name, index), name=f"capacity-remove-{name}-{index}")
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    async def _remove_one(self, name: str, index: int) -> None:
        try:
            await self.replicas.remove((name, index))  # drains: the calls it holds finish there
            self.actions.remove(name, index)
            await self._changed(name)
            self._log(name, "removed", f"{name}/{index} drained and released")
        finally:
            self._meters[name].stopping.discard(index)
            self._count(name)

    async def _changed(self, name: str) -> None:
        """Tell who else follows the replicas (the power governor) that they changed."""
        if self.on_replicas_changed is None:
            return
        try:
            await self.on_replicas_changed()
        except Exception as exc:  # noqa: BLE001 - scaling goes on; the governor's view is stale until the next change
            self._log(name, "notify_failed", f"replicas changed but the power governor was not told: {exc}",
                      level=logging.WARNING)

    # -- waking ---------------------------------------------------------------------------------
    async def wake(self, name: str, avoid: frozenset[int] = frozenset()) -> None:
        """Return once a replica of ``name`` not in ``avoid`` (replica indices the waiting request
        failed on) is healthy, starting one if none is starting; raises ExpertUnavailable if every
        start failed. Cancelling the wait does not cancel the start."""
        m = self._meters[name]
        m.waiters += 1

        def usable() -> list:
            return [s for s in self._serving(name) if s.client.index not in avoid]

        try:
            while not any(s.healthy for s in usable()):
                if not m.starts:
                    have = len(self._serving(name))
                    self._event_text(name, "wake", have, have + 1, None,
                                     f"{name}: a request arrived with no replica serving: start one "
                                     f"(expected {self.state.experts[name].cold_start_s:.1f} s)")
                    self._start(name)
                before = self.state.experts[name].cold_starts
                await asyncio.wait(list(m.starts), return_when=asyncio.FIRST_COMPLETED)
                if any(s.healthy for s in usable()):
                    break
                if self.state.experts[name].cold_starts == before and not m.starts:
                    raise ExpertUnavailable(f"expert {name} is scaled to zero and its replica failed to start")
                while usable() and not any(s.healthy for s in usable()):
                    await asyncio.sleep(WAKE_POLL_S)  # started, not yet healthy: its next poll tells
        finally:
            m.waiters -= 1

    # -- the event log --------------------------------------------------------------------------
    def _event(self, name: str, action: str, before: int, after: int, plan: Plan) -> None:
        clock = None if plan.clock_mhz == CLOCK_NOT_CONTROLLED else plan.clock_mhz
        self._event_text(name, action, before, after, clock, plan.reason)

    def _event_text(self, name: str, action: str, before: int, after: int, clock: float | None, reason: str,
                    level: int = logging.INFO) -> None:
        if clock is not None:
            reason += f" [target clock {clock:.0f} MHz: recorded, not applied]"
        self.state.events.append(CapacityEvent(self.wall(), name, action, before, after, clock, reason))
        log.log(level, "capacity %s %s %d -> %d: %s", name, action, before, after, reason)

    def _log(self, name: str, action: str, reason: str, level: int = logging.INFO) -> None:
        """An event that leaves the replica count as it is (a start finished or failed, a release)."""
        n = len(self._serving(name))
        self._event_text(name, action, n, n, None, reason, level)


def release_order(states):
    """Which replicas a scale-down releases first: unhealthy ones (dead, restarting), then the
    emptiest (fewest calls in flight: they drain soonest, and with ``gateway.replica_order: packed``
    they are the ones left idle), then the newest (the oldest have the warmest caches and
    measured profiles)."""
    return sorted(states, key=lambda s: (s.healthy, s.inflight, -s.client.index))
