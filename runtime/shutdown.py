"""Draining streams at shutdown, the same way for the gRPC and the HTTP API.

On SIGINT/SIGTERM the server stops taking requests and lets the streams in flight finish within
``gateway.shutdown_grace_s``; whatever still runs then is cut, and its client is told so in the
stream's last message (gRPC UNAVAILABLE, an in-band SSE error for HTTP: "the server shut down
and its N s grace period ended"), never left to a transport's bare cancellation. The server's
last log line says what happened: how many streams were in flight per API, how many finished,
how many were cut.

Before this, the HTTP runner waited for its handlers (so an HTTP stream ran to completion) while
the gRPC server, stopped afterwards with a 2 s grace, cut its stream with UNAVAILABLE and no
usage: the two APIs drained differently.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
from collections import Counter
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field

from wattserve.errors import ShuttingDown


@dataclass(slots=True)
class _Live:
    api: str
    task: asyncio.Task | None
    cut: bool = False


@dataclass(slots=True)
class DrainReport:
    grace_s: float
    in_flight: Counter = field(default_factory=Counter)  # api -> streams in flight when it began
    cut: Counter = field(default_factory=Counter)  # api -> streams cut after the grace period
    waited_s: float = 0.0
    cut_early: bool = False  # a second signal asked to cut at once

    @property
    def finished(self) -> int:
        return sum(self.in_flight.values()) - sum(self.cut.values())

    def message(self) -> str:
        total = sum(self.in_flight.values())
        if total == 0:
            return "shutdown: no streams in flight"
        apis = ", ".join(f"{n} {api}" for api, n in sorted(self.in_flight.items()))
        head = f"shutdown: {total} stream(s) in flight ({apis})"
        if not self.cut:
            return f"{head}: all finished within the {self.grace_s:g} s grace period ({self.waited_s:.1f} s)"
        cut = ", ".join(f"{n} {api}" for api, n in sorted(self.cut.items()))
        why = "on a second signal" if self.cut_early else f"after the {self.grace_s:g} s grace period"
        return f"{head}: {self.finished} finished, {sum(self.cut.values())} cut {why} ({cut})"


class StreamDrain:
    """Tracks the gateway's streams and drains them (see module doc)."""

    def __init__(self, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        self.draining = False
        self.grace_s = 0.0
        self._live: dict[int, _Live] = {}
        self._changed = asyncio.Event()
        self._cut_now = asyncio.Event()

    def check_open(self) -> None:
        """Refuse a new request once draining has begun."""
        if self.draining:
            raise ShuttingDown("the server is shutting down and takes no new requests; retry on another server")

    @contextlib.contextmanager
    def track(self, api: str) -> Iterator[_Live]:
        """Around one stream's life inside the gateway; turns the cancellation of a cut stream
        into :class:`ShuttingDown`, which both transports report to the client."""
        live = _Live(api, asyncio.current_task())
        self._live[id(live)] = live
        try:
            yield live
        except asyncio.CancelledError:
            if not live.cut:
                raise
            if live.task is not None:
                live.task.uncancel()
            raise ShuttingDown(f"stream cut: the server shut down and its {self.grace_s:g} s shutdown grace "
                               "period ended before this stream finished; retry on another server") from None
        finally:
            del self._live[id(live)]
            self._changed.set()

    def cut_now(self) -> None:
        """End the grace period at once (a second Ctrl-C)."""
        self._cut_now.set()

    async def drain(self, grace_s: float, busy: Callable[[], int] | None = None) -> DrainReport:
        """Stop taking requests, wait up to ``grace_s`` for the streams (and ``busy()`` other
        requests) to finish, then cut the streams still running. Returns what happened."""
        self.draining, self.grace_s = True, grace_s
        report = DrainReport(grace_s, in_flight=Counter(live.api for live in self._live.values()))
        start = self.clock()
        deadline = start + grace_s
        while self._live or (busy is not None and busy() > 0):
            left = deadline - self.clock()
            if left <= 0 or self._cut_now.is_set():
                break
            self._changed.clear()
            waiters = {asyncio.ensure_future(self._changed.wait()), asyncio.ensure_future(self._cut_now.wait())}
            _, pending = await asyncio.wait(waiters, timeout=min(left, 0.1), return_when=asyncio.FIRST_COMPLETED)
            for w in pending:
                w.cancel()
        report.waited_s = self.clock() - start
        report.cut_early = self._cut_now.is_set() and report.waited_s < grace_s
        remaining = list(self._live.values())
        for live in remaining:
            report.cut[live.api] += 1
            live.cut = True
            if live.task is not None:
                live.task.cancel()
        until = self.clock() + 5.0  # cut streams leave at their next await; give them a moment
        while self._live and self.clock() < until:
            await asyncio.sleep(0.01)
        return report
