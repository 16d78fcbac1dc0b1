"""The power governor: every ``interval_s`` it reads all GPUs through the node agents, sums power
per row, asks the row's :class:`~runtime.power.policy.PowerPolicy` for a cap level, and sends each
GPU whose target changed its new clock ceiling through the agent of its node.

A plain class with async methods; ``runtime/power/plane.py`` makes it one named Ray actor
(``wattserve:power-governor``). Tests run it in-process with fake agents and an injected clock.

The loop only reads telemetry, asks the policy, and applies the answer. Everything it does is an
event with a reason in a bounded log; ``counters`` only grow, so they export as Prometheus
counters as they are. Nothing here raises for a device: a GPU that cannot be capped, an
unreachable agent, a missing reading become alerts in the status and events in the log.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from wattserve.errors import InvalidRequest
from wattserve.power import (
    CapLevel,
    EventKind,
    GpuSample,
    GpuStatus,
    PowerCap,
    PowerEvent,
    PowerStatus,
    RowStatus,
)

from .config import PowerConfig
from .policy import ClockTarget, Decision, PowerPolicy, classify_priority

log = logging.getLogger(__name__)


@dataclass(slots=True)
class _Gpu:
    """What the governor knows about one GPU."""

    gpu: str
    node_id: str
    row: str
    sample: GpuSample
    power_w: float | None = None  # last good reading (kept while readings are missing: fail-safe)
    ok_s: float | None = None  # monotonic time of the last good reading
    priority: str = "high"
    target: ClockTarget | None = None  # what the policy wants now
    sent: ClockTarget | None = None  # the last target a device accepted (None: never sent)
    sent_s: float = float("-inf")
    error: str = ""


class PowerGovernor:
    """``agents`` maps Ray node id -> (node agent handle, node address)."""

    def __init__(self, config: PowerConfig, agents: dict[str, tuple[Any, str]], *,
                 clock: Callable[[], float] = time.monotonic,
                 wall_clock: Callable[[], float] = time.time) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.config = config
        self.agents = agents
        self.clock = clock
        self.wall_clock = wall_clock
        self.policies = {row: PowerPolicy(config.policy, watts, row=row) for row, watts in config.budgets().items()}
        self.gpus: dict[str, _Gpu] = {}
        self.events: collections.deque[PowerEvent] = collections.deque(maxlen=config.event_log_size)
        self.counters: collections.Counter[str] = collections.Counter()
        self.alerts: dict[str, str] = {}  # condition key -> message, while in effect
        self.row_power_w: dict[str, float | None] = {}
        self._task: asyncio.Task | None = None

    # -- lifecycle ----------------------------------------------------------------------------------
    async def start(self) -> bool:
        """Start the control loop; a no-op (False) when it already runs. Idempotent on purpose:
        the server calls it periodically so a restarted governor actor resumes by itself."""
        if self._task is not None and not self._task.done():
            return False
        self._task = asyncio.get_running_loop().create_task(self._run(), name="power-governor")
        return True

    async def stop(self) -> None:
        if self._task is not None:
            self._task.cancel()
            try:
                await self._task
            except asyncio.CancelledError:
                pass
            self._task = None

    async def _run(self) -> None:
        while True:
            started = self.clock()
            try:
                await self.tick()
            except Exception:  # noqa: BLE001 - the loop must outlive any one bad tick
                log.exception("power governor tick failed")
                self.counters["tick_errors"] += 1
            await asyncio.sleep(max(0.0, self.config.interval_s - (self.clock() - started)))

    # -- one control period ---------------------------------------------------------------------------
    async def tick(self) -> None:
        """Read every GPU, run each row's policy, send the caps that changed."""
        now = self.clock()
        await self._collect(now)
        caps: dict[str, dict[str, PowerCap]] = collections.defaultdict(dict)
        for row, policy in self.policies.items():
            members = [g for g in self.gpus.values() if g.row == row]
            power_w, complete = self._row_power(members, now)
            self.row_power_w[row] = power_w
            decision = policy.update(now, power_w, complete)
            self._log_decision(row, policy, decision, power_w)
            for g in members:
                cap = self._cap_for(g, policy, decision, now)
                if cap is not None:
                    caps[g.node_id][g.gpu] = cap
        await self._actuate(caps, now)
        self.counters["ticks"] += 1

    async def _collect(self, now: float) -> None:
        replies = await asyncio.gather(*(self._ask_agent(nid, h) for nid, (h, _) in self.agents.items()))
        for (node_id, (_, address)), samples in zip(self.agents.items(), replies, strict=True):
            if samples is None:
                continue  # the agent's GPUs go stale: their rows hold caps (fail-safe)
            seen = set()
            for s in samples:
                seen.add(s.gpu)
                g = self.gpus.get(s.gpu) or _Gpu(s.gpu, node_id, self.config.row_of(node_id, address), s)
                self.gpus[s.gpu] = g
                if s.sample.power_w is not None:
                    g.sample, g.power_w, g.ok_s = s, s.sample.power_w, now
                elif g.ok_s is None:
                    g.sample = s  # nothing better known yet; a failed read keeps the last good one
                g.error = s.sample.error
            for gone in [k for k, g in self.gpus.items() if g.node_id == node_id and k not in seen]:
                del self.gpus[gone]  # an expert removed from the node is no longer governed

    async def _ask_agent(self, node_id: str, agent: Any) -> list[GpuSample] | None:
        try:
            samples = await asyncio.wait_for(agent.sample.remote(), self.config.telemetry_timeout_s)
        except Exception as exc:  # noqa: BLE001 - dead or slow agent
            self._alert(f"agent:{node_id}", f"node agent {node_id[:12]} unreachable: {type(exc).__name__}")
            return None
        self._clear(f"agent:{node_id}", f"node agent {node_id[:12]} reachable again")
        return samples

    def _row_power(self, members: list[_Gpu], now: float) -> tuple[float | None, bool]:
        """Sum of the latest good readings, and whether every one of them is fresh."""
        if not members:
            return 0.0, True
        known = [g.power_w for g in members if g.power_w is not None]
        timeout = self.config.telemetry_timeout_s
        complete = all(g.ok_s is not None and now - g.ok_s <= timeout for g in members)
        return (sum(known) if known else None), complete

    def _cap_for(self, g: _Gpu, policy: PowerPolicy, decision: Decision, now: float) -> PowerCap | None:
        """The command to send ``g`` now, or None when nothing needs sending."""
        s = g.sample.sample
        if s.max_sm_clock_mhz is None or s.min_sm_clock_mhz is None:
            return None  # a device without clocks (cpu) is only monitored
        g.priority = classify_priority(s.priority_class, s.low_requests, s.other_requests)
        g.target = policy.target(g.priority, s.max_sm_clock_mhz, s.min_sm_clock_mhz, s.min_power_limit_w)
        if not s.control.can_actuate:
            if g.target.sm_clock_mhz is not None:
                self._alert(f"control:{g.gpu}", f"{g.gpu} cannot be capped: {s.control.reason}")
            return None
        drifted = s.locked_sm_clock_mhz != g.target.sm_clock_mhz and now - g.sent_s >= self.config.resend_after_s
        first = g.sent is None and (g.target.sm_clock_mhz is not None or s.locked_sm_clock_mhz is not None)
        if not (first or (g.sent is not None and g.sent != g.target) or drifted):
            return None
        had_limit = g.sent is not None and g.sent.power_limit_w is not None
        reason = self._reason(g, policy, decision)
        return PowerCap(g.target.sm_clock_mhz, g.target.power_limit_w,
                        reset_power_limit=had_limit and g.target.power_limit_w is None, reason=reason)

    def _reason(self, g: _Gpu, policy: PowerPolicy, decision: Decision) -> str:
        row_w = self.row_power_w.get(g.row)
        at = f"{row_w:.0f} W" if row_w is not None else "unknown power"
        return f"row {g.row} at {at}, level {policy.level.name}, {g.priority}-priority GPU"

    async def _actuate(self, caps: dict[str, dict[str, PowerCap]], now: float) -> None:
        async def one(node_id: str, node_caps: dict[str, PowerCap]):
            agent = self.agents[node_id][0]
            try:
                return node_caps, await asyncio.wait_for(agent.apply.remote(node_caps), self.config.telemetry_timeout_s)
            except Exception as exc:  # noqa: BLE001 - retried next tick (targets stay unsent)
                self.counters["actuation_failures"] += len(node_caps)
                self._alert(f"agent:{node_id}", f"node agent {node_id[:12]} unreachable: {type(exc).__name__}")
                return node_caps, []

        for node_caps, results in await asyncio.gather(*(one(n, c) for n, c in caps.items() if c)):
            for result in results:
                self._record_result(node_caps[result.gpu], result, now)

    def _record_result(self, cap: PowerCap, result, now: float) -> None:
        g = self.gpus.get(result.gpu)
        if g is None:
            return
        if not result.applied:
            self.counters["actuation_failures"] += 1
            key = f"control:{g.gpu}"
            if result.permanent or key not in self.alerts:
                self._alert(key, f"{g.gpu}: cap not applied: {result.error}")
            return
        self._clear(f"control:{g.gpu}", f"{g.gpu}: caps apply again")
        previous = g.sent.sm_clock_mhz if g.sent is not None else g.sample.sample.locked_sm_clock_mhz
        g.sent, g.sent_s = ClockTarget(cap.sm_clock_mhz, cap.power_limit_w), now
        if previous == cap.sm_clock_mhz:
            return  # a re-send after drift: no new decision to log
        lower = cap.sm_clock_mhz is not None and (previous is None or cap.sm_clock_mhz < previous)
        self._event(EventKind.CAP if lower else EventKind.UNCAP, g.row, cap.reason, gpu=g.gpu,
                    from_sm_clock_mhz=previous, to_sm_clock_mhz=cap.sm_clock_mhz)

    async def release_all(self, reason: str = "the governor is stopping") -> None:
        """Stop the loop and remove every cap this governor set (a server that stops must not
        leave real GPUs locked)."""
        await self.stop()
        caps: dict[str, dict[str, PowerCap]] = collections.defaultdict(dict)
        for g in self.gpus.values():
            if g.sent is not None and (g.sent.sm_clock_mhz is not None or g.sent.power_limit_w is not None):
                caps[g.node_id][g.gpu] = PowerCap(None, None, reset_power_limit=g.sent.power_limit_w is not None,
                                                  reason=reason)
        await self._actuate(caps, self.clock())

    # -- operators ----------------------------------------------------------------------------------
    async def set_budget(self, row: str, provisioned_power_w: float) -> None:
        """Change a row's provisioned budget P (watts) at run time; "" is the default row."""
        row = row or next(iter(self.policies))
        if row not in self.policies:
            raise InvalidRequest(f"unknown power row {row!r}; rows: {', '.join(self.policies)}")
        policy = self.policies[row]
        old = policy.provisioned_power_w
        policy.set_budget(provisioned_power_w)
        was = f"{old:.0f} W" if old is not None else "none (monitor only)"
        self._event(EventKind.BUDGET, row, f"operator set P = {provisioned_power_w:.0f} W (was {was})")

    async def status(self, max_events: int = 100) -> PowerStatus:
        now = self.clock()
        rows = tuple(self._row_status(row, policy) for row, policy in self.policies.items())
        gpus = tuple(self._gpu_status(g, now) for g in sorted(self.gpus.values(), key=lambda g: g.gpu))
        events = tuple(self.events)[-max_events:] if max_events > 0 else ()
        return PowerStatus(enabled=True, policy=self.config.policy.preset, interval_s=self.config.interval_s,
                           rows=rows, gpus=gpus, events=events, counters=dict(self.counters),
                           alerts=tuple(self.alerts.values()))

    def _row_status(self, row: str, policy: PowerPolicy) -> RowStatus:
        members = [g for g in self.gpus.values() if g.row == row]
        _, complete = self._row_power(members, self.clock())
        return RowStatus(
            name=row, provisioned_power_w=policy.provisioned_power_w, power_w=self.row_power_w.get(row) or 0.0,
            level=policy.level, t1_w=policy.threshold_w(CapLevel.T1), t2_w=policy.threshold_w(CapLevel.T2),
            brake_w=policy.threshold_w(CapLevel.BRAKE), telemetry_ok=complete, gpus=len(members),
            capped_s=policy.capped_s,
        )

    def _gpu_status(self, g: _Gpu, now: float) -> GpuStatus:
        s = g.sample.sample
        return GpuStatus(
            gpu=g.gpu, node=g.sample.node, row=g.row, expert=g.sample.expert, replica=g.sample.replica,
            device=s.device, priority=g.priority, power_w=g.power_w, sm_clock_mhz=s.sm_clock_mhz,
            max_sm_clock_mhz=s.max_sm_clock_mhz, locked_sm_clock_mhz=s.locked_sm_clock_mhz,
            target_sm_clock_mhz=g.target.sm_clock_mhz if g.target else None, power_limit_w=s.power_limit_w,
            can_actuate=s.control.can_actuate, control_reason=s.control.reason,
            sample_age_s=None if g.ok_s is None else now - g.ok_s, error=g.error,
        )

    # -- the log ------------------------------------------------------------------------------------
    def _log_decision(self, row: str, policy: PowerPolicy, decision: Decision, power_w: float | None) -> None:
        for kind, reason in decision.events:
            if kind == EventKind.ALERT:
                self.alerts[f"telemetry:{row}"] = reason
            elif kind == EventKind.RECOVERED:
                self.alerts.pop(f"telemetry:{row}", None)
            self._event(kind, row, reason, row_power_w=power_w)

    def _event(self, kind: EventKind, row: str, reason: str, **fields: Any) -> None:
        budget = self.policies[row].provisioned_power_w if row in self.policies else None
        fields.setdefault("row_power_w", self.row_power_w.get(row))
        event = PowerEvent(time_unix_s=self.wall_clock(), kind=kind, row=row, reason=reason,
                           provisioned_power_w=budget, **fields)
        self.events.append(event)
        self.counters[f"{kind.value}_events"] += 1
        log.info("power %s [%s] %s%s", kind.value, row, f"{event.gpu}: " if event.gpu else "", reason)

    def _alert(self, key: str, message: str) -> None:
        if self.alerts.get(key) != message:
            self.alerts[key] = message
            self._event(EventKind.ALERT, self._row_for_key(key), message)

    def _clear(self, key: str, message: str) -> None:
        if self.alerts.pop(key, None) is not None:
            self._event(EventKind.RECOVERED, self._row_for_key(key), message)

    def _row_for_key(self, key: str) -> str:
        g = self.gpus.get(key.partition(":")[2])
        return g.row if g is not None else next(iter(self.policies))
