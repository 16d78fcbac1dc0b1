"""Iteration-level admission for continuous batching. No torch here: plain bookkeeping.

Requests wait in priority order (high first, then arrival); at every step boundary the scheduler
admits as many as free batch slots and the per-step prefill token budget allow, so a long prompt
cannot stall the decode of everyone else for more than one bounded prefill.
"""

from __future__ import annotations

import bisect
import itertools
from dataclasses import dataclass, field
from typing import Generic, Protocol, TypeVar


class Schedulable(Protocol):
    @property
    def request_id(self) -> str: ...

    @property
    def priority(self) -> int: ...

    @property
    def prompt_len(self) -> int: ...

    @property
    def deadline_s(self) -> float | None: ...


T = TypeVar("T", bound=Schedulable)


@dataclass(slots=True)
class _Entry(Generic[T]):
    key: tuple[int, int]
    item: T = field(compare=False)


class Scheduler(Generic[T]):
    """Waiting queue + running set with a batch-size and a prefill-token budget."""

    def __init__(self, max_batch: int, max_prefill_tokens: int) -> None:
        if max_batch < 1 or max_prefill_tokens < 1:
            raise ValueError("max_batch and max_prefill_tokens must be >= 1")
        self.max_batch = max_batch
        self.max_prefill_tokens = max_prefill_tokens
        self._waiting: list[_Entry[T]] = []
        self._keys: list[tuple[int, int]] = []
        self.running: list[T] = []
        self._seq = itertools.count()

    @property
    def num_waiting(self) -> int:
        return len(self._waiting)

    def add(self, item: T) -> None:
        key = (-int(item.priority), next(self._seq))
        i = bisect.bisect(self._keys, key)
        self._keys.insert(i, key)
        self._waiting.insert(i, _Entry(key, item))

    def admit(self) -> list[T]:
        """Move requests from waiting to running for this step; returns the newly admitted."""
        admitted: list[T] = []
        budget = self.max_prefill_tokens
        while self._waiting and len(self.running) < self.max_batch:
            head = self._waiting[0].item
            # The first admission of a step always fits, so an over-budget prompt still runs.
            if admitted and head.prompt_len > budget:
                break
            budget -= head.prompt_len
            self._waiting.pop(0)
            self._keys.pop(0)
            self.running.append(head)
            admitted.append(head)
        return admitted

    def remove(self, request_id: str) -> T | None:
        """Take a request out of whichever set holds it."""
        for i, item in enumerate(self.running):
            if item.request_id == request_id:
                return self.running.pop(i)
        for i, entry in enumerate(self._waiting):
            if entry.item.request_id == request_id:
                self._keys.pop(i)
                return self._waiting.pop(i).item
        return None

    def expired(self, now_s: float) -> list[T]:
        """Requests whose deadline has passed (still in their sets; the caller removes them)."""
        items = list(self.running) + [e.item for e in self._waiting]
        return [it for it in items if it.deadline_s is not None and it.deadline_s <= now_s]

    def __contains__(self, request_id: str) -> bool:
        return any(it.request_id == request_id for it in self.running) or any(
            e.item.request_id == request_id for e in self._waiting
        )
