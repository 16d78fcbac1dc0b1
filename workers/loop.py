"""The engine loop: one thread that owns an engine and its device, steps while there is work,
meters every step's energy, and delivers outputs to per-request sinks.

Other threads (the actor's asyncio loop) only call :meth:`EngineLoop.submit`,
:meth:`EngineLoop.submit_score`, :meth:`EngineLoop.abort` and :meth:`EngineLoop.snapshot`; adds,
aborts and scoring jobs travel through an inbox that the loop drains at each step boundary, so the
engine itself is single-threaded. A scoring job runs between two steps and is metered like a step
(its energy goes through the same ledger, attributed to the scoring request).
"""

from __future__ import annotations

import concurrent.futures
import dataclasses
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Protocol

from wattserve.errors import EngineDead, InvalidRequest, QueueFull
from wattserve.types import EnergyTotals, FinishReason, GenerateCall, RequestUsage, ScoreCall, ScoreResult, StreamEvent

from .devices.base import Device
from .energy import EnergyLedger, ExitSavingMeter
from .engines.base import Engine, EngineInfo, PreparedScore, SequenceOutput
from .profile import ProfileTracker

log = logging.getLogger(__name__)

#: receives a request's events in order, or the exception that ended it
Sink = Callable[[list[StreamEvent] | BaseException], None]
#: receives a scoring request's result, or the exception that ended it
ScoreSink = Callable[[ScoreResult | BaseException], None]

IDLE_TICK_S = 0.5  # how often idle energy is booked while nothing runs


@dataclass(slots=True)
class _Tracked:
    sink: Sink
    arrival_s: float
    first_token_s: float | None = None


@dataclass(slots=True, frozen=True)
class LoopSnapshot:
    running: int
    waiting: int
    energy: EnergyTotals
    requests_finished: int
    steps: int
    dead: str  # why the loop died, or ""
    kv_cache_usage: float | None = None  # share of the KV cache in use (engines that report it)


class ServingLoop(Protocol):
    """What the expert actor drives: :class:`EngineLoop` around a stepped engine (torch,
    synthetic), or an engine that schedules itself behind an adapter with the same surface
    (vLLM: ``workers/engines/vllm_engine/runner.py``). ``submit``, ``submit_score``, ``abort``
    and ``snapshot`` are thread-safe; outputs reach the sinks in order, the last event of a
    request carrying its usage, and every joule goes through ``ledger``."""

    device: Device
    ledger: EnergyLedger
    profile: ProfileTracker
    started: concurrent.futures.Future  # done when requests can be taken; an exception if start failed

    @property
    def info(self) -> EngineInfo: ...

    def start(self) -> None: ...

    def submit(self, call: GenerateCall, sink: Sink) -> None: ...

    def submit_score(self, call: ScoreCall, sink: ScoreSink) -> None: ...

    def abort(self, request_id: str) -> None: ...

    def snapshot(self) -> LoopSnapshot: ...

    def engine_metrics(self) -> str: ...

    def engine_state(self) -> dict: ...

    def stop(self) -> None: ...


class EngineLoop:
    def __init__(
        self,
        engine: Engine,
        device: Device,
        *,
        max_queue: int,
        clock: Callable[[], float] = time.monotonic,
        wall_clock: Callable[[], float] = time.time,
        on_fatal: Callable[[BaseException], None] | None = None,
        sleep: Callable[[float], None] = time.sleep,
    ) -> None:
        self.engine = engine
        self.device = device
        self.capacity = engine.info.max_batch + max_queue
        self.clock = clock
        self.wall_clock = wall_clock
        self.on_fatal = on_fatal
        self.sleep = sleep
        self.ledger = EnergyLedger(device.energy_source)
        self.exit_savings = ExitSavingMeter()  # early exit's saving net of measured joules
        self.profile = ProfileTracker(num_layers=engine.info.num_layers)
        self._lock = threading.Lock()
        self._wake = threading.Event()
        self._inbox: list[tuple[str, object]] = []
        self._tracked: dict[str, _Tracked] = {}
        self._scores: list[tuple[PreparedScore, ScoreSink]] = []
        self._load = (0, 0)
        self._finished = 0
        self._dead = ""
        self._stop = False
        self._thread = threading.Thread(target=self._run, name="engine-loop", daemon=True)
        self._last_j = 0.0  # the device counter when the loop started (then as the thread left it)
        self.started: concurrent.futures.Future[bool] = concurrent.futures.Future()
        self.started.set_result(True)  # the engine was built (model loaded) before the loop

    @property
    def info(self) -> EngineInfo:
        return self.engine.info

    # -- called from other threads --------------------------------------------------------------
    def start(self) -> None:
        # The baseline is read here, not in the thread, so a run's energy is measured from the
        # moment the caller starts it (the thread's start-up costs joules on a CPU device too).
        self.device.sync()
        self._last_j = self.device.energy_j()
        self._thread.start()

    def engine_metrics(self) -> str:
        """Stepped engines have no metrics of their own: the profile carries their figures."""
        return ""

    def engine_state(self) -> dict:
        snap = self.snapshot()
        return {"started": True, "dead": snap.dead, "running": snap.running, "waiting": snap.waiting}

    def submit(self, call: GenerateCall, sink: Sink) -> None:
        """Validate and queue ``call``; raises InvalidRequest, QueueFull or EngineDead at once."""
        if self._dead:
            raise EngineDead(f"engine stopped: {self._dead}")
        now = self.clock()
        prepared = self.engine.validate(call, now)
        if call.deadline_unix_s is not None:
            prepared.deadline_s = now + (call.deadline_unix_s - self.wall_clock())
        with self._lock:
            if call.request_id in self._tracked:
                raise InvalidRequest(f"request id {call.request_id!r} is already being served")
            if len(self._tracked) >= self.capacity:
                raise QueueFull(
                    f"expert {self.engine.info.model!r} is full: {len(self._tracked)} requests "
                    f"running or queued (max_batch + max_queue = {self.capacity}); retry shortly",
                    retry_after_ms=self._retry_hint_ms(),
                )
            self._tracked[call.request_id] = _Tracked(sink=sink, arrival_s=now)
            self._inbox.append(("add", prepared))
        self._wake.set()

    def submit_score(self, call: ScoreCall, sink: ScoreSink) -> None:
        """Validate and queue a scoring job (run between steps); raises at once like :meth:`submit`."""
        if self._dead:
            raise EngineDead(f"engine stopped: {self._dead}")
        prepared = self.engine.validate_score(call, self.clock())
        with self._lock:
            if len(self._scores) >= self.capacity:
                raise QueueFull(
                    f"expert {self.engine.info.model!r} has {len(self._scores)} scoring jobs queued; retry shortly",
                    retry_after_ms=self._retry_hint_ms(),
                )
            self._scores.append((prepared, sink))
        self._wake.set()

    def abort(self, request_id: str) -> None:
        with self._lock:
            if request_id not in self._tracked:
                return
            self._inbox.append(("abort", request_id))
        self._wake.set()

    def snapshot(self) -> LoopSnapshot:
        with self._lock:
            running, waiting = self._load
            return LoopSnapshot(
                running=running,
                waiting=waiting + sum(1 for op, _ in self._inbox if op == "add"),
                energy=self.ledger.totals(),
                requests_finished=self._finished,
                steps=self.profile.steps,
                dead=self._dead,
            )

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop = True
        self._wake.set()
        if self._thread.is_alive():
            self._thread.join(timeout_s)

    def _retry_hint_ms(self) -> int:
        step_ms = self.profile.decode_ms_per_token or 50.0
        return int(min(10_000, max(50, step_ms * 8)))

    # -- the loop thread ------------------------------------------------------------------------
    def _run(self) -> None:
        last_j = self._last_j
        try:
            while not self._stop:
                self._drain_inbox()
                for job in self._take_scores():
                    last_j = self._score(job, last_j)
                if not self.engine.has_work():
                    self._wake.wait(IDLE_TICK_S)
                    self._wake.clear()
                    now_j = self.device.energy_j()
                    with self._lock:
                        self.ledger.add_idle(now_j - last_j)
                    last_j = now_j
                    continue
                last_j = self._step(last_j)
        except BaseException as exc:  # noqa: BLE001 - any engine failure ends every request
            log.exception("engine loop failed")
            self._fail_all(exc)
            if self.on_fatal:
                self.on_fatal(exc)
        finally:
            self._book_rest(last_j)

    def _book_rest(self, last_j: float) -> None:
        """The loop ends (stopped, possibly mid-run, or failed): the energy since its last
        reading, freshly read, is idle, so that requests + idle equal the device counter's own
        delta over the whole run (tests/workers/test_energy_conservation.py)."""
        try:
            self.device.sync()
            now_j = self.device.energy_j()
        except Exception:  # noqa: BLE001 - a dead device cannot be read; what it last said stands
            log.warning("engine loop: could not read the device after the loop ended", exc_info=True)
            return
        with self._lock:
            self.ledger.add_idle(now_j - last_j)
        self._last_j = now_j

    def _drain_inbox(self) -> None:
        with self._lock:
            inbox, self._inbox = self._inbox, []
        for op, arg in inbox:
            if op == "add":
                self.engine.add(arg)
            else:
                out = self.engine.abort(arg)
                if out is not None:
                    self._deliver([out], self.clock())
        with self._lock:
            self._load = self.engine.load()

    def _take_scores(self) -> list[tuple[PreparedScore, ScoreSink]]:
        with self._lock:
            jobs, self._scores = self._scores, []
        return jobs

    def _score(self, job: tuple[PreparedScore, ScoreSink], last_j: float) -> float:
        """Run one scoring job as a metered step of its own; returns the device counter after it."""
        prepared, sink = job
        rid = prepared.call.request_id
        start_j = self.device.energy_j()
        self.device.begin_step()
        try:
            out = self.engine.score(prepared)
        except BaseException as exc:
            sink(EngineDead(f"the engine failed while scoring ({type(exc).__name__}: {exc})"))
            raise
        self.device.end_step(out.work)
        end_j = self.device.energy_j()
        with self._lock:
            self.ledger.add_idle(start_j - last_j)
            self.ledger.add_step(end_j - start_j, {rid: out.work.tokens})
            energy_j = self.ledger.close(rid)
            self._finished += 1
        self.profile.observe(out.timings, end_j - start_j, out.work.tokens)
        sink(ScoreResult(
            request_id=rid,
            choice_logprobs=tuple(out.logprobs),
            choice_tokens=tuple(len(c) for c in prepared.choice_ids),
            prompt_tokens=len(prepared.prompt_ids),
            latency_ms=1000.0 * (self.clock() - prepared.arrival_s),
            energy_j=energy_j,
            energy_source=self.device.energy_source,
        ))
        return end_j

    def _step(self, last_j: float) -> float:
        # One counter reading per step: the step runs from the previous reading (the end of the
        # step before, or the loop waking from idle), so the work between two steps (delivering
        # outputs, taking new requests in) is charged to the requests of the next one, and only
        # time spent waiting with nothing to do is idle. A second reading per step cost the
        # replica ~5% of its CPU time at full speed (docs/benchmarks.md "Serving-path overhead").
        start_j = last_j
        self.device.begin_step()
        result = self.engine.step(self.clock())
        self._wait_out_cap(result)
        self.device.end_step(result.work)
        end_j = self.device.energy_j()
        with self._lock:
            self.ledger.add_step(end_j - start_j, result.tokens_by_request)
            self._load = self.engine.load()
        self.exit_savings.observe(end_j - start_j, result.work.prefill_tokens, result.tokens_by_request,
                                  result.exit_probes)
        prof = self.profile
        prof.observe(result.timings, end_j - start_j, result.work.tokens, result.work, result.exit_counts)
        self.engine.observe_energy(prof.prefill_j_per_layer_token, prof.decode_j_per_layer_token)
        self._deliver(result.outputs, self.clock())
        return end_j

    def _wait_out_cap(self, result) -> None:
        """A modeled device that is capped would have taken longer than the host did: wait the
        difference, inside the step, so latencies and the measured profile follow the cap (real
        devices report zero; see ``Device.cap_slowdown_s``)."""
        prefill_s, decode_s = self.device.cap_slowdown_s(result.work)
        if prefill_s + decode_s <= 0:
            return
        self.sleep(prefill_s + decode_s)
        result.timings.prefill_s += prefill_s
        result.timings.decode_s += decode_s

    def _deliver(self, outputs: list[SequenceOutput], now: float) -> None:
        by_request: dict[str, list[StreamEvent]] = {}
        for out in outputs:
            tracked = self._tracked.get(out.request_id)
            if tracked is None:
                continue
            if out.token_ids and tracked.first_token_s is None:
                tracked.first_token_s = now
            usage = None
            if out.finish_reason is not None:
                usage = self._usage(out, tracked, now)
            by_request.setdefault(out.request_id, []).append(
                StreamEvent(request_id=out.request_id, text=out.text, token_ids=out.token_ids, usage=usage)
            )
        for rid, events in by_request.items():
            sink = self._tracked[rid].sink
            if events[-1].usage is not None:
                with self._lock:
                    del self._tracked[rid]
                    self._finished += 1
            sink(events)

    def _usage(self, out: SequenceOutput, tracked: _Tracked, now: float) -> RequestUsage:
        with self._lock:
            energy_j = self.ledger.close(out.request_id)
        first = tracked.first_token_s if tracked.first_token_s is not None else now
        return RequestUsage(
            prompt_tokens=out.prompt_tokens,
            completion_tokens=out.completion_tokens,
            ttft_ms=1000.0 * (first - tracked.arrival_s),
            latency_ms=1000.0 * (now - tracked.arrival_s),
            energy_j=energy_j,
            energy_source=self.device.energy_source,
            finish_reason=FinishReason(out.finish_reason),
            exits=self._net_exits(out),
            mean_logprob=out.logprob_sum / out.completion_tokens if out.completion_tokens else None,
        )

    def _net_exits(self, out: SequenceOutput):
        net = self.exit_savings.close(out.request_id)
        return None if out.exits is None else dataclasses.replace(out.exits, energy_saved_net_j=net)

    def _fail_all(self, exc: BaseException) -> None:
        with self._lock:
            self._dead = f"{type(exc).__name__}: {exc}"
            tracked, self._tracked = self._tracked, {}
            scores, self._scores = self._scores, []
            self._inbox.clear()
        error = EngineDead(f"the engine failed while serving this request ({self._dead})")
        for t in tracked.values():
            t.sink(error)
        for _, sink in scores:
            sink(error)
