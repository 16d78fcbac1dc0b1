"""The router's seam: plain-value inputs, a ranked plan out. No Ray, no gRPC.

The gateway builds a :class:`RequestFeatures` and one :class:`Candidate` per expert replica from
its latest telemetry, asks a :class:`RoutingPolicy` for a :class:`Plan`, and dispatches to the
plan's candidates in order (the next one if a replica turns out to be full). Every decision is a
pure function of these values, so it can be unit-tested and replayed offline.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Protocol

from wattserve.types import ExpertProfile, Priority


@dataclass(slots=True, frozen=True)
class RequestFeatures:
    prompt_chars: int
    max_tokens: int
    priority: Priority = Priority.NORMAL
    tenant: str = "default"
    expert: str | None = None  # the caller pinned this expert
    energy_budget_j: float | None = None
    latency_budget_ms: float | None = None


@dataclass(slots=True, frozen=True)
class Candidate:
    """One replica as the gateway sees it now."""

    expert: str
    replica: int
    healthy: bool
    inflight: int  # requests the gateway has dispatched to it and not yet seen finish
    profile: ExpertProfile | None = None

    @property
    def key(self) -> tuple[str, int]:
        return (self.expert, self.replica)


@dataclass(slots=True, frozen=True)
class Plan:
    ranked: tuple[Candidate, ...]  # try in this order
    policy: str
    reason: str
    predicted_energy_j: float | None = None
    predicted_latency_ms: float | None = None


class RoutingPolicy(Protocol):
    name: str

    def plan(self, request: RequestFeatures, candidates: Sequence[Candidate]) -> Plan:
        """Rank ``candidates`` for ``request``. Raises NoHealthyExpert if none can serve it."""
