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

Each pool holds one LANE per priority class (waiting, in prefill, decoding); the FIFO bookkeeping
is per class, across pools. Normally a pool serves its own class. The levers of issue 16 item 5:

- ``share_classes``: at low load both classes run on the high pool's replicas
  (:func:`~runtime.capacity.planner.plan_sharing` decides; the high class is admitted and
  prefilled first, the batch is shared), the low pool is released once drained; when load rises
  the classes split again, the low class staying on the shared replicas until its own pool serves;
- ``pack_decode``: decode is packed WITHOUT moving sequences, as a live router could do it. The
  sequences are discrete (each with its own output length, FIFO per class): a sequence whose prefill
  ends is admitted to the fullest ready replica whose batch is below ``max_batch_fill x max_batch``
  (bin packing at admission; none with room: the emptiest), and stays there until it finishes;
  each replica steps its own batch (its step time and power at its own batch size), so replicas
  left without sequences idle as hot spares while prefill still spreads over every ready replica.
  A replica the plan releases while it holds sequences drains (takes nothing new, finishes its
  sequences, then is released; reused first if the plan grows again). The request's TPOT is that of
  the fullest replica (the one new sequences go to);
- ``pack_migrate`` (with ``pack_decode``): an IDEALISED UPPER BOUND, not a serving policy: the same
  discrete sequences re-packed every tick onto the fewest ready replicas that hold them within
  ``max_batch_fill x max_batch``, as if sequences (and their KV caches) moved between replicas for free;
- ``warm`` (:class:`WarmTier`): a released replica keeps its weights in host memory, drawing
  ``power_w``, for ``keep_s``; waking it takes ``wake_s`` at the start-up power instead of the cold start.

The ``oracle`` policy is an analysis, never a serving policy: the planner is told the busiest
``oracle_window_s`` among the arrivals of the next cold start plus two intervals (and of this
hour's token sizes), has no scale-down delay, and releases a replica as soon as nothing needs it
within the cold start's energy / idle power (ski rental with the future known).

Every joule is modeled from the replica profile and labelled with its ``energy_source``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field, replace

import numpy as np

from runtime.power.policy import HIGH, LOW, PolicyConfig, PowerPolicy
from runtime.power.workload import Workload

from .planner import Plan, PlannerConfig, PoolLoad, PoolSpec, PoolState, plan_pool, plan_sharing, shared_spec
from .profile import ReplicaProfile

SERVING_POLICIES: tuple[str, ...] = ("static", "autoscale", "dvfs", "both", "both+polca")
#: ``oracle`` is an analysis, never a serving policy: the planner told the arrivals still to come
POLICIES: tuple[str, ...] = (*SERVING_POLICIES, "oracle")
SCALE_POLICIES = ("autoscale", "both", "both+polca", "oracle")
DVFS_POLICIES = ("dvfs", "both", "both+polca", "oracle")


@dataclass(slots=True, frozen=True)
class WarmTier:
    """Released replicas keep their weights in host memory for ``keep_s``: waking one takes ``wake_s``
    (instead of the cold start, at the same start-up power) and each draws ``power_w`` meanwhile.
    All three are assumptions (nothing here measures them); the benchmark sweeps them."""

    wake_s: float = 15.0
    power_w: float = 100.0
    keep_s: float = math.inf

    def __post_init__(self) -> None:
        if self.wake_s < 0 or self.power_w < 0 or self.keep_s <= 0:
            raise ValueError("warm tier: wake_s and power_w must be >= 0, keep_s > 0")


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
    share_classes: bool = False  # both classes on shared replicas at low load (planner.plan_sharing)
    share_max_replicas: int | None = None  # most replicas a shared pool may use (None: the high pool's max)
    pack_decode: bool = False  # decode packed at admission (fullest replica with room), sequences never move
    pack_migrate: bool = False  # idealised upper bound: the batch re-packed every tick (sequences move for free)
    oracle_window_s: float = 60.0  # the oracle plans for the busiest window this long among the arrivals ahead
    warm: WarmTier | None = None  # None: a released replica is cold (a start takes the pool's cold_start_s)

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
    warm_starts: int = 0  # of the starts, those from the warm tier

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
    share_changes: int = 0  # the classes were merged onto shared replicas or split again
    shared_s: float = 0.0  # seconds the classes shared replicas
    brakes_at_s: list[float] = field(default_factory=list)  # when POLCA braked (both+polca)

    @property
    def power_w(self) -> np.ndarray:
        return np.sum([p.power_w for p in self.pools], axis=0)

    @property
    def energy_j(self) -> float:
        return float(sum(sum(p.energy_j.values()) for p in self.pools))


class _Class:
    """One priority class's requests, wherever they are served: per-tick arrival bins and the FIFO
    bookkeeping its latencies come back from (cumulative prefilled tokens over every pool)."""

    def __init__(self, spec: PoolSpec, work: Workload, mask: np.ndarray, n_ticks: int, tick_s: float) -> None:
        self.spec = spec
        self.arr = work.arrival_s[mask]
        self.prompt = work.prompt_tokens[mask].astype(float)
        self.out = work.output_tokens[mask].astype(float)
        k = np.minimum((self.arr // tick_s).astype(int), n_ticks - 1)
        self.bin_n = np.bincount(k, minlength=n_ticks).astype(float)
        self.bin_p = np.bincount(k, self.prompt, minlength=n_ticks)
        self.bin_o = np.bincount(k, self.out - 1.0, minlength=n_ticks)  # after the first token
        self.bin_m = np.bincount(k, (self.out > 1).astype(float), minlength=n_ticks)
        self.cum_n = np.concatenate([[0.0], np.cumsum(self.bin_n)])
        self.dec_len = self.out[self.out > 1] - 1.0  # decode tokens of each decoding request, FIFO
        self.dec_in, self.dec_taken = 0.0, 0  # (packing) decoders out of prefill: fluid, and admitted as sequences
        self.cum_tok = 0.0
        self.ewma = 0.0
        self.c_tok, self.tpot, self.clocks = np.zeros(n_ticks), np.zeros(n_ticks), np.zeros(n_ticks)
        self.t_off, self.t_end = np.zeros(n_ticks), np.zeros(n_ticks)  # its prefill window inside the tick

    def update_ewma(self, k: int, every: int, dt: float, cfg: PlannerConfig) -> None:
        rate = float(self.bin_n[max(0, k + 1 - every):k + 1].sum()) / (every * dt)
        self.ewma += min(1.0, every * dt / cfg.ewma_s) * (rate - self.ewma)


class _Lane:
    """One class's work inside one pool: waiting for a batch slot, in prefill, decoding."""

    __slots__ = ("wait", "pre", "dec_n", "dec_o")

    def __init__(self) -> None:
        self.wait = [0.0, 0.0, 0.0, 0.0]  # requests, prompt tokens, decode tokens, decoders
        self.pre = [0.0, 0.0, 0.0, 0.0]
        self.dec_n = self.dec_o = 0.0

    def work(self) -> float:
        return self.wait[0] + self.pre[0] + self.dec_n


class _Pool:
    """Fluid state of one pool of replicas (see the module docstring). It holds one lane per
    priority class; normally only its own class's lane is used, a shared pool serves both, the high
    class first (batch slots, then prefill order)."""

    def __init__(self, spec: PoolSpec, profile: ReplicaProfile, classes: list[_Class], n_ticks: int, tick_s: float,
                 config: SimConfig) -> None:
        self.spec, self.prof, self.dt, self.classes = spec, profile, tick_s, classes
        self._released_w = config.released_replica_power_w  # what a released replica still draws
        self._warm = config.warm
        self._pack_seq = config.pack_decode
        self._migrate = config.pack_decode and config.pack_migrate  # the idealised upper bound
        self._fill = max(1, int(config.planner.max_batch_fill * profile.max_batch + 1e-9))
        # (packing) replica ids: ready, draining (released by a plan, finishing their sequences), free;
        # the sequences decoding: replica id, decode tokens left, class
        self.rids: list[int] = list(range(spec.max_replicas))
        self.dids: list[int] = []
        self.free_ids: list[int] = []
        self._n_ids = spec.max_replicas
        self.s_rep, self.s_rem, self.s_cls = np.zeros(0, dtype=int), np.zeros(0), np.zeros(0, dtype=int)
        self._np_tables = (np.asarray(profile.decode_step_s, dtype=float), np.asarray(profile.decode_power_w, dtype=float))
        self._window_s = config.oracle_window_s
        self.lanes = [_Lane() for _ in classes]
        # the class this pool is for: its requests keep the pool from counting as idle even while they
        # are served elsewhere (after a split the low class rides the high pool until its own is ready)
        self.own = next((c for c, cls in enumerate(classes) if cls.spec == spec), None)
        self.ready, self.starting = spec.max_replicas, []  # ready-at times of starting replicas
        self.warm: list[float] = []  # release times of released replicas still holding weights in host memory
        self.clock = profile.max_clock_index
        self.idle_since: float | None = None
        self.shrink_since: float | None = None
        self.tpot_now = tick_s
        self.power, self.replicas, self.clocks = np.zeros(n_ticks), np.zeros(n_ticks), np.zeros(n_ticks)
        self.energy = dict.fromkeys(("idle", "prefill", "decode", "cold_start", "released", "warm"), 0.0)
        self.cold_starts = self.warm_starts = self.replica_changes = self.clock_changes = 0
        self.plans: list[tuple[float, str]] = []
        self.last_reason = ""
        self._tables = ([list(r) for r in profile.decode_step_s], [list(r) for r in profile.decode_power_w])

    def _row(self, table: int, batch: float) -> float:
        row = self._tables[table][self.clock]
        b = min(max(batch, 1.0), len(row) - 1.0)
        i = min(int(b), len(row) - 2)
        return row[i] + (row[i + 1] - row[i]) * (b - i)

    def work(self) -> float:
        return sum(lane.work() for lane in self.lanes)

    def tick(self, k: int, now: float, cap_index: int | None, routed: list[int]) -> float:
        """Advance one tick with the arrivals of the classes in ``routed``; returns the pool's watts."""
        dt, prof, spec = self.dt, self.prof, self.spec
        if self.starting and self.starting[0] <= now:
            done = [t for t in self.starting if t <= now]
            self.starting = self.starting[len(done):]
            self.ready += len(done)
            for _ in done:
                self.rids.append(self._new_id())
        arrived = 0.0
        for c in routed:
            cls, w = self.classes[c], self.lanes[c].wait
            w[0] += cls.bin_n[k]
            w[1] += cls.bin_p[k]
            w[2] += cls.bin_o[k]
            w[3] += cls.bin_m[k]
            arrived += cls.bin_n[k]
        clock = self.clock if cap_index is None else min(self.clock, cap_index)
        saved, self.clock = self.clock, clock
        power = self._serve(k, dt, prof)
        self.clock = saved
        cold_w = spec.cold_start_energy_j / spec.cold_start_s if spec.cold_start_s > 0 else 0.0
        n_start = len(self.starting)
        if self.warm and self._warm is not None:
            self.warm = [t for t in self.warm if now - t < self._warm.keep_s]
        draining = len(self.dids)
        released = spec.max_replicas - self.ready - n_start - draining
        n_warm = min(len(self.warm), released)
        self.energy["cold_start"] += n_start * cold_w * dt
        self.energy["released"] += (released - n_warm) * self._released_w * dt
        warm_w = self._warm.power_w if self._warm is not None else 0.0
        self.energy["warm"] += n_warm * warm_w * dt
        power += n_start * cold_w + (released - n_warm) * self._released_w + n_warm * warm_w
        self.power[k], self.replicas[k], self.clocks[k] = power, self.ready + n_start + draining, \
            prof.clocks_mhz[clock]
        own = self.own is not None and self.own not in routed and self.classes[self.own].bin_n[k] > 0
        busy = self.work() > 1e-9 or arrived > 0 or own
        self.idle_since = None if busy else (now if self.idle_since is None else self.idle_since)
        return power

    def _serve(self, k: int, dt: float, prof: ReplicaProfile) -> float:
        n, lanes = self.ready, self.lanes
        if n == 0 and not self.dids:
            self.tpot_now = dt
            return 0.0
        draining_seqs = float(np.isin(self.s_rep, self.dids).sum()) if self.dids else 0.0
        slots = n * prof.max_batch - sum(ln.pre[0] + ln.dec_n for ln in lanes) + draining_seqs
        for ln in lanes:  # the high class first
            w, pre = ln.wait, ln.pre
            if w[0] > 1e-12 and slots > 0:
                f = min(1.0, slots / w[0])
                slots -= w[0] * f
                for i in range(4):
                    pre[i] += w[i] * f
                    w[i] *= 1.0 - f
        spt, ovh = prof.prefill_s_per_token[self.clock], prof.prefill_overhead_s
        total = sum(ln.pre[1] for ln in lanes)
        t_p = frac = 0.0
        if total > 1e-9 and n > 0:
            full = ovh + total / n * spt
            t_p, frac = min(dt, full), min(1.0, dt / full)
        budget, before = frac * total, 0.0
        moved_by_lane = []
        for c, ln in enumerate(lanes):  # prefill order: the high class's prompts first
            pre = ln.pre
            take = min(pre[1], budget - before) if pre[1] > 1e-9 else 0.0
            f = take / pre[1] if pre[1] > 1e-9 else (frac if pre[0] > 0 else 0.0)
            moved = [x * f for x in pre]
            for i in range(4):
                pre[i] -= moved[i]
            moved_by_lane.append(moved)
            if moved[1] > 0:
                cls = self.classes[c]
                cls.cum_tok += moved[1]
                off, end = t_p * before / budget, t_p * (before + moved[1]) / budget
                if cls.t_end[k] > 0:
                    off, end = min(off, cls.t_off[k]), max(end, cls.t_end[k])
                cls.t_off[k], cls.t_end[k] = off, end
                cls.clocks[k] = prof.clocks_mhz[self.clock]
            before += moved[1]
        if self._pack_seq:
            return self._decode_packed(n, t_p, moved_by_lane, ovh + prof.prefill_chunk_tokens * spt)
        dec_n = sum(ln.dec_n for ln in lanes)
        dec_o = sum(ln.dec_o for ln in lanes)
        n_d = n  # without packing every replica decodes: the load spread evenly
        t_d, busy_d, nd = dt - t_p, 0.0, dec_n / n_d
        step = self._row(0, nd)
        chunk = ovh + prof.prefill_chunk_tokens * spt
        per_seq = t_p / chunk + t_d / step  # tokens a decoding sequence can get this tick
        if nd > 1e-12:
            ride = min(dec_o / n_d, t_p / chunk * nd)  # one token per chunked-prefill step
            tokens = min(dec_o / n_d, ride + t_d / step * nd)
            busy_d = (tokens - ride) / max(nd, 1.0) * step
            for ln in lanes:  # every sequence of the batch gets the same tokens
                if ln.dec_n <= 1e-12:
                    continue
                got = tokens * n_d * ln.dec_n / dec_n
                if ln.dec_o > 1e-12:
                    ln.dec_n -= ln.dec_n * min(1.0, got / ln.dec_o)
                ln.dec_o = max(0.0, ln.dec_o - got)
        for ln, moved in zip(lanes, moved_by_lane, strict=True):
            ln.dec_n += moved[3]
            ln.dec_o += moved[2]
        self.tpot_now = dt / per_seq
        idle_w = prof.idle_power_w
        pre_w, dec_w = prof.prefill_power_w[self.clock], self._row(1, nd)
        idle_t = max(0.0, n * (dt - t_p) - n_d * busy_d)  # replica-seconds
        self.energy["idle"] += n * idle_w * dt
        self.energy["prefill"] += n * t_p * (pre_w - idle_w)
        self.energy["decode"] += n_d * busy_d * (dec_w - idle_w)
        return (n * t_p * pre_w + n_d * busy_d * dec_w + idle_t * idle_w) / dt

    def _new_id(self) -> int:
        if self.free_ids:
            return self.free_ids.pop()
        self._n_ids += 1
        return self._n_ids - 1

    def _counts(self) -> np.ndarray:
        return np.bincount(self.s_rep, minlength=self._n_ids)

    def _decode_packed(self, n: int, t_p: float, moved_by_lane: list[list[float]], chunk_s: float) -> float:
        """Decode without migration (``pack_decode``): each replica steps its own sequences, then the
        sequences out of prefill are admitted, each to the fullest ready replica with room. Returns watts."""
        dt, prof, clock = self.dt, self.prof, self.clock
        t_d, ride = dt - t_p, t_p / chunk_s  # a decoding sequence gets one token per chunked-prefill step
        steps, watts = self._np_tables[0][clock], self._np_tables[1][clock]
        grid = np.arange(len(steps), dtype=float)
        idle_w = prof.idle_power_w
        dec_e = 0.0  # decode joules above idle, this tick
        if self._migrate and len(self.s_rem) and self.rids:  # idealised: every sequence re-packed, for free
            slot = np.arange(len(self.s_rem)) // self._fill
            slot = np.where(slot < len(self.rids), slot, np.arange(len(self.s_rem)) % len(self.rids))
            self.s_rep = np.asarray(self.rids, dtype=int)[slot]
        worst = float(steps[1])  # the fullest replica's step: what a new sequence gets
        if len(self.s_rem):
            counts = self._counts()
            occ = np.flatnonzero(counts)
            b = np.clip(counts[occ].astype(float), 1.0, len(steps) - 1.0)
            step_occ, w_occ = np.interp(b, grid, steps), np.interp(b, grid, watts)
            step = np.zeros(self._n_ids)
            step[occ] = step_occ
            s = step[self.s_rep]
            need = np.clip((self.s_rem - ride) * s, 0.0, t_d)  # decode-step time each sequence still needs
            busy = np.zeros(self._n_ids)
            np.maximum.at(busy, self.s_rep, need)
            dec_e = float((busy[occ] * (w_occ - idle_w)).sum())
            worst = float(step_occ.max())
            self.s_rem = self.s_rem - (ride + t_d / s)
            alive = self.s_rem > 1e-9
            self.s_rep, self.s_rem, self.s_cls = self.s_rep[alive], self.s_rem[alive], self.s_cls[alive]
        self.tpot_now = dt / (ride + t_d / worst)
        counts = self._counts()
        if self.dids:  # a draining replica whose last sequence finished is released
            left = [r for r in self.dids if counts[r] > 0]
            self.free_ids += [r for r in self.dids if counts[r] == 0]
            self.dids = left
        new_rep, new_rem, new_cls = [], [], []
        cnt = {r: int(counts[r]) for r in self.rids}
        for c, moved in enumerate(moved_by_lane):
            cls = self.classes[c]
            cls.dec_in += moved[3]
            m = min(int(cls.dec_in + 1e-6), len(cls.dec_len)) - cls.dec_taken
            if m <= 0 or not self.rids:
                continue
            for rem in cls.dec_len[cls.dec_taken:cls.dec_taken + m]:
                room = [r for r in self.rids if cnt[r] < self._fill]
                r = max(room, key=lambda x: (cnt[x], -x)) if room else min(self.rids, key=lambda x: (cnt[x], x))
                cnt[r] += 1
                new_rep.append(r)
                new_rem.append(rem)
                new_cls.append(c)
            cls.dec_taken += m
        if new_rep:
            self.s_rep = np.concatenate([self.s_rep, np.asarray(new_rep, dtype=int)])
            self.s_rem = np.concatenate([self.s_rem, np.asarray(new_rem, dtype=float)])
            self.s_cls = np.concatenate([self.s_cls, np.asarray(new_cls, dtype=int)])
        for c, ln in enumerate(self.lanes):
            mine = self.s_cls == c
            ln.dec_n, ln.dec_o = float(mine.sum()), float(self.s_rem[mine].sum())
        up = n + len(self.dids)
        self.energy["idle"] += up * idle_w * dt
        pre_w = prof.prefill_power_w[clock]
        self.energy["prefill"] += n * t_p * (pre_w - idle_w)
        self.energy["decode"] += dec_e
        return (up * idle_w * dt + n * t_p * (pre_w - idle_w) + dec_e) / dt

    def load(self, serves: list[int], k: int, cfg: PlannerConfig, stats: tuple[float, float, float],
             oracle_lookahead: int = 0) -> PoolLoad:
        """What the planner sees for the classes this pool serves (their ewma updated by the caller).
        ``oracle_lookahead`` > 0: the clairvoyant load, the busiest minute of the arrivals still to
        come within that many ticks (the ``oracle`` policy)."""
        queued = sum(self.lanes[c].wait[0] for c in range(len(self.lanes)))
        busy = sum(ln.pre[0] + ln.dec_n for ln in self.lanes) > 1e-9
        minute = max(1, int(round(60.0 / self.dt)))
        if not serves:
            return PoolLoad(0.0, 0.0, *stats, queued_requests=queued, busy=busy)
        if oracle_lookahead:
            cum = sum(self.classes[c].cum_n for c in serves)
            last = len(cum) - 1
            lo, hi = min(k + 1, last), min(k + 1 + oracle_lookahead, last)
            span = max(1, int(round(self._window_s / self.dt)))
            ends = np.minimum(np.arange(lo, hi + 1) + span, last)
            future = float((cum[ends] - cum[lo:hi + 1]).max()) / (span * self.dt) if hi >= lo else 0.0
            return PoolLoad(future, future, *stats, queued_requests=queued, busy=busy, arrival_rate_peak_rps=future)
        every = max(1, int(round(cfg.interval_s / self.dt)))
        rate = sum(float(self.classes[c].bin_n[max(0, k + 1 - every):k + 1].sum()) for c in serves) / (every * self.dt)
        ewma = sum(self.classes[c].ewma for c in serves)
        lo = max(0, k + 1 - int(cfg.peak_window_s / self.dt))
        window = sum(self.classes[c].bin_n[lo:k + 1] for c in serves)
        m = len(window) // minute * minute
        peak = float(window[len(window) - m:].reshape(-1, minute).sum(axis=1).max()) / 60.0 if m else 0.0
        return PoolLoad(rate, ewma, *stats, queued_requests=queued, busy=busy, arrival_rate_peak_rps=peak)

    def planning_spec(self, spec: PoolSpec | None = None) -> PoolSpec:
        """The spec to plan with: a start from the warm tier takes ``warm.wake_s`` (and its energy)."""
        spec = spec or self.spec
        if self._warm is None or not self.warm:
            return spec
        cold_w = spec.cold_start_energy_j / spec.cold_start_s if spec.cold_start_s > 0 else 0.0
        return spec.model_copy(update={"cold_start_s": self._warm.wake_s,
                                       "cold_start_energy_j": cold_w * self._warm.wake_s})

    def apply(self, plan: Plan, now: float) -> None:
        spec = self.spec
        current = self.ready + len(self.starting)
        if plan.replicas > current and self.dids:  # draining replicas are still up: they serve again first
            back = self.dids[:plan.replicas - current]
            self.dids = self.dids[len(back):]
            self.rids += back
            self.ready += len(back)
            current += len(back)
        if plan.replicas > current:
            add = plan.replicas - current
            warm = min(add, len(self.warm)) if self._warm is not None else 0
            for _ in range(warm):
                self.warm.pop()  # the most recently released: its host copy is the freshest
            self.starting = sorted(self.starting + [now + self._warm.wake_s] * warm
                                   + [now + spec.cold_start_s] * (add - warm)) if warm else \
                self.starting + [now + spec.cold_start_s] * add
            self.cold_starts += add
            self.warm_starts += warm
        elif plan.replicas < current:
            drop = current - plan.replicas
            keep = max(0, len(self.starting) - drop)
            drop -= len(self.starting) - keep
            if self._warm is not None:
                self.warm += [now] * (current - plan.replicas)
            self.starting = self.starting[:keep]
            if self._pack_seq and drop > 0:  # the emptiest go; one that holds sequences drains first
                counts = self._counts()
                gone = sorted(self.rids, key=lambda r: (counts[r], -r))[:drop]
                self.rids = [r for r in self.rids if r not in gone]
                self.dids += [r for r in gone if counts[r] > 0]
                self.free_ids += [r for r in gone if counts[r] == 0]
            # without packing the fluid's released replica's work goes to the others (drain not modeled)
            self.ready -= drop
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

    def result(self, cls: _Class, n_ticks: int) -> PoolResult:
        ttft, tpot = request_latencies(cls.arr, cls.prompt, cls.out, cls.c_tok[:n_ticks], cls.t_end[:n_ticks],
                                       cls.tpot[:n_ticks], cls.clocks[:n_ticks], self.prof, self.dt,
                                       t_off=cls.t_off[:n_ticks])
        return PoolResult(cls.spec, cls.arr, ttft, tpot, self.power[:n_ticks], self.replicas[:n_ticks],
                          self.clocks[:n_ticks], int(cls.out.sum()), dict(self.energy), self.cold_starts,
                          self.replica_changes, self.clock_changes, self.plans, self.warm_starts)


def request_latencies(arr, prompt, out, c_tok, t_p, tpot, clocks_mhz, prof: ReplicaProfile, dt: float, t_off=None):
    """Per-request TTFT and TPOT (s) from the fluid's cumulative prefilled tokens (FIFO). The class's
    prompts of tick ``k`` are prefilled between ``t_off[k]`` (default 0) and ``t_p[k]`` into the tick."""
    end = np.cumsum(prompt)
    k = np.searchsorted(c_tok, end - 1e-6)
    done = k < len(c_tok)
    kk = np.minimum(k, len(c_tok) - 1)
    prev = np.where(kk > 0, c_tok[np.maximum(kk - 1, 0)], 0.0)
    span = np.maximum(c_tok[kk] - prev, 1e-9)
    off = 0.0 if t_off is None else t_off[kk]
    first = kk * dt + off + (t_p[kk] - off) * np.clip((end - prev) / span, 0.0, 1.0)
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


def _prompt_stats(classes: list[_Class], hour: int, *, previous: bool = True) -> tuple[float, float, float]:
    """Prompt mean, prompt p99 and output mean of ``classes`` together, measured over the previous
    hour (the first hour: itself); ``previous=False``: over ``hour`` itself (the clairvoyant oracle)."""
    arr = np.concatenate([c.arr for c in classes])
    if not len(arr):
        return 1.0, 1.0, 1.0
    prompt = np.concatenate([c.prompt for c in classes])
    out = np.concatenate([c.out for c in classes])
    h = max(0, hour - 1) if previous else hour
    sel = (arr >= h * 3600) & (arr < (h + 1) * 3600)
    if not sel.any():
        sel = slice(None)
    return float(prompt[sel].mean()), float(np.percentile(prompt[sel], 99)), float(out[sel].mean())


def simulate_day(work: Workload, specs: tuple[PoolSpec, PoolSpec], profile: ReplicaProfile,
                 config: SimConfig) -> DayResult:
    """Run ``work`` (high-priority requests to ``specs[0]``, the rest to ``specs[1]``) under
    ``config.policy``; deterministic for a given workload."""
    dt = config.tick_s
    end_s = (float(work.arrival_s[-1]) if len(work.arrival_s) else 0.0) + config.drain_s
    n_ticks = int(math.ceil(end_s / dt))
    masks = (work.high_priority, ~work.high_priority)
    classes = [_Class(s, work, m, n_ticks, dt) for s, m in zip(specs, masks, strict=True)]
    pools = tuple(_Pool(s, profile, classes, n_ticks, dt, config) for s in specs)
    every = max(1, int(round(config.planner.interval_s / dt)))
    polca_every = max(1, int(round(config.polca_interval_s / dt)))
    clock_every = max(1, int(round(config.clock_interval_s / dt))) if config.clock_interval_s else 0
    policy = PowerPolicy(config.polca, config.provisioned_power_w, row="capacity") \
        if config.policy == "both+polca" else None
    caps: dict[str, int | None] = {HIGH: None, LOW: None}
    ctl = _Control(config, profile, pools, classes)
    row = np.zeros(n_ticks)
    last_arrival_tick = n_ticks if not len(work.arrival_s) else int(work.arrival_s[-1] // dt) + 1
    brakes: list[float] = []
    k = 0
    for k in range(n_ticks):
        now = k * dt
        route = ctl.route()
        row[k] = sum(pool.tick(k, now, caps[HIGH if i == 0 else LOW], [c for c, p in enumerate(route) if p == i])
                     for i, pool in enumerate(pools))
        for c, cls in enumerate(classes):
            cls.c_tok[k] = cls.cum_tok
            holding = [p.tpot_now for p in pools if p.lanes[c].dec_n > 1e-9]
            cls.tpot[k] = max(holding) if holding else pools[route[c]].tpot_now
            if cls.t_end[k] == 0:
                cls.clocks[k] = profile.clocks_mhz[pools[route[c]].clock]
        if policy is not None and (k + 1) % polca_every == 0:
            decision = policy.update(now + dt, float(row[k + 1 - polca_every:k + 1].mean()))
            brakes += [now + dt for kind, _ in decision.events if kind.value == "brake"]
            for cls in (HIGH, LOW):
                target = policy.target(cls, float(profile.clocks_mhz[-1]), float(profile.clocks_mhz[0]))
                caps[cls] = None if target.sm_clock_mhz is None else \
                    max(0, int(np.searchsorted(profile.clocks_mhz, target.sm_clock_mhz, side="right")) - 1)
        if config.policy != "static" and (k + 1) % every == 0:
            ctl.control(k, every, now + dt)
        elif clock_every and config.policy in DVFS_POLICIES and (k + 1) % clock_every == 0:
            ctl.control(k, clock_every, now + dt, clocks_only=True)
        if k >= last_arrival_tick and all(p.work() < 1e-6 for p in pools):
            break
    n = k + 1
    return DayResult(config.policy, profile.energy_source, dt,
                     [pool.result(cls, n) for pool, cls in zip(pools, classes, strict=True)],
                     config.provisioned_power_w, len(brakes), policy.capped_s if policy else 0.0,
                     ctl.share_changes, ctl.shared_s, brakes)


class _Control:
    """The planner's side of the simulation: what each pool serves (sharing), its load and its plan."""

    def __init__(self, config: SimConfig, profile: ReplicaProfile, pools, classes: list[_Class]) -> None:
        self.config, self.profile, self.pools, self.classes = config, profile, pools, classes
        self.oracle = config.policy == "oracle"
        planner = config.planner
        if self.oracle:  # foresight replaces caution: no hysteresis, release as soon as nothing is coming
            planner = planner.model_copy(update={"scale_down_delay_s": 0.0, "scale_to_zero_after_s": 0.0})
        self.planner = planner
        self.sharing = config.share_classes and config.policy in SCALE_POLICIES
        self.shared, self.wanted_since, self.share_changes, self.shared_s = False, None, 0, 0.0
        self._last = 0.0
        self.stats: dict[tuple[int, ...], tuple[float, float, float]] = {}
        self._hour = -1

    def route(self) -> list[int]:
        """Pool index per class: the low class goes to the high pool while shared, and while its own
        pool has no ready replica after a split (so a split never makes it wait for a start)."""
        if not self.sharing:
            return [0, 1]
        low_own = not self.shared and self.pools[1].ready > 0
        return [0, 1 if low_own else 0]

    def _stats(self, serves: list[int], hour: int):
        key = tuple(serves)
        if hour != self._hour:
            self.stats, self._hour = {}, hour
        if key not in self.stats:
            self.stats[key] = _prompt_stats([self.classes[c] for c in serves], hour, previous=not self.oracle)
        return self.stats[key]

    def control(self, k: int, every: int, now: float, clocks_only: bool = False) -> None:
        """Plan every pool (replicas and clock; or, in the fast loop, only the clock of the replicas
        ready now), the high-priority pool first within the budget."""
        config, profile, pools = self.config, self.profile, self.pools
        scale = config.policy in SCALE_POLICIES
        dvfs = config.policy in DVFS_POLICIES
        budget = config.provisioned_power_w
        hour = int(now // 3600)
        for cls in self.classes:
            cls.update_ewma(k, every, config.tick_s, config.planner)
        if self.sharing and not clocks_only:
            self._decide_sharing(k, now, hour, budget)
        route = self.route()
        serves = [[c for c, p in enumerate(route) if p == i] for i in range(len(pools))]
        if self.sharing and self.shared:
            serves[0] = [0, 1]
        if self.sharing and not self.shared and route[1] == 0:
            serves = [[0, 1], [1]]  # after a split: the high pool carries the low class until its own pool serves
        # the high pool plans first within budget_fraction x the budget (less the low pool's floor);
        # the low pool within budget_fraction x what the high pool's plan leaves of the budget, its
        # start-up power included. Together at most budget_fraction x P + (1 - budget_fraction) x the
        # high pool's plan: into POLCA's T1-T2 band, where POLCA caps the low class, never above P
        lp_floor = pools[1].spec.min_replicas * profile.idle_power_w
        left = None if budget is None else budget - lp_floor
        for i, pool in enumerate(pools):
            spec = pool.spec
            if len(serves[i]) > 1:
                spec = shared_spec(pools[0].spec, pools[1].spec, min(
                    self.config.share_max_replicas or pools[0].spec.max_replicas, pools[0].spec.max_replicas))
            spec = pool.planning_spec(spec)
            lookahead = 0
            if self.oracle:
                lookahead = int((spec.cold_start_s + 2 * self.planner.interval_s) / config.tick_s)
            load = pool.load(serves[i], k, self.planner, self._stats(serves[i] or [i], hour), lookahead)
            starting = len(pool.starting)
            state = PoolState(now, pool.ready, starting, (pool.starting[0] - now) if starting else 0.0,
                              pool.idle_since, pool.shrink_since, float(profile.clocks_mhz[pool.clock]))
            if clocks_only:
                if pool.ready == 0:
                    continue
                plan = plan_pool(load, state, spec, profile, self.planner, power_budget_w=left, replicas=pool.ready)
                pool.set_clock(plan)
            elif not serves[i] and pool.work() < 1e-9:
                # its class is served by the shared replicas and it holds no work: release it now
                plan = Plan(0, float(profile.clocks_mhz[-1]), 0.0, 0.0, 0.0, True,
                            f"{spec.name}: class served by shared replicas; released")
                pool.apply(plan, now)
            else:
                plan = plan_pool(load, state, spec, profile, self.planner, power_budget_w=left, scale=scale,
                                 dvfs=dvfs)
                if self.oracle and plan.replicas < state.replicas and serves[i]:
                    plan = self._oracle_hold(pool, serves[i], k, hour, spec, load, state, plan, left)
                if not serves[i] and plan.replicas > pool.ready + starting:
                    continue  # draining only: never start replicas for a pool that takes no new work
                pool.apply(plan, now)
            if budget is not None:
                left = budget - plan.predicted_power_w - plan.startup_power_w

    def _oracle_hold(self, pool: _Pool, serves: list[int], k: int, hour: int, spec: PoolSpec, load: PoolLoad,
                     state: PoolState, plan: Plan, left: float | None) -> Plan:
        """The oracle keeps a replica it will need again before idling costs more than restarting it
        (ski rental with the future known): replicas wanted over the next cold-start energy / idle
        power seconds are held, at the clock the load now ahead needs."""
        idle_w = max(self.profile.idle_power_w, 1e-9)
        hold_s = spec.cold_start_energy_j / idle_w
        ahead = int(hold_s / self.config.tick_s)
        if ahead <= int((spec.cold_start_s + 2 * self.planner.interval_s) / self.config.tick_s):
            return plan
        later = pool.load(serves, k, self.planner, self._stats(serves, hour), ahead)
        if later.arrival_rate_rps == 0:
            return plan  # nothing comes within the break-even time: release
        need = plan_pool(later, replace(state, idle_since_s=None), spec, self.profile, self.planner,
                         power_budget_w=left)
        keep = min(state.replicas, max(plan.replicas, need.replicas))
        if keep <= plan.replicas:
            return plan
        held = plan_pool(replace(load, busy=True), state, spec, self.profile, self.planner, power_budget_w=left,
                         replicas=keep)
        return replace(held, reason=f"{held.reason}; held: needed again within {hold_s:.0f} s (oracle)")

    def _decide_sharing(self, k: int, now: float, hour: int, budget: float | None) -> None:
        pools, prof = self.pools, self.profile
        loads = [pools[0].load([c], k, self.planner, self._stats([c], hour)) for c in (0, 1)]
        if self.oracle:
            look = int((pools[0].spec.cold_start_s + 2 * self.planner.interval_s) / self.config.tick_s)
            loads = [pools[0].load([c], k, self.planner, self._stats([c], hour), look) for c in (0, 1)]
        loads = [replace(ld, queued_requests=sum(p.lanes[c].wait[0] for p in pools), busy=False)
                 for c, ld in enumerate(loads)]
        if self.shared:
            self.shared_s += now - self._last
        self._last = now
        d = plan_sharing(loads[0], loads[1], pools[0].spec, pools[1].spec, prof, self.planner,
                         shared=self.shared, now_s=now, wanted_since_s=self.wanted_since,
                         max_shared_replicas=self.config.share_max_replicas or pools[0].spec.max_replicas,
                         power_budget_w=budget)
        if d.shared != self.shared:
            self.share_changes += 1
            pools[0].plans.append((now, d.reason))
        self.shared, self.wanted_since = d.shared, d.wanted_since_s
