"""Online cost profile of one expert replica, refreshed from every engine step.

Figures are exponentially weighted moving averages (EWMA) so the profile follows changes such as
a power cap or a busier host within a few dozen steps; the router reads them to predict cost.
"""

from __future__ import annotations

from wattserve.types import StepWork
from workers.engines.base import StepTimings


def _ewma(old: float | None, new: float, alpha: float) -> float:
    return new if old is None else (1 - alpha) * old + alpha * new


class ProfileTracker:
    """Measured prefill ms/token, decode step ms (overall and per batch size), J/token and the
    power while computing (J per second of step time; the router turns predicted time into J);
    with ``num_layers``, also J per layer-token in prefill-only and decode-only steps (a token
    through one decoder layer: what early exit saves) and the histogram of decode exit depths."""

    def __init__(self, alpha: float = 0.2, num_layers: int = 0) -> None:
        self.alpha = alpha
        self.num_layers = num_layers
        self.prefill_j_per_layer_token: float | None = None
        self.decode_j_per_layer_token: float | None = None
        # every depth present from the start: other threads copy this while steps update it, and
        # a dict that never changes size is safe to copy
        self.exit_histogram: dict[int, int] = dict.fromkeys(range(1, num_layers + 1), 0)
        self.prefill_ms_per_token: float | None = None
        self.decode_ms_per_token: float | None = None  # one decode step = one token per sequence
        self.j_per_token: float | None = None  # step energy over all tokens processed in it
        self.busy_power_w: float | None = None  # step energy over step compute time
        # the same, over steps that only prefilled (prompts, scoring) and steps that only decoded:
        # a prompt keeps every core busy, a small decode batch does not, so they draw differently
        self.prefill_power_w: float | None = None
        self.decode_power_w: float | None = None
        self.decode_ms_by_batch: dict[int, float] = {}
        self.steps = 0

    def observe(
        self, timings: StepTimings, energy_j: float, tokens: int, work: StepWork | None = None,
        exit_counts: dict[int, int] | None = None,
    ) -> None:
        self.steps += 1
        if work is not None and self.num_layers and tokens:
            self._layer_tokens(work, energy_j)
        for depth, n in (exit_counts or {}).items():
            if depth in self.exit_histogram:
                self.exit_histogram[depth] += n
        a = self.alpha
        prompt_s = timings.prefill_s - timings.scored_s  # a Score's choices are not prompt tokens
        if timings.prefill_tokens and prompt_s > 0:
            per_token = 1000.0 * prompt_s / timings.prefill_tokens
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
            if timings.prefill_s > 0 and timings.decode_s <= 0:
                self.prefill_power_w = _ewma(self.prefill_power_w, energy_j / busy_s, a)
            elif timings.decode_s > 0 and timings.prefill_s <= 0:
                self.decode_power_w = _ewma(self.decode_power_w, energy_j / busy_s, a)

    def _layer_tokens(self, work: StepWork, energy_j: float) -> None:
        # Mixed steps are skipped: their energy cannot be split between prefill and decode.
        layer_tokens = work.tokens * work.layer_fraction * self.num_layers
        if layer_tokens <= 0:
            return
        if work.decode_tokens and not work.prefill_tokens:
            self.decode_j_per_layer_token = _ewma(self.decode_j_per_layer_token, energy_j / layer_tokens, self.alpha)
        elif work.prefill_tokens and not work.decode_tokens:
            self.prefill_j_per_layer_token = _ewma(self.prefill_j_per_layer_token, energy_j / layer_tokens, self.alpha)
