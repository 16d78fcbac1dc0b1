"""The replicas behind the gateway: one :class:`ReplicaSet` per expert, over :class:`ReplicaClient`.

A ``ReplicaClient`` is what the gateway needs of one replica, whatever hosts it: telemetry, a
token stream, an abort, a score, image sessions. ``runtime/cluster.py`` implements it over Ray
actors (the only serving code that imports Ray); ``tests/fakes.py`` implements it in memory, so the
lifecycle's retry, abandon, cascade, deadline and replica-death paths run without Ray.

A ``ReplicaSet`` owns its replicas' states (health, last profile, in-flight count), polls their
telemetry, and can grow and shrink at run time: an added replica is a candidate at the next plan;
a removed one stops taking requests at once and leaves when the calls it holds have finished.
It also counts what the capacity controller measures (arrivals, token sizes). A set that a waker
can grow from zero stays routable with no replica: one cold candidate (``COLD_REPLICA``) whose
predicted latency includes the start; a request dispatched to it wakes a replica and waits for it
within its deadline. A request whose woken replica fails before its first token may wake another
(:meth:`Replicas.retry_ranking`, at most ``wakes_per_request`` wakes in all).
:class:`Replicas` holds every expert's set: the router's candidates come from it and every call
goes through :meth:`Replicas.dispatch` ("the first replica of the plan that accepts, else the
next"), which also keeps the in-flight counts and marks a replica whose process died unhealthy.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from abc import ABC, abstractmethod
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TypeVar

from router.base import Candidate
from wattserve.errors import ExpertUnavailable, QueueFull
from wattserve.images import ImageData, ImageJobCall, ImageResult, ImageStreamCall, StreamSettings
from wattserve.types import ExpertProfile, GenerateCall, ScoreCall, ScoreResult

log = logging.getLogger(__name__)

T = TypeVar("T")
Key = tuple[str, int]

#: the replica index of a cold candidate: an expert with no replica that a request can wake
COLD_REPLICA = -1
#: finished requests whose token counts a set keeps for the capacity controller
TOKEN_SAMPLES = 1000
#: replicas one request may wake (its first wake included) unless the capacity controller says otherwise
WAKES_PER_REQUEST = 2


class ReplicaDied(ExpertUnavailable):
    """The replica's process is gone (killed, crashed, restarting): UNAVAILABLE, and the replica is
    unhealthy until its telemetry says otherwise."""


class ReplicaStream(ABC):
    """What one call streams back from a replica (a Generate call's events, an image session's
    results), in the batches the replica sent them."""

    @abstractmethod
    async def next(self) -> list:
        """The next batch; ExpertUnavailable if the stream ends before its final message."""

    @abstractmethod
    def cancel(self) -> None:
        """Stop reading (idempotent); the caller also aborts the request on the replica."""


class ReplicaClient(ABC):
    """One replica of one expert. Failures of the transport arrive as ExpertUnavailable
    (:class:`ReplicaDied` when the process is gone); the replica's own domain errors (QueueFull,
    InvalidRequest, DeadlineExceeded, ...) arrive as themselves."""

    def __init__(self, expert: str, index: int) -> None:
        self.expert = expert
        self.index = index
        self.node = ""  # where the replica runs (a Ray node id), when whoever started it knows

    @property
    def key(self) -> Key:
        return (self.expert, self.index)

    @property
    def name(self) -> str:
        return f"{self.expert}/{self.index}"

    @abstractmethod
    async def profile(self) -> ExpertProfile: ...

    @abstractmethod
    def generate(self, call: GenerateCall) -> ReplicaStream: ...

    @abstractmethod
    def abort(self, request_id: str) -> None:
        """Ask the replica to drop a request (fire and forget: it frees the request's slot)."""

    @abstractmethod
    async def score(self, call: ScoreCall) -> ScoreResult: ...

    async def engine_metrics(self) -> str:
        """The engine's own Prometheus text (vLLM); empty for engines without any."""
        return ""

    def close(self) -> None:
        """Release what the client holds open to the replica (the gateway is stopping or the replica left)."""

    # image experts
    async def open_session(self, call: ImageStreamCall) -> StreamSettings:
        raise ExpertUnavailable(f"expert {self.name} does not serve image streams")

    async def push_frame(self, session_id: str, index: int, image: ImageData) -> None:
        raise ExpertUnavailable(f"expert {self.name} does not serve image streams")

    async def end_input(self, session_id: str) -> None:
        raise ExpertUnavailable(f"expert {self.name} does not serve image streams")

    def stream_outputs(self, session_id: str) -> ReplicaStream:
        """The session's results (lists of FrameResult, the last ending in StreamSummary)."""
        raise ExpertUnavailable(f"expert {self.name} does not serve image streams")

    def close_session(self, session_id: str) -> None:
        """Free the session's queues (fire and forget)."""

    async def generate_image(self, call: ImageJobCall) -> ImageResult:
        raise ExpertUnavailable(f"expert {self.name} does not generate images")


@dataclass(slots=True)
class ReplicaState:
    client: ReplicaClient
    healthy: bool = False
    profile: ExpertProfile | None = None
    inflight: int = 0
    last_ok_s: float = 0.0
    error: str = "not polled yet"
    removing: bool = False  # takes no new calls; leaves once ``inflight`` is 0

    @property
    def key(self) -> Key:
        return self.client.key

    def candidate(self) -> Candidate:
        return Candidate(expert=self.client.expert, replica=self.client.index, healthy=self.healthy,
                         inflight=self.inflight, profile=self.profile)


class Lease:
    """One call's hold on a replica: counted in its in-flight number until released (once)."""

    __slots__ = ("state", "_held")

    def __init__(self, state: ReplicaState) -> None:
        self.state = state
        self._held = True
        state.inflight += 1

    @property
    def client(self) -> ReplicaClient:
        return self.state.client

    def release(self) -> None:
        if self._held:
            self._held = False
            self.state.inflight -= 1


class ReplicaSet:
    """The replicas of one expert."""

    def __init__(self, expert: str, modality: str = "text") -> None:
        self.expert = expert
        self.modality = modality
        self.states: dict[int, ReplicaState] = {}
        self.arrivals = 0  # calls dispatched to (or waking) this expert since start
        self.tokens: deque[tuple[int, int]] = deque(maxlen=TOKEN_SAMPLES)  # (prompt, output) of finished calls
        # Set by the capacity controller for experts it may scale to zero: starts a replica (if
        # none is starting) and returns once one is healthy that is not among the replica indices
        # passed (those the waiting request already failed on).
        self.waker: Callable[[frozenset[int]], Awaitable[None]] | None = None
        self.cold_start_ms = 0.0  # what a waking request waits (measured starts, else configured)
        self.last_profile: ExpertProfile | None = None  # what the last replica said before it left

    def add(self, client: ReplicaClient) -> ReplicaState:
        if client.expert != self.expert:
            raise ValueError(f"replica {client.name} is not a replica of {self.expert}")
        if client.index in self.states:
            raise ValueError(f"{client.name} is already in the set")
        state = self.states[client.index] = ReplicaState(client)
        return state

    async def remove(self, index: int, poll_s: float = 0.05) -> ReplicaClient:
        """Stop sending calls to replica ``index``, wait for those it holds, and drop it; returns its
        client (the caller releases what hosts it)."""
        state = self.states[index]
        state.removing = True
        while state.inflight > 0:
            await asyncio.sleep(poll_s)
        del self.states[index]
        state.client.close()
        if state.profile is not None:
            self.last_profile = state.profile
        return state.client

    def candidates(self) -> list[Candidate]:
        out = [s.candidate() for s in self.states.values() if not s.removing]
        if not out and self.cold:
            out.append(Candidate(expert=self.expert, replica=COLD_REPLICA, healthy=True, inflight=0,
                                 profile=self.last_profile, cold_start_ms=max(1.0, self.cold_start_ms)))
        return out

    @property
    def cold(self) -> bool:
        """No replica takes calls (draining ones may still finish theirs), and a request can wake one."""
        return self.waker is not None and not any(not s.removing for s in self.states.values())

    def finished(self, prompt_tokens: int, output_tokens: int) -> None:
        """A call finished with these token counts (what the capacity controller plans with)."""
        self.tokens.append((prompt_tokens, output_tokens))


class Replicas:
    """Every expert's :class:`ReplicaSet`, their telemetry, and dispatch."""

    def __init__(self, sets: Iterable[ReplicaSet], *, clock: Callable[[], float], health_interval_s: float = 1.0,
                 health_timeout_s: float = 5.0, on_health_change: Callable[[bool], None] | None = None) -> None:
        self.sets = {s.expert: s for s in sets}
        self.clock = clock
        self.health_interval_s = health_interval_s
        self.health_timeout_s = health_timeout_s
        self.on_health_change = on_health_change
        self._poller: asyncio.Task | None = None
        self._any_healthy: bool | None = None
        self.wake_timeout_s = 120.0  # most a request without a deadline waits for a cold expert
        self.wakes_per_request = WAKES_PER_REQUEST  # replicas one request may wake, retries included

    @classmethod
    def of(cls, clients: Iterable[ReplicaClient], modality: Callable[[str], str] = lambda e: "text",
           **kw) -> Replicas:
        """Sets built from a flat list of clients (``modality(expert)`` says what each expert serves)."""
        sets: dict[str, ReplicaSet] = {}
        for client in clients:
            sets.setdefault(client.expert, ReplicaSet(client.expert, modality(client.expert))).add(client)
        return cls(sets.values(), **kw)

    # -- what the router and operators see ------------------------------------------------------
    def candidates(self, modality: str = "text") -> list[Candidate]:
        """Replicas of the experts that serve ``modality``: the router never sees an image expert for a
        text request (nor a text expert for an image request)."""
        return [c for s in self.sets.values() if s.modality == modality for c in s.candidates()]

    def states(self) -> list[ReplicaState]:
        return [st for s in self.sets.values() for st in s.states.values()]

    def state(self, key: Key) -> ReplicaState | None:
        s = self.sets.get(key[0])
        return None if s is None else s.states.get(key[1])

    def healthy(self, key: Key) -> bool:
        st = self.state(key)
        return st is not None and st.healthy and not st.removing

    def any_serving(self) -> bool:
        """Whether any replica can serve, or a cold expert can be woken to."""
        return any(s.healthy for s in self.states()) or any(s.cold for s in self.sets.values())

    # -- growing and shrinking ------------------------------------------------------------------
    def add(self, client: ReplicaClient, modality: str = "text") -> ReplicaState:
        """A new replica; it is a candidate from its first healthy poll (call :meth:`poll_once` to
        make that now)."""
        rs = self.sets.setdefault(client.expert, ReplicaSet(client.expert, modality))
        return rs.add(client)

    async def remove(self, key: Key) -> ReplicaClient:
        """Drain replica ``key`` (no new calls; those in flight finish) and drop it."""
        return await self.sets[key[0]].remove(key[1])

    # -- dispatch -------------------------------------------------------------------------------
    async def dispatch(self, ranked: Sequence[Candidate], start: Callable[[ReplicaClient], Awaitable[T]], *,
                       skip: Iterable[Key] = (), what: str = "replica", retry_after_ms: int = 250,
                       deadline_s: float | None = None) -> tuple[Lease, T]:
        """``start`` the call on the first replica of ``ranked`` (not in ``skip``) that accepts it.

        A replica that answers QueueFull is passed over for the next; any other error stands. The
        returned lease counts the call in the replica's in-flight number until released. A cold
        candidate wakes its expert and waits for a replica until ``deadline_s`` (on this clock;
        None: ``wake_timeout_s``); one that does not come in time is passed over like a full one.
        """
        skipped = set(skip)
        full: list[str] = []
        cold: list[str] = []
        first = next((c for c in ranked if c.key not in skipped and c.expert in self.sets), None)
        if first is not None:  # the demand the capacity controller sees: one arrival, at the router's choice
            self.sets[first.expert].arrivals += 1
        for cand in ranked:
            if cand.replica == COLD_REPLICA:
                state = await self._woken(cand.expert, deadline_s, cold, skipped)
            else:
                state = self.state(cand.key)
            if state is None or state.key in skipped or state.removing:
                continue
            lease = Lease(state)
            try:
                return lease, await self.watch(state, start(state.client))
            except QueueFull as exc:
                lease.release()
                full.append(str(exc))
            except BaseException:
                lease.release()
                raise
        if not full:
            why = "; ".join(cold) if cold else "removed or failed"
            raise ExpertUnavailable(f"no {what} of the plan is left to try ({why}); retry")
        raise QueueFull(f"every eligible {what} is full: " + " | ".join(full), retry_after_ms=retry_after_ms)

    def retry_ranking(self, ranked: Sequence[Candidate], failed: Iterable[Key], *, wake: bool) -> list[Candidate]:
        """Where a request may go after the replicas in ``failed`` failed it before its first token:
        the plan's healthy replicas not in ``failed`` (in the plan's order: they answer at once), then,
        with ``wake``, a cold candidate for each expert of the plan that a waker can grow and that has
        none of those (a woken replica that died leaves its expert like this). Dispatched, that
        candidate takes a healthy replica the plan did not list if one came meanwhile, else wakes one."""
        failed = set(failed)
        warm = [c for c in ranked if c.replica != COLD_REPLICA and c.key not in failed and self.healthy(c.key)]
        if not wake:
            return warm
        cold: list[Candidate] = []
        for expert in dict.fromkeys(c.expert for c in ranked):
            rs = self.sets.get(expert)
            if rs is None or rs.waker is None or any(c.expert == expert for c in warm):
                continue
            profile = next((s.profile for s in rs.states.values() if s.profile is not None), rs.last_profile)
            cold.append(Candidate(expert=expert, replica=COLD_REPLICA, healthy=True, inflight=0, profile=profile,
                                  cold_start_ms=max(1.0, rs.cold_start_ms)))
        return warm + cold

    async def _woken(self, expert: str, deadline_s: float | None, notes: list[str],
                     avoid: set[Key] | frozenset[Key] = frozenset()) -> ReplicaState | None:
        """Wake a cold ``expert`` and return its least loaded healthy replica not in ``avoid``, or
        None (said why in ``notes``) if none is healthy before the deadline."""
        rs = self.sets.get(expert)
        if rs is None:
            return None
        ready = [s for s in rs.states.values() if s.healthy and not s.removing and s.key not in avoid]
        if not ready and rs.waker is not None:
            wait_s = self.wake_timeout_s if deadline_s is None else min(self.wake_timeout_s, deadline_s - self.clock())
            if 1e3 * wait_s < rs.cold_start_ms:
                notes.append(f"{expert} is cold: a start takes ~{rs.cold_start_ms / 1e3:.1f} s, the deadline is "
                             f"{max(0.0, wait_s):.1f} s away")
                return None
            try:
                await asyncio.wait_for(rs.waker(frozenset(i for e, i in avoid if e == expert)), max(0.0, wait_s))
            except (TimeoutError, ExpertUnavailable) as exc:
                notes.append(f"{expert} is cold and no replica started within {max(0.0, wait_s):.1f} s"
                            + (f" ({exc})" if str(exc) else ""))
                return None
            ready = [s for s in rs.states.values() if s.healthy and not s.removing and s.key not in avoid]
        return min(ready, key=lambda s: s.inflight, default=None)

    async def watch(self, state: ReplicaState, call: Awaitable[T]) -> T:
        """Await ``call`` on ``state``'s replica; a dead replica is marked unhealthy at once (the
        next telemetry poll tells when it is back)."""
        try:
            return await call
        except ReplicaDied as exc:
            state.healthy = False
            state.error = str(exc)[:300]
            raise

    # -- telemetry ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_forever(), name="replica-telemetry")

    async def stop(self) -> None:
        if self._poller:
            self._poller.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._poller
            self._poller = None
        for state in self.states():
            state.client.close()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.health_interval_s)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - telemetry must never stop
                log.exception("telemetry poll failed")

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(s) for s in self.states()))
        any_healthy = self.any_serving()
        if any_healthy != self._any_healthy:
            self._any_healthy = any_healthy
            if self.on_health_change:
                self.on_health_change(any_healthy)

    async def poll(self, key: Key) -> bool:
        """Poll one replica now; whether it is healthy."""
        state = self.state(key)
        if state is None:
            return False
        await self._poll(state)
        return state.healthy

    async def _poll(self, state: ReplicaState) -> None:
        try:
            profile = await asyncio.wait_for(state.client.profile(), self.health_timeout_s)
        except TimeoutError:
            state.healthy = False
            state.error = f"no telemetry for {self.health_timeout_s:.0f} s"
            return
        except ExpertUnavailable as exc:  # dead, restarting or failed to construct
            state.healthy = False
            state.error = str(exc)[:300]
            return
        state.profile = profile
        state.healthy = profile.healthy
        state.error = profile.error
        state.last_ok_s = self.clock()
