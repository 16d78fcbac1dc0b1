"""The request lifecycle: admit -> route -> dispatch -> stream -> account.

Transport-free: the gRPC servicer (``runtime/api/servicer.py``) converts protobuf to a
:class:`ClientRequest` and the events yielded by :meth:`Gateway.generate` back. The gateway keeps
fresh telemetry of every replica (polled in the background), asks the routing policy for a plan,
streams from the chosen replica's Ray streaming generator, and on any exit path (finish, error,
client cancel, deadline) makes sure the replica stops working on the request.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field

import ray
from ray.exceptions import RayActorError, RayError

from router.base import Candidate, Plan
from router.policies import Policy
from wattserve.errors import ExpertUnavailable, QueueFull, WattserveError
from wattserve.types import ChatMessage, ExpertProfile, GenerateCall, Priority, RequestUsage, SamplingParams

from .admission import Admission
from .cluster import ExpertPool, Replica
from .config import WattserveConfig
from .metrics import UNLISTED_TENANT_LABEL, RequestRecorder, ServingMetrics
from .power_state import PowerState
from .routing import RouteRequest, RoutingService
from .shutdown import StreamDrain
from .validation import MAX_REQUEST_ID_CHARS, Validator

log = logging.getLogger(__name__)

__all__ = ["MAX_REQUEST_ID_CHARS", "ClientRequest", "Chunk", "Final", "Gateway", "ReplicaState"]


@dataclass(slots=True, frozen=True)
class ClientRequest:
    """A generation request as the API received it (not yet validated).

    Exactly one of ``prompt`` (a completion) and ``messages`` (a chat, rendered by the expert's
    chat template) is set. ``api`` names the transport, for metrics.
    """

    prompt: str
    max_tokens: int = 0
    sampling: SamplingParams = field(default_factory=SamplingParams)
    expert: str = ""
    energy_budget_j: float | None = None
    latency_budget_ms: float | None = None
    compute_budget: float | None = None  # early exit: share of full depth per token, in (0, 1]
    priority: Priority = Priority.NORMAL
    tenant: str = ""
    request_id: str = ""
    deadline_unix_s: float | None = None
    messages: tuple[ChatMessage, ...] = ()
    api: str = "grpc"


@dataclass(slots=True, frozen=True)
class Chunk:
    text: str
    token_ids: tuple[int, ...]
    expert: str = ""  # who produced it: with the router choosing, every chunk can name the expert


@dataclass(slots=True, frozen=True)
class Final:
    request_id: str
    expert: str
    replica: int
    usage: RequestUsage
    ttft_ms: float  # gateway: received -> first token yielded
    total_latency_ms: float
    plan: Plan


@dataclass(slots=True)
class _Attempt:
    """How far one dispatch of a request got: the replica it went to, whether a token reached
    the caller (then it must not be retried)."""

    key: tuple[str, int] | None = None
    streamed: bool = False


@dataclass(slots=True)
class ReplicaState:
    replica: Replica
    healthy: bool = False
    profile: ExpertProfile | None = None
    inflight: int = 0
    last_ok_s: float = 0.0
    error: str = "not polled yet"


class Gateway:
    def __init__(
        self,
        config: WattserveConfig,
        pool: ExpertPool,
        policy: Policy | None = None,
        *,
        clock: Callable[[], float] = time.monotonic,
        on_health_change: Callable[[bool], None] | None = None,
        metrics: ServingMetrics | None = None,
    ) -> None:
        self.config = config
        self.gw = config.gateway
        self.pool = pool
        self.routing = RoutingService(config, clock=clock, policy=policy)
        self.policy = self.routing.policy
        self.clock = clock
        self.on_health_change = on_health_change
        self.states = {(r.expert, r.index): ReplicaState(r) for r in pool.all()}
        self.modality = {e.name: e.modality for e in config.experts}  # text or image
        self.started_s = clock()
        self.validator = Validator(config)
        self.admission = Admission.from_config(config.gateway, config.tenants, clock)
        self.requests_total = 0
        self.requests_failed = 0
        self.requests_retried = 0  # re-dispatched after their first replica failed before any token
        self._poller: asyncio.Task | None = None
        self._any_healthy: bool | None = None
        self.metrics = metrics or ServingMetrics()
        self.power = PowerState()  # filled by the power governor; exported as metrics
        self.drain = StreamDrain(clock)  # shutdown: streams finish within the grace period or are cut
        self._streams: dict[tuple[str, int], _ReplicaStream] = {}  # one multiplexed stream per replica

    # -- telemetry ------------------------------------------------------------------------------
    async def start(self) -> None:
        await self.routing.start()
        await self.poll_once()
        self._poller = asyncio.create_task(self._poll_forever(), name="gateway-telemetry")

    async def stop(self) -> None:
        for stream in self._streams.values():
            stream.close()
        if self._poller:
            self._poller.cancel()
            try:
                await self._poller
            except asyncio.CancelledError:
                pass
        await self.routing.stop()

    async def _poll_forever(self) -> None:
        while True:
            await asyncio.sleep(self.gw.health_interval_s)
            try:
                await self.poll_once()
            except Exception:  # noqa: BLE001 - telemetry must never stop
                log.exception("telemetry poll failed")

    async def poll_once(self) -> None:
        await asyncio.gather(*(self._poll(s) for s in self.states.values()))
        any_healthy = any(s.healthy for s in self.states.values())
        if any_healthy != self._any_healthy:
            self._any_healthy = any_healthy
            if self.on_health_change:
                self.on_health_change(any_healthy)

    async def _poll(self, state: ReplicaState) -> None:
        try:
            profile = await asyncio.wait_for(state.replica.actor.profile.remote(), self.gw.health_timeout_s)
        except TimeoutError:
            state.healthy = False
            state.error = f"no telemetry for {self.gw.health_timeout_s:.0f} s"
            return
        except RayError as exc:  # dead, restarting or failed to construct
            state.healthy = False
            state.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:200]}"
            return
        state.profile = profile
        state.healthy = profile.healthy
        state.error = profile.error
        state.last_ok_s = self.clock()

    # -- validation and admission --------------------------------------------------------------
    def validate(self, req: ClientRequest) -> ClientRequest:
        """Check every field (``runtime/validation.py``); return the request with defaults filled in."""
        return self.validator.request(req)

    @property
    def inflight(self) -> int:
        """Requests (text, score and image) the gateway is serving now."""
        return self.admission.inflight

    # -- the lifecycle --------------------------------------------------------------------------
    async def generate(self, request: ClientRequest) -> AsyncIterator[Chunk | Final]:
        """Serve one request; yields text chunks, then one :class:`Final`.

        Raises domain errors (InvalidRequest, QueueFull, NoHealthyExpert, ExpertUnavailable,
        EngineDead); whichever way the caller leaves, the replica's work is aborted.
        """
        received = self.clock()
        rec = self.metrics.begin(request.api, self.clock)
        self.requests_total += 1
        try:
            self.drain.check_open()
            req = self.validate(request)
            ticket = self.admission.acquire(req.tenant)
        except WattserveError as exc:
            self.requests_failed += 1  # refused: failed, for GetStatus as for the metrics
            rec.failed(exc)
            raise
        final_sent = False
        try:
            with self.drain.track(request.api):  # shutdown drains (or cuts, saying so) this stream
                async for item in self._serve(req, received, rec):
                    if isinstance(item, Chunk):
                        rec.chunk(item)
                    else:
                        rec.finished(item, self.tenant_label(req.tenant), req.energy_budget_j, req.latency_budget_ms)
                        final_sent = True
                    yield item
        except BaseException as exc:
            if not final_sent:  # a caller closing us right after the Final is not a failure
                self.requests_failed += 1
                rec.failed(exc)
            raise
        finally:
            self.admission.release(ticket)

    def refused(self, api: str, exc: WattserveError) -> None:
        """Count a request the API refused before it reached :meth:`generate` (a body that is not
        JSON, an unknown field, a message too large): operators see it like any other failure."""
        self.requests_total += 1
        self.requests_failed += 1
        self.metrics.begin(api, self.clock).failed(exc)

    def tenant_label(self, tenant: str) -> str:
        """The metric label of ``tenant``: itself when tenants are configured (others are refused),
        else "default" or ``UNLISTED_TENANT_LABEL`` (any string is a tenant then: a label value
        per string would grow the series without bound)."""
        if self.config.tenants or tenant == "default":
            return tenant
        return UNLISTED_TENANT_LABEL

    async def _serve(self, req: ClientRequest, received: float, rec: RequestRecorder) -> AsyncIterator[Chunk | Final]:
        route = RouteRequest(
            prompt=req.prompt or "\n".join(m.content for m in req.messages),  # what the gate reads
            tenant=req.tenant, priority=req.priority, max_tokens=req.max_tokens,
            expert=req.expert, energy_budget_j=req.energy_budget_j, latency_budget_ms=req.latency_budget_ms,
            deadline_ms=None if req.deadline_unix_s is None else 1000.0 * (req.deadline_unix_s - time.time()),
        )
        plan = await self.routing.plan(route, self._candidates())
        if plan.cascade:
            from .cascade import serve_cascade

            async for item in serve_cascade(self, req, plan, received, rec):
                yield item
            return
        async for item in self._run(req, plan, received, rec):
            yield item

    async def _run(self, req: ClientRequest, plan: Plan, received: float, rec: RequestRecorder) -> AsyncIterator[Chunk | Final]:
        """Dispatch ``req`` to the plan's first replica that admits it and stream it to the end.

        A replica that fails before the caller saw any token (its process died, its engine
        failed) is replaced once by another healthy replica of the plan; after a token the error
        stands (UNAVAILABLE), since a partly streamed answer cannot be replayed transparently.
        """
        failed: set[tuple[str, int]] = set()
        retries = 1 if self.gw.retry_unstarted else 0
        while True:
            attempt = _Attempt()
            try:
                async for item in self._attempt(req, plan, received, rec, failed, attempt):
                    yield item
                return
            except ExpertUnavailable as exc:
                if attempt.streamed or attempt.key is None:
                    raise
                failed.add(attempt.key)
                spare = [c.key for c in plan.ranked if c.key not in failed and self.states[c.key].healthy]
                if retries <= 0 or not spare:
                    raise
                retries -= 1
                self.requests_retried += 1
                log.warning("request %s: %s; retrying on %s/%d", req.request_id or "-", exc, *spare[0])

    async def _attempt(self, req: ClientRequest, plan: Plan, received: float, rec: RequestRecorder,
                       failed: set, attempt: _Attempt) -> AsyncIterator[Chunk | Final]:
        """One dispatch of ``req`` (a fresh call id, so a restarted replica cannot mix it up)."""
        call = GenerateCall(
            request_id=uuid.uuid4().hex,
            prompt=req.prompt,
            max_tokens=req.max_tokens,
            sampling=req.sampling,
            priority=req.priority,
            tenant=req.tenant,
            deadline_unix_s=req.deadline_unix_s,
            messages=req.messages,
            compute_budget=req.compute_budget,
            energy_budget_j=req.energy_budget_j,
        )
        state, queue, first = await self._dispatch(plan, call, failed, attempt)
        replica = state.replica
        rec.routed(replica.expert)
        ttft_ms = None
        finished = False
        tokens_streamed = 0
        try:
            events = first
            while True:
                # Events that arrived together (the replica coalesces under load) leave as one
                # chunk: fewer, larger gRPC messages when the server is busy.
                text = "".join(ev.text for ev in events)
                ids = tuple(t for ev in events for t in ev.token_ids)
                if text or ids:
                    if ttft_ms is None:
                        ttft_ms = 1000.0 * (self.clock() - received)
                    tokens_streamed += len(ids)
                    attempt.streamed = True
                    yield Chunk(text, ids, replica.expert)
                usage = events[-1].usage
                if usage is not None:
                    finished = True
                    self.routing.finish(
                        plan, req.tenant, replica.expert, replica.index, prompt_tokens=usage.prompt_tokens,
                        output_tokens=usage.completion_tokens, energy_j=usage.energy_j, latency_ms=usage.latency_ms,
                        request_id=call.request_id,
                    )
                    await self.routing.flush()  # the charge is durable before the caller learns it finished
                    request_id = req.request_id or call.request_id
                    self.routing.remember(request_id, req.tenant, replica.expert, plan)  # for feedback
                    now = self.clock()
                    yield Final(
                        request_id=request_id,
                        expert=replica.expert,
                        replica=replica.index,
                        usage=usage,
                        ttft_ms=ttft_ms if ttft_ms is not None else 1000.0 * (now - received),
                        total_latency_ms=1000.0 * (now - received),
                        plan=plan,
                    )
                    return
                events = await self._next(queue, replica, tokens_streamed)
        finally:
            state.inflight -= 1
            self._stream(attempt.key).forget(call.request_id)
            if not finished:
                _abandon(replica, call.request_id)
                self.routing.charge_unfinished(req.tenant, plan, tokens_streamed / max(1, req.max_tokens),
                                               request_id=call.request_id)

    async def _dispatch(self, plan: Plan, call: GenerateCall, failed: set, attempt: _Attempt):
        """Start the call on the first candidate (not already failed) that admits it; returns its
        first events."""
        full: list[str] = []
        for cand in plan.ranked:
            if cand.key in failed:
                continue
            state = self.states[cand.key]
            attempt.key = cand.key
            stream = self._stream(cand.key)
            queue, accepted = stream.start(call)
            state.inflight += 1
            try:
                refused = await accepted
                if refused is not None:
                    self._raise(refused, state.replica, 0)
                first = await self._next(queue, state.replica, 0)
            except QueueFull as exc:
                state.inflight -= 1
                stream.forget(call.request_id)
                full.append(str(exc))
                continue
            except BaseException:
                state.inflight -= 1
                stream.forget(call.request_id)
                _abandon(state.replica, call.request_id)
                raise
            return state, queue, first
        raise QueueFull("every eligible replica is full: " + " | ".join(full), retry_after_ms=250)

    def _stream(self, key: tuple[str, int]) -> _ReplicaStream:
        stream = self._streams.get(key)
        if stream is None:
            stream = self._streams[key] = _ReplicaStream(self.states[key].replica)
        return stream

    async def _next(self, queue: asyncio.Queue, replica: Replica, tokens_streamed: int) -> list:
        """The request's next events: everything its stream delivered since the last call (events
        that arrived together leave as one chunk), or the error that ended it."""
        item = await queue.get()
        events: list = []
        while True:
            if isinstance(item, BaseException):
                self._raise(item, replica, tokens_streamed)
            events.extend(item)
            if queue.empty():
                return events
            item = queue.get_nowait()

    def _raise(self, exc: BaseException, replica: Replica, tokens_streamed: int):
        """Raise ``exc`` (from the replica's stream or its submit) as a domain error."""
        if isinstance(exc, WattserveError):
            raise exc  # Ray re-raises actor errors as instances of the original class
        if isinstance(exc, StopAsyncIteration):
            raise ExpertUnavailable(
                f"expert {replica.expert}/{replica.index} ended the stream without a final message"
            ) from None
        if isinstance(exc, RayActorError):
            self.states[(replica.expert, replica.index)].healthy = False
            raise ExpertUnavailable(
                f"expert {replica.expert}/{replica.index} died while serving this request "
                f"after {tokens_streamed} tokens ({type(exc).__name__}); retry"
            ) from None
        text = str(exc).strip().splitlines()
        raise ExpertUnavailable(
            f"expert {replica.expert}/{replica.index} failed: {(text[-1] if text else type(exc).__name__)[:300]}"
        ) from None

    async def feedback(self, request_id: str, score: float, tenant: str = ""):
        """A client's score in [0, 1] for a finished Generate request (``RoutingService.record_feedback``)."""
        return await self.routing.record_feedback(request_id, score, tenant)

    async def score(self, request):
        """Serve an ``Inference.Score`` request (``runtime/scoring.py``)."""
        from .scoring import score

        return await score(self, request)

    def candidates(self, modality: str = "text") -> list[Candidate]:
        return self._candidates(modality)

    def _candidates(self, modality: str = "text") -> list[Candidate]:
        """Replicas of the experts that serve ``modality``: the router never sees an image expert
        for a text request (nor a text expert for an image request)."""
        return [
            Candidate(expert=k[0], replica=k[1], healthy=s.healthy, inflight=s.inflight, profile=s.profile)
            for k, s in self.states.items()
            if self.modality.get(k[0], "text") == modality
        ]

    # -- views for the Admin API ----------------------------------------------------------------
    def replica_states(self) -> list[ReplicaState]:
        return list(self.states.values())

    def uptime_s(self) -> float:
        return self.clock() - self.started_s


def _abandon(replica: Replica, request_id: str) -> None:
    """Make sure a replica stops work on a request we no longer read (cancel, error, deadline)."""
    replica.actor.abort.remote(request_id)


class _ReplicaStream:
    """The gateway's side of one replica's multiplexed stream (``workers/streams.py``): calls go
    to the replica in batches, one ``submit`` on its way at a time (those started meanwhile go in
    the next), and one long-lived ``open_stream`` generator brings back the events of all of them,
    sorted here into a queue per request. One Ray task and object per batch instead of a task per request and an object per
    chunk. If the stream fails (the replica died), every request on it gets the error and the
    next call opens a fresh stream."""

    def __init__(self, replica: Replica) -> None:
        self.replica = replica
        self._queues: dict[str, asyncio.Queue] = {}
        self._on_stream: dict[str, str] = {}  # request id -> the stream it was submitted on
        self._pending: list[tuple[GenerateCall, asyncio.Future]] = []
        self._stream_id = ""
        self._reader: asyncio.Task | None = None
        self._generator = None
        self._submitting = False  # a submit is scheduled or on its way: new calls wait for the next

    def start(self, call: GenerateCall) -> tuple[asyncio.Queue, asyncio.Future]:
        """Queue ``call`` for the next submit; returns the queue of its events and a future of
        the replica's answer to the submit (None, or the exception that refused it)."""
        loop = asyncio.get_running_loop()
        if self._reader is None or self._reader.done():
            self._open()
        if not self._submitting:
            self._submitting = True
            loop.call_soon(self._flush)
        accepted = loop.create_future()
        self._pending.append((call, accepted))
        queue = self._queues[call.request_id] = asyncio.Queue()
        self._on_stream[call.request_id] = self._stream_id
        return queue, accepted

    def forget(self, request_id: str) -> None:
        """The request is over for the gateway; a call not yet submitted never will be."""
        self._queues.pop(request_id, None)
        self._on_stream.pop(request_id, None)
        self._pending = [(c, f) for c, f in self._pending if c.request_id != request_id]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._generator is not None:
            try:
                ray.cancel(self._generator)  # the replica aborts what the stream still had
            except Exception:  # noqa: BLE001 - a dead replica has nothing left to abort
                pass

    def _open(self) -> None:
        self._stream_id = uuid.uuid4().hex
        self._generator = self.replica.actor.open_stream.remote(self._stream_id)
        self._reader = asyncio.create_task(self._read(self._generator, self._stream_id),
                                           name=f"stream-{self.replica.expert}-{self.replica.index}")

    def _flush(self) -> None:
        """Submit what is pending. One submit at a time per replica: calls that arrive while one
        is on its way go together in the next, so the batches grow with the load (a call that
        finds none on its way leaves in the next turn of the event loop)."""
        batch, self._pending = self._pending, []
        if not batch:
            self._submitting = False
            return
        if self._reader is None or self._reader.done():
            self._open()  # the stream failed since these calls were started
        for call, _ in batch:
            self._on_stream[call.request_id] = self._stream_id
        ref = self.replica.actor.submit.remote(self._stream_id, [call for call, _ in batch])
        asyncio.ensure_future(self._settle(ref, batch))

    async def _settle(self, ref, batch: list[tuple[GenerateCall, asyncio.Future]]) -> None:
        try:
            results = await ref
        except BaseException as exc:  # noqa: BLE001 - every call of the batch gets it
            results = [exc] * len(batch)
        finally:
            self._flush()
        for (_, accepted), result in zip(batch, results, strict=True):
            if not accepted.done():
                accepted.set_result(result)

    async def _read(self, generator, stream_id: str) -> None:
        try:
            async for ref in generator:
                for rid, item in await ref:
                    queue = self._queues.get(rid)
                    if queue is not None:
                        queue.put_nowait(item)
            error: BaseException = StopAsyncIteration()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the requests on this stream get it
            error = exc
        for rid, sid in list(self._on_stream.items()):
            if sid == stream_id:
                self._queues[rid].put_nowait(error)
