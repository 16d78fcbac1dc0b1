"""Learning from use: feedback scores correct the gate's predicted quality of each expert, online.

A client scores a finished request (``Inference.Feedback`` / ``POST /v1/feedback``: a score in
[0, 1]); a cascade's outcome scores its cheap expert too (kept: 1, escalated: 0, at a lower
weight). The gateway remembers which expert answered each request and what quality the gate
predicted for it then, so each score gives a **residual** ``r = score - q_predicted``. Per expert
(and per expert and tenant) we keep the weighted sum of residuals ``S`` and their weight ``W``; the
correction added to the gate's q_i(x) for every later prompt is::

    global:  d = S / (W + prior_weight)
    tenant:  d_t = (S_t + prior_weight * d) / (W_t + prior_weight)     (shrunk towards the global one)
    q'_i(x) = clip(q_i(x) + clip(d_t, -max_correction, max_correction), 0, 1)

``prior_weight`` is how many scores the gate's own prediction is worth (a Beta prior's
pseudo-count, our choice); ``max_weight`` caps W: past it, old scores are scaled down before a new
one is added (a moving window of about ``max_weight`` scores), so a change in an expert's quality
always shows within a bounded number of scores, both ways. A tenant without scores of its own
gets the global correction. Corrections are additive on the residual, so a fitted gate keeps its
per-prompt ranking and feedback only removes its bias per expert.

Pure: plain values, no I/O (``runtime/ledger_store.py`` persists :meth:`rows`).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

from .gate import GateOutput

ALL_TENANTS = "*"


@dataclass(slots=True)
class FeedbackStat:
    """Weighted residuals of one expert (for one tenant, or ``*`` for all)."""

    residual_sum: float = 0.0
    weight: float = 0.0
    scores: int = 0  # feedback calls counted (not capped; for operators)


@dataclass(slots=True, frozen=True)
class FeedbackSettings:
    prior_weight: float = 2.0
    max_weight: float = 20.0
    max_correction: float = 0.5

    def __post_init__(self) -> None:
        if not (self.prior_weight > 0 and self.max_weight > 0 and 0 < self.max_correction <= 1):
            raise ValueError("prior_weight and max_weight must be > 0 and max_correction in (0, 1]")


class QualityFeedback:
    """Online per-expert (and per-tenant) corrections of predicted quality; see the module doc."""

    def __init__(self, settings: FeedbackSettings | None = None) -> None:
        self.settings = settings or FeedbackSettings()
        self.stats: dict[tuple[str, str], FeedbackStat] = {}  # (tenant or "*", expert) -> stat
        self.received = 0  # scores received since start (exploration starts with the first)

    def update(self, expert: str, tenant: str, score: float, predicted: float, weight: float = 1.0) -> float:
        """Add one score in [0, 1] for an answer whose predicted quality was ``predicted``;
        returns the expert's correction for ``tenant`` afterwards."""
        if not (0.0 <= score <= 1.0):
            raise ValueError(f"score must be in [0, 1] (got {score})")
        if not (0.0 <= predicted <= 1.0) or not (0.0 < weight <= self.settings.max_weight):
            raise ValueError(f"predicted quality must be in [0, 1] and weight in (0, max_weight] "
                             f"(got {predicted}, {weight})")
        residual = score - predicted
        for key in ((ALL_TENANTS, expert), (tenant, expert)):
            self._add(self.stats.setdefault(key, FeedbackStat()), residual, weight)
            if tenant == ALL_TENANTS:
                break
        self.received += 1
        return self.correction(expert, tenant)

    def _add(self, stat: FeedbackStat, residual: float, weight: float) -> None:
        room = self.settings.max_weight - weight
        if stat.weight > room:  # forget proportionally: a window of about max_weight scores
            scale = room / stat.weight
            stat.residual_sum *= scale
            stat.weight *= scale
        stat.residual_sum += weight * residual
        stat.weight += weight
        stat.scores += 1

    def correction(self, expert: str, tenant: str = ALL_TENANTS) -> float:
        """The additive correction of ``expert``'s predicted quality for ``tenant`` (0 without scores)."""
        k = self.settings.prior_weight
        g = self.stats.get((ALL_TENANTS, expert))
        d = g.residual_sum / (g.weight + k) if g else 0.0
        t = self.stats.get((tenant, expert)) if tenant != ALL_TENANTS else None
        if t is not None:
            d = (t.residual_sum + k * d) / (t.weight + k)
        m = self.settings.max_correction
        return min(m, max(-m, d))

    def corrections(self, tenant: str, experts: Iterable[str]) -> dict[str, float]:
        """Non-zero corrections of ``experts`` for ``tenant``."""
        out = {}
        for e in experts:
            d = self.correction(e, tenant)
            if d:
                out[e] = d
        return out

    def apply(self, gate: GateOutput, tenant: str) -> GateOutput:
        """``gate`` with each expert's quality corrected for ``tenant`` (weights unchanged: the Score
        ensemble's mixing weights stay the gate's; its values g q use the corrected q)."""
        if not self.stats:
            return gate
        deltas = self.corrections(tenant, gate.quality)
        if not deltas:
            return gate
        quality = {e: min(1.0, max(0.0, q + deltas.get(e, 0.0))) for e, q in gate.quality.items()}
        return GateOutput(weights=gate.weights, quality=quality, source=gate.source + "+feedback")

    # -- persistence ------------------------------------------------------------------------------
    def rows(self) -> list[tuple[str, str, float, float, int]]:
        """(tenant, expert, residual_sum, weight, scores) for every stat."""
        return [(t, e, s.residual_sum, s.weight, s.scores) for (t, e), s in sorted(self.stats.items())]

    def restore(self, rows: Iterable[tuple[str, str, float, float, int]]) -> None:
        """Load :meth:`rows` (e.g. from disk at start); bad rows are skipped."""
        for tenant, expert, residual_sum, weight, scores in rows:
            if not (math.isfinite(residual_sum) and math.isfinite(weight) and weight > 0):
                continue
            weight = min(weight, self.settings.max_weight)
            residual_sum = max(-weight, min(weight, residual_sum))  # |residual| <= 1 per unit of weight
            self.stats[(tenant, expert)] = FeedbackStat(residual_sum, weight, int(scores))

    def summary(self) -> Mapping[str, float]:
        """Global correction per expert (for logs and status)."""
        return {e: self.correction(e) for (t, e) in self.stats if t == ALL_TENANTS}
