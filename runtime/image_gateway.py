"""The image request lifecycle: validate -> admit -> place on an image expert -> stream frames in
and results out -> release.

Transport-free, like :mod:`runtime.gateway` (whose replica telemetry, admission counter and
configuration it shares): the gRPC servicer turns protobuf into :class:`ImageStreamRequest` /
:class:`ImageRequest` and an async iterator of :class:`~wattserve.images.ImageData` frames, and
the events yielded here back into protobuf. Image requests go only to image experts (text
requests only to text experts: ``Gateway.candidates``); among them the least loaded replica
is chosen, because the text router's cost and quality models describe LLM experts.

A stream is a session on one replica: ``open_session``, then ``push_frame`` per frame (awaited,
so a bad frame fails the stream at once) concurrently with the replica's ``stream_outputs``
generator, and ``close_session`` on every exit path (finish, error, client cancel).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayError

from router.base import Plan, RequestFeatures
from router.policies import make_policy
from wattserve.errors import (
    ExpertUnavailable,
    InvalidRequest,
    NoHealthyExpert,
    QueueFull,
    WattserveError,
)
from wattserve.images import (
    FrameResult,
    ImageData,
    ImageJobCall,
    ImageParams,
    ImageResult,
    ImageStreamCall,
    SimilarityFilterParams,
    StreamSettings,
    StreamSummary,
)
from wattserve.types import Priority

from .admission import RateLimit
from .gateway import Gateway, ReplicaState
from .image_metrics import ImageMetrics

log = logging.getLogger(__name__)

#: results the expert may have produced and the gateway not yet taken: beyond this the expert's
#: output queue fills and drops its oldest results (a slow client loses frames, not memory)
OUTPUT_BACKPRESSURE_OBJECTS = 2


@dataclass(slots=True, frozen=True)
class ImageStreamRequest:
    """A StreamImages config message as the API received it (not yet validated)."""

    params: ImageParams
    similarity: SimilarityFilterParams | None = None
    frame_buffer_size: int = 0
    expert: str = ""
    priority: Priority = Priority.NORMAL
    tenant: str = ""
    request_id: str = ""


@dataclass(slots=True, frozen=True)
class ImageRequest:
    """A GenerateImage request as the API received it."""

    params: ImageParams
    expert: str = ""
    priority: Priority = Priority.NORMAL
    tenant: str = ""
    request_id: str = ""
    deadline_unix_s: float | None = None


@dataclass(slots=True, frozen=True)
class StreamStarted:
    request_id: str
    expert: str
    replica: int
    settings: StreamSettings
    plan: Plan


@dataclass(slots=True, frozen=True)
class FrameOut:
    result: FrameResult
    latency_ms: float  # gateway: frame received -> result handed to the transport


@dataclass(slots=True, frozen=True)
class StreamEnded:
    summary: StreamSummary
    total_latency_ms: float


@dataclass(slots=True, frozen=True)
class ImageAnswer:
    request_id: str
    expert: str
    replica: int
    result: ImageResult
    latency_ms: float
    plan: Plan


class ImageGateway:
    def __init__(self, gateway: Gateway, metrics: ImageMetrics | None = None) -> None:
        self.gateway = gateway
        self.metrics = metrics
        self.policy = make_policy("least_loaded")
        self.clock = gateway.clock

    # -- validation and placement ---------------------------------------------------------------
    def _validate(self, params: ImageParams, expert: str, tenant: str, priority: Priority,
                  request_id: str) -> tuple[str, Priority]:
        check = self.gateway.validator  # the same limits as text requests (runtime/validation.py)
        if not params.prompt.strip():
            raise InvalidRequest("prompt is empty: describe the image to generate")
        check.prompt_size(params.prompt, "prompt")
        check.prompt_size(params.negative_prompt, "negative_prompt")
        check.expert(expert, "image")
        check.request_id(request_id)
        return check.tenant(tenant, priority)

    def _admit(self, kind: str, req: ImageRequest | ImageStreamRequest):
        """Validate, plan and take an admission slot for ``req``; returns (tenant, priority, plan,
        ticket). A refusal is counted under ``kind`` and raised."""
        try:
            tenant, priority = self._validate(req.params, req.expert, req.tenant, req.priority, req.request_id)
            plan = self._plan(req.params, req.expert, tenant, priority)
            ticket = self.gateway.admission.acquire(tenant)
        except WattserveError as exc:
            self._count(kind, "none", exc)
            raise
        self.gateway.requests_total += 1
        return tenant, priority, plan, ticket

    def _plan(self, params: ImageParams, expert: str, tenant: str, priority: Priority) -> Plan:
        candidates = self.gateway.candidates("image")
        if not candidates:
            raise NoHealthyExpert("this server has no image experts (configure an expert with engine kind diffusion)")
        features = RequestFeatures(prompt_chars=len(params.prompt), max_tokens=0, priority=priority,
                                   tenant=tenant, expert=expert or None)
        return self.policy.plan(features, candidates)

    async def _place(self, plan: Plan, method: str, arg) -> tuple[ReplicaState, object]:
        """Call ``method(arg)`` on the first ranked replica that admits it."""
        full: list[str] = []
        for cand in plan.ranked:
            state = self.gateway.states[cand.key]
            try:
                return state, await _ray_call(state, getattr(state.replica.actor, method).remote(arg))
            except QueueFull as exc:
                full.append(str(exc))
        raise QueueFull("every eligible image expert is full: " + " | ".join(full), retry_after_ms=500)

    # -- streams --------------------------------------------------------------------------------
    async def stream(self, req: ImageStreamRequest, frames: AsyncIterator[ImageData]
                     ) -> AsyncIterator[StreamStarted | FrameOut | StreamEnded]:
        """Serve one stream. Raises domain errors; whichever way the caller leaves, the expert's
        session is closed."""
        received = self.clock()
        expert = "none"
        gw = self.gateway
        tenant, priority, plan, ticket = self._admit("stream", req)
        session_id = uuid.uuid4().hex
        call = ImageStreamCall(session_id, req.params, req.similarity, req.frame_buffer_size, priority, tenant)
        state: ReplicaState | None = None
        try:
            state, settings = await self._place(plan, "open_session", call)
            state.inflight += 1
            expert = state.replica.expert
            if self.metrics:
                self.metrics.started(expert, settings.energy_source, settings.setup_energy_j)
            yield StreamStarted(req.request_id or session_id, expert, state.replica.index, settings, plan)
            async for event in self._run(state, session_id, frames, received, settings):
                yield event
            self._count("stream", expert, None)
        except BaseException as exc:
            gw.requests_failed += 1
            self._count("stream", expert, exc)
            raise
        finally:
            gw.admission.release(ticket)
            if state is not None:
                state.inflight -= 1
                state.replica.actor.close_session.remote(session_id)

    async def _run(self, state: ReplicaState, session_id: str, frames: AsyncIterator[ImageData],
                   received: float, settings: StreamSettings) -> AsyncIterator[FrameOut | StreamEnded]:
        actor = state.replica.actor
        arrivals: dict[int, float] = {}
        outputs = actor.stream_outputs.options(
            _generator_backpressure_num_objects=OUTPUT_BACKPRESSURE_OBJECTS).remote(session_id)
        feeder = asyncio.create_task(self._feed(state, session_id, frames, arrivals), name=f"feed-{session_id}")
        pending: asyncio.Future | None = None
        drops = [0, 0]  # the stream's last reported input / output drop totals
        try:
            while True:
                pending = pending or asyncio.ensure_future(self._next(outputs, state))
                waiting = {pending} if feeder.done() else {pending, feeder}
                await asyncio.wait(waiting, return_when=asyncio.FIRST_COMPLETED)
                if feeder.done() and feeder.exception() is not None:
                    raise feeder.exception()
                if not pending.done():
                    continue
                messages, pending = pending.result(), None
                for msg in messages:
                    for index in msg.dropped_frame_indices:
                        arrivals.pop(index, None)
                    drops = [msg.input_frames_dropped, msg.output_frames_dropped]
                    if isinstance(msg, StreamSummary):
                        yield StreamEnded(msg, 1000.0 * (self.clock() - received))
                        return
                    latency_ms = 1000.0 * (self.clock() - arrivals.pop(msg.frame_index, received))
                    if self.metrics:
                        self.metrics.frame(state.replica.expert, msg, settings.cfg_type.value, latency_ms)
                    yield FrameOut(msg, latency_ms)
        finally:
            if self.metrics:
                self.metrics.dropped(state.replica.expert, *drops)
            feeder.cancel()
            if pending is not None:
                pending.cancel()
            try:
                ray.cancel(outputs)
            except Exception:  # noqa: BLE001 - close_session (the caller's finally) frees the session
                pass

    async def _feed(self, state: ReplicaState, session_id: str, frames: AsyncIterator[ImageData],
                    arrivals: dict[int, float]) -> None:
        """Push each frame as it arrives (awaited: a bad frame fails the stream now), then end."""
        actor = state.replica.actor
        index = 0
        gw = self.gateway.gw
        limit = RateLimit(gw.max_stream_fps, gw.stream_frame_burst, self.clock)
        async for image in frames:
            if not limit.take():
                raise InvalidRequest(f"frames arrive faster than this server's limit of {gw.max_stream_fps:g} per "
                                     f"second (bursts of {gw.stream_frame_burst}); pace them")
            arrivals[index] = self.clock()
            await _ray_call(state, actor.push_frame.remote(session_id, index, image))
            index += 1
        await _ray_call(state, actor.end_input.remote(session_id))

    async def _next(self, outputs, state: ReplicaState) -> list:
        try:
            ref = await outputs.__anext__()
        except StopAsyncIteration:
            raise ExpertUnavailable(
                f"image expert {state.replica.expert}/{state.replica.index} ended the stream without a summary"
            ) from None
        except RayError as exc:
            raise _unavailable(state, exc) from None
        return await _ray_call(state, ref)

    # -- text to image --------------------------------------------------------------------------
    async def generate(self, req: ImageRequest) -> ImageAnswer:
        received = self.clock()
        expert = "none"
        gw = self.gateway
        tenant, priority, plan, ticket = self._admit("image", req)
        call = ImageJobCall(uuid.uuid4().hex, req.params, priority, tenant, req.deadline_unix_s)
        try:
            state, result = await self._place(plan, "generate_image", call)
            expert = state.replica.expert
        except BaseException as exc:
            gw.requests_failed += 1
            self._count("image", expert, exc)
            for cand in plan.ranked:  # a cancelled call must not keep a replica busy
                gw.states[cand.key].replica.actor.abort.remote(call.request_id)
            raise
        finally:
            gw.admission.release(ticket)
        self._count("image", expert, None)
        if self.metrics:
            self.metrics.image(expert, result)
        return ImageAnswer(req.request_id or call.request_id, expert, state.replica.index, result,
                           1000.0 * (self.clock() - received), plan)

    # -- metrics --------------------------------------------------------------------------------
    def _count(self, kind: str, expert: str, exc: BaseException | None) -> None:
        if self.metrics:
            self.metrics.request(kind, expert, exc)


async def _ray_call(state: ReplicaState, ref):
    """Await an actor call, turning Ray's failures into domain errors (domain errors raised in
    the actor arrive as themselves)."""
    try:
        return await ref
    except WattserveError:
        raise
    except asyncio.CancelledError:
        ray.cancel(ref)
        raise
    except RayError as exc:
        raise _unavailable(state, exc) from None


def _unavailable(state: ReplicaState, exc: BaseException) -> ExpertUnavailable:
    r = state.replica
    if isinstance(exc, RayActorError):
        state.healthy = False
        return ExpertUnavailable(f"image expert {r.expert}/{r.index} died ({type(exc).__name__}); retry")
    return ExpertUnavailable(f"image expert {r.expert}/{r.index} failed: {str(exc).strip().splitlines()[-1][:300]}")
