"""Bounded queues with real-time semantics: when full, the OLDEST item is dropped, not the new one.

A live stream values the newest frame: if the model falls behind, a frame that waited longest is
the least useful one to compute (StreamDiffusion's input/output queues decouple arrival from
model throughput the same way). Every drop is counted and handed back to the caller so the
client can be told which frames will get no answer.
"""

from __future__ import annotations

import threading
from collections import deque
from collections.abc import Callable
from typing import Generic, TypeVar

T = TypeVar("T")


class DropOldestQueue(Generic[T]):
    """Thread-safe FIFO of at most ``capacity`` items. ``on_put`` runs (outside the lock) after
    every put, e.g. to wake a consumer in another thread or event loop."""

    def __init__(self, capacity: int, on_put: Callable[[], None] | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"capacity must be >= 1, got {capacity}")
        self.capacity = capacity
        self.on_put = on_put
        self._items: deque[T] = deque()
        self._lock = threading.Lock()
        self.dropped = 0
        self.put_total = 0

    def put(self, item: T) -> T | None:
        """Append ``item``; returns the item dropped to make room, or None."""
        with self._lock:
            dropped = None
            if len(self._items) >= self.capacity:
                dropped = self._items.popleft()
                self.dropped += 1
            self._items.append(item)
            self.put_total += 1
        if self.on_put is not None:
            self.on_put()
        return dropped

    def take(self, max_items: int) -> list[T]:
        """Remove and return up to ``max_items`` oldest items."""
        with self._lock:
            return [self._items.popleft() for _ in range(min(max_items, len(self._items)))]

    def clear(self) -> int:
        with self._lock:
            n = len(self._items)
            self._items.clear()
            return n

    def __len__(self) -> int:
        with self._lock:
            return len(self._items)
