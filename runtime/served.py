"""Which expert served which request: a bounded memory with a time to live, for feedback.

A client's feedback names a request id; to learn from it the gateway must know which expert
answered that request, for which tenant, and what quality the gate predicted for it then. At most
``capacity`` finished requests are remembered, each for ``ttl_s``; the oldest go first. Memory is
bounded: ~200 bytes per entry, so the default 100,000 entries hold ~20 MB at most. With a ledger
file the gateway also writes them there (same bounds) and restores them at start.
"""

from __future__ import annotations

import time
from collections import OrderedDict
from collections.abc import Callable
from dataclasses import dataclass


@dataclass(slots=True)
class ServedRequest:
    tenant: str
    expert: str
    predicted_quality: float  # the gate's q for the answering expert, before feedback corrections
    finished_s: float = 0.0
    scored: bool = False  # feedback counts once per request


class ServedRequests:
    """request id -> :class:`ServedRequest`, insertion-ordered, bounded by count and age."""

    def __init__(self, capacity: int = 100_000, ttl_s: float = 3600.0, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if capacity < 1 or ttl_s <= 0:
            raise ValueError("capacity must be >= 1 and ttl_s > 0")
        self.capacity, self.ttl_s, self.clock = capacity, ttl_s, clock
        self._items: OrderedDict[str, ServedRequest] = OrderedDict()

    def add(self, request_id: str, served: ServedRequest) -> None:
        now = self.clock()
        served.finished_s = now
        self._items.pop(request_id, None)  # a reused id refers to its latest request
        self._items[request_id] = served
        self._expire(now)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def restore(self, rows, now_unix_s: float) -> None:
        """Entries stored by an earlier process (``LedgerStore.load_served``: oldest first, with
        wall-clock finish times), mapped onto this process's clock so they expire on time."""
        now = self.clock()
        for request_id, tenant, expert, predicted, unix_s, scored in rows:
            finished = now - max(0.0, now_unix_s - unix_s)
            self._items.pop(request_id, None)
            self._items[request_id] = ServedRequest(tenant, expert, predicted, finished, scored)
        self._expire(now)
        while len(self._items) > self.capacity:
            self._items.popitem(last=False)

    def get(self, request_id: str) -> ServedRequest | None:
        self._expire(self.clock())
        return self._items.get(request_id)

    def _expire(self, now: float) -> None:
        items = self._items
        while items:
            first = next(iter(items.values()))
            if now - first.finished_s <= self.ttl_s:
                break
            items.popitem(last=False)

    def __len__(self) -> int:
        return len(self._items)
