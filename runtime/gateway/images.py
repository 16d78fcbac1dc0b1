"""Image requests: place on an image expert -> stream frames in and results out -> release.

Through the same lifecycle as text (``lifecycle.py``: validate, admit, drain, count, release);
the gRPC servicer turns protobuf into a :class:`~runtime.gateway.request.Request` (kind ``image``
or ``image_stream``) and an async iterator of :class:`~wattserve.images.ImageData` frames, and
the events yielded here back into protobuf. Image requests go only to image experts (text
requests only to text experts); among them the least loaded replica is chosen, because the text
router's cost and quality models describe LLM experts.

A stream is a session on one replica: ``open_session``, then ``push_frame`` per frame (awaited,
so a bad frame fails the stream at once) concurrently with the replica's ``stream_outputs``,
and ``close_session`` on every exit path (finish, error, client cancel).
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass

from router.base import Plan, RequestFeatures
from router.policies import make_policy
from wattserve.errors import InvalidRequest, NoHealthyExpert
from wattserve.images import (
    FrameResult,
    ImageData,
    ImageJobCall,
    ImageResult,
    ImageStreamCall,
    StreamSettings,
    StreamSummary,
)

from ..admission import RateLimit
from ..image_metrics import ImageMetrics
from .lifecycle import Call, Lifecycle
from .replicas import Lease
from .request import Request, engine_deadline

log = logging.getLogger(__name__)


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


class _ImageRecorder:
    """The lifecycle's record of an image request, in the image series (``image_metrics.py``)."""

    __slots__ = ("metrics", "kind", "expert")

    def __init__(self, metrics: ImageMetrics | None, kind: str) -> None:
        self.metrics, self.kind, self.expert = metrics, kind, "none"

    def routed(self, expert: str) -> None:
        self.expert = expert

    def failed(self, exc: BaseException) -> None:
        if self.metrics:
            self.metrics.request(self.kind, self.expert, exc)

    def succeeded(self) -> None:
        if self.metrics:
            self.metrics.request(self.kind, self.expert, None)


class Images:
    def __init__(self, lifecycle: Lifecycle, metrics: ImageMetrics | None, *, max_stream_fps: float,
                 stream_frame_burst: int) -> None:
        self.lifecycle = lifecycle
        self.metrics = metrics
        self.policy = make_policy("least_loaded")
        self.clock = lifecycle.clock
        self.max_stream_fps = max_stream_fps
        self.stream_frame_burst = stream_frame_burst

    def _plan(self, call: Call) -> Plan:
        candidates = self.lifecycle.replicas.candidates("image")
        if not candidates:
            raise NoHealthyExpert("this server has no image experts (configure an expert with engine kind diffusion)")
        req = call.request
        features = RequestFeatures(prompt_chars=len(req.text), max_tokens=0, priority=req.priority,
                                   tenant=req.tenant, expert=req.expert or None)
        return self.policy.plan(features, candidates)

    async def _place(self, call: Call, plan: Plan, start) -> tuple[Lease, object]:
        lease, result = await self.lifecycle.replicas.dispatch(plan.ranked, start, what="image expert",
                                                               retry_after_ms=500)
        call.recorder.routed(lease.client.expert)
        return lease, result

    # -- streams --------------------------------------------------------------------------------
    async def stream(self, request: Request, frames: AsyncIterator[ImageData]
                     ) -> AsyncIterator[StreamStarted | FrameOut | StreamEnded]:
        """Serve one stream. Raises domain errors; whichever way the caller leaves, the expert's
        session is closed."""
        rec = _ImageRecorder(self.metrics, "stream")
        async with self.lifecycle.call(request, rec) as call:
            req = call.request
            plan = self._plan(call)
            session_id = uuid.uuid4().hex
            engine_call = ImageStreamCall(session_id, req.image, req.similarity, req.frame_buffer_size, req.priority,
                                          req.tenant)
            lease, settings = await self._place(call, plan, lambda client: client.open_session(engine_call))
            client = lease.client
            try:
                if self.metrics:
                    self.metrics.started(client.expert, settings.energy_source, settings.setup_energy_j)
                yield StreamStarted(req.request_id or session_id, client.expert, client.index, settings, plan)
                async for event in self._run(call, lease, session_id, frames, settings):
                    yield event
                rec.succeeded()
                call.done = True
            finally:
                lease.release()
                client.close_session(session_id)

    async def _run(self, call: Call, lease: Lease, session_id: str, frames: AsyncIterator[ImageData],
                   settings: StreamSettings) -> AsyncIterator[FrameOut | StreamEnded]:
        client, replicas = lease.client, self.lifecycle.replicas
        arrivals: dict[int, float] = {}
        outputs = client.stream_outputs(session_id)
        feeder = asyncio.create_task(self._feed(lease, session_id, frames, arrivals), name=f"feed-{session_id}")
        pending: asyncio.Future | None = None
        drops = [0, 0]  # the stream's last reported input / output drop totals
        try:
            while True:
                pending = pending or asyncio.ensure_future(replicas.watch(lease.state, outputs.next()))
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
                        yield StreamEnded(msg, call.elapsed_ms())
                        return
                    latency_ms = 1000.0 * (self.clock() - arrivals.pop(msg.frame_index, call.received_s))
                    if self.metrics:
                        self.metrics.frame(client.expert, msg, settings.cfg_type.value, latency_ms)
                    yield FrameOut(msg, latency_ms)
        finally:
            if self.metrics:
                self.metrics.dropped(client.expert, *drops)
            feeder.cancel()
            if pending is not None:
                pending.cancel()
            outputs.cancel()  # close_session (the caller's) frees the session

    async def _feed(self, lease: Lease, session_id: str, frames: AsyncIterator[ImageData],
                    arrivals: dict[int, float]) -> None:
        """Push each frame as it arrives (awaited: a bad frame fails the stream now), then end."""
        client, replicas = lease.client, self.lifecycle.replicas
        index = 0
        limit = RateLimit(self.max_stream_fps, self.stream_frame_burst, self.clock)
        async for image in frames:
            if not limit.take():
                raise InvalidRequest(f"frames arrive faster than this server's limit of {self.max_stream_fps:g} per "
                                     f"second (bursts of {self.stream_frame_burst}); pace them")
            arrivals[index] = self.clock()
            await replicas.watch(lease.state, client.push_frame(session_id, index, image))
            index += 1
        await replicas.watch(lease.state, client.end_input(session_id))

    # -- text to image --------------------------------------------------------------------------
    async def generate(self, request: Request) -> ImageAnswer:
        rec = _ImageRecorder(self.metrics, "image")
        async with self.lifecycle.call(request, rec) as call:
            req = call.request
            plan = self._plan(call)
            engine_call = ImageJobCall(uuid.uuid4().hex, req.image, req.priority, req.tenant,
                                       engine_deadline(call.deadline_s, self.clock))

            async def start(client) -> ImageResult:
                try:
                    return await client.generate_image(engine_call)
                except asyncio.CancelledError:
                    client.abort(engine_call.request_id)  # a cancelled call must not keep a replica busy
                    raise

            lease, result = await self._place(call, plan, start)
            lease.release()
            rec.succeeded()
            call.done = True
        if self.metrics:
            self.metrics.image(lease.client.expert, result)
        return ImageAnswer(req.request_id or engine_call.request_id, lease.client.expert, lease.client.index, result,
                           call.elapsed_ms(), plan)
