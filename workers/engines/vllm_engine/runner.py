"""vLLM's AsyncLLM behind the same surface as the torch engine's loop (``workers/loop.py``).

The torch engine is synchronous and ``EngineLoop`` steps it; vLLM owns its scheduler, batching and
step loop (in an engine-core child process) and is driven through asyncio. :class:`VllmRunner`
is the adapter: one thread runs an event loop that owns the ``AsyncLLM`` (as the engine-loop
thread owns a torch engine), and the actor talks to it through the methods ``EngineLoop`` has —
``submit`` / ``submit_score`` / ``abort`` / ``snapshot`` — with the same sinks, errors, ledger and
profile. Per-step energy comes from :mod:`.metering`.

Threads: ``submit``, ``submit_score``, ``abort``, ``snapshot`` are called from the actor's event
loop; everything else runs on the runner's loop. Shared state (``_tracked``, the ledger, the
load) is guarded by ``_lock``.
"""

from __future__ import annotations

import asyncio
import collections
import concurrent.futures
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path

from wattserve.errors import EngineDead, ExpertUnavailable, InvalidRequest, QueueFull, WattserveError
from wattserve.specs import ExpertSpec, VllmEngineSpec
from wattserve.types import FinishReason, GenerateCall, RequestUsage, ScoreCall, StreamEvent

from ...devices.base import Device
from ...energy import EnergyLedger
from ...loop import LoopSnapshot, ScoreSink, Sink
from ...models import load_model_info
from ...profile import ProfileTracker
from ..base import EngineInfo
from . import settings
from .metering import StepMeter, stat_logger_factory, tap_outputs
from .prepare import Prepared, PreparedScoreJob, Tokenizing
from .scoring import run_score

log = logging.getLogger(__name__)

IDLE_TICK_S = 0.5  # how often idle energy is booked (and the engine's health checked) while idle
RECENT_FINISHES = 256  # vLLM's own finish reasons remembered for engine_state()


@dataclass(slots=True)
class _Request:
    prepared: Prepared
    sink: Sink
    arrival_s: float
    first_token_s: float | None = None
    completion_tokens: int = 0
    logprob_sum: float = 0.0
    abort_reason: FinishReason | None = None
    in_engine: bool = False  # generate() was called: vLLM may know the request
    timer: asyncio.TimerHandle | None = None
    task: asyncio.Task | None = field(default=None, repr=False)


class VllmRunner:
    """Owns one ``AsyncLLM``. Construction loads the tokenizer and starts nothing; :meth:`start`
    starts the engine in the background and :attr:`started` completes when it is up (or fails
    with :class:`EngineDead` naming why)."""

    def __init__(
        self,
        expert: ExpertSpec,
        model_dir: Path,
        open_device: Callable[[int], Device],
        *,
        on_fatal: Callable[[BaseException], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
    ) -> None:
        settings.require_vllm(expert.name)
        spec = expert.engine
        assert isinstance(spec, VllmEngineSpec)
        self.expert, self.spec, self.model_dir = expert, spec, Path(model_dir)
        model = load_model_info(model_dir)
        self.max_model_len = min(expert.max_model_len, model.max_position_embeddings or expert.max_model_len)
        self.info = EngineInfo(
            model=expert.model_label, engine="vllm", params=model.num_params or 0,
            max_model_len=self.max_model_len, max_batch=expert.max_batch, device="starting",
        )
        self.tokens = Tokenizing(model_dir, expert.name, self.max_model_len, spec.report_logprobs)
        self.device = open_device(self.info.params)
        self.capacity = expert.max_batch + expert.max_queue
        self.clock, self.wall_clock, self.on_fatal = clock, wall_clock, on_fatal
        self.ledger = EnergyLedger(self.device.energy_source)
        self.profile = ProfileTracker()
        self._lock = threading.Lock()
        self.meter = StepMeter(self.device, self.ledger, self.profile, self._lock)
        self.started: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self.llm = None
        self._tracked: dict[str, _Request] = {}
        self._scores: dict[str, int] = {}  # scoring job id -> vLLM requests it runs (one per choice)
        self._finished = 0
        self._dead = ""
        self._started_s = clock()
        self._recent: collections.deque[tuple[str, str]] = collections.deque(maxlen=RECENT_FINISHES)
        self._loop = asyncio.new_event_loop()
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=self._thread_main, name="vllm-runner", daemon=True)

    # -- called from other threads --------------------------------------------------------------
    def start(self) -> None:
        self._thread.start()

    def submit(self, call: GenerateCall, sink: Sink) -> None:
        """Validate and queue ``call``; raises InvalidRequest, QueueFull, EngineDead (or
        ExpertUnavailable while the engine starts) at once, like ``EngineLoop.submit``."""
        self._check_up()
        now = self.clock()
        prepared = self.tokens.prepare(call)
        req = _Request(prepared=prepared, sink=sink, arrival_s=now)
        delay_s = None if call.deadline_unix_s is None else call.deadline_unix_s - self.wall_clock()
        with self._lock:
            self._admit(call.request_id, 1)
            self._tracked[call.request_id] = req
        self._loop.call_soon_threadsafe(self._start_request, req, delay_s)

    def submit_score(self, call: ScoreCall, sink: ScoreSink) -> None:
        """Validate and queue a scoring job: one vLLM request per choice, run in parallel."""
        self._check_up()
        job = self.tokens.prepare_score(call, self.clock())
        with self._lock:
            self._admit(call.request_id, len(job.choice_ids))
            self._scores[call.request_id] = len(job.choice_ids)
        self._loop.call_soon_threadsafe(self._start_score, job, sink)

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self._tracked:
                return
        self._loop.call_soon_threadsafe(self._abort_now, request_id, FinishReason.ABORT)

    def snapshot(self) -> LoopSnapshot:
        with self._lock:
            in_flight = len(self._tracked) + sum(self._scores.values())
            load = self.meter.load
            running = min(load.running, in_flight)
            return LoopSnapshot(
                running=running,
                waiting=max(0, in_flight - running),
                energy=self.ledger.totals(),
                requests_finished=self._finished,
                steps=self.meter.steps,
                dead=self._dead or self._starting_note(),
                kv_cache_usage=load.kv_cache_usage if self.started.done() else None,
            )

    def engine_state(self) -> dict:
        """vLLM's own view, for operators and tests: its unfinished requests, scheduler load, and
        the finish reasons it reported for recent requests."""
        with self._lock:
            load, recent = self.meter.load, list(self._recent)
        llm = self.llm
        return {
            "started": self.started.done() and not self._dead,
            "dead": self._dead,
            "unfinished": llm.get_num_unfinished_requests() if llm is not None else 0,
            "running": load.running,
            "waiting": load.waiting,
            "kv_cache_usage": load.kv_cache_usage,
            "recent_finishes": recent,
            "vllm_version": _vllm_version(),
        }

    def engine_metrics(self) -> str:
        """vLLM's Prometheus metrics (``vllm:*``) of this process, in text format. vLLM's
        Prometheus logger registers them in this process's default registry."""
        from prometheus_client import REGISTRY, generate_latest

        families = [m for m in REGISTRY.collect() if m.name.startswith("vllm:")]
        return generate_latest(_Families(families)).decode()

    def stop(self, timeout_s: float = 30.0) -> None:
        if self._thread.is_alive() and self._stop is not None:
            self._loop.call_soon_threadsafe(self._stop.set)
            self._thread.join(timeout_s)

    def _check_up(self) -> None:
        if self._dead:
            raise EngineDead(self._dead if "failed to start" in self._dead else f"engine stopped: {self._dead}")
        if not self.started.done():
            raise ExpertUnavailable(
                f"expert {self.expert.name!r}: its vLLM engine is still starting "
                f"({self.clock() - self._started_s:.0f} s so far); retry shortly"
            )

    def _admit(self, request_id: str, weight: int) -> None:
        """Under ``_lock``: refuse duplicates and requests beyond max_batch + max_queue."""
        if request_id in self._tracked or request_id in self._scores:
            raise InvalidRequest(f"request id {request_id!r} is already being served")
        in_flight = len(self._tracked) + sum(self._scores.values())
        if in_flight + weight > self.capacity:
            raise QueueFull(
                f"expert {self.expert.name!r} is full: {in_flight} requests running or queued "
                f"(max_batch + max_queue = {self.capacity}); retry shortly",
                retry_after_ms=int(min(10_000, max(50, 8 * (self.profile.decode_ms_per_token or 50.0)))),
            )

    def _starting_note(self) -> str:
        return "" if self.started.done() else f"vLLM engine starting ({self.clock() - self._started_s:.0f} s)"

    # -- the runner thread ----------------------------------------------------------------------
    def _thread_main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._loop.run_until_complete(self._main())
        finally:
            pending = [t for t in asyncio.all_tasks(self._loop) if not t.done()]
            for task in pending:
                task.cancel()
            self._loop.run_until_complete(asyncio.gather(*pending, return_exceptions=True))
            self._loop.close()

    async def _main(self) -> None:
        self._stop = asyncio.Event()
        self._started_s = self.clock()
        try:
            self.llm = self._build_engine()
        except BaseException as exc:  # noqa: BLE001 - any start failure is reported, not raised
            self._dead = f"vLLM engine failed to start: {settings.describe_error(exc)}"
            log.error("expert %s: %s", self.expert.name, self._dead, exc_info=exc)
            self.started.set_exception(EngineDead(self._dead))
            return
        device_type = self.llm.vllm_config.device_config.device_type
        self.info = replace(self.info, device=str(device_type))
        self.meter.start()
        self.started.set_result(True)
        log.info("expert %s: vLLM %s engine up in %.1f s on %s", self.expert.name, _vllm_version(),
                 self.clock() - self._started_s, device_type)
        try:
            while not self._stop.is_set():
                try:
                    await asyncio.wait_for(self._stop.wait(), IDLE_TICK_S)
                except TimeoutError:
                    self._tick()
        finally:
            self._shutdown_engine()

    def _build_engine(self):
        from vllm.v1.engine.async_llm import AsyncLLM

        settings.apply_env(self.spec)
        args = settings.engine_args(self.expert, self.model_dir, self.max_model_len)
        llm = AsyncLLM.from_engine_args(args, stat_loggers=[stat_logger_factory(self._on_record)])
        try:
            tap_outputs(llm, self.meter.on_outputs)
        except BaseException:
            llm.shutdown()
            raise
        return llm

    def _shutdown_engine(self) -> None:
        self._fail_all(EngineDead(f"expert {self.expert.name!r} is shutting down"))
        if self.started.done() and self.started.exception() is None:
            try:
                self.meter.finish()
            except Exception:  # noqa: BLE001 - a device that cannot be read any more: what it said stands
                log.warning("expert %s: could not book the energy since the last step", self.expert.name, exc_info=True)
        if self.llm is not None:
            try:
                self.llm.shutdown()
            except Exception:  # noqa: BLE001 - best effort at exit
                log.exception("vLLM shutdown failed")

    def _tick(self) -> None:
        """Idle energy, and the engine's health while nothing exercises it."""
        if self.llm is not None and self.llm.errored and not self._dead:
            self._fatal(self.llm.dead_error)
            return
        if not self._tracked and not self._scores:
            self.meter.idle_tick()

    def _on_record(self, scheduler_stats) -> None:
        """vLLM's stat logger hook: one engine step's outputs were delivered."""
        self.meter.on_step(scheduler_stats, still_busy=bool(self._tracked or self._scores))

    def _work_done(self) -> None:
        if not self._tracked and not self._scores:
            self.meter.settle()

    # -- one generation -------------------------------------------------------------------------
    def _start_request(self, req: _Request, deadline_delay_s: float | None) -> None:
        rid = req.prepared.call.request_id
        if rid not in self._tracked:
            return  # failed before it started (engine died)
        self.meter.work_arrived()
        if deadline_delay_s is not None:
            req.timer = self._loop.call_later(max(0.0, deadline_delay_s), self._abort_now, rid, FinishReason.DEADLINE)
        req.task = self._loop.create_task(self._serve(req), name=f"vllm-request-{rid}")

    async def _serve(self, req: _Request) -> None:
        rid = req.prepared.call.request_id
        try:
            if req.abort_reason is not None:  # aborted before it reached vLLM
                self._finish(req, "", (), req.abort_reason)
                return
            req.in_engine = True
            prompt = settings.engine_input(self.llm, req.prepared.prompt_ids)
            async for out in self.llm.generate(prompt, req.prepared.params, rid):
                if await self._on_output(req, out):
                    return
            self._fail(req, ExpertUnavailable(f"vLLM ended request {rid} without a final output"))
        except asyncio.CancelledError:
            self._fail(req, EngineDead(f"expert {self.expert.name!r} is shutting down"))
            raise
        except Exception as exc:  # noqa: BLE001 - mapped to our error types
            self._on_error(req, exc)

    async def _on_output(self, req: _Request, out) -> bool:
        """Deliver one RequestOutput (a delta); returns whether the request finished."""
        rid = req.prepared.call.request_id
        c = out.outputs[0]
        ids = tuple(c.token_ids)
        if ids and req.first_token_s is None:
            req.first_token_s = self.clock()
        req.completion_tokens += len(ids)
        for token_id, position in zip(ids, c.logprobs or (), strict=False):
            req.logprob_sum += position[token_id].logprob  # logprobs=0: the sampled token's entry
        if out.finished:
            with self._lock:
                self._recent.append((rid, str(c.finish_reason)))
            reason = req.abort_reason or settings.finish_reason(c.finish_reason)
            self.meter.when_metered(lambda: self._finish(req, c.text, ids, reason))
            return True
        if req.abort_reason is not None:  # an abort raced the request into vLLM: repeat it
            await self.llm.abort(rid)
        if c.text or ids:
            req.sink([StreamEvent(request_id=rid, text=c.text, token_ids=ids)])
        return False

    def _on_error(self, req: _Request, exc: Exception) -> None:
        from vllm.exceptions import VLLMClientError
        from vllm.v1.engine.exceptions import EngineDeadError

        if isinstance(exc, EngineDeadError):
            self._fatal(exc)
        elif isinstance(exc, (VLLMClientError, ValueError)):
            self._fail(req, InvalidRequest(f"vLLM refused the request: {settings.describe_error(exc)}"))
        else:
            log.warning("expert %s: request failed in vLLM", self.expert.name, exc_info=exc)
            self._fail(req, ExpertUnavailable(f"vLLM failed this request: {settings.describe_error(exc)}"))

    def _abort_now(self, rid: str, reason: FinishReason) -> None:
        req = self._tracked.get(rid)
        if req is None or req.abort_reason is not None:
            return
        req.abort_reason = reason
        if req.in_engine and self.llm is not None:
            # vLLM drops it from the scheduler at its next step and answers a final "abort" output.
            self._loop.create_task(self.llm.abort(rid))

    def _finish(self, req: _Request, text: str, ids: tuple[int, ...], reason: FinishReason) -> None:
        rid = req.prepared.call.request_id
        if req.timer is not None:
            req.timer.cancel()
        now = self.clock()
        with self._lock:
            if self._tracked.pop(rid, None) is None:
                return
            energy_j = self.ledger.close(rid)
            self._finished += 1
        first = req.first_token_s if req.first_token_s is not None else now
        n = req.completion_tokens
        usage = RequestUsage(
            prompt_tokens=len(req.prepared.prompt_ids), completion_tokens=n,
            ttft_ms=1000.0 * (first - req.arrival_s), latency_ms=1000.0 * (now - req.arrival_s),
            energy_j=energy_j, energy_source=self.device.energy_source, finish_reason=reason,
            mean_logprob=req.logprob_sum / n if n and self.spec.report_logprobs else None,
        )
        req.sink([StreamEvent(request_id=rid, text=text, token_ids=ids, usage=usage)])
        self._work_done()

    def _fail(self, req: _Request, error: WattserveError) -> None:
        rid = req.prepared.call.request_id
        if req.timer is not None:
            req.timer.cancel()
        with self._lock:
            if self._tracked.pop(rid, None) is None:
                return
            self.ledger.close(rid)
        req.sink(error)
        self._work_done()

    # -- scoring --------------------------------------------------------------------------------
    def _start_score(self, job: PreparedScoreJob, sink: ScoreSink) -> None:
        self.meter.work_arrived()
        self._loop.create_task(self._score(job, sink), name=f"vllm-score-{job.call.request_id}")

    async def _score(self, job: PreparedScoreJob, sink: ScoreSink) -> None:
        rid = job.call.request_id
        try:
            logprobs, sub_ids = await run_score(self.llm, job)
        except asyncio.CancelledError:
            self._end_score(rid, [f"{rid}.{k}" for k in range(len(job.choice_ids))])
            sink(EngineDead(f"expert {self.expert.name!r} is shutting down"))
            raise
        except Exception as exc:  # noqa: BLE001 - mapped like a generation's errors
            self._end_score(rid, [f"{rid}.{k}" for k in range(len(job.choice_ids))])
            sink(_score_error(exc, self))
            return

        def done() -> None:
            energy_j = self._end_score(rid, sub_ids)
            sink(job.result(logprobs, 1000.0 * (self.clock() - job.arrival_s), energy_j, self.device.energy_source))

        self.meter.when_metered(done)

    def _end_score(self, rid: str, sub_ids: list[str]) -> float:
        with self._lock:
            self._scores.pop(rid, None)
            energy_j = sum(self.ledger.close(s) for s in sub_ids)
            self._finished += 1
        self._work_done()
        return energy_j

    # -- failure --------------------------------------------------------------------------------
    def _fatal(self, exc: BaseException) -> None:
        if self._dead:
            return
        self._dead = f"vLLM engine died: {settings.describe_error(exc)}"
        log.error("expert %s: %s", self.expert.name, self._dead)
        self._fail_all(EngineDead(f"the engine failed while serving this request ({self._dead})"))
        if self.on_fatal:
            self.on_fatal(exc)

    def _fail_all(self, error: WattserveError) -> None:
        with self._lock:
            tracked, self._tracked = self._tracked, {}
        for req in tracked.values():
            if req.timer is not None:
                req.timer.cancel()
            if req.task is not None and not req.task.done():
                req.task.cancel()
            req.sink(error)


class _Families:
    """A registry stand-in for ``generate_latest``: the metric families it is given."""

    def __init__(self, families: list) -> None:
        self.families = families

    def collect(self):
        return iter(self.families)


def _score_error(exc: Exception, runner: VllmRunner) -> WattserveError:
    from vllm.exceptions import VLLMClientError
    from vllm.v1.engine.exceptions import EngineDeadError

    if isinstance(exc, EngineDeadError):
        runner._fatal(exc)
        return EngineDead(f"the engine failed while scoring ({settings.describe_error(exc)})")
    if isinstance(exc, (VLLMClientError, ValueError)):
        return InvalidRequest(f"vLLM refused the scoring request: {settings.describe_error(exc)}")
    return ExpertUnavailable(f"vLLM failed this scoring request: {settings.describe_error(exc)}")


def _vllm_version() -> str:
    try:
        import vllm

        return vllm.__version__
    except Exception:  # noqa: BLE001 - only a label
        return "unknown"
