"""One multiplexed event stream per caller: the events of many requests in one Ray object.

A Ray streaming generator per request costs an actor task per request and an object per yield
(about 2 ms of the replica's CPU per request on a 2-core host: docs/benchmarks.md "Serving-path
overhead"). A caller (the gateway) instead opens one long-lived stream per replica and submits
its requests in batches; every yield of the stream carries whatever the engine produced for any
of them since the previous yield. No event waits for another: the stream yields as soon as it
has anything, and what it carries is only what arrived while the previous yield was in flight.

Nothing here imports Ray: the expert body drives an :class:`Outbox` from its async methods.
"""

from __future__ import annotations

import asyncio
from collections import deque
from collections.abc import AsyncIterator, Callable
from itertools import chain

from wattserve.types import StreamEvent

#: one entry of a stream batch: a request id and its events in order, or the exception that ended it
StreamItem = tuple[str, list[StreamEvent] | BaseException]


class Outbox:
    """The events of one caller's requests on this replica, gathered for its stream.

    :meth:`sink_for` gives the engine loop's thread a sink per request; :meth:`batches` (on the
    actor's event loop) yields what the sinks delivered. One wake-up per batch, not per event:
    the engine loop delivers a step's outputs for many requests in a row.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, abort: Callable[[str], None]) -> None:
        self._loop = loop
        self._abort = abort
        self._items: deque[StreamItem] = deque()
        self._wake = asyncio.Event()
        self._armed = False  # a wake-up is on its way to the event loop
        self.requests: set[str] = set()  # submitted, not finished: aborted if the stream closes
        self.opened = False  # its caller has started reading (:meth:`batches`)

    def sink_for(self, request_id: str) -> Callable[[list[StreamEvent] | BaseException], None]:
        """A sink for the engine loop's thread; thread-safe."""

        def sink(item: list[StreamEvent] | BaseException) -> None:
            # Append before reading the flag, and the reader clears the flag before it drains:
            # an item is either drained by the current pass or arms the next wake-up.
            self._items.append((request_id, item))
            if not self._armed:
                self._armed = True
                self._loop.call_soon_threadsafe(self._wake.set)

        return sink

    async def batches(self) -> AsyncIterator[list[StreamItem]]:
        """Yield every item delivered since the last yield, forever; when the caller goes away
        (the stream is cancelled or closed), abort the requests that had not finished."""
        self.opened = True
        try:
            while True:
                await self._wake.wait()
                self._wake.clear()
                self._armed = False
                batch = self._take()
                if batch:
                    yield batch
        finally:
            self.abort_all()

    def abort_all(self) -> None:
        """Abort the requests that have not finished (their caller is gone)."""
        for rid in list(self.requests):
            self._abort(rid)
        self.requests.clear()

    def _take(self) -> list[StreamItem]:
        """Everything delivered so far, each request's events merged into one event: the caller
        sends events that arrive together as one chunk anyway, and one object per request
        instead of one per token is most of the pickling."""
        batch: list[StreamItem] = []
        merged: dict[str, list[StreamEvent]] = {}
        while self._items:
            rid, item = self._items.popleft()
            if isinstance(item, BaseException):
                self.requests.discard(rid)
                batch.append((rid, item))
                merged.pop(rid, None)
                continue
            if item[-1].finished:
                self.requests.discard(rid)
            events = merged.get(rid)
            if events is None:
                merged[rid] = events = list(item)
                batch.append((rid, events))
            else:
                events.extend(item)
        for _, item in batch:
            if isinstance(item, list) and len(item) > 1:
                item[:] = [_merged(item)]
        return batch


def _merged(events: list[StreamEvent]) -> StreamEvent:
    # list comprehensions and chain: the engine delivers one event per token at full speed, and
    # generators here were a tenth of the replica's event loop (docs/benchmarks.md)
    return StreamEvent(
        request_id=events[-1].request_id,
        text="".join([ev.text for ev in events]),
        token_ids=tuple(chain.from_iterable([ev.token_ids for ev in events])),
        usage=events[-1].usage,
    )
