"""Energy budgets of tenants and of the whole cluster, over rolling windows.

A scope (``cluster`` or ``tenant:<name>``) has a limit of ``energy_j`` per ``window_s`` seconds
(an average power budget of W watts is ``W * window_s`` joules). The ledger is charged the
*measured* energy of each request when it finishes, and answers admission questions:

- used < ``throttle_fraction`` x limit: **ok**, any expert;
- used >= ``throttle_fraction`` x limit: **throttled**, the router only considers the cheapest
  expert (``restrict_to_cheapest``);
- used >= limit: **exhausted**, requests are refused (RESOURCE_EXHAUSTED) until enough of the
  window has rolled past; the error says when.

Pure bookkeeping: every method takes ``now_s`` (monotonic seconds) from the caller, and the whole
state is one object with :meth:`BudgetLedger.snapshot` / :meth:`BudgetLedger.restore`, so it can be
persisted (a later issue) and replayed in tests. Every limit change is recorded with who made it.
"""

from __future__ import annotations

import enum
import logging
import time
from collections import deque
from dataclasses import asdict, dataclass, field

from wattserve.errors import BudgetExhausted, InvalidRequest

log = logging.getLogger(__name__)

CLUSTER = "cluster"
MAX_CHANGES = 1000  # change records kept in memory (the log keeps them all)


def tenant_scope(tenant: str) -> str:
    return f"tenant:{tenant}"


class BudgetState(enum.StrEnum):
    OK = "ok"
    THROTTLED = "throttled"
    EXHAUSTED = "exhausted"


@dataclass(slots=True, frozen=True)
class BudgetLimit:
    energy_j: float
    window_s: float = 3600.0
    throttle_fraction: float = 0.8

    def __post_init__(self) -> None:
        if not self.energy_j >= 0 or not self.window_s > 0 or not 0 < self.throttle_fraction <= 1:
            raise InvalidRequest(
                f"budget needs energy_j >= 0, window_s > 0 and 0 < throttle_fraction <= 1 "
                f"(got {self.energy_j}, {self.window_s}, {self.throttle_fraction})"
            )

    @property
    def average_power_w(self) -> float:
        return self.energy_j / self.window_s


@dataclass(slots=True, frozen=True)
class BudgetChange:
    """One change of a limit: when, which scope, from what to what, by whom and why."""

    unix_s: float
    scope: str
    old: BudgetLimit | None
    new: BudgetLimit | None
    actor: str
    peer: str
    reason: str


@dataclass(slots=True, frozen=True)
class ScopeStatus:
    scope: str
    limit: BudgetLimit | None
    used_j: float  # in the current window
    state: BudgetState
    retry_after_s: float = 0.0  # when exhausted: until used drops below the limit

    @property
    def remaining_j(self) -> float | None:
        return None if self.limit is None else max(0.0, self.limit.energy_j - self.used_j)


@dataclass(slots=True, frozen=True)
class Admission:
    throttled: bool
    reason: str = ""


@dataclass(slots=True)
class _Scope:
    """A scope's limit and its use in the window, as buckets ``(last_s, joules)``, oldest first.

    A charge within :data:`BUCKETS_PER_WINDOW`-th of a window after the bucket's first charge
    joins it, so memory is bounded by the window, not by the request rate (500 requests/s kept
    43 million entries per unlimited scope for a day). A bucket leaves the window at its *last*
    charge's time: use is remembered at most one bucket too long, never forgotten early.
    """

    limit: BudgetLimit | None = None
    events: deque = field(default_factory=deque)  # (last_s, joules), oldest first
    used_j: float = 0.0
    bucket_first_s: float = float("-inf")  # when the newest bucket's first charge came

    @property
    def window_s(self) -> float:
        return _UNLIMITED_WINDOW_S if self.limit is None else self.limit.window_s

    def add(self, now_s: float, energy_j: float) -> None:
        if self.events and now_s - self.bucket_first_s < self.window_s / BUCKETS_PER_WINDOW:
            self.events[-1] = (now_s, self.events[-1][1] + energy_j)
        else:
            self.events.append((now_s, energy_j))
            self.bucket_first_s = now_s
        self.used_j += energy_j


class BudgetLedger:
    """Rolling-window energy use per scope. Not thread-safe: the gateway's event loop owns it."""

    def __init__(self) -> None:
        self._scopes: dict[str, _Scope] = {}
        self.changes: deque[BudgetChange] = deque(maxlen=MAX_CHANGES)

    # -- limits --------------------------------------------------------------------------------
    def set_limit(self, scope: str, limit: BudgetLimit | None, *, actor: str = "", peer: str = "",
                  reason: str = "", unix_s: float | None = None) -> BudgetChange:
        """Set (or with None remove) a scope's limit; the change is recorded and logged."""
        if scope != CLUSTER and not scope.startswith("tenant:"):
            raise InvalidRequest(f"budget scope {scope!r} must be 'cluster' or 'tenant:<name>'")
        s = self._scopes.setdefault(scope, _Scope())
        change = BudgetChange(unix_s if unix_s is not None else time.time(), scope, s.limit, limit, actor, peer, reason)
        s.limit = limit
        self.changes.append(change)
        log.info("energy budget of %s: %s -> %s (by %s from %s%s)", scope, _fmt(change.old), _fmt(limit),
                 actor or "anonymous", peer or "?", f": {reason}" if reason else "")
        return change

    def limit(self, scope: str) -> BudgetLimit | None:
        s = self._scopes.get(scope)
        return s.limit if s else None

    # -- use -----------------------------------------------------------------------------------
    def charge(self, tenant: str, energy_j: float, now_s: float) -> None:
        """A request of ``tenant`` finished having used ``energy_j``: charge it and the cluster."""
        if energy_j <= 0:
            return
        for scope in (tenant_scope(tenant), CLUSTER):
            s = self._scopes.get(scope)
            if s is None:
                s = self._scopes[scope] = _Scope()
            # expired here as well as in status(): admit() no longer reads scopes without a limit
            self._expire(s, now_s, s.window_s)
            s.add(now_s, energy_j)

    def status(self, scope: str, now_s: float) -> ScopeStatus:
        s = self._scopes.get(scope) or _Scope()
        if s.limit is None:
            self._expire(s, now_s, window_s=_UNLIMITED_WINDOW_S)
            return ScopeStatus(scope, None, s.used_j, BudgetState.OK)
        self._expire(s, now_s, s.limit.window_s)
        lim = s.limit
        if s.used_j >= lim.energy_j:
            return ScopeStatus(scope, lim, s.used_j, BudgetState.EXHAUSTED, self._retry_after(s, now_s))
        if s.used_j >= lim.throttle_fraction * lim.energy_j:
            return ScopeStatus(scope, lim, s.used_j, BudgetState.THROTTLED)
        return ScopeStatus(scope, lim, s.used_j, BudgetState.OK)

    def admit(self, tenant: str, now_s: float) -> Admission:
        """Whether ``tenant`` may send a request now; raises BudgetExhausted if not."""
        throttled = []
        for scope in (tenant_scope(tenant), CLUSTER):
            s = self._scopes.get(scope)
            if s is None or s.limit is None:
                continue  # no limit: nothing to refuse or throttle (status() reports its use)
            st = self.status(scope, now_s)
            who = "the cluster" if st.scope == CLUSTER else f"tenant {tenant!r}"
            if st.state is BudgetState.EXHAUSTED:
                raise BudgetExhausted(
                    f"{who} used {st.used_j:.3g} J of its {st.limit.energy_j:.3g} J energy budget per "
                    f"{st.limit.window_s:g} s; retry in {st.retry_after_s:.0f} s or ask an operator to raise it",
                    retry_after_ms=int(1000 * max(1.0, st.retry_after_s)),
                )
            if st.state is BudgetState.THROTTLED:
                throttled.append(f"{who} at {st.used_j / st.limit.energy_j:.0%} of its energy budget")
        return Admission(bool(throttled), "; ".join(throttled))

    @staticmethod
    def _expire(s: _Scope, now_s: float, window_s: float) -> None:
        while s.events and s.events[0][0] <= now_s - window_s:
            s.used_j -= s.events.popleft()[1]
        if not s.events:
            s.used_j = 0.0  # no float drift left behind

    @staticmethod
    def _retry_after(s: _Scope, now_s: float) -> float:
        """Seconds until enough charges leave the window to go below the limit."""
        excess = s.used_j - s.limit.energy_j
        freed = 0.0
        for t, j in s.events:
            freed += j
            if freed > excess:
                return max(0.0, t + s.limit.window_s - now_s)
        return s.limit.window_s

    # -- persistence ---------------------------------------------------------------------------
    def snapshot(self) -> dict:
        """Plain-data copy of the whole state (JSON-serialisable)."""
        return {
            "scopes": {
                name: {"limit": asdict(s.limit) if s.limit else None, "events": [list(e) for e in s.events]}
                for name, s in self._scopes.items()
            },
            "changes": [
                {**asdict(c), "old": asdict(c.old) if c.old else None, "new": asdict(c.new) if c.new else None}
                for c in self.changes
            ],
        }

    @classmethod
    def restore(cls, data: dict) -> BudgetLedger:
        ledger = cls()
        for name, s in data.get("scopes", {}).items():
            scope = _Scope(BudgetLimit(**s["limit"]) if s["limit"] else None)
            for t, j in sorted(s["events"]):
                scope.add(float(t), float(j))
            ledger._scopes[name] = scope
        for c in data.get("changes", []):
            old = BudgetLimit(**c["old"]) if c["old"] else None
            new = BudgetLimit(**c["new"]) if c["new"] else None
            ledger.changes.append(BudgetChange(c["unix_s"], c["scope"], old, new, c["actor"], c["peer"], c["reason"]))
        return ledger

    def scopes(self) -> list[str]:
        return sorted(self._scopes)


#: scopes without a limit still report use; they forget it after a day
_UNLIMITED_WINDOW_S = 86400.0
#: buckets per window: 1 s for an hour's window, 24 s for a day's
BUCKETS_PER_WINDOW = 3600


def _fmt(limit: BudgetLimit | None) -> str:
    return "unlimited" if limit is None else f"{limit.energy_j:g} J / {limit.window_s:g} s"
