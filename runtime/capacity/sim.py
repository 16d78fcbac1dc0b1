"""The capacity simulator: a day of trace load on pools of simulated replicas, replicas and
clocks set by :func:`~runtime.capacity.planner.plan_pool` (and, for ``both+polca``, capped by the
unchanged POLCA :class:`~runtime.power.policy.PowerPolicy`).

Coarse-grained on purpose (a day of two traces, five policies, minutes on two cores). Time moves
in ticks of ``tick_s`` (1 s); each pool is a FLUID: its replicas are identical and share the load
evenly, so one replica is computed per tick and multiplied. Per replica and tick: admitted prompt
tokens are prefilled first (one step: overhead + tokens x s/token at the clock, the tick's share
``t_p``), then the decode batch steps for the rest of the tick (step time of the batch at the
clock), then the replica idles; power is the profile's prefill / decode / idle power weighted by
those times. Requests wait for a batch slot (``max_batch`` per replica). Starting replicas draw
their cold-start energy spread over ``cold_start_s`` and serve after it.

Per-request latency comes back from the fluid exactly in FIFO order: a request's first token is
due when the pool's cumulative prefilled tokens reach its own cumulative prompt end (interpolated
inside the tick's prefill time), and never earlier than its arrival plus its own prefill; its TPOT
is the tick TPOT (decode step x tick / decode time: prefill pauses decoding) averaged over the
ticks its decode spans. Prefill is chunked (``prefill_chunk_tokens``, vLLM's chunked prefill):
during the tick's prefill time every decoding sequence still gets one token per chunk step.
Within-tick ordering and per-sequence KV growth are not modeled.

Every joule is modeled from the replica profile and labelled with its ``energy_source``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field

import numpy as np

from runtime.power.policy import HIGH, LOW, PolicyConfig, PowerPolicy
from runtime.power.workload import Workload

from .planner import Plan, PlannerConfig, PoolLoad, PoolSpec, PoolState, plan_pool
from .profile import ReplicaProfile

POLICIES: tuple[str, ...] = ("static", "autoscale", "dvfs", "both", "both+polca")
DVFS_POLICIES = ("dvfs", "both", "both+polca")


@dataclass(slots=True, frozen=True)
class SimConfig:
    """How the day is run."""

    policy: str
    tick_s: float = 1.0
    planner: PlannerConfig = field(default_factory=PlannerConfig)
    provisioned_power_w: float | None = None  # the row budget (both+polca; a ceiling for the planner)
    polca: PolicyConfig = field(default_factory=PolicyConfig)
    polca_interval_s: float = 2.0
    clock_interval_s: float | None = None  # a fast clock-only loop between replica plans, seconds (None: off)
    released_replica_power_w: float = 0.0  # a released replica's GPUs: 0 = powered down / lent elsewhere
    drain_s: float = 3600.0

    def __post_init__(self) -> None:
        if self.policy not in POLICIES:
            raise ValueError(f"unknown policy {self.policy!r}; choose from {', '.join(POLICIES)}")
        if self.policy == "both+polca" and self.provisioned_power_w is None:
            raise ValueError("both+polca needs provisioned_power_w")


@dataclass(slots=True)
class PoolResult:
    """One pool's requests and time series."""

    spec: PoolSpec
    arrival_s: np.ndarray
    ttft_s: np.ndarray  # NaN: no first token within the run
    tpot_s: np.ndarray
    power_w: np.ndarray  # per tick
    replicas: np.ndarray  # per tick, ready + starting
    clock_mhz: np.ndarray  # per tick
    output_tokens: int
    energy_j: dict[str, float]  # idle, prefill, decode, cold_start, released
    cold_starts: int = 0
    replica_changes: int = 0
    clock_changes: int = 0
    plans: list[tuple[float, str]] = field(default_factory=list)  # (time, reason), changes only

    def slo_ok(self) -> np.ndarray:
        slo = self.spec.slo
        return (self.ttft_s * 1e3 <= slo.ttft_ms) & (self.tpot_s * 1e3 <= slo.tpot_ms)


@dataclass(slots=True)
class DayResult:
    policy: str
    energy_source: str
    tick_s: float
    pools: list[PoolResult]
    provisioned_power_w: float | None
    brake_events: int = 0
    polca_capped_s: float = 0.0

    @property
    def power_w(self) -> np.ndarray:
        return np.sum([p.power_w for p in self.pools], axis=0)

    @property
    def energy_j(self) -> float:
        return float(sum(sum(p.energy_j.values()) for p in self.pools))


class _Pool:
    """Fluid state of one pool (see the module docstring)."""

    def __init__(self, spec: PoolSpec, profile: ReplicaProfile, work: Workload, mask: np.ndarray,
                 n_ticks: int, tick_s: float, released_w: float) -> None:
        self.spec, self.prof, self.dt = spec, profile, tick_s
        self._released_w = released_w  # what a released replica still draws
        self.arr = work.arrival_s[mask]
        self.prompt = work.prompt_tokens[mask].astype(float)
        self.out = work.output_tokens[mask].astype(float)
        k = np.minimum((self.arr // tick_s).astype(int), n_ticks - 1)
        self.bin_n = np.bincount(k, minlength=n_ticks).astype(float)
        self.bin_p = np.bincount(k, self.prompt, minlength=n_ticks)
        self.bin_o = np.bincount(k, self.out - 1.0, minlength=n_ticks)  # after the first token
        self.bin_m = np.bincount(k, (self.out > 1).astype(float), minlength=n_ticks)
        self.ready, self.starting = spec.max_replicas, []  # ready-at times of starting replicas
        self.clock = profile.max_clock_index
        self.wait = [0.0, 0.0, 0.0, 0.0]  # requests, prompt tokens, decode tokens, decoders
        self.pre = [0.0, 0.0, 0.0, 0.0]
        self.dec_n = self.dec_o = 0.0
        self.cum_tok = 0.0
        self.idle_since: float | None = None
        self.shrink_since: float | None = None
        self.ewma = 0.0
        self.c_tok, self.t_p, self.tpot = np.zeros(n_ticks), np.zeros(n_ticks), np.zeros(n_ticks)
        self.power, self.replicas, self.clocks = np.zeros(n_ticks), np.zeros(n_ticks), np.zeros(n_ticks)
        self.energy = dict.fromkeys(("idle", "prefill", "decode", "cold_start", "released"), 0.0)
        self.cold_starts = self.replica_changes = self.clock_changes = 0
        self.plans: list[tuple[float, str]] = []
        self.last_reason = ""
        self._tables = ([list(r) for r in profile.decode_step_s], [list(r) for r in profile.decode_power_w])

    def _row(self, table: int, batch: float) -> float:
        row = self._tables[table][self.clock]
        b = min(max(batch, 1.0), len(row) - 1.0)
        i = min(int(b), len(row) - 2)
        return row[i] + (row[i + 1] - row[i]) * (b - i)

    def tick(self, k: int, now: float, cap_index: int | None) -> float:
        """Advance one tick; returns the pool's power in watts."""
        dt, prof, spec = self.dt, self.prof, self.spec
        if self.starting and self.starting[0] <= now:
            done = [t for t in self.starting if t <= now]
            self.starting = self.starting[len(done):]
            self.ready += len(done)
        w = self.wait
        w[0] += self.bin_n[k]
        w[1] += self.bin_p[k]
        w[2] += self.bin_o[k]
        w[3] += self.bin_m[k]
        clock = self.clock if cap_index is None else min(self.clock, cap_index)
        saved, self.clock = self.clock, clock
        power = self._serve(k, dt, prof)
        self.clock = saved
        cold_w = spec.cold_start_energy_j / spec.cold_start_s if spec.cold_start_s > 0 else 0.0
        n_start = len(self.starting)
        released = spec.max_replicas - self.ready - n_start
        self.energy["cold_start"] += n_start * cold_w * dt
        self.energy["released"] += released * self._released_w * dt
        power += n_start * cold_w + released * self._released_w
        self.power[k], self.replicas[k], self.clocks[k] = power, self.ready + n_start, prof.clocks_mhz[clock]
        busy = w[0] + self.pre[0] + self.dec_n > 1e-9 or self.bin_n[k] > 0
        self.idle_since = None if busy else (now if self.idle_since is None else self.idle_since)
        return power

    def _serve(self, k: int, dt: float, prof: ReplicaProfile) -> float:
        n, w, pre = self.ready, self.wait, self.pre
        if n == 0:
            self.c_tok[k], self.t_p[k], self.tpot[k] = self.cum_tok, 0.0, dt
            return 0.0
        slots = n * prof.max_batch - pre[0] - self.dec_n
        if w[0] > 1e-12 and slots > 0:
            f = min(1.0, slots / w[0])
            for i in range(4):
                pre[i] += w[i] * f
                w[i] *= 1.0 - f
        spt, ovh = prof.prefill_s_per_token[self.clock], prof.prefill_overhead_s
        t_p = frac = 0.0
        if pre[1] > 1e-9:
            full = ovh + pre[1] / n * spt
            t_p, frac = min(dt, full), min(1.0, dt / full)
        moved = [x * frac for x in pre]
        for i in range(4):
            pre[i] -= moved[i]
        self.cum_tok += moved[1]
        t_d, busy_d, nd = dt - t_p, 0.0, self.dec_n / n
        step = self._row(0, nd)
        chunk = ovh + prof.prefill_chunk_tokens * spt
        per_seq = t_p / chunk + t_d / step  # tokens a decoding sequence can get this tick
        if nd > 1e-12:
            ride = min(self.dec_o / n, t_p / chunk * nd)  # one token per chunked-prefill step
            tokens = min(self.dec_o / n, ride + t_d / step * nd)
            busy_d = (tokens - ride) / max(nd, 1.0) * step
            if self.dec_o > 1e-12:
                self.dec_n -= self.dec_n * min(1.0, tokens * n / self.dec_o)
            self.dec_o = max(0.0, self.dec_o - tokens * n)
        self.dec_n += moved[3]
        self.dec_o += moved[2]
        self.c_tok[k], self.t_p[k] = self.cum_tok, t_p
        self.tpot[k] = dt / per_seq
        idle_w = prof.idle_power_w
        pre_w, dec_w = prof.prefill_power_w[self.clock], self._row(1, nd)
        idle_t = max(0.0, dt - t_p - busy_d)
        self.energy["idle"] += n * idle_w * dt
        self.energy["prefill"] += n * t_p * (pre_w - idle_w)
        self.energy["decode"] += n * busy_d * (dec_w - idle_w)
        return n * (t_p * pre_w + busy_d * dec_w + idle_t * idle_w) / dt

    def load(self, k: int, every: int, cfg: PlannerConfig, stats: tuple[float, float, float]) -> PoolLoad:
        lo = max(0, k + 1 - every)
        rate = float(self.bin_n[lo:k + 1].sum()) / (every * self.dt)
        alpha = min(1.0, every * self.dt / cfg.ewma_s)
        self.ewma += alpha * (rate - self.ewma)
        busy = self.pre[0] + self.dec_n > 1e-9
        minute = max(1, int(round(60.0 / self.dt)))
        window = self.bin_n[max(0, k + 1 - int(cfg.peak_window_s / self.dt)):k + 1]
        m = len(window) // minute * minute
        peak = float(window[len(window) - m:].reshape(-1, minute).sum(axis=1).max()) / 60.0 if m else 0.0
        return PoolLoad(rate, self.ewma, *stats, queued_requests=self.wait[0], busy=busy, arrival_rate_peak_rps=peak)

    def apply(self, plan: Plan, now: float) -> None:
        spec = self.spec
        current = self.ready + len(self.starting)
        if plan.replicas > current:
            add = plan.replicas - current
            self.starting += [now + spec.cold_start_s] * add
            self.cold_starts += add
        elif plan.replicas < current:
            drop = current - plan.replicas
            keep = max(0, len(self.starting) - drop)
            drop -= len(self.starting) - keep
            self.starting = self.starting[:keep]
            self.ready -= drop  # a released replica's work goes to the others (drain not modeled)
        if plan.replicas != current:
            self.replica_changes += 1
        new_clock = int(np.searchsorted(self.prof.clocks_mhz, plan.clock_mhz))
        if new_clock != self.clock:
            self.clock_changes += 1
            self.clock = new_clock
        self.shrink_since = plan.shrink_since_s
        if plan.replicas != current or plan.reason.split(":")[0] != self.last_reason:
            self.plans.append((now, plan.reason))
        self.last_reason = plan.reason.split(":")[0]

    def set_clock(self, plan: Plan) -> None:
        new_clock = int(np.searchsorted(self.prof.clocks_mhz, plan.clock_mhz))
        if new_clock != self.clock:
            self.clock_changes += 1
            self.clock = new_clock

    def result(self, n_ticks: int) -> PoolResult:
        ttft, tpot = request_latencies(self.arr, self.prompt, self.out, self.c_tok[:n_ticks], self.t_p[:n_ticks],
                                       self.tpot[:n_ticks], self.clocks[:n_ticks], self.prof, self.dt)
        return PoolResult(self.spec, self.arr, ttft, tpot, self.power[:n_ticks], self.replicas[:n_ticks],
                          self.clocks[:n_ticks], int(self.out.sum()), dict(self.energy), self.cold_starts,
                          self.replica_changes, self.clock_changes, self.plans)


def request_latencies(arr, prompt, out, c_tok, t_p, tpot, clocks_mhz, prof: ReplicaProfile, dt: float):
    """Per-request TTFT and TPOT (s) from the fluid's cumulative prefilled tokens (FIFO)."""
    end = np.cumsum(prompt)
    k = np.searchsorted(c_tok, end - 1e-6)
    done = k < len(c_tok)
    kk = np.minimum(k, len(c_tok) - 1)
    prev = np.where(kk > 0, c_tok[np.maximum(kk - 1, 0)], 0.0)
    span = np.maximum(c_tok[kk] - prev, 1e-9)
    first = kk * dt + t_p[kk] * np.clip((end - prev) / span, 0.0, 1.0)
    ci = np.clip(np.searchsorted(prof.clocks_mhz, clocks_mhz[kk]), 0, len(prof.clocks_mhz) - 1)
    own = prof.prefill_overhead_s + prompt * prof.prefill_s_per_token[ci]
    ttft = np.maximum(first, arr + own) - arr
    cs = np.concatenate([[0.0], np.cumsum(tpot)])
    length = np.maximum(1, np.ceil(np.maximum(out - 1, 0) * tpot[kk] / dt)).astype(int)
    stop = np.minimum(kk + 1 + length, len(tpot))
    start = np.minimum(kk + 1, len(tpot) - 1)
    avg = (cs[stop] - cs[start]) / np.maximum(stop - start, 1)
    avg = np.where(stop > start, avg, tpot[kk])
    return np.where(done, ttft, np.nan), np.where(done, avg, np.nan)


def _prompt_stats(pool: _Pool, hour: int) -> tuple[float, float, float]:
    """Prompt mean, prompt p99 and output mean measured over the previous hour (this hour's first
    hour: the first hour itself)."""
    h = max(0, hour - 1)
    sel = (pool.arr >= h * 3600) & (pool.arr < (h + 1) * 3600)
    if not sel.any():
        sel = slice(None)
    if not len(pool.arr):
        return 1.0, 1.0, 1.0
    return float(pool.prompt[sel].mean()), float(np.percentile(pool.prompt[sel], 99)), float(pool.out[sel].mean())


def simulate_day(work: Workload, specs: tuple[PoolSpec, PoolSpec], profile: ReplicaProfile,
                 config: SimConfig) -> DayResult:
    """Run ``work`` (high-priority requests to ``specs[0]``, the rest to ``specs[1]``) under
    ``config.policy``; deterministic for a given workload."""
    dt = config.tick_s
    end_s = (float(work.arrival_s[-1]) if len(work.arrival_s) else 0.0) + config.drain_s
    n_ticks = int(math.ceil(end_s / dt))
    masks = (work.high_priority, ~work.high_priority)
    pools = tuple(_Pool(s, profile, work, m, n_ticks, dt, config.released_replica_power_w)
                  for s, m in zip(specs, masks, strict=True))
    hp, lp = pools
    every = max(1, int(round(config.planner.interval_s / dt)))
    polca_every = max(1, int(round(config.polca_interval_s / dt)))
    clock_every = max(1, int(round(config.clock_interval_s / dt))) if config.clock_interval_s else 0
    policy = PowerPolicy(config.polca, config.provisioned_power_w, row="capacity") \
        if config.policy == "both+polca" else None
    caps: dict[str, int | None] = {HIGH: None, LOW: None}
    stats = {id(p): _prompt_stats(p, 0) for p in pools}
    row = np.zeros(n_ticks)
    last_arrival_tick = n_ticks if not len(work.arrival_s) else int(work.arrival_s[-1] // dt) + 1
    brakes = 0
    k = 0
    for k in range(n_ticks):
        now = k * dt
        row[k] = hp.tick(k, now, caps[HIGH]) + lp.tick(k, now, caps[LOW])
        if policy is not None and (k + 1) % polca_every == 0:
            decision = policy.update(now + dt, float(row[k + 1 - polca_every:k + 1].mean()))
            brakes += sum(1 for kind, _ in decision.events if kind.value == "brake")
            for cls in (HIGH, LOW):
                target = policy.target(cls, float(profile.clocks_mhz[-1]), float(profile.clocks_mhz[0]))
                caps[cls] = None if target.sm_clock_mhz is None else \
                    max(0, int(np.searchsorted(profile.clocks_mhz, target.sm_clock_mhz, side="right")) - 1)
        if config.policy != "static" and (k + 1) % every == 0:
            if (k + 1) % int(3600 / dt) == 0:
                stats = {id(p): _prompt_stats(p, int((k + 1) * dt // 3600)) for p in pools}
            _control(pools, k, every, now + dt, config, profile, stats)
        elif clock_every and config.policy in DVFS_POLICIES and (k + 1) % clock_every == 0:
            _control(pools, k, clock_every, now + dt, config, profile, stats, clocks_only=True)
        if k >= last_arrival_tick and all(p.wait[0] + p.pre[0] + p.dec_n < 1e-6 for p in pools):
            break
    n = k + 1
    return DayResult(config.policy, profile.energy_source, dt, [p.result(n) for p in pools],
                     config.provisioned_power_w, brakes, policy.capped_s if policy else 0.0)


def _control(pools, k: int, every: int, now: float, config: SimConfig, profile: ReplicaProfile, stats,
             clocks_only: bool = False) -> None:
    """Plan every pool (replicas and clock; or, in the fast loop, only the clock of the replicas
    ready now), the high-priority pool first within the budget."""
    scale = config.policy in ("autoscale", "both", "both+polca")
    dvfs = config.policy in DVFS_POLICIES
    budget = config.provisioned_power_w
    hp, lp = pools
    lp_floor = lp.spec.min_replicas * profile.idle_power_w
    left = None if budget is None else budget - lp_floor
    for pool in pools:
        load = pool.load(k, every, config.planner, stats[id(pool)])
        starting = len(pool.starting)
        state = PoolState(now, pool.ready, starting, (pool.starting[0] - now) if starting else 0.0,
                          pool.idle_since, pool.shrink_since, float(profile.clocks_mhz[pool.clock]))
        if clocks_only:
            if pool.ready == 0:
                continue
            plan = plan_pool(load, state, pool.spec, profile, config.planner, power_budget_w=left,
                             replicas=pool.ready)
            pool.set_clock(plan)
        else:
            plan = plan_pool(load, state, pool.spec, profile, config.planner, power_budget_w=left, scale=scale,
                             dvfs=dvfs)
            pool.apply(plan, now)
        if budget is not None:
            left = budget - plan.predicted_power_w
