"""The body of an image expert replica: a diffusion model + device + diffusion loop, with an async
API. The sibling of :class:`workers.expert.ExpertWorker` for ``engine: {kind: diffusion}``.

``runtime/cluster.py`` turns this class into a Ray actor; nothing here imports Ray. A stream is
a session: :meth:`open_session` (validates, sets up, returns the settings), :meth:`push_frame`
per frame, :meth:`stream_outputs` (a streaming generator of results, ending with a summary once
:meth:`end_input` was called), and :meth:`close_session`, which the gateway calls on every exit
path; the session is also closed when the output generator is cancelled or goes idle.
Image bytes are decoded and encoded here, in worker threads, never on the diffusion loop.
"""

from __future__ import annotations

import asyncio
import logging
import os
import socket
import threading
from collections.abc import AsyncIterator

from wattserve.errors import InvalidRequest, RequestAborted
from wattserve.images import (
    FrameResult,
    ImageData,
    ImageExpertStats,
    ImageJobCall,
    ImageResult,
    ImageStreamCall,
    StreamSettings,
    StreamSummary,
)
from wattserve.specs import DiffusionEngineSpec, ExpertSpec
from wattserve.types import ExpertProfile

from ..devices import open_device
from ..governed import GovernedDevice
from .components import DiffusionModel
from .images import decode_image, encode_image
from .loop import DiffusionLoop, ImageJob, JobOutcome
from .session import RawResult, RawSummary, StreamSession
from .settings import resolve_settings

log = logging.getLogger(__name__)

EXIT_DELAY_S = 1.0
MAX_RESULTS_PER_MESSAGE = 8


class ImageExpertWorker(GovernedDevice):
    """One replica of one image expert. Construction loads the model and starts the loop."""

    def __init__(self, spec: ExpertSpec, replica: int, cache_dir: str = "", exit_on_failure: bool = True) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        if not isinstance(spec.engine, DiffusionEngineSpec):
            raise TypeError(f"expert {spec.name!r} is not a diffusion expert")
        self.spec = spec
        self.engine: DiffusionEngineSpec = spec.engine
        self.replica = replica
        self.exit_on_failure = exit_on_failure
        self.model = DiffusionModel(spec.model.path, self.engine, label=spec.model_label)
        self.device = open_device(spec.device, model_params=self.model.params)
        self.loop = DiffusionLoop(self.model, self.device, self.engine, on_fatal=self._on_fatal)
        self.loop.start()
        self._init_governed()
        log.info("image expert %s/%d ready: %s on %s (%s), %d params", spec.name, replica, self.model.label,
                 self.model.device, self.device.energy_source, self.model.params)

    async def ready(self) -> bool:
        return True

    # -- streams --------------------------------------------------------------------------------
    async def open_session(self, call: ImageStreamCall) -> StreamSettings:
        """Validate and set up a stream; returns what it runs with. InvalidRequest, QueueFull."""
        self.note_priority(call.priority)
        settings = resolve_settings(call.params, self.engine, self.model, similarity=call.similarity,
                                    frame_buffer_size=call.frame_buffer_size, energy_source=self.device.energy_source)
        session = StreamSession(call, settings, self.model, input_queue_frames=self.engine.input_queue_frames,
                                output_queue_frames=self.engine.output_queue_frames,
                                schedule_steps=self.engine.schedule_steps, stream_batch=self.engine.stream_batch,
                                wake_loop=self.loop.wake)
        loop = asyncio.get_running_loop()
        ready: asyncio.Future = loop.create_future()

        def on_ready(exc: BaseException | None) -> None:
            loop.call_soon_threadsafe(_resolve, ready, exc)

        self.loop.open_session(session, on_ready)
        try:
            await ready
        except BaseException:
            self.loop.close_session(call.session_id)
            raise
        return session.settings

    def _session(self, session_id: str) -> StreamSession:
        session = self.loop.session(session_id)
        if session is None or (session.closed and session.error is None):
            raise RequestAborted(f"stream {session_id} is not open on this replica (closed, idle or restarted)")
        if session.error is not None:
            raise session.error
        return session

    async def push_frame(self, session_id: str, index: int, image: ImageData) -> None:
        """Decode a frame and queue it (the oldest waiting frame is dropped if the queue is full)."""
        session = self._session(session_id)
        if session.input_ended:
            raise InvalidRequest("frames were sent after the end of the input")
        s = session.settings
        pixels = await asyncio.to_thread(decode_image, image, s.width, s.height, self.engine.max_frame_bytes)
        session.push(index, pixels)

    async def end_input(self, session_id: str) -> None:
        """No more frames: flush the frames in flight, then the output stream ends with a summary."""
        self._session(session_id).end_input()

    async def stream_outputs(self, session_id: str) -> AsyncIterator[list[FrameResult | StreamSummary]]:
        """Results as they are ready, a few per message; a StreamSummary ends the stream. Closing
        (or cancelling) this generator closes the session."""
        session = self._session(session_id)
        loop = asyncio.get_running_loop()
        ready = asyncio.Event()
        session.notify_reader = _threadsafe_set(loop, ready)
        ready.set()  # results may already be waiting
        try:
            while True:
                await ready.wait()
                ready.clear()
                if session.error is not None:
                    raise session.error
                if session.closed:
                    raise RequestAborted(f"stream {session_id} was closed")
                items = session.output.take(MAX_RESULTS_PER_MESSAGE)
                if not items:
                    continue
                session.touch()
                if len(session.output):
                    ready.set()  # more than one message's worth is waiting
                messages = await asyncio.to_thread(self._encode, session, items)
                yield messages
                if isinstance(messages[-1], StreamSummary):
                    return
        finally:
            self.loop.close_session(session_id)

    def _encode(self, session: StreamSession, items: list[RawResult | RawSummary]) -> list[FrameResult | StreamSummary]:
        s, source = session.settings, self.device.energy_source
        quality = session.call.params.jpeg_quality or 90
        out: list[FrameResult | StreamSummary] = []
        for item in items:
            dropped = session.take_dropped()
            if isinstance(item, RawSummary):
                t = item.totals
                out.append(StreamSummary(
                    frames_received=t.frames_received, frames_processed=t.frames_processed,
                    frames_skipped=t.frames_skipped, input_frames_dropped=session.input.dropped,
                    output_frames_dropped=session.output.dropped, unet_calls=t.unet_calls,
                    unet_evaluations=t.unet_evaluations, energy_j=t.energy_j, setup_energy_j=t.setup_energy_j,
                    energy_saved_j=t.energy_saved_j, energy_source=source, dropped_frame_indices=dropped,
                ))
                continue
            out.append(FrameResult(
                frame_index=item.frame_index, source_frame_index=item.source_frame_index, skipped=item.skipped,
                image=encode_image(item.pixels, s.output_format, quality),
                expert_latency_ms=item.expert_latency_ms, energy_j=item.energy_j, energy_source=source,
                energy_saved_j=item.energy_saved_j, unet_evaluations=item.unet_evaluations,
                similarity=item.similarity, input_frames_dropped=session.input.dropped,
                output_frames_dropped=session.output.dropped, dropped_frame_indices=dropped,
            ))
        return out

    async def close_session(self, session_id: str) -> None:
        self.loop.close_session(session_id)

    # -- text to image --------------------------------------------------------------------------
    async def generate_image(self, call: ImageJobCall) -> ImageResult:
        """One text-to-image request (n sequential steps of one latent). Cancelling the call
        stops the work at the next step."""
        self.note_priority(call.priority)
        settings = resolve_settings(call.params, self.engine, self.model, energy_source=self.device.energy_source)
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        now = self.loop.clock()
        deadline = None if call.deadline_unix_s is None else now + (call.deadline_unix_s - self.loop.wall_clock())
        job = ImageJob(call, settings, lambda r: loop.call_soon_threadsafe(_resolve_value, done, r), now, deadline)
        self.loop.submit_job(job)
        try:
            outcome: JobOutcome = await done
        except BaseException:
            self.loop.cancel_job(call.request_id)
            raise
        image = await asyncio.to_thread(encode_image, outcome.pixels, settings.output_format,
                                        call.params.jpeg_quality or 90)
        return ImageResult(
            request_id=call.request_id, image=image, latency_ms=outcome.latency_ms, energy_j=outcome.energy_j,
            energy_source=self.device.energy_source, unet_calls=outcome.unet_calls,
            unet_evaluations=outcome.unet_evaluations, settings=outcome.settings,
        )

    async def abort(self, request_id: str) -> None:
        """Stop whatever ``request_id`` names: a text-to-image job or a stream session."""
        self.loop.cancel_job(request_id)
        self.loop.close_session(request_id)

    # -- telemetry ------------------------------------------------------------------------------
    async def stats(self) -> ImageExpertStats:
        return self.loop.stats()

    async def profile(self) -> ExpertProfile:
        power_w, limit_w, clock, max_clock = await asyncio.to_thread(self._device_telemetry)
        running, waiting = self.loop.load()
        stats = self.loop.stats()
        return ExpertProfile(
            expert=self.spec.name, replica=self.replica, model=self.model.label, engine="diffusion",
            device=self.device.name, energy_source=self.device.energy_source,
            priority_class=self.spec.priority_class, max_batch=self.engine.max_sessions,
            max_queue=self.engine.input_queue_frames, max_model_len=self.model.max_prompt_tokens,
            params=self.model.params, healthy=not self.loop.dead, running=running, waiting=waiting,
            energy=self.loop.energy(), requests_finished=stats.frames_processed + stats.images_generated,
            error=self.loop.dead, host=socket.gethostname(), pid=os.getpid(), power_w=power_w,
            power_limit_w=limit_w, sm_clock_mhz=clock, max_sm_clock_mhz=max_clock, image=stats,
        )

    def _device_telemetry(self) -> tuple[float | None, ...]:
        d = self.device
        return d.power_w(), d.power_limit_w(), d.sm_clock_mhz(), d.max_sm_clock_mhz()

    def shutdown(self) -> None:
        self.loop.stop()
        self.device.close()

    def _on_fatal(self, exc: BaseException) -> None:
        if not self.exit_on_failure:
            return
        log.error("image expert %s/%d failed (%s); exiting for a restart", self.spec.name, self.replica, exc)
        threading.Timer(EXIT_DELAY_S, os._exit, args=(1,)).start()


def _threadsafe_set(loop: asyncio.AbstractEventLoop, event: asyncio.Event):
    """A callable any thread may call to set ``event`` (a no-op once the event loop is closed)."""
    def notify() -> None:
        try:
            loop.call_soon_threadsafe(event.set)
        except RuntimeError:  # the actor is shutting down
            pass
    return notify


def _resolve(fut: asyncio.Future, exc: BaseException | None) -> None:
    if fut.done():
        return
    if exc is None:
        fut.set_result(None)
    else:
        fut.set_exception(exc)


def _resolve_value(fut: asyncio.Future, value) -> None:
    if fut.done():
        return
    if isinstance(value, BaseException):
        fut.set_exception(value)
    else:
        fut.set_result(value)
