"""The capacity planner: per expert pool and control interval, how many replicas and at which
SM clock, as a pure function of (load, state, profile, SLOs, power budget). No Ray, no clock of
its own: the cluster simulator calls it today and a live controller can call the same function.

How a plan is made (DESIGN.md section 11; DynamoLLM, HPCA'25, does the same at three time scales):

1. Planned load = max(last interval's arrival rate, its moving average, the busiest minute of the
   last ``peak_window_s``: bursts recur, and a replica takes a cold start to come) x ``load_headroom`` plus
   the queue drained over one interval (``queued_requests / interval_s``).
2. For every replica count n (``min_replicas``..``max_replicas``, never below one while there is
   load) and every clock c of the profile, the steady state of one replica is predicted from the
   profile's tables, prefill and decode separately:
   prefill busy fraction ``rho_p = (rate / n) x (prompt tokens x s/token(c)) + overhead``;
   with chunked prefill a decoding sequence gets one token per prefill chunk step and one per
   decode step, so TPOT = ``1 / (rho_p / chunk_step(c) + (1 - rho_p) / step(b, c))`` and the batch
   ``b`` solves ``b = (rate / n) x output tokens x TPOT`` (Little's law; continuous batching runs
   steps back to back); TTFT of a 99th-percentile prompt = queueing wait
   ``rho_p / (1 - rho_p) x mean prefill`` + one decode step in flight + its own prefill;
   power = prefill, decode and idle power weighted by their time shares.
3. Feasible: TTFT and TPOT within ``slo_margin`` x SLO, ``rho_p`` and the batch within their
   limits, and the pool's predicted power within the budget (a ceiling, never planned above).
   Per n the LOWEST feasible clock is taken (decode is memory-bound: a lower clock costs it
   little time and saves compute power); across n the lowest predicted power wins, counting the
   cold-start energy of replicas to add (amortised over ``cold_start_amortise_s``); a feasible
   current clock is kept unless changing it saves more than ``clock_change_min_saving``. Fewer, fuller
   replicas win at low load because J/token falls with batch and idle replicas cost idle power.
4. Hysteresis: scale up at once; scale down only after the smaller count was wanted for
   ``scale_down_delay_s``; release the last replica only where ``min_replicas`` is 0, after no
   request and no work for ``scale_to_zero_after_s``. A pool with no ready replica counts the
   remaining cold start in its predicted TTFT (what a router should see for a cold expert).

Every plan says why in ``reason``.

:func:`plan_sharing` decides, per control interval, whether the two priority classes of an expert
share replicas (low load: one pool for both, held to the stricter SLO, the high class first) or
run apart; it is pure too, and says why.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal

import numpy as np
from pydantic import Field, model_validator

from wattserve.specs import Strict

from .profile import ReplicaProfile

_FIXED_POINT_ITERATIONS = 40


class SLO(Strict):
    """Latency targets of one priority class."""

    ttft_ms: float = Field(gt=0, description="Time to first token target per request, in milliseconds.")
    tpot_ms: float = Field(gt=0, description="Time per output token after the first, averaged per request (ms).")


class PoolSpec(Strict):
    """One expert's replicas serving one priority class (POLCA assigns priority per workload)."""

    name: str = Field(description="Pool id in plans, reports and events.")
    priority: Literal["high", "low"] = Field(description="Priority class served (POLCA caps low first).")
    slo: SLO = Field(description="TTFT/TPOT targets of this class.")
    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas; 0 allows scale to zero.")
    max_replicas: int = Field(ge=1, description="Most replicas (the fleet the pool may use).")
    cold_start_s: float = Field(default=60.0, ge=0, description="Seconds from 'add a replica' to serving.")
    cold_start_energy_j: float = Field(default=0.0, ge=0, description="Joules one cold start costs (whole replica).")

    @model_validator(mode="after")
    def _range(self) -> PoolSpec:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class PlannerConfig(Strict):
    """How cautious the planner is and how fast it reacts."""

    interval_s: float = Field(default=10.0, gt=0, description="Control period in seconds.")
    load_headroom: float = Field(default=1.3, ge=1.0, description="Plan for the measured rate times this.")
    ewma_s: float = Field(default=120.0, gt=0, description="Time constant of the arrival-rate moving average (s).")
    clock_change_min_saving: float = Field(
        default=0.03, ge=0, description="Keep a feasible current clock unless a change saves more than this fraction."
    )
    peak_window_s: float = Field(
        default=1800.0, ge=0, description="Plan for the busiest minute seen this long ago or later (s); 0: off."
    )
    slo_margin: float = Field(default=0.8, gt=0, le=1, description="Plan predicted latency within this x SLO.")
    max_prefill_fraction: float = Field(default=0.5, gt=0, lt=1, description="Most of a replica's time in prefill.")
    max_batch_fill: float = Field(default=0.9, gt=0, le=1, description="Most of max_batch a plan may fill.")
    scale_down_delay_s: float = Field(default=120.0, ge=0, description="A smaller count must be wanted this long (s).")
    scale_to_zero_after_s: float = Field(
        default=300.0, ge=0, description="Release the last replica after no request and no work this long (s)."
    )
    cold_start_amortise_s: float = Field(
        default=600.0, gt=0, description="Spread a cold start's energy over this many seconds when comparing plans."
    )
    budget_fraction: float = Field(
        default=1.0, gt=0, le=1, description="Plan at most this fraction of the power budget (headroom for POLCA)."
    )


@dataclass(slots=True, frozen=True)
class PoolLoad:
    """What was measured over the last interval (requests, tokens)."""

    arrival_rate_rps: float
    arrival_rate_ewma_rps: float
    prompt_tokens_mean: float
    prompt_tokens_p99: float
    output_tokens_mean: float
    queued_requests: float = 0.0
    busy: bool = False
    arrival_rate_peak_rps: float = 0.0  # busiest minute within the planner's peak window  # requests still in prefill or decode


@dataclass(slots=True, frozen=True)
class PoolState:
    """The pool now, plus the planner's own memory from its last plan (``shrink_since_s``)."""

    now_s: float
    replicas_ready: int
    replicas_starting: int = 0
    cold_start_left_s: float = 0.0  # until the first starting replica serves
    idle_since_s: float | None = None  # no arrivals and no work since (None: not idle)
    shrink_since_s: float | None = None
    clock_mhz: float | None = None  # the clock the pool runs now (None: unknown)

    @property
    def replicas(self) -> int:
        return self.replicas_ready + self.replicas_starting


@dataclass(slots=True, frozen=True)
class Plan:
    """Replicas wanted and their clock, with the model's predictions and the reason."""

    replicas: int
    clock_mhz: float
    predicted_ttft_ms: float  # of a 99th-percentile prompt, cold start included when cold
    predicted_tpot_ms: float
    predicted_power_w: float  # the pool, at the planned load
    slo_met: bool
    reason: str
    shrink_since_s: float | None = None
    startup_power_w: float = 0.0  # drawn on top while the plan's replicas not yet ready start (cold-start power)


@dataclass(slots=True, frozen=True)
class Prediction:
    """Model outputs over a grid of (replicas, clock index), arrays of one shape."""

    replicas: np.ndarray
    clock_index: np.ndarray
    ttft_s: np.ndarray
    tpot_s: np.ndarray
    power_w: np.ndarray
    batch: np.ndarray
    prefill_fraction: np.ndarray


def predict(profile: ReplicaProfile, rate_rps: float, load: PoolLoad, replicas, clock_index) -> Prediction:
    """Steady state of a pool of ``replicas`` at ``clock_index`` serving ``rate_rps`` (see the module
    docstring). Arrays broadcast; replicas must be >= 1."""
    n, c = np.broadcast_arrays(np.asarray(replicas, dtype=float), np.asarray(clock_index, dtype=int))
    n, c = n.ravel(), c.ravel()
    per = rate_rps / n
    spt = profile.prefill_s_per_token[c]
    ovh = profile.prefill_overhead_s
    rho_p = per * load.prompt_tokens_mean * spt + ovh * np.minimum(per, 1.0)
    free = np.maximum(1.0 - rho_p, 1e-6)
    x_d = per * load.output_tokens_mean  # decode tokens per second per replica
    chunk = profile.chunk_step_s(c)
    rho = np.minimum(rho_p, 1.0)

    def tpot_at(batch):  # tokens per second a sequence gets: one per chunk step, one per decode step
        return 1.0 / (rho / chunk + (1.0 - rho) / profile.decode_step(batch, c))

    b = x_d * tpot_at(np.ones_like(n))
    for _ in range(_FIXED_POINT_ITERATIONS):  # a contraction: step(b) grows slowly with b
        nxt = x_d * tpot_at(b)
        done = np.max(np.abs(nxt - b)) < 1e-4
        b = nxt
        if done:
            break
    b1 = np.maximum(b, 1.0)
    step = profile.decode_step(b1, c)
    tpot = tpot_at(b1)
    mean_prefill = ovh + load.prompt_tokens_mean * spt
    ttft = rho_p / free * mean_prefill + step + ovh + load.prompt_tokens_p99 * spt
    busy_d = np.minimum(free, np.maximum(0.0, x_d - b * rho / chunk) * step / b1)
    idle = np.maximum(0.0, 1.0 - np.minimum(rho_p, 1.0) - busy_d)
    power = n * (np.minimum(rho_p, 1.0) * profile.prefill_power_w[c] + busy_d * profile.decode_power(b1, c)
                 + idle * profile.idle_power_w)
    return Prediction(n.astype(int), c, ttft, tpot, power, b, rho_p)


def planned_rate_rps(load: PoolLoad, config: PlannerConfig) -> float:
    """The rate a plan must carry: the highest of the last interval's rate, its moving average and
    the busiest minute of the peak window, with headroom, plus the queue drained within one interval."""
    measured = max(load.arrival_rate_rps, load.arrival_rate_ewma_rps, load.arrival_rate_peak_rps)
    return measured * config.load_headroom + load.queued_requests / config.interval_s


def plan_pool(load: PoolLoad, state: PoolState, spec: PoolSpec, profile: ReplicaProfile, config: PlannerConfig,
              *, power_budget_w: float | None = None, scale: bool = True, dvfs: bool = True,
              replicas: int | None = None) -> Plan:
    """Replicas and clock for one pool. ``scale``/``dvfs`` False pin the count at ``max_replicas`` /
    the clock at its maximum (the ``dvfs`` and ``autoscale`` policies); ``replicas`` pins the count
    at that number (the fast, instance-level clock loop: seconds, between replica decisions);
    ``power_budget_w`` is the pool's ceiling in watts (None: unconstrained)."""
    rate = planned_rate_rps(load, config)
    ceiling = None if power_budget_w is None else power_budget_w * config.budget_fraction
    if scale and replicas is None and _may_release(load, state, spec, config):
        wake = _wake_ttft_ms(profile, load, spec)
        return Plan(0, float(profile.clocks_mhz[-1]), wake, 0.0, 0.0, wake <= spec.slo.ttft_ms,
                    f"{spec.name}: no request and no work for {state.now_s - state.idle_since_s:.0f} s >= "
                    f"{config.scale_to_zero_after_s:g} s: release every replica; a waking request would see "
                    f"TTFT {wake:.0f} ms (cold start {spec.cold_start_s:g} s) against SLO {spec.slo.ttft_ms:g} ms")
    if replicas is not None:
        if replicas < 1:
            raise ValueError(f"a pinned replica count must be >= 1 (got {replicas})")
        counts, scale = np.array([replicas]), False
    else:
        lo = max(1, spec.min_replicas) if scale else spec.max_replicas
        counts = np.arange(lo, spec.max_replicas + 1)
    clocks = np.arange(len(profile.clocks_mhz)) if dvfs else np.array([profile.max_clock_index])
    grid_n, grid_c = np.meshgrid(counts, clocks, indexing="ij")
    pred = predict(profile, rate, load, grid_n, grid_c)
    ok_slo = ((pred.ttft_s * 1e3 <= config.slo_margin * spec.slo.ttft_ms)
              & (pred.tpot_s * 1e3 <= config.slo_margin * spec.slo.tpot_ms)
              & (pred.prefill_fraction <= config.max_prefill_fraction)
              & (pred.batch <= config.max_batch_fill * profile.max_batch))
    # a replica not yet ready draws its cold-start power (weights loading) while the others serve: a
    # plan that starts replicas must fit the budget with that on top, or a burst's scale-up is the peak
    def starting_w(up: int) -> np.ndarray:  # start-up power of each plan's replicas beyond ``up``
        return np.maximum(0, pred.replicas - up) * _cold_start_w(spec)

    startup_w = starting_w(state.replicas_ready)
    in_budget = np.ones_like(ok_slo) if ceiling is None else pred.power_w + startup_w <= ceiling
    # holding the current count starts nothing new: replicas already starting were priced when they
    # were started, and cancelling them to shed their start-up power would only restart them later
    keep_budget = in_budget if ceiling is None else pred.power_w + starting_w(state.replicas) <= ceiling
    cost = pred.power_w + np.maximum(0, pred.replicas - state.replicas) * spec.cold_start_energy_j \
        / config.cold_start_amortise_s
    shrink_since = None
    choice = _choose(ok_slo & in_budget, cost, pred, len(clocks))
    if choice is not None and scale and pred.replicas[choice] < state.replicas:
        shrink_since = state.shrink_since_s if state.shrink_since_s is not None else state.now_s
        if state.now_s - shrink_since < config.scale_down_delay_s:
            hold = (ok_slo & keep_budget) & (pred.replicas == state.replicas)
            held = _choose(hold, cost, pred, len(clocks))
            if held is not None:
                return _plan(pred, held, spec, profile, state, rate, shrink_since, startup_w,
                             f"holding {state.replicas} (fewer wanted for {state.now_s - shrink_since:.0f} s "
                             f"< {config.scale_down_delay_s:g} s)")
    if choice is not None:
        why = "lowest power meeting the SLO"
        kept = _keep_clock(ok_slo & in_budget, cost, pred, choice, state, profile, config)
        if kept is not None:
            choice, why = kept, f"{why} (clock kept: a change would save < {config.clock_change_min_saving:.0%})"
        return _plan(pred, choice, spec, profile, state, rate, shrink_since, startup_w, why)
    return _fallback(pred, in_budget, spec, profile, state, rate, ceiling, startup_w)


def _cold_start_w(spec: PoolSpec) -> float:
    """What one starting replica draws: its cold-start energy spread over the cold start."""
    return spec.cold_start_energy_j / spec.cold_start_s if spec.cold_start_s > 0 else 0.0


def _choose(mask: np.ndarray, cost: np.ndarray, pred: Prediction, n_clocks: int) -> int | None:
    """Per replica count the lowest feasible clock, then the cheapest count (flat index)."""
    m = mask.reshape(-1, n_clocks)
    if not m.any():
        return None
    first = np.argmax(m, axis=1)  # lowest feasible clock per count
    rows = np.flatnonzero(m.any(axis=1))
    flat = rows * n_clocks + first[rows]
    return int(flat[np.argmin(cost.ravel()[flat])])


def _keep_clock(ok, cost, pred: Prediction, choice: int, state: PoolState, profile: ReplicaProfile,
                config: PlannerConfig) -> int | None:
    """The current clock at the chosen count, if still feasible and nearly as cheap (fewer clock
    changes: each is an NVML call and a latency step)."""
    if state.clock_mhz is None:
        return None
    same = np.flatnonzero((pred.replicas == pred.replicas[choice])
                          & (profile.clocks_mhz[pred.clock_index] == state.clock_mhz) & ok.ravel())
    if not len(same) or same[0] == choice:
        return None
    i = int(same[0])
    return i if cost.ravel()[i] <= cost.ravel()[choice] * (1.0 + config.clock_change_min_saving) else None


def _fallback(pred, in_budget, spec, profile, state, rate, ceiling, startup_w) -> Plan:
    """No plan meets the SLO: the most capacity the budget allows (most replicas, then the
    highest clock); if even the smallest fleet is over budget, the smallest fleet at its lowest clock."""
    flat = np.flatnonzero(in_budget.ravel())
    if len(flat):
        best = int(flat[np.lexsort((pred.clock_index[flat], pred.replicas[flat]))[-1]])
        why = "SLO not reachable within max_replicas" + ("" if ceiling is None else f" and {ceiling:.0f} W")
    else:
        best = int(np.lexsort((pred.clock_index, pred.replicas))[0])
        why = f"even {pred.replicas[best]} replica(s) at the lowest clock exceed {ceiling:.0f} W"
    return _plan(pred, best, spec, profile, state, rate, None, startup_w, f"best effort: {why}", slo_met=False)


def _plan(pred: Prediction, i: int, spec: PoolSpec, profile: ReplicaProfile, state: PoolState, rate: float,
          shrink_since: float | None, startup_w: np.ndarray, why: str, slo_met: bool = True) -> Plan:
    n, clock = int(pred.replicas[i]), float(profile.clocks_mhz[pred.clock_index[i]])
    ttft_ms, tpot_ms = float(pred.ttft_s[i] * 1e3), float(pred.tpot_s[i] * 1e3)
    cold = ""
    if state.replicas_ready == 0:
        wait_s = state.cold_start_left_s if state.replicas_starting else spec.cold_start_s
        ttft_ms += wait_s * 1e3
        slo_met = slo_met and ttft_ms <= spec.slo.ttft_ms  # requests arriving before a replica serves
        cold = f"; cold: {wait_s:.0f} s of start-up counted in TTFT"
    start_w = float(startup_w[i])
    if start_w > 0:
        cold += f"; {pred.replicas[i] - state.replicas_ready} starting: +{start_w:.0f} W until ready"
    reason = (f"{spec.name}: plan {rate:.2f} req/s -> {n} replica(s) at {clock:.0f} MHz: predicted TTFT "
              f"{ttft_ms:.0f} ms (p99 prompt), TPOT {tpot_ms:.0f} ms vs SLO {spec.slo.ttft_ms:g}/{spec.slo.tpot_ms:g} "
              f"ms, batch {pred.batch[i]:.1f}, {pred.power_w[i]:.0f} W {profile.energy_source}; {why}{cold}")
    return Plan(n, clock, ttft_ms, tpot_ms, float(pred.power_w[i]), slo_met, reason, shrink_since, start_w)


def _may_release(load: PoolLoad, state: PoolState, spec: PoolSpec, config: PlannerConfig) -> bool:
    quiet = load.arrival_rate_rps == 0 and load.queued_requests == 0 and not load.busy
    return (spec.min_replicas == 0 and quiet and state.idle_since_s is not None
            and state.now_s - state.idle_since_s >= config.scale_to_zero_after_s)


def _wake_ttft_ms(profile: ReplicaProfile, load: PoolLoad, spec: PoolSpec) -> float:
    top = profile.max_clock_index
    return 1e3 * (spec.cold_start_s + float(profile.prefill_s(load.prompt_tokens_p99, top)))


def merge_loads(a: PoolLoad, b: PoolLoad) -> PoolLoad:
    """The load of two classes served by the same replicas: rates add, token means are weighted by
    rate, the 99th-percentile prompt is the larger of the two (a bound: the union's p99 is no larger)."""
    wa = max(a.arrival_rate_ewma_rps, a.arrival_rate_rps, 1e-12)
    wb = max(b.arrival_rate_ewma_rps, b.arrival_rate_rps, 1e-12)
    mean = lambda x, y: (x * wa + y * wb) / (wa + wb)  # noqa: E731
    return PoolLoad(a.arrival_rate_rps + b.arrival_rate_rps, a.arrival_rate_ewma_rps + b.arrival_rate_ewma_rps,
                    mean(a.prompt_tokens_mean, b.prompt_tokens_mean), max(a.prompt_tokens_p99, b.prompt_tokens_p99),
                    mean(a.output_tokens_mean, b.output_tokens_mean), a.queued_requests + b.queued_requests,
                    a.busy or b.busy, a.arrival_rate_peak_rps + b.arrival_rate_peak_rps)


def shared_spec(high: PoolSpec, low: PoolSpec, max_replicas: int) -> PoolSpec:
    """The spec a shared pool is planned with: the high-priority pool's, held to the stricter of the
    two classes' targets (each class keeps its own SLO in the accounting), at most ``max_replicas``."""
    slo = SLO(ttft_ms=min(high.slo.ttft_ms, low.slo.ttft_ms), tpot_ms=min(high.slo.tpot_ms, low.slo.tpot_ms))
    return high.model_copy(update={"slo": slo, "max_replicas": max_replicas,
                                   "min_replicas": min(high.min_replicas, max_replicas)})


@dataclass(slots=True, frozen=True)
class SharingDecision:
    """Whether the two priority classes share replicas, since when sharing has been wanted, and why."""

    shared: bool
    wanted_since_s: float | None
    reason: str


def plan_sharing(high_load: PoolLoad, low_load: PoolLoad, high: PoolSpec, low: PoolSpec, profile: ReplicaProfile,
                 config: PlannerConfig, *, shared: bool, now_s: float, wanted_since_s: float | None,
                 max_shared_replicas: int = 1, power_budget_w: float | None = None) -> SharingDecision:
    """Share replicas across priority classes at low load (the high class keeps priority inside the
    shared replicas' queue and batch), split again when load rises.

    Sharing is wanted when one plan for both classes' load, held to the stricter SLO, meets it with at
    most ``max_shared_replicas`` replicas and is predicted to draw less than the two pools planned
    apart (each pays its own idle and small-batch decode power). Splitting is at once (the SLO is at
    stake); sharing starts only after it has been wanted for ``config.scale_down_delay_s`` (it releases
    the low pool's replicas, and splitting again costs a start). Never with ``low.min_replicas > 0``."""
    fresh = config.model_copy(update={"scale_down_delay_s": 0.0})
    if low.min_replicas > 0:
        return SharingDecision(False, None, f"{low.name}: min_replicas {low.min_replicas} > 0: never shared")
    merged = merge_loads(high_load, low_load)
    spec = shared_spec(high, low, max_shared_replicas).model_copy(update={"min_replicas": 1})
    both = plan_pool(merged, PoolState(now_s, max_shared_replicas), spec, profile, fresh,
                     power_budget_w=power_budget_w)
    apart = [plan_pool(ld, PoolState(now_s, s.max_replicas), s.model_copy(update={"min_replicas": 1}), profile,
                       fresh, power_budget_w=power_budget_w) for ld, s in ((high_load, high), (low_load, low))]
    apart_w = sum(p.predicted_power_w for p in apart)
    want = both.slo_met and both.predicted_power_w < apart_w
    what = (f"both classes on {both.replicas} shared replica(s): {both.predicted_power_w:.0f} W vs "
            f"{apart_w:.0f} W apart ({apart[0].replicas}+{apart[1].replicas} replicas)")
    if not want:
        why = "SLO not met within the shared limit" if not both.slo_met else "no saving"
        return SharingDecision(False, None, f"{'split' if shared else 'apart'}: {what}; {why}")
    if shared:
        return SharingDecision(True, wanted_since_s, f"shared: {what}")
    since = now_s if wanted_since_s is None else wanted_since_s
    if now_s - since >= config.scale_down_delay_s:
        return SharingDecision(True, since, f"share: {what}")
    return SharingDecision(False, since, f"apart (sharing wanted for {now_s - since:.0f} s < "
                                         f"{config.scale_down_delay_s:g} s): {what}")
