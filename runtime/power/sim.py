"""A row of simulated GPU servers replaying a trace under the SAME power policy the live
governor runs (:class:`~runtime.power.policy.PowerPolicy`).

Each server is ``gpus_per_server`` GPUs of one device profile running one model instance split
across them (tensor parallel: each GPU holds ``model_params / gpus_per_server`` weights) with
continuous batching up to ``max_batch`` sequences. Time advances in fixed ticks (``tick_s``) for
all servers at once (numpy over servers and over running requests), so an hour of trace on 50
servers takes seconds. Within a tick a server first works off its prompt backlog (prefill:
compute-bound, time ~ 1/clock, the power spikes POLCA guards against), then decodes its running
batch for the rest of the tick (memory-bound, nearly flat in the clock), then idles. Latency and
power of each phase come from the fitted roofline/utilisation model of
``workers/devices/simulated.py`` at the server's current SM clock.

Telemetry: the policy sees the row's power averaged over ``telemetry_window_s`` every
``interval_s`` (POLCA reads row power every 2 s); clock targets take effect ``actuation_delay_s``
after the decision. The brake locks every GPU at its lowest clock and clips its power at the
lowest power limit (the limiter's slowing of memory is not modeled, so brake latency is
optimistic). Requests are routed to the least-loaded server of their priority class: POLCA
assigns priority per workload, so a server serves one class.
"""

from __future__ import annotations

import collections
from dataclasses import dataclass, field

import numpy as np

from wattserve.power import CapLevel, EventKind
from workers.devices.simulated import DeviceProfile, load_profile, power_from_utilisation, step_terms

from .policy import HIGH, LOW, PolicyConfig, PowerPolicy
from .workload import Workload


@dataclass(slots=True, frozen=True)
class ServerModel:
    """What one server is: GPUs of one profile running one model instance."""

    profile: str = "a100"
    gpus_per_server: int = 8
    model_params: float = 70e9  # Llama-2-70B on a DGX-A100 by default
    max_batch: int = 64

    def params_per_gpu(self) -> float:
        return self.model_params / self.gpus_per_server


@dataclass(slots=True, frozen=True)
class SimSettings:
    """How the row is run: servers, budget, control loop timing."""

    servers: int
    hp_servers: int
    provisioned_power_w: float | None  # None: uncapped reference (no budget, no brake)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    interval_s: float = 2.0
    telemetry_window_s: float = 1.0
    actuation_delay_s: float = 1.0
    tick_s: float = 0.2
    drain_s: float = 900.0  # keep serving this long after the last arrival


@dataclass(slots=True)
class SimResult:
    """Per-request latencies and the row's power over time."""

    arrival_s: np.ndarray
    ttft_s: np.ndarray  # NaN: never got a first token within the run
    latency_s: np.ndarray  # NaN: never finished
    high_priority: np.ndarray
    time_s: np.ndarray  # per tick
    row_power_w: np.ndarray  # per tick, sum of GPU power
    control_time_s: np.ndarray  # per control interval
    telemetry_w: np.ndarray  # what the policy saw
    levels: np.ndarray  # CapLevel per control interval
    provisioned_power_w: float | None
    thresholds_w: dict[str, float]
    cap_events: int = 0  # row escalations to T1 or T2
    brake_events: int = 0
    gpu_actuations: int = 0  # GPU clock changes sent
    capped_s: float = 0.0
    braked_s: float = 0.0
    events: list[tuple[float, str, str]] = field(default_factory=list)

    @property
    def unfinished(self) -> int:
        return int(np.isnan(self.latency_s).sum())


class RowSimulator:
    """Run once with :meth:`run`. ``workload`` must be sorted by arrival (``scale_trace`` is)."""

    def __init__(self, workload: Workload, server: ServerModel, settings: SimSettings) -> None:
        if not 0 <= settings.hp_servers <= settings.servers:
            raise ValueError("hp_servers must be within [0, servers]")
        if settings.hp_servers == 0 and workload.high_priority.any():
            raise ValueError("high-priority requests need at least one high-priority server")
        if settings.hp_servers == settings.servers and (~workload.high_priority).any():
            raise ValueError("low-priority requests need at least one low-priority server")
        self.w, self.server, self.cfg = workload, server, settings
        self.profile: DeviceProfile = load_profile(server.profile)
        self.policy = PowerPolicy(settings.policy, settings.provisioned_power_w, row="sim")
        s = settings.servers
        self.is_hp = np.arange(s) < settings.hp_servers
        self._pools = (np.flatnonzero(self.is_hp), np.flatnonzero(~self.is_hp))
        self.clock_mhz = np.full(s, self.profile.max_sm_clock_mhz)
        self.limit_w = np.full(s, self.profile.tdp_w)
        self.prefill_enq = np.zeros(s)
        self.prefill_done = np.zeros(s)
        self.running = np.zeros(s, dtype=int)
        self.queues = [collections.deque() for _ in range(s)]
        self.queued = np.zeros(s, dtype=int)
        n = len(workload.arrival_s)
        self.ttft = np.full(n, np.nan)
        self.finish = np.full(n, np.nan)
        # the running batches: max_batch slots per server (slot // max_batch is the server)
        slots = s * server.max_batch
        self.a_srv = np.arange(slots) // server.max_batch
        self.a_req = np.full(slots, -1)
        self.a_used = np.zeros(slots, dtype=bool)
        self.a_end = np.zeros(slots)  # cumulative prefill offset at which the prompt is done
        self.a_dec = np.zeros(slots, dtype=bool)  # decoding (prompt done)
        self.a_rem = np.zeros(slots)  # output tokens still to decode
        self.free_slots = [list(range((i + 1) * server.max_batch - 1, i * server.max_batch - 1, -1)) for i in range(s)]
        self.pending: dict[str, tuple[float, float | None, float | None]] = {}  # class -> (at, mhz, limit)
        self.commanded: dict[str, tuple[float | None, float | None]] = {LOW: (None, None), HIGH: (None, None)}

    # -- the run ------------------------------------------------------------------------------------
    def run(self) -> SimResult:
        cfg = self.cfg
        end = (self.w.arrival_s[-1] if len(self.w.arrival_s) else 0.0) + cfg.drain_s
        n_ticks = int(np.ceil(end / cfg.tick_s))
        window = max(1, int(round(cfg.telemetry_window_s / cfg.tick_s)))
        every = max(1, int(round(cfg.interval_s / cfg.tick_s)))
        row_w = np.zeros(n_ticks)
        result = self._empty_result(n_ticks)
        controls: list[tuple[float, float, int]] = []
        nxt = 0  # next arrival
        last = n_ticks
        for k in range(n_ticks):
            t = k * cfg.tick_s
            nxt = self._arrive(nxt, t)  # requests join at the next tick boundary (<= tick_s late)
            self._settle(t)
            self._admit()
            row_w[k] = self._compute(t)
            if (k + 1) % every == 0:
                reading = float(row_w[max(0, k + 1 - window):k + 1].mean())
                controls.append((t + cfg.tick_s, reading, int(self._control(t + cfg.tick_s, reading, result))))
            if nxt >= len(self.w.arrival_s) and not self.running.any() and not self.queued.any():
                last = k + 1
                break
        return self._finish_result(result, row_w[:last], controls)

    def _arrive(self, nxt: int, until: float) -> int:
        """Route arrivals before ``until`` to the least-loaded server of their class."""
        arrival, hp = self.w.arrival_s, self.w.high_priority
        hp_idx, lp_idx = self._pools
        while nxt < len(arrival) and arrival[nxt] < until:
            pool = hp_idx if hp[nxt] else lp_idx
            load = self.running[pool] + self.queued[pool]
            srv = int(pool[int(np.argmin(load))])
            self.queues[srv].append(nxt)
            self.queued[srv] += 1
            nxt += 1
        return nxt

    def _admit(self) -> None:
        ready = np.flatnonzero((self.running < self.server.max_batch) & (self.queued > 0))
        if not len(ready):
            return
        slots, reqs, ends = [], [], []
        for srv in ready:
            queue, free = self.queues[srv], self.free_slots[srv]
            for _ in range(min(len(free), len(queue))):
                r = queue.popleft()
                self.prefill_enq[srv] += self.w.prompt_tokens[r]
                slots.append(free.pop())
                reqs.append(r)
                ends.append(self.prefill_enq[srv])
        idx = np.asarray(slots, dtype=int)
        counts = np.bincount(self.a_srv[idx], minlength=len(self.running))
        self.running += counts
        self.queued -= counts
        self.a_req[idx], self.a_end[idx], self.a_used[idx] = reqs, ends, True
        self.a_dec[idx], self.a_rem[idx] = False, 0.0

    def _compute(self, t: float) -> float:
        """One tick of every server: prefill, then decode, then idle. Returns row power (W)."""
        dt, p, m = self.cfg.tick_s, self.profile, self.server
        params = m.params_per_gpu()
        backlog = self.prefill_enq - self.prefill_done
        r = self.clock_mhz / p.max_sm_clock_mhz  # within range: set only from policy targets
        lat_p, um_p, uc_p = step_terms(p, backlog, 0.0, 1.0, 1.0, params, 2.0, ratio=r)
        busy_p = backlog > 0
        t_p = np.where(busy_p, np.minimum(dt, lat_p), 0.0)
        processed = np.where(busy_p, backlog * np.minimum(1.0, dt / lat_p), 0.0)
        n_dec = self.a_dec.reshape(len(backlog), -1).sum(axis=1).astype(float)
        lat_d, um_d, uc_d = step_terms(p, 0.0, n_dec, n_dec, 1.0, params, 2.0, ratio=r)
        t_d = np.where(n_dec > 0, dt - t_p, 0.0)
        steps = np.where(n_dec > 0, t_d / lat_d, 0.0)
        pw_p = np.minimum(self.limit_w, power_from_utilisation(p, um_p, uc_p, ratio=r))
        pw_d = np.minimum(self.limit_w, power_from_utilisation(p, um_d, uc_d, ratio=r))
        idle = np.minimum(self.limit_w, p.idle_w)
        gpu_w = (pw_p * t_p + pw_d * t_d + idle * (dt - t_p - t_d)) / dt
        done_before = self.prefill_done.copy()
        self.prefill_done += processed
        self._advance(t, t_p, t_d, steps, processed, done_before)
        return float(gpu_w.sum() * m.gpus_per_server)

    def _advance(self, t, t_p, t_d, steps, processed, done_before) -> None:
        """Move running requests: prompts that completed get a first token, decoders progress."""
        if not self.running.any():
            return
        b = self.server.max_batch
        steps_s, t_p_s = np.repeat(steps, b), np.repeat(t_p, b)  # per slot (cheaper than gathers)
        was_dec = self.a_dec.copy()
        rem_before = self.a_rem
        self.a_rem = rem_before - np.where(was_dec, steps_s, 0.0)
        fin = was_dec & (self.a_rem <= 0)
        if fin.any():
            frac = np.clip(rem_before[fin] / steps_s[fin], 0.0, 1.0)
            self.finish[self.a_req[fin]] = t + t_p_s[fin] + np.repeat(t_d, b)[fin] * frac
        new = self.a_used & ~was_dec & (self.a_end <= np.repeat(self.prefill_done, b) + 1e-6)
        one_token = new
        if new.any():
            into = (self.a_end[new] - np.repeat(done_before, b)[new]) / np.repeat(processed, b)[new]
            first = t + t_p_s[new] * np.clip(into, 0.0, 1.0)
            self.ttft[self.a_req[new]] = first
            self.a_dec |= new
            self.a_rem[new] = self.w.output_tokens[self.a_req[new]] - 1.0
            short = self.a_rem[new] <= 0
            self.finish[self.a_req[new][short]] = first[short]
            one_token = new & (self.a_rem <= 0)
        done = np.flatnonzero(fin | one_token)
        if len(done):
            self.running -= np.bincount(self.a_srv[done], minlength=len(self.running))
            self.a_used[done], self.a_dec[done], self.a_req[done] = False, False, -1
            for slot in done.tolist():
                self.free_slots[slot // b].append(slot)

    # -- control ------------------------------------------------------------------------------------
    def _control(self, now: float, reading_w: float, result: SimResult) -> CapLevel:
        decision = self.policy.update(now, reading_w)
        for kind, reason in decision.events:
            result.events.append((now, kind.value, reason))
            if kind == EventKind.BRAKE:
                result.brake_events += 1
            elif kind == EventKind.LEVEL and decision.level > decision.previous and decision.level < CapLevel.BRAKE:
                result.cap_events += 1
        p = self.profile
        for cls in (LOW, HIGH):
            target = self.policy.target(cls, p.max_sm_clock_mhz, p.min_sm_clock_mhz, p.min_power_limit_w)
            wanted = (target.sm_clock_mhz, target.power_limit_w)
            if wanted != self.commanded[cls]:
                self.commanded[cls] = wanted
                self.pending[cls] = (now + self.cfg.actuation_delay_s, *wanted)
                n = int(self.is_hp.sum()) if cls == HIGH else int((~self.is_hp).sum())
                result.gpu_actuations += n * self.server.gpus_per_server
        return decision.level

    def _settle(self, t: float) -> None:
        for cls, (at, mhz, limit) in list(self.pending.items()):
            if t >= at:
                mask = self.is_hp if cls == HIGH else ~self.is_hp
                self.clock_mhz[mask] = mhz if mhz is not None else self.profile.max_sm_clock_mhz
                self.limit_w[mask] = limit if limit is not None else self.profile.tdp_w
                del self.pending[cls]

    # -- results ------------------------------------------------------------------------------------
    def _empty_result(self, n_ticks: int) -> SimResult:
        pol = self.policy
        thresholds = {lv.name: pol.threshold_w(lv) for lv in (CapLevel.T1, CapLevel.T2, CapLevel.BRAKE)}
        return SimResult(
            arrival_s=self.w.arrival_s, ttft_s=self.ttft, latency_s=self.finish, high_priority=self.w.high_priority,
            time_s=np.zeros(0), row_power_w=np.zeros(0), control_time_s=np.zeros(0), telemetry_w=np.zeros(0),
            levels=np.zeros(0, dtype=int), provisioned_power_w=self.cfg.provisioned_power_w,
            thresholds_w={k: v for k, v in thresholds.items() if v is not None},
        )

    def _finish_result(self, result: SimResult, row_w: np.ndarray, controls) -> SimResult:
        result.ttft_s = self.ttft - self.w.arrival_s
        result.latency_s = self.finish - self.w.arrival_s
        result.time_s = np.arange(len(row_w)) * self.cfg.tick_s
        result.row_power_w = row_w
        if controls:
            times, readings, levels = zip(*controls, strict=True)
            result.control_time_s, result.telemetry_w = np.array(times), np.array(readings)
            result.levels = np.array(levels, dtype=int)
        result.capped_s, result.braked_s = self.policy.capped_s, self.policy.braked_s
        return result
