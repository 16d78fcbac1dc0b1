"""Admission at the gateway: bounded in-flight requests in total and per tenant, fair across
tenants when the server is saturated, and a retry hint with every refusal.

Rules, checked in order when a request arrives (every refusal is RESOURCE_EXHAUSTED with
``retry_after_ms``, answered at once instead of queueing into a timeout):

1. the server holds ``gateway.max_inflight`` requests: refuse;
2. the tenant holds its own cap (``tenants[].max_inflight``, else ``gateway.tenant_max_inflight``):
   refuse;
3. the server is saturated (at least ``fair_share_above`` x max_inflight in use) and the tenant
   already holds its weighted fair share, ``ceil(max_inflight x w_t / sum of w over the tenants
   in flight, or seen within the last few request durations, and this one)``: refuse. A tenant
   under its share is still admitted, so one tenant flooding the server cannot starve the others
   (max-min fairness on slots, our choice of rule). Counting recently seen tenants matters for a
   client that sends one request after another: between two of them it holds no slot, and
   without the memory a flooder would take the whole server in that gap.

Per-expert queues stay bounded where they are (``experts[].max_queue`` in each engine loop; a
full replica makes the gateway try the plan's next one). Every admitted request gets a
:class:`Ticket`; releasing it (in the caller's ``finally``: finish, error, cancel, deadline)
frees the slot exactly once.

The retry hint is the time until a slot is likely to free: the running mean request duration
divided by the number of requests holding the slots the caller competes for, clamped to
[50 ms, 10 s].
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from wattserve.errors import QueueFull

MIN_RETRY_MS = 50
MAX_RETRY_MS = 10_000
DEFAULT_DURATION_MS = 1000.0  # assumed until a request has finished
EWMA_ALPHA = 0.1
#: a tenant seen this many mean request durations ago (at least MIN_RECENT_S) still has a share
RECENT_DURATIONS = 4.0
MIN_RECENT_S = 1.0


@dataclass(slots=True)
class Ticket:
    """One admitted request's slot; :meth:`Admission.release` frees it (idempotent)."""

    tenant: str
    started_s: float
    released: bool = False


class Admission:
    """In-flight bookkeeping of one gateway. Single-threaded: the event loop owns it."""

    def __init__(self, max_inflight: int, *, tenant_max_inflight: int | None = None,
                 fair_share_above: float = 0.75, tenant_caps: dict[str, int] | None = None,
                 weights: dict[str, float] | None = None, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_inflight = max_inflight
        self.tenant_max_inflight = tenant_max_inflight or max_inflight
        self.fair_share_above = fair_share_above
        self.tenant_caps = dict(tenant_caps or {})
        self.weights = dict(weights or {})
        self.clock = clock
        self.inflight = 0
        self.by_tenant: dict[str, int] = {}
        self.duration_ms = DEFAULT_DURATION_MS
        self.refused: dict[str, int] = {"server": 0, "tenant": 0, "fair_share": 0}
        self.last_seen_s: dict[str, float] = {}  # tenant -> last arrival or departure (bounded: pruned)

    @classmethod
    def from_config(cls, gateway, tenants: Sequence, clock: Callable[[], float] = time.monotonic) -> Admission:
        """From a ``GatewayConfig`` and the ``TenantConfig`` list."""
        return cls(
            gateway.max_inflight, tenant_max_inflight=gateway.tenant_max_inflight,
            fair_share_above=gateway.fair_share_above,
            tenant_caps={t.name: t.max_inflight for t in tenants if t.max_inflight is not None},
            weights={t.name: t.weight for t in tenants}, clock=clock,
        )

    # -- admit / release -----------------------------------------------------------------------
    def acquire(self, tenant: str) -> Ticket:
        """A slot for a request of ``tenant``; raises QueueFull (with ``retry_after_ms``)."""
        held = self.by_tenant.get(tenant, 0)
        self.last_seen_s[tenant] = self.clock()
        if self.inflight >= self.max_inflight:
            self._refuse("server", f"server is at its limit of {self.max_inflight} requests in flight; retry shortly",
                         self.inflight)
        cap = self.tenant_caps.get(tenant, self.tenant_max_inflight)
        if held >= cap:
            self._refuse("tenant", f"tenant {tenant!r} has {held} requests in flight, its limit; retry shortly",
                         held)
        share = self.fair_share(tenant)
        if self.inflight >= self.fair_share_above * self.max_inflight and held >= share:
            self._refuse("fair_share", f"server is busy and tenant {tenant!r} already holds its fair share "
                         f"({held} of {self.max_inflight} slots); retry shortly", held)
        self.inflight += 1
        self.by_tenant[tenant] = held + 1
        return Ticket(tenant, self.clock())

    def release(self, ticket: Ticket) -> None:
        if ticket.released:
            return
        ticket.released = True
        self.inflight -= 1
        left = self.by_tenant.get(ticket.tenant, 1) - 1
        if left > 0:
            self.by_tenant[ticket.tenant] = left
        else:
            self.by_tenant.pop(ticket.tenant, None)
        now = self.clock()
        self.last_seen_s[ticket.tenant] = now
        ms = 1000.0 * (now - ticket.started_s)
        self.duration_ms += EWMA_ALPHA * (ms - self.duration_ms)

    # -- views ---------------------------------------------------------------------------------
    def fair_share(self, tenant: str) -> int:
        """Slots ``tenant`` may hold when the server is saturated (at least 1)."""
        active = set(self.by_tenant) | self._recent() | {tenant}
        total_w = sum(self.weights.get(t, 1.0) for t in active)
        return max(1, math.ceil(self.max_inflight * self.weights.get(tenant, 1.0) / total_w))

    def _recent(self) -> set[str]:
        """Tenants seen within the recency window; older entries are dropped here."""
        horizon = self.clock() - max(MIN_RECENT_S, RECENT_DURATIONS * self.duration_ms / 1000.0)
        for t in [t for t, seen in self.last_seen_s.items() if seen < horizon]:
            del self.last_seen_s[t]
        return set(self.last_seen_s)

    def retry_after_ms(self, holders: int) -> int:
        """Expected wait until one of ``holders`` running requests finishes."""
        ms = self.duration_ms / max(1, holders)
        return int(min(MAX_RETRY_MS, max(MIN_RETRY_MS, ms)))

    def _refuse(self, why: str, message: str, holders: int) -> None:
        self.refused[why] += 1
        raise QueueFull(message, retry_after_ms=self.retry_after_ms(holders), reason=why)


class RateLimit:
    """A token bucket: ``rate_per_s`` on average, ``burst`` at once (StreamImages frame rate).

    ``take`` returns False when the caller is over the limit; the gateway then ends the stream
    with INVALID_ARGUMENT (a client that sends faster than agreed is misconfigured, and queueing
    its frames would only grow memory or drop them silently).
    """

    def __init__(self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self.clock = clock
        self._tokens = float(burst)
        self._last_s = clock()

    def take(self) -> bool:
        now = self.clock()
        self._tokens = min(float(self.burst), self._tokens + (now - self._last_s) * self.rate_per_s)
        self._last_s = now
        if self._tokens < 1.0:
            return False
        self._tokens -= 1.0
        return True
