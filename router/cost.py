"""Cost model: predicted energy (J) and latency (ms) of a request on one expert replica.

Inputs are the replica's live :class:`~wattserve.types.ExpertProfile` (measured prefill ms/token,
decode step ms by batch size, J/token, queue, SM clock) and the request's token counts::

    r_t       = clock_at_measurement / clock_now          (1 when the device reports no clock)
    prefill   = prefill_ms_per_token * prompt_tokens * r_t ** prefill_clock_exponent
    decode    = decode_step_ms(batch) * (output_tokens - 1) * r_t ** decode_clock_exponent
    scored    = decode_step_ms(1) * scored_tokens * r_t ** decode_clock_exponent     (Score's choices)
    queue     = rounds_ahead * output_tokens * decode_step_ms(max_batch)
    latency   = (queue + prefill + decode + scored) * latency_correction
    energy    = r_t ** -power_clock_exponent * (prefill_power_w * prefill + decode_power_w * (decode / batch + scored))
                * energy_correction
              (each phase's power measured over steps of that phase only; busy_power_w, over all
              steps, until such a step was measured)
              (a profile without measured power: j_per_token * tokens * r_t ** -energy_clock_exponent)

Before a replica has measured anything its expert's :class:`CostPrior` stands in for the profile,
through the same formula: a prior gives prefill ms/token, decode ms/step and the busy power, so
a prompt-heavy request and an output-heavy one rank two experts as their measurements would (a
shallow wide model can be cheaper per prompt token and dearer per output token than a deep narrow
one). A prior with only ``j_per_token`` (the old form) prices every token alike, prompt or output.

Score (``output_tokens == 0``) runs the prompt once, then each choice after it reading the
log-probabilities at every choice token: a choice token pays the whole model *and* the output
layer over the vocabulary, as a decode step does, so ``scored_tokens`` (the choices' tokens) are
priced at the batch-1 decode step, the prompt at the prefill rate. One rate for both misranked
the default experts live: Gemma 3 270M's 262k-entry output layer makes its choice tokens dear and
its prompt tokens cheap, so cloud was the dearer expert on 0-shot questions with sentence-long
choices and the cheaper one on 5-shot prompts with one-word choices (docs/routing.md §10).

Energy follows compute time because the engine attributes each step's energy by tokens: a
request pays its prefill and a 1/batch share of every decode step. Why these exponents: prefill is
matrix-matrix work, compute bound, so its time scales as 1/clock (exponent 1); decode reads every
weight once per step and is memory bound, so it barely moves with the clock (0.2, an assumption);
power falls faster than the clock because DVFS lowers the voltage too (1.5, an assumption between
linear and V^2 f scaling; the simulated devices use the same idea). The power
governor moves clocks; a lowered clock therefore shows up in the very next prediction, before the
measured EWMAs catch up. Both corrections are online EWMAs of actual/predicted over finished
requests of that expert, and the error of past predictions (EWMA of |pred - actual| / actual)
is tracked per expert and exported through the Admin API.
"""

from __future__ import annotations

import bisect
import dataclasses
import math
from collections.abc import Mapping
from dataclasses import dataclass, field

from wattserve.types import ExpertProfile


@dataclass(slots=True, frozen=True)
class CostPrior:
    """Costs to assume before an expert has measured anything (from the router config).

    With ``busy_power_w`` the prior predicts energy like a measured profile (power x the
    request's share of compute time: its prefill and 1/batch of each decode step); without it,
    ``j_per_token`` x (prompt + output tokens). One of the two must be given.
    """

    prefill_ms_per_token: float
    decode_ms_per_token: float
    j_per_token: float | None = None
    busy_power_w: float | None = None
    prefill_power_w: float | None = None  # power while prefilling; None: busy_power_w
    decode_power_w: float | None = None  # power while decoding; None: busy_power_w

    def __post_init__(self) -> None:
        if self.busy_power_w is None and self.j_per_token is None:
            raise ValueError("a cost prior needs busy_power_w (or the older j_per_token)")
        if self.busy_power_w is None and (self.prefill_power_w is not None or self.decode_power_w is not None):
            raise ValueError("prefill_power_w and decode_power_w refine busy_power_w: give it too")


@dataclass(slots=True, frozen=True)
class CostEstimate:
    energy_j: float
    latency_ms: float
    queue_ms: float
    basis: str  # "measured" (live profile) or "prior" (config, nothing measured yet)

    def waiting(self, wait_ms: float) -> CostEstimate:
        """This estimate after ``wait_ms`` more of waiting before the work starts (a cold start)."""
        return dataclasses.replace(self, latency_ms=self.latency_ms + wait_ms, queue_ms=self.queue_ms + wait_ms)


@dataclass(slots=True)
class PredictionError:
    """Online accuracy of one expert's predictions (fractions, e.g. 0.1 = 10 %)."""

    energy_rel_error: float | None = None
    latency_rel_error: float | None = None
    energy_correction: float = 1.0  # EWMA of actual / raw prediction
    latency_correction: float = 1.0
    samples: int = 0  # outcomes compared
    learned: int = 0  # of which against measured figures (those move the corrections)
    # EWMAs of actual and raw predicted energy (J) / latency (ms); a correction is their ratio
    energy_actual_j: float = 0.0
    energy_predicted_j: float = 0.0
    latency_actual_ms: float = 0.0
    latency_predicted_ms: float = 0.0


@dataclass(slots=True)
class _ClockRef:
    """The SM clock in force when the profile's figures were last refreshed."""

    figures: tuple = ()
    clock_mhz: float | None = None


@dataclass(slots=True)
class CostModel:
    """Predicts per-replica costs and learns from outcomes. Plain state; not thread-safe (the
    gateway calls it from its event loop only)."""

    priors: Mapping[str, CostPrior] = field(default_factory=dict)
    alpha: float = 0.1  # EWMA weight of one new outcome
    prefill_clock_exponent: float = 1.0
    decode_clock_exponent: float = 0.2
    energy_clock_exponent: float = 0.5
    power_clock_exponent: float = 1.5
    errors: dict[str, PredictionError] = field(default_factory=dict)
    # Prefill-only work (Score: no output tokens) learns its own corrections: its error is not
    # Generate's (measured live: Score predictions 1.0-2.0x the measured joules while Generate's
    # were close), and one shared correction would pull both wrong.
    prefill_only_errors: dict[str, PredictionError] = field(default_factory=dict)
    _clock_refs: dict[tuple[str, int], _ClockRef] = field(default_factory=dict)

    # -- prediction ----------------------------------------------------------------------------
    def predict(
        self, profile: ExpertProfile | None, expert: str, prompt_tokens: int, output_tokens: int,
        *, inflight: int = 0, queue: bool = True, scored_tokens: int = 0,
    ) -> CostEstimate | None:
        """Predicted cost of ``prompt_tokens`` in and ``output_tokens`` out on this replica
        (``scored_tokens``: tokens whose log-probabilities a Score reads, its choices).

        ``inflight`` is the gateway's own count of requests sent to the replica (fresher than
        the profile's queue). None when neither measurements nor a prior exist.
        """
        raw = self.raw(profile, expert, prompt_tokens, output_tokens, inflight=inflight, queue=queue,
                       scored_tokens=scored_tokens)
        if raw is None:
            return None
        err = self.errors_for(prefill_only=output_tokens <= 0).get(expert)
        if err is None or raw.basis != "measured":
            return raw  # corrections are learned against measured figures only
        return CostEstimate(
            energy_j=raw.energy_j * err.energy_correction,
            latency_ms=raw.latency_ms * err.latency_correction,
            queue_ms=raw.queue_ms * err.latency_correction,
            basis=raw.basis,
        )

    def raw(
        self, profile: ExpertProfile | None, expert: str, prompt_tokens: int, output_tokens: int,
        *, inflight: int = 0, queue: bool = True, scored_tokens: int = 0,
    ) -> CostEstimate | None:
        """The prediction before the online corrections."""
        f = _figures(profile, self.priors.get(expert))
        if f is None:
            return None
        r_t = self._time_ratio(profile)
        p, n = max(0, prompt_tokens), max(0, output_tokens)  # n = 0: scoring (prefill only)
        running = profile.running if profile else 0
        waiting = profile.waiting if profile else 0
        max_batch = max(1, profile.max_batch if profile else 1)
        occupied = max(inflight, running + waiting)
        batch = min(max_batch, running + 1)
        decode_scale = r_t**self.decode_clock_exponent
        step_ms = _step_ms(f.decode_by_batch, f.decode_ms, batch) * decode_scale
        prefill_ms = f.prefill_ms * p * r_t**self.prefill_clock_exponent
        # Score's choice tokens: each one runs the model and its output layer, like a decode step.
        scored_ms = _step_ms(f.decode_by_batch, f.decode_ms, 1) * decode_scale * max(0, scored_tokens)
        latency = prefill_ms + step_ms * max(0, n - 1) + scored_ms
        queue_ms = 0.0
        if queue and n and occupied >= max_batch:
            # Rounds of whole batches ahead of us, each assumed as long as this request's decode.
            rounds = (occupied - max_batch) // max_batch + 1
            queue_ms = rounds * n * _step_ms(f.decode_by_batch, f.decode_ms, max_batch) * decode_scale
        if f.busy_power_w is not None:
            # Energy follows compute time: our prefill, and our 1/batch share of each decode step
            # (the engine splits a step's energy by tokens). Power falls with the clock.
            prefill_w = f.prefill_power_w or f.busy_power_w
            decode_w = f.decode_power_w or f.busy_power_w
            busy_mj = prefill_w * prefill_ms + decode_w * (step_ms / batch * n + scored_ms)
            energy = r_t**-self.power_clock_exponent * busy_mj / 1000.0
        else:
            energy = f.j_per_token * (p + n + max(0, scored_tokens)) * r_t**-self.energy_clock_exponent
        return CostEstimate(energy_j=energy, latency_ms=latency + queue_ms, queue_ms=queue_ms, basis=f.basis)

    def _time_ratio(self, profile: ExpertProfile | None) -> float:
        """clock at measurement / clock now (> 1 after a cap): how much slower compute is now."""
        if profile is None or not profile.sm_clock_mhz:
            return 1.0
        key = (profile.expert, profile.replica)
        ref = self._clock_refs.setdefault(key, _ClockRef())
        figures = (profile.prefill_ms_per_token, profile.decode_ms_per_token, profile.j_per_token)
        if figures != ref.figures or ref.clock_mhz is None:
            # New measurements arrived: they were taken at (about) the clock reported with them.
            ref.figures, ref.clock_mhz = figures, profile.sm_clock_mhz
        return max(1e-3, ref.clock_mhz / profile.sm_clock_mhz)

    # -- learning ------------------------------------------------------------------------------
    def learn(
        self, profile: ExpertProfile | None, expert: str, prompt_tokens: int, output_tokens: int,
        actual_energy_j: float, actual_latency_ms: float, *, inflight: int = 0, queue: bool = True,
        scored_tokens: int = 0,
    ) -> None:
        """A request finished: compare with what the plan-time ``profile`` predicts for the tokens
        it actually processed, and update the corrections and error figures."""
        raw = self.raw(profile, expert, prompt_tokens, output_tokens, inflight=inflight, queue=queue,
                       scored_tokens=scored_tokens)
        if raw is not None:
            self.observe(expert, raw, actual_energy_j, actual_latency_ms, prefill_only=output_tokens <= 0)

    def errors_for(self, prefill_only: bool) -> dict[str, PredictionError]:
        """Per expert: the accuracy of Generate's predictions, or of Score's prefill-only ones."""
        return self.prefill_only_errors if prefill_only else self.errors

    def observe(self, expert: str, raw: CostEstimate, actual_energy_j: float, actual_latency_ms: float,
                *, prefill_only: bool = False) -> None:
        """A request finished: ``raw`` is the uncorrected prediction for its actual token counts;
        ``prefill_only`` (a Score) updates the corrections of prefill-only work."""
        err = self.errors_for(prefill_only).setdefault(expert, PredictionError())
        a = self.alpha
        learn = raw.basis == "measured"  # a prior's bias says nothing about the measured figures
        for kind, pred, actual in (("energy", raw.energy_j, actual_energy_j), ("latency", raw.latency_ms, actual_latency_ms)):
            if actual <= 0 or pred <= 0 or not math.isfinite(actual):
                continue
            corr_name, err_name = f"{kind}_correction", f"{kind}_rel_error"
            corr = getattr(err, corr_name) if learn else 1.0
            rel = abs(pred * corr - actual) / actual  # error of what we actually predicted
            old = getattr(err, err_name)
            setattr(err, err_name, rel if old is None else (1 - a) * old + a * rel)
            if learn:
                # A ratio of averages, not an average of ratios: a request weighs by its size, so a
                # one-token answer (whose fixed per-request costs dwarf its prediction) cannot
                # inflate every later prediction of a 64-token one.
                unit = "j" if kind == "energy" else "ms"
                act_name, pred_name = f"{kind}_actual_{unit}", f"{kind}_predicted_{unit}"
                first = err.learned == 0
                setattr(err, act_name, actual if first else (1 - a) * getattr(err, act_name) + a * actual)
                setattr(err, pred_name, pred if first else (1 - a) * getattr(err, pred_name) + a * pred)
                setattr(err, corr_name, min(5.0, max(0.2, getattr(err, act_name) / getattr(err, pred_name))))
        err.samples += 1
        err.learned += learn


@dataclass(slots=True, frozen=True)
class _Figures:
    prefill_ms: float
    decode_by_batch: Mapping[int, float]
    decode_ms: float
    j_per_token: float
    busy_power_w: float | None
    prefill_power_w: float | None
    decode_power_w: float | None
    basis: str


def _figures(profile: ExpertProfile | None, prior: CostPrior | None) -> _Figures | None:
    """The measured figures of ``profile``, completed by ``prior``; None if neither exists."""
    if profile is not None and profile.j_per_token is not None and profile.decode_ms_per_token is not None:
        prefill = profile.prefill_ms_per_token
        if prefill is None:  # engines that report no separate prefill time (synthetic)
            prefill = prior.prefill_ms_per_token if prior else 0.0
        return _Figures(prefill, profile.decode_ms_per_step_by_batch, profile.decode_ms_per_token,
                        profile.j_per_token, profile.busy_power_w, profile.prefill_power_w, profile.decode_power_w,
                        "measured")
    if prior is not None:
        return _Figures(prior.prefill_ms_per_token, {}, prior.decode_ms_per_token, prior.j_per_token or 0.0,
                        prior.busy_power_w, prior.prefill_power_w, prior.decode_power_w, "prior")
    return None


def _step_ms(by_batch: Mapping[int, float], fallback_ms: float, batch: int) -> float:
    """Decode step time at ``batch`` from measured points: exact, interpolated, or nearest end."""
    if not by_batch:
        return fallback_ms
    if batch in by_batch:
        return by_batch[batch]
    keys = sorted(by_batch)
    i = bisect.bisect_left(keys, batch)
    if i == 0:
        return by_batch[keys[0]]
    if i == len(keys):
        return by_batch[keys[-1]]
    lo, hi = keys[i - 1], keys[i]
    w = (batch - lo) / (hi - lo)
    return by_batch[lo] * (1 - w) + by_batch[hi] * w
