"""One client stream on an image expert: input queue -> similarity filter -> VAE encode ->
Stream Batch -> VAE decode -> output queue, with every frame's energy metered.

Threads: the actor's event loop calls :meth:`StreamSession.push`, :meth:`end_input`,
:meth:`close` and reads :attr:`output`; the diffusion loop thread calls :meth:`setup` once and
then :meth:`step` whenever :meth:`has_work`. The queues are the only shared state (each has its
own lock); counters written by the loop thread are read for reporting only.

Order of results: a processed frame's image leaves with the (n-1)-th step after the one that
admitted it; a skipped frame is answered at once with the last image that left (the previous
output), so its answer can overtake frames still in flight. ``source_frame_index`` says whose
image each answer carries. A step whose frames were all skipped still advances the slots in
flight (same rows, fewer per call), so their latency stays bounded in a static scene. When the input ends, the frames in flight are flushed (steps with no
new frame) and a summary closes the stream.
"""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, replace

import numpy as np
import torch

from wattserve.images import CfgType, ImageStreamCall, StreamSettings
from workers.diffusion.metering import Meter
from workers.diffusion.queues import DropOldestQueue
from workers.diffusion.schedule import LcmSchedule
from workers.diffusion.similarity import SimilarityFilter
from workers.diffusion.stream import Guidance, StreamBatch, make_noise

#: weight of the newest processed frame in the estimate of what a skipped frame saved
SAVED_EWMA_ALPHA = 0.2


@dataclass(slots=True)
class InputFrame:
    index: int
    pixels: np.ndarray  # H x W x 3 uint8
    queued_s: float


@dataclass(slots=True)
class RawResult:
    """A frame's answer before its image is encoded (the reader encodes, off the loop thread)."""

    frame_index: int
    source_frame_index: int
    skipped: bool
    pixels: np.ndarray
    expert_latency_ms: float
    energy_j: float
    energy_saved_j: float = 0.0
    unet_evaluations: int = 0
    similarity: float | None = None


@dataclass(slots=True)
class SessionTotals:
    frames_received: int = 0
    frames_processed: int = 0
    frames_skipped: int = 0
    unet_calls: int = 0
    unet_evaluations: int = 0
    energy_j: float = 0.0
    setup_energy_j: float = 0.0
    energy_saved_j: float = 0.0


@dataclass(slots=True)
class _InFlight:
    queued_s: float
    similarity: float | None


@dataclass(slots=True)
class RawSummary:
    """The end of the stream; drop counts are read when it is sent (a full output queue may
    still drop results after it was queued)."""

    totals: SessionTotals


class StreamSession:
    def __init__(self, call: ImageStreamCall, settings: StreamSettings, model, *, input_queue_frames: int,
                 output_queue_frames: int, schedule_steps: int, stream_batch: bool = True,
                 clock: Callable[[], float] = time.monotonic, wake_loop: Callable[[], None] = lambda: None) -> None:
        self.id = call.session_id
        self.call = call
        self.settings = settings
        self.model = model
        self.schedule_steps = schedule_steps
        self.stream_batch = stream_batch  # False: each frame is denoised fully before the next
        self.clock = clock
        self.notify_reader: Callable[[], None] = lambda: None  # set by the reader when it attaches
        self.wake_loop = wake_loop
        self.input: DropOldestQueue[InputFrame] = DropOldestQueue(input_queue_frames, on_put=wake_loop)
        self.output: DropOldestQueue[RawResult | RawSummary] = DropOldestQueue(
            output_queue_frames, on_put=lambda: self.notify_reader())
        self.totals = SessionTotals()
        self.last_activity_s = clock()
        self.input_ended = False
        self.closed = False
        self.finished = False  # the summary was queued
        self.error: BaseException | None = None
        self.batch: StreamBatch | None = None
        self.filter: SimilarityFilter | None = None
        self._lock = threading.Lock()
        self._dropped: list[int] = []
        self._in_flight: dict[int, _InFlight] = {}
        self._last_output: tuple[int, np.ndarray] | None = None
        self._pixels_in: list[torch.Tensor] = []
        self._processed_j_ewma: float | None = None

    # -- the actor's side ---------------------------------------------------------------------
    def push(self, index: int, pixels: np.ndarray) -> None:
        """Queue a frame; the oldest waiting frame is dropped (and reported) if the queue is full."""
        self.last_activity_s = self.clock()
        self.totals.frames_received += 1
        dropped = self.input.put(InputFrame(index, pixels, self.clock()))
        if dropped is not None:
            with self._lock:
                self._dropped.append(dropped.index)

    def end_input(self) -> None:
        self.input_ended = True
        self.wake_loop()  # to flush the frames in flight

    def close(self) -> None:
        self.closed = True
        self.notify_reader()

    def take_dropped(self) -> tuple[int, ...]:
        """Indices of frames that will get no answer, since the previous call."""
        with self._lock:
            dropped, self._dropped = self._dropped, []
        return tuple(dropped)

    def touch(self) -> None:
        self.last_activity_s = self.clock()

    # -- the loop thread's side ---------------------------------------------------------------
    def setup(self, meter: Meter) -> None:
        """Encode the prompts, draw the fixed noise, build the Stream Batch (one metered phase)."""
        s, m = self.settings, self.model
        schedule = LcmSchedule(m.scheduler, s.t_index_list, self.schedule_steps, m.prediction_type, m.device, m.dtype)
        needs_negative = s.cfg_type in (CfgType.FULL, CfgType.INITIALIZE)

        def build():
            cond = m.encode_prompt(self.call.params.prompt)
            uncond = m.encode_prompt(self.call.params.negative_prompt) if needs_negative else None
            noise = make_noise(schedule.steps, s.frame_buffer_size, m.latent_shape(s.width, s.height), s.seed,
                               m.device, m.dtype)
            return StreamBatch(m.unet, schedule, Guidance(s.cfg_type, s.guidance_scale, s.delta), noise, cond, uncond)

        key = f"{self.id}/setup"
        self.batch, _ = meter.run({key: 1}, build, flops=lambda f: f.text() * (1 + needs_negative))
        self.totals.setup_energy_j = meter.close(key)
        if s.similarity.enabled:
            self.filter = SimilarityFilter(s.similarity.threshold, s.similarity.max_skip_frames, random.Random(s.seed))
        self.settings = replace(s, timesteps=schedule.timesteps, setup_energy_j=self.totals.setup_energy_j)

    def has_work(self) -> bool:
        if self.closed or self.finished or self.batch is None:
            return False
        return len(self.input) > 0 or self.input_ended

    def step(self, meter: Meter) -> None:
        """One iteration: take up to frame_buffer_size frames, filter, encode, ONE UNet call over
        every slot, decode what finished. With no frame waiting after the input ended, flush.
        Without Stream Batch the frames taken are denoised to the end (n calls) instead."""
        frames = self.input.take(self.settings.frame_buffer_size)
        if frames:
            frames = self._filter(frames, meter)
        if not frames and not self.batch.in_flight():
            if self.input_ended and len(self.input) == 0:
                self._finish()
            return
        if frames:
            self._encode_and_admit(frames, meter)
        self._denoise_and_emit(meter)
        while not self.stream_batch and self.batch.in_flight():
            self._denoise_and_emit(meter)  # sequential: the remaining n-1 calls for these frames

    def _key(self, index: int) -> str:
        return f"{self.id}/{index}"

    def _filter(self, frames: list[InputFrame], meter: Meter) -> list[InputFrame]:
        """Preprocess (and, with the filter on, decide); answer skipped frames at once."""
        def decide():
            tensors = self.model.to_tensor([f.pixels for f in frames])
            if self.filter is None:
                return tensors, [None] * len(frames)
            return tensors, [self.filter.decide(t, can_skip=self._last_output is not None) for t in tensors]

        (tensors, decisions), _ = meter.run({self._key(f.index): 1 for f in frames}, decide)
        kept, self._pixels_in = [], []
        for frame, pixels, decision in zip(frames, tensors, decisions, strict=True):
            similarity = None if decision is None else decision.similarity
            if decision is not None and decision.skip:
                self._answer_skipped(frame, similarity, meter)
            else:
                kept.append(frame)
                self._pixels_in.append(pixels)
                self._in_flight[frame.index] = _InFlight(frame.queued_s, similarity)
        return kept

    def _answer_skipped(self, frame: InputFrame, similarity: float | None, meter: Meter) -> None:
        energy_j = meter.close(self._key(frame.index))
        saved = max(0.0, (self._processed_j_ewma or 0.0) - energy_j)
        source, pixels = self._last_output
        t = self.totals
        t.frames_skipped += 1
        t.energy_j += energy_j
        t.energy_saved_j += saved
        self._emit(RawResult(frame.index, source, True, pixels, 1000.0 * (self.clock() - frame.queued_s),
                             energy_j, energy_saved_j=saved, similarity=similarity))

    def _encode_and_admit(self, frames: list[InputFrame], meter: Meter) -> None:
        s, m = self.settings, self.model
        pixels = torch.stack(self._pixels_in)
        latents, _ = meter.run({self._key(f.index): 1 for f in frames}, lambda: m.encode_images(pixels),
                               flops=lambda fl: fl.encode(s.width, s.height) * len(frames), items=len(frames))
        self.batch.admit([(f.index, lat) for f, lat in zip(frames, latents, strict=True)])

    def _denoise_and_emit(self, meter: Meter) -> None:
        s, m = self.settings, self.model
        shape = m.latent_shape(s.width, s.height)
        rows = self.batch.rows_by_key()
        total_rows = sum(rows.values())
        finished, _ = meter.run({self._key(k): r for k, r in rows.items()}, self.batch.step,
                                flops=lambda fl: fl.unet_row(shape) * total_rows, items=total_rows)
        self.totals.unet_calls += 1
        self.totals.unet_evaluations += total_rows
        if not finished:
            return
        latents = torch.stack([d for _, d, _ in finished])
        images, _ = meter.run({self._key(k): 1 for k, _, _ in finished}, lambda: m.decode_latents(latents),
                              flops=lambda fl: fl.decode(shape) * len(finished), items=len(finished))
        now = self.clock()
        for (index, _, evaluations), pixels in zip(finished, images, strict=True):
            meta = self._in_flight.pop(index)
            energy_j = meter.close(self._key(index))
            self._processed_j_ewma = energy_j if self._processed_j_ewma is None else (
                (1 - SAVED_EWMA_ALPHA) * self._processed_j_ewma + SAVED_EWMA_ALPHA * energy_j)
            self.totals.frames_processed += 1
            self.totals.energy_j += energy_j
            self._last_output = (index, pixels)
            self._emit(RawResult(index, index, False, pixels, 1000.0 * (now - meta.queued_s), energy_j,
                                 unet_evaluations=evaluations, similarity=meta.similarity))

    def _emit(self, item: RawResult | RawSummary) -> None:
        dropped = self.output.put(item)
        if isinstance(dropped, RawResult):
            with self._lock:
                self._dropped.append(dropped.frame_index)

    def _finish(self) -> None:
        self.finished = True
        self.totals.energy_j += self.totals.setup_energy_j
        self._emit(RawSummary(self.totals))

    def release(self, meter: Meter) -> None:
        """Free the latents and stop tracking this session's energy keys (loop thread)."""
        for index in list(self._in_flight):
            meter.close(self._key(index))
        self._in_flight.clear()
        self.input.clear()
        if self.batch is not None:
            self.batch.clear()
        self._last_output = None
