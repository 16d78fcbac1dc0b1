"""The diffusion loop: one thread that owns the model and the device, and serves every open stream
session (one Stream Batch step each, round robin) and every text-to-image job.

Other threads only open/close sessions, push frames into their queues and submit/cancel jobs;
sessions are set up (prompt encoding, noise) on this thread, so the networks are only ever
called here. A failure inside the networks is fatal, as in the LLM engine loop: every session
and job gets EngineDead and ``on_fatal`` lets the actor exit so Ray restarts it.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace

import numpy as np

from wattserve.errors import DeadlineExceeded, EngineDead, QueueFull, RequestAborted, WattserveError
from wattserve.images import ImageExpertStats, ImageJobCall, StreamSettings
from wattserve.specs import DiffusionEngineSpec
from wattserve.types import EnergyTotals
from workers.devices.base import Device
from workers.diffusion.metering import FlopEstimator, Meter
from workers.diffusion.schedule import LcmSchedule
from workers.diffusion.session import SessionTotals, StreamSession
from workers.diffusion.stream import Guidance, StreamBatch, make_noise
from workers.energy import EnergyLedger

log = logging.getLogger(__name__)

IDLE_TICK_S = 0.5  # how often idle energy is booked (and idle sessions reaped) while nothing runs
EWMA_ALPHA = 0.2


@dataclass(slots=True)
class JobOutcome:
    pixels: np.ndarray
    energy_j: float
    unet_calls: int
    unet_evaluations: int
    latency_ms: float
    settings: StreamSettings


@dataclass(slots=True)
class ImageJob:
    """A text-to-image request; ``done`` gets a JobOutcome or the exception that ended it."""

    call: ImageJobCall
    settings: StreamSettings
    done: Callable[[JobOutcome | BaseException], None]
    arrival_s: float
    deadline_s: float | None = None
    cancelled: bool = False


@dataclass(slots=True)
class _Opening:
    session: StreamSession
    on_ready: Callable[[BaseException | None], None]


@dataclass(slots=True)
class _Counters:
    retired: SessionTotals = field(default_factory=SessionTotals)  # of sessions already released
    input_dropped: int = 0
    output_dropped: int = 0
    images_generated: int = 0
    ms_per_step: float | None = None
    j_per_frame: float | None = None
    evaluations_by_cfg: dict[str, int] = field(default_factory=dict)


class DiffusionLoop:
    def __init__(self, model, device: Device, engine: DiffusionEngineSpec, *,
                 clock: Callable[[], float] = time.monotonic, wall_clock: Callable[[], float] = time.time,
                 on_fatal: Callable[[BaseException], None] | None = None) -> None:
        self.model = model
        self.device = device
        self.engine = engine
        self.clock = clock
        self.wall_clock = wall_clock
        self.on_fatal = on_fatal
        self.ledger = EnergyLedger(device.energy_source)
        self._lock = threading.Lock()
        self.meter = Meter(device, self.ledger, self._lock, model.synchronize, model.params,
                           FlopEstimator(model) if device.models_step_work else None)
        self._wake = threading.Event()
        self._opening: list[_Opening] = []
        self._sessions: dict[str, StreamSession] = {}
        self._jobs: deque[ImageJob] = deque()
        self._counters = _Counters()
        self._current: ImageJob | None = None  # the job the loop thread is running
        self._dead = ""
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="diffusion-loop", daemon=True)

    # -- called from other threads --------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def wake(self) -> None:
        self._wake.set()

    def _admit(self, what: str) -> None:
        if self._dead:
            raise EngineDead(f"diffusion loop stopped: {self._dead}")
        used = len(self._sessions) + len(self._opening) + len(self._jobs)
        if used >= self.engine.max_sessions:
            raise QueueFull(
                f"image expert is serving {used} streams/images (max_sessions {self.engine.max_sessions}); "
                f"cannot start this {what}, retry shortly", retry_after_ms=500,
            )

    def open_session(self, session: StreamSession, on_ready: Callable[[BaseException | None], None]) -> None:
        """Queue ``session`` for set-up; ``on_ready`` runs on the loop thread when it is ready (None)
        or failed (the exception). Raises QueueFull when max_sessions are in use."""
        with self._lock:
            self._admit("stream")
            if session.id in self._sessions or any(o.session.id == session.id for o in self._opening):
                raise WattserveError(f"session id {session.id!r} is already open")
            self._opening.append(_Opening(session, on_ready))
        self._wake.set()

    def session(self, session_id: str) -> StreamSession | None:
        with self._lock:
            return self._sessions.get(session_id)

    def close_session(self, session_id: str) -> None:
        """Release a session at the next step boundary (idempotent)."""
        with self._lock:
            session = self._sessions.get(session_id)
            for o in self._opening:
                if o.session.id == session_id:
                    session = o.session
        if session is not None:
            session.close()
            self._wake.set()

    def submit_job(self, job: ImageJob) -> None:
        with self._lock:
            self._admit("image request")
            self._jobs.append(job)
        self._wake.set()

    def cancel_job(self, request_id: str) -> None:
        with self._lock:
            for job in self._jobs:
                if job.call.request_id == request_id:
                    job.cancelled = True
        self._running_job_cancel(request_id)

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    @property
    def dead(self) -> str:
        return self._dead

    def energy(self) -> EnergyTotals:
        with self._lock:
            return self.ledger.totals()

    def load(self) -> tuple[int, int]:
        """(sessions and jobs being served, frames and jobs waiting)."""
        with self._lock:
            sessions = list(self._sessions.values())
            return len(sessions) + len(self._opening) + (self._current is not None), (
                sum(len(s.input) for s in sessions) + len(self._jobs))

    def stats(self) -> ImageExpertStats:
        with self._lock:
            sessions = list(self._sessions.values())
            c = self._counters
            live = [s.totals for s in sessions]
            return ImageExpertStats(
                sessions_open=len(sessions) + len(self._opening),
                max_sessions=self.engine.max_sessions,
                frames_processed=c.retired.frames_processed + sum(t.frames_processed for t in live),
                frames_skipped=c.retired.frames_skipped + sum(t.frames_skipped for t in live),
                input_frames_dropped=c.input_dropped + sum(s.input.dropped for s in sessions),
                output_frames_dropped=c.output_dropped + sum(s.output.dropped for s in sessions),
                images_generated=c.images_generated,
                unet_calls=self.model.counters.calls,
                unet_evaluations=self.model.counters.evaluations,
                ms_per_step=c.ms_per_step,
                j_per_frame=c.j_per_frame,
                evaluations_by_cfg=dict(c.evaluations_by_cfg),
            )

    # -- the loop thread ------------------------------------------------------------------------
    def _running_job_cancel(self, request_id: str) -> None:
        job = self._current
        if job is not None and job.call.request_id == request_id:
            job.cancelled = True

    def _run(self) -> None:
        try:
            while not self._stop:
                self._set_up_new()
                self._reap()
                worked = self._serve_sessions()
                job = self._next_job()
                if job is not None:
                    self._run_job(job)
                    worked = True
                if not worked:
                    self._wake.wait(IDLE_TICK_S)
                    self._wake.clear()
                    self.meter.idle()
        except BaseException as exc:  # noqa: BLE001 - a failed network ends every session and job
            log.exception("diffusion loop failed")
            self._fail_all(exc)
            if self.on_fatal:
                self.on_fatal(exc)

    def _set_up_new(self) -> None:
        with self._lock:
            opening, self._opening = self._opening, []
        for o in opening:
            if o.session.closed:
                o.on_ready(RequestAborted("stream closed before it was set up"))
                continue
            try:
                o.session.setup(self.meter)
            except WattserveError as exc:
                o.on_ready(exc)
                continue
            except BaseException:
                o.on_ready(EngineDead("the image expert failed while setting up this stream"))
                raise
            with self._lock:
                self._sessions[o.session.id] = o.session
            o.on_ready(None)

    def _reap(self) -> None:
        now = self.clock()
        for session in list(self._sessions.values()):
            if not session.closed and now - session.last_activity_s > self.engine.session_idle_timeout_s:
                log.info("closing stream %s: idle for %.0f s", session.id, now - session.last_activity_s)
                session.error = RequestAborted(
                    f"stream closed: nothing pushed or read for {self.engine.session_idle_timeout_s:g} s")
                session.close()
            if session.closed:
                session.release(self.meter)
                with self._lock:
                    del self._sessions[session.id]
                    self._retire(session)

    def _retire(self, session: StreamSession) -> None:
        c, t = self._counters, session.totals
        c.retired.frames_processed += t.frames_processed
        c.retired.frames_skipped += t.frames_skipped
        c.input_dropped += session.input.dropped
        c.output_dropped += session.output.dropped

    def _serve_sessions(self) -> bool:
        worked = False
        for session in list(self._sessions.values()):
            if not session.has_work():
                continue
            before = (session.totals.unet_evaluations, session.totals.frames_processed, session.totals.energy_j)
            start = self.clock()
            session.step(self.meter)
            self._observe(session, before, self.clock() - start)
            worked = True
        return worked

    def _observe(self, session: StreamSession, before: tuple[int, int, float], elapsed_s: float) -> None:
        t, c = session.totals, self._counters
        evaluations = t.unet_evaluations - before[0]
        if not evaluations:
            return
        cfg = session.settings.cfg_type.value
        frames = t.frames_processed - before[1]
        with self._lock:
            c.evaluations_by_cfg[cfg] = c.evaluations_by_cfg.get(cfg, 0) + evaluations
            c.ms_per_step = _ewma(c.ms_per_step, 1000.0 * elapsed_s)
            if frames:
                # energy_j also holds skipped frames' (tiny) costs; close enough for a profile
                c.j_per_frame = _ewma(c.j_per_frame, (t.energy_j - before[2]) / frames)

    def _next_job(self) -> ImageJob | None:
        with self._lock:
            job = self._jobs.popleft() if self._jobs else None
            self._current = job
            return job

    def _run_job(self, job: ImageJob) -> None:
        try:
            job.done(self._generate(job))
        except WattserveError as exc:
            self.meter.close(f"job/{job.call.request_id}")
            job.done(exc)
        finally:
            with self._lock:
                self._current = None

    def _check_job(self, job: ImageJob) -> None:
        if job.cancelled:
            raise RequestAborted("image request cancelled")
        if job.deadline_s is not None and self.clock() > job.deadline_s:
            raise DeadlineExceeded("image request passed its deadline inside the expert")

    def _generate(self, job: ImageJob) -> JobOutcome:
        """Text-to-image: n steps of one slot (sequential denoising), then a decode."""
        s, m, key = job.settings, self.model, f"job/{job.call.request_id}"
        self._check_job(job)
        schedule = LcmSchedule(m.scheduler, s.t_index_list, self.engine.schedule_steps, m.prediction_type,
                               m.device, m.dtype)
        negative = s.cfg_type.value in ("full", "initialize")
        shape = m.latent_shape(s.width, s.height)

        def build() -> StreamBatch:
            cond = m.encode_prompt(job.call.params.prompt)
            uncond = m.encode_prompt(job.call.params.negative_prompt) if negative else None
            noise = make_noise(schedule.steps, 1, shape, s.seed, m.device, m.dtype)
            return StreamBatch(m.unet, schedule, Guidance(s.cfg_type, s.guidance_scale, s.delta), noise, cond, uncond)

        batch, _ = self.meter.run({key: 1}, build, flops=lambda f: f.text() * (1 + negative))
        batch.admit([(key, None)])
        finished = []
        while batch.in_flight():
            self._check_job(job)
            rows = sum(batch.rows_by_key().values())
            finished, _ = self.meter.run({key: rows}, batch.step, flops=lambda f, r=rows: f.unet_row(shape) * r, items=rows)
        latents = finished[0][1][None]
        images, _ = self.meter.run({key: 1}, lambda: m.decode_latents(latents), flops=lambda f: f.decode(shape))
        with self._lock:
            self._counters.images_generated += 1
            cfg = s.cfg_type.value
            self._counters.evaluations_by_cfg[cfg] = self._counters.evaluations_by_cfg.get(cfg, 0) + batch.evaluations
        return JobOutcome(
            pixels=images[0], energy_j=self.meter.close(key), unet_calls=batch.calls,
            unet_evaluations=batch.evaluations, latency_ms=1000.0 * (self.clock() - job.arrival_s),
            settings=replace(s, timesteps=schedule.timesteps),
        )

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            self._dead = f"{type(exc).__name__}: {exc}"
            sessions = list(self._sessions.values()) + [o.session for o in self._opening]
            jobs = list(self._jobs) + ([self._current] if self._current else [])
            self._sessions.clear()
            self._opening.clear()
            self._jobs.clear()
        error = EngineDead(f"the image expert failed ({self._dead})")
        for session in sessions:
            session.error = error
            session.close()
        for job in jobs:
            job.done(error)


def _ewma(old: float | None, new: float) -> float:
    return new if old is None else (1 - EWMA_ALPHA) * old + EWMA_ALPHA * new
