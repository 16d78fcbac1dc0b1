"""Online cost profile of one expert replica, refreshed from every engine step.

Figures are exponentially weighted moving averages (EWMA) so the profile follows changes such as
a power cap or a busier host within a few dozen steps; the router reads them to predict cost.
"""

from __future__ import annotations

from workers.engines.base import StepTimings


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


class ProfileTracker:
    """Measured prefill ms/token, decode step ms (overall and per batch size), J/token and the
    power while computing (J per second of step time; the router turns predicted time into J)."""

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.prefill_ms_per_token: float | None = None
        self.decode_ms_per_token: float | None = None  # one decode step = one token per sequence
        self.j_per_token: float | None = None  # step energy over all tokens processed in it
        self.busy_power_w: float | None = None  # step energy over step compute time
        self.decode_ms_by_batch: dict[int, float] = {}
        self.steps = 0

    def observe(self, timings: StepTimings, energy_j: float, tokens: int) -> None:
        self.steps += 1
        a = self.alpha
        if timings.prefill_tokens and timings.prefill_s > 0:
            per_token = 1000.0 * timings.prefill_s / timings.prefill_tokens
            self.prefill_ms_per_token = _ewma(self.prefill_ms_per_token, per_token, a)
        if timings.decode_batch:
            step_ms = 1000.0 * timings.decode_s
            self.decode_ms_per_token = _ewma(self.decode_ms_per_token, step_ms, a)
            b = timings.decode_batch
            self.decode_ms_by_batch[b] = _ewma(self.decode_ms_by_batch.get(b), step_ms, a)
        if tokens:
            self.j_per_token = _ewma(self.j_per_token, energy_j / tokens, a)
        busy_s = timings.prefill_s + timings.decode_s
        if tokens and busy_s > 0:
            self.busy_power_w = _ewma(self.busy_power_w, energy_j / busy_s, a)
