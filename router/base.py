"""The router's seam: plain-value inputs, a ranked plan out. No Ray, no gRPC.

The gateway builds a :class:`RequestFeatures` and one :class:`Candidate` per expert replica from
its latest telemetry, asks a routing policy (``router/policies/``) for a :class:`Plan`, and dispatches to the
plan's candidates in order (the next one if a replica turns out to be full). Every decision is a
pure function of these values, so it can be unit-tested and replayed offline.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Literal

from wattserve.types import ExpertProfile, Priority

from .gate import GateOutput

if TYPE_CHECKING:
    from .ensemble import EnsembleGains

#: characters per token assumed when estimating a prompt's length before any tokenizer runs
CHARS_PER_TOKEN = 4.0


def estimate_tokens(text: str) -> int:
    """Rough token count of ``text`` (UTF-8 bytes / 4, the usual BPE average for English)."""
    return max(1, math.ceil(len(text.encode("utf-8", "surrogatepass")) / CHARS_PER_TOKEN))


@dataclass(slots=True, frozen=True)
class RequestFeatures:
    prompt_chars: int
    max_tokens: int  # generate: the output bound; score: 0
    priority: Priority = Priority.NORMAL
    tenant: str = "default"
    expert: str | None = None  # the caller pinned this expert
    energy_budget_j: float | None = None
    latency_budget_ms: float | None = None
    prompt_tokens: int = 0  # estimate (0: derive from prompt_chars)
    mode: Literal["generate", "score"] = "generate"
    choice_tokens: tuple[int, ...] = ()  # score: estimated tokens of each candidate answer
    gate: GateOutput | None = None  # the gate's view of this prompt (None: policy's prior)
    throttled: bool = False  # the tenant or the cluster is near its energy budget
    throttle_reason: str = ""
    quality_per_j: float | None = None  # price of energy for this request (its tenant's); None: settings'
    explore_share: float = 0.0  # Generate: chance of answering from another expert that fits (feedback)

    @property
    def tokens_in(self) -> int:
        """Prompt tokens (estimated) an expert processes before answering; a Score runs its
        prompt once and each choice after it (those are ``scored_tokens``)."""
        return self.prompt_tokens or max(1, math.ceil(self.prompt_chars / CHARS_PER_TOKEN))

    @property
    def scored_tokens(self) -> int:
        """Score: the choices' tokens (estimated), whose log-probabilities are read; 0 when generating."""
        return sum(self.choice_tokens) if self.mode == "score" else 0

    @property
    def tokens_out(self) -> int:
        """Output tokens to budget for: ``max_tokens`` (the worst case) when generating, 0 when scoring."""
        return 0 if self.mode == "score" else max(1, self.max_tokens)


#: how a policy orders one expert's replicas (``router.policies.base.order_replicas``)
ReplicaOrder = Literal["least_loaded", "packed"]
REPLICA_ORDERS: tuple[str, ...] = ("least_loaded", "packed")


@dataclass(slots=True, frozen=True)
class RouterSettings:
    """Knobs shared by the policies (plain values; runtime/config.py fills them from YAML)."""

    infeasible: Literal["reject", "serve_cheapest"] = "reject"
    aggregation_ms: float = 0.0  # scoring: combining several experts' answers costs this much
    quality_per_j: float = 0.0  # MoE²: price of energy (quality units per joule) when a request brings none
    strong: str | None = None  # threshold policy: the two experts (default: by quality prior)
    weak: str | None = None
    threshold: float = 0.0  # threshold policy: strong when q_strong - q_weak >= threshold
    quality_prior: Mapping[str, float] = field(default_factory=dict)
    cascade_below_logprob: float | None = None  # MoE² Generate: escalate below this mean token log p
    # MoE² Score: what mixing experts adds over the best of them, measured (router/ensemble.py);
    # None: not measured, and Score falls back to the separable objective
    ensemble: EnsembleGains | None = None
    # which of the chosen expert's replicas a request tries first: the least loaded (spread) or the
    # fullest with batch room (packed: leaves replicas idle for the capacity controller to release)
    replica_order: ReplicaOrder = "least_loaded"


@dataclass(slots=True, frozen=True)
class Candidate:
    """One replica as the gateway sees it now."""

    expert: str
    replica: int
    healthy: bool
    inflight: int  # requests the gateway has dispatched to it and not yet seen finish
    profile: ExpertProfile | None = None
    # > 0: no replica runs (scaled to zero); the first request starts one and waits this long
    # before its own prefill, so the cost model adds it to the predicted latency
    cold_start_ms: float = 0.0

    @property
    def key(self) -> tuple[str, int]:
        return (self.expert, self.replica)


@dataclass(slots=True, frozen=True)
class Plan:
    ranked: tuple[Candidate, ...]  # try in this order
    policy: str
    reason: str
    predicted_energy_j: float | None = None  # generate: the answering expert; score: all of S
    predicted_latency_ms: float | None = None
    subset: tuple[str, ...] = ()  # experts chosen (S), highest weight first
    weights: Mapping[str, float] = field(default_factory=dict)  # gate weights renormalised over S
    gate: str = ""  # "prior", "fitted:<dir>", or "" for policies that use no gate
    budget_exceeded: bool = False  # nothing fitted the budget; served by the cheapest expert anyway
    # Generate may cascade: answer from cascade[0] (the cheapest of S) and, if that answer's mean
    # token log-probability is below cascade_below_logprob, answer again from cascade[1] (the top).
    cascade: tuple[str, ...] = ()
    cascade_below_logprob: float | None = None
    cascaded: tuple[str, ...] = ()  # filled by the gateway: the experts that answered, in order
    # filled by the gateway: the gate's predicted quality per expert *before* feedback corrections
    # (feedback residuals are taken against it)
    predicted_quality: Mapping[str, float] = field(default_factory=dict)

    @property
    def experts(self) -> tuple[str, ...]:
        """The experts this plan uses: S, or the first candidate's expert."""
        return self.subset or ((self.ranked[0].expert,) if self.ranked else ())
