"""The budget ledger on disk: every energy charge and every limit change in a local SQLite file,
so tenant and cluster budget use survives a gateway restart. The router's learned quality
corrections (feedback, ``router/feedback.py``) are kept in the same file, and so is its memory of
which expert answered each recent request (``runtime/served.py``, bounded by the same count and age
as in memory), so a client can score a request served before a restart.

Why SQLite and not Ray's GCS: the embedded default starts its own Ray instance, and the GCS's
key-value store lives in that instance's memory unless GCS fault tolerance is set up with an
external Redis, so a gateway restart (which restarts embedded Ray) would lose it. SQLite is in the
standard library, transactional, needs no service, and one file per gateway is what one gateway
needs. Several gateways sharing budgets need a shared store behind the same three calls
(``load``, ``append``/``flush``, ``record_change``); that is future work.

Durability (the loss window): charges are appended in memory and written by :meth:`flush` in one
transaction per batch (group commit: concurrent flushes share one write). The gateway awaits
``flush`` after charging a finished request and *before* sending its final message, so a request
the client saw finish is on disk (WAL, ``synchronous=FULL``): the loss window for
accepted-and-finished requests is zero. Charges of abandoned requests (cancelled, failed) are
written with the next flush (milliseconds later) or at shutdown; a crash in between loses them.

Times: the pure ledger (``router/budget.py``) runs on a monotonic clock, which restarts with the
process; rows store wall-clock seconds and are mapped back onto the new monotonic clock on load.
"""

from __future__ import annotations

import asyncio
import logging
import sqlite3
import time
from collections.abc import Callable
from dataclasses import asdict
from pathlib import Path

from router.budget import CLUSTER, BudgetChange, BudgetLimit, tenant_scope
from wattserve.errors import ConfigError

log = logging.getLogger(__name__)

#: rows kept in memory while the disk refuses writes; beyond this the oldest are dropped (counted)
MAX_PENDING = 100_000
#: use of scopes without a limit is reported over a day (router.budget does the same)
UNLIMITED_WINDOW_S = 86400.0
PRUNE_EVERY_S = 600.0

_SCHEMA = """
CREATE TABLE IF NOT EXISTS charges (
    id INTEGER PRIMARY KEY,
    unix_s REAL NOT NULL,
    tenant TEXT NOT NULL,
    energy_j REAL NOT NULL,
    request_id TEXT NOT NULL DEFAULT '',
    kind TEXT NOT NULL DEFAULT 'finished'
);
CREATE INDEX IF NOT EXISTS charges_time ON charges (unix_s);
CREATE TABLE IF NOT EXISTS changes (
    id INTEGER PRIMARY KEY,
    unix_s REAL NOT NULL,
    scope TEXT NOT NULL,
    old_limit TEXT,
    new_limit TEXT,
    actor TEXT NOT NULL,
    peer TEXT NOT NULL,
    reason TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS served_requests (
    request_id TEXT PRIMARY KEY,
    tenant TEXT NOT NULL,
    expert TEXT NOT NULL,
    predicted_quality REAL NOT NULL,
    unix_s REAL NOT NULL,
    scored INTEGER NOT NULL DEFAULT 0
);
CREATE INDEX IF NOT EXISTS served_time ON served_requests (unix_s);
CREATE TABLE IF NOT EXISTS quality_feedback (
    tenant TEXT NOT NULL,
    expert TEXT NOT NULL,
    residual_sum REAL NOT NULL,
    weight REAL NOT NULL,
    scores INTEGER NOT NULL,
    unix_s REAL NOT NULL,
    PRIMARY KEY (tenant, expert)
);
"""


def _limit_text(limit: BudgetLimit | None) -> str | None:
    if limit is None:
        return None
    return f"{limit.energy_j!r} {limit.window_s!r} {limit.throttle_fraction!r}"


def _limit_of(text: str | None) -> dict | None:
    if text is None:
        return None
    joules, window, throttle = (float(x) for x in text.split())
    return asdict(BudgetLimit(joules, window, throttle))


class LedgerStore:
    """One SQLite file. ``append`` is cheap and synchronous; ``flush`` does the I/O off the
    event loop; ``record_change`` writes at once (operator changes are rare)."""

    def __init__(self, path: str | Path, *, retention_s: float = 7 * 86400.0,
                 wall_clock: Callable[[], float] = time.time) -> None:
        self.path = Path(path).expanduser()
        self.retention_s = retention_s
        self.wall_clock = wall_clock
        self._db: sqlite3.Connection | None = None
        self._pending: list[tuple[float, str, float, str, str]] = []
        self._served: list[tuple[str, str, str, float, float]] = []  # requests remembered, not yet written
        self.served_capacity = 100_000  # the served-request memory's bounds (router.feedback sets them)
        self.served_ttl_s = 3600.0
        self._appended = 0  # rows appended since open
        self._committed = 0  # rows of those known to be on disk
        self._lock = asyncio.Lock()
        self._pruned_s = 0.0
        self.longest_window_s = 0.0  # charges inside the longest budget window are never pruned
        self.dropped = 0  # rows lost because the disk refused them for too long
        self.write_errors = 0

    # -- lifecycle ------------------------------------------------------------------------------
    def open(self) -> None:
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            # check_same_thread off: writes run in a worker thread, one at a time (the lock)
            self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
            self._db.execute("PRAGMA journal_mode=WAL")
            self._db.execute("PRAGMA synchronous=FULL")
            self._db.executescript(_SCHEMA)
        except sqlite3.Error as exc:
            raise ConfigError(f"ledger.path {self.path}: cannot open the budget ledger ({exc})") from None

    @property
    def is_open(self) -> bool:
        return self._db is not None

    def close(self) -> None:
        if (self._pending or self._served) and self._db is not None:
            self._write(*self._take())
        if self._db is not None:
            self._db.close()
            self._db = None

    # -- reading it back --------------------------------------------------------------------------
    def load(self, base: dict, now_mono_s: float) -> dict:
        """A ``BudgetLedger.snapshot()``-shaped dict: ``base`` (the configured limits) with the
        stored operator changes applied on top, and the stored charges inside the longest budget
        window (at least a day), their times mapped onto the caller's monotonic clock."""
        scopes = {name: {"limit": s["limit"], "events": []} for name, s in base["scopes"].items()}
        changes = list(base["changes"])
        rows = self._db.execute("SELECT unix_s, scope, old_limit, new_limit, actor, peer, reason FROM changes "
                                "ORDER BY id").fetchall()
        for unix_s, scope, old, new, actor, peer, reason in rows:
            scopes.setdefault(scope, {"limit": None, "events": []})["limit"] = _limit_of(new)
            changes.append({"unix_s": unix_s, "scope": scope, "old": _limit_of(old), "new": _limit_of(new),
                            "actor": actor, "peer": peer, "reason": reason})
        self.longest_window_s = max([UNLIMITED_WINDOW_S] + [s["limit"]["window_s"] for s in scopes.values() if s["limit"]])
        self._prune()
        now_unix = self.wall_clock()
        # summed per tenant and second (the ledger keeps no finer buckets): a busy day is
        # millions of rows, and each one would otherwise cross into Python
        charges = self._db.execute("SELECT MAX(unix_s), tenant, SUM(energy_j) FROM charges WHERE unix_s > ? "
                                   "GROUP BY tenant, CAST(unix_s AS INTEGER) ORDER BY 1",
                                   (now_unix - self.longest_window_s,)).fetchall()
        for unix_s, tenant, energy_j in charges:
            if energy_j <= 0:
                continue
            t = now_mono_s - max(0.0, now_unix - unix_s)
            for scope in (tenant_scope(tenant), CLUSTER):
                scopes.setdefault(scope, {"limit": None, "events": []})["events"].append([t, energy_j])
        changes.sort(key=lambda c: c["unix_s"])
        if rows or charges:
            log.info("budget ledger %s: restored charges in %d tenant-second(s) and %d operator change(s)", self.path, len(charges), len(rows))
        return {"scopes": scopes, "changes": changes}

    # -- writing --------------------------------------------------------------------------------
    def append(self, tenant: str, energy_j: float, *, request_id: str = "", kind: str = "finished") -> None:
        """Queue one charge (written by the next :meth:`flush`)."""
        if energy_j <= 0:
            return
        self._pending.append((self.wall_clock(), tenant, float(energy_j), request_id, kind))
        self._appended += 1
        if len(self._pending) > MAX_PENDING:
            del self._pending[0]
            self.dropped += 1

    def remember_served(self, request_id: str, tenant: str, expert: str, predicted_quality: float) -> None:
        """Queue the record of who answered ``request_id`` (written by the next :meth:`flush`,
        with the charges: the gateway flushes before the final message, so a request the client
        saw finish can be scored after a restart)."""
        self._served.append((request_id, tenant, expert, float(predicted_quality), self.wall_clock()))
        self._appended += 1
        if len(self._served) > MAX_PENDING:
            del self._served[0]
            self.dropped += 1

    async def flush(self) -> None:
        """Return once every charge (and served request) appended before this call is on disk
        (or the disk refused it: logged, kept for the next flush)."""
        target = self._appended
        async with self._lock:
            if self._committed >= target or self._db is None:
                return
            upto = self._appended
            rows, served = self._take()
            ok = await asyncio.to_thread(self._write, rows, served)
            if ok:
                self._committed = upto
            else:  # keep them for the next try
                self._pending[:0], self._served[:0] = rows, served
            if self.wall_clock() - self._pruned_s > PRUNE_EVERY_S:
                await asyncio.to_thread(self._prune)

    def record_change(self, change: BudgetChange) -> None:
        """Persist an operator's limit change now (configured limits are not recorded: the
        config file is their record)."""
        if self._db is None or change.actor == "config":
            return
        with self._db:
            self._db.execute(
                "INSERT INTO changes (unix_s, scope, old_limit, new_limit, actor, peer, reason) VALUES (?,?,?,?,?,?,?)",
                (change.unix_s, change.scope, _limit_text(change.old), _limit_text(change.new), change.actor,
                 change.peer, change.reason),
            )

    def _take(self) -> tuple[list, list]:
        rows, self._pending = self._pending, []
        served, self._served = self._served, []
        return rows, served

    def _write(self, rows: list, served: list = ()) -> bool:
        """Charges and served requests in one transaction."""
        try:
            with self._db:  # one transaction
                self._db.executemany(
                    "INSERT INTO charges (unix_s, tenant, energy_j, request_id, kind) VALUES (?,?,?,?,?)", rows)
                # a reused id refers to its latest request, as in memory
                self._db.executemany(
                    "INSERT OR REPLACE INTO served_requests (request_id, tenant, expert, predicted_quality, unix_s, "
                    "scored) VALUES (?,?,?,?,?,0)", served)
            return True
        except sqlite3.Error as exc:
            self.write_errors += 1
            log.error("budget ledger %s: cannot write %d charge(s) and %d served request(s) (%s); keeping them in "
                      "memory", self.path, len(rows), len(served), exc)
            return False

    def _prune(self) -> None:
        keep_s = max(self.retention_s, self.longest_window_s)
        try:
            with self._db:
                self._db.execute("DELETE FROM charges WHERE unix_s < ?", (self.wall_clock() - keep_s,))
                self._db.execute("DELETE FROM served_requests WHERE unix_s < ?", (self.wall_clock() - self.served_ttl_s,))
                self._db.execute("DELETE FROM served_requests WHERE request_id IN (SELECT request_id FROM "
                                 "served_requests ORDER BY unix_s DESC LIMIT -1 OFFSET ?)", (self.served_capacity,))
        except sqlite3.Error as exc:
            log.warning("budget ledger %s: prune failed (%s)", self.path, exc)
        self._pruned_s = self.wall_clock()

    # -- learned quality (router/feedback.py) ------------------------------------------------------
    def load_feedback(self) -> list[tuple[str, str, float, float, int]]:
        """The stored feedback statistics: (tenant, expert, residual_sum, weight, scores)."""
        return self._db.execute("SELECT tenant, expert, residual_sum, weight, scores FROM quality_feedback").fetchall()

    async def save_feedback(self, rows: list[tuple[str, str, float, float, int]], scored: str = "") -> None:
        """Replace the stored statistics of these (tenant, expert) pairs, and mark request
        ``scored`` as scored, off the event loop and never inside a charges transaction (the same
        lock as :meth:`flush`)."""
        async with self._lock:
            await asyncio.to_thread(self._save_feedback, rows, scored)

    def _save_feedback(self, rows: list[tuple[str, str, float, float, int]], scored: str = "") -> None:
        """One transaction. A failed write is logged; the next one carries the whole state again."""
        if self._db is None:
            return
        now = self.wall_clock()
        try:
            with self._db:
                self._db.executemany(
                    "INSERT OR REPLACE INTO quality_feedback (tenant, expert, residual_sum, weight, scores, unix_s) "
                    "VALUES (?,?,?,?,?,?)", [(*r, now) for r in rows])
                if scored:
                    self._db.execute("UPDATE served_requests SET scored = 1 WHERE request_id = ?", (scored,))
        except sqlite3.Error as exc:
            self.write_errors += 1
            log.error("budget ledger %s: cannot write quality feedback (%s)", self.path, exc)

    def load_served(self) -> list[tuple[str, str, str, float, float, bool]]:
        """The remembered requests still inside the memory's age and count, oldest first:
        (request_id, tenant, expert, predicted_quality, unix_s, scored)."""
        rows = self._db.execute(
            "SELECT request_id, tenant, expert, predicted_quality, unix_s, scored FROM served_requests WHERE unix_s > ? "
            "ORDER BY unix_s DESC LIMIT ?", (self.wall_clock() - self.served_ttl_s, self.served_capacity)).fetchall()
        return [(rid, t, e, q, u, bool(sc)) for rid, t, e, q, u, sc in reversed(rows)]

    # -- for tests and the chaos report -----------------------------------------------------------
    def charges(self) -> list[tuple[str, float, str, str]]:
        """Every stored charge: (tenant, energy_j, request_id, kind)."""
        return self._db.execute("SELECT tenant, energy_j, request_id, kind FROM charges ORDER BY id").fetchall()
