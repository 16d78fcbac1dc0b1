"""The body of an expert replica: model + engine + device + engine loop, with an async API.

``runtime/cluster.py`` turns this class into a Ray actor (the only place actors are created);
nothing here imports Ray, so the class also runs in-process in tests. The async methods run on
the actor's event loop while the engine loop thread computes; ``generate`` is an async generator
that Ray exposes as a streaming generator.
"""

from __future__ import annotations

import asyncio
import dataclasses
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from wattserve.errors import ExpertUnavailable
from wattserve.specs import ExpertSpec
from wattserve.types import EnergyTotals, ExpertProfile, GenerateCall, SamplingParams, ScoreCall, ScoreResult

from .devices import open_device
from .engines import build_engine
from .governed import GovernedDevice
from .loop import EngineLoop, ServingLoop
from .models import prepare_for_engine
from .streams import Outbox, StreamItem

log = logging.getLogger(__name__)

#: seconds between a fatal engine error and the process exit that lets Ray restart the actor
EXIT_DELAY_S = 1.0
#: a stream that requests were submitted to but that its caller never opened (the caller died, or
#: its stream failed while a submit was on its way) has its requests aborted after this long
STREAM_OPEN_GRACE_S = 30.0
#: closed stream ids remembered, so that a submit arriving after its stream closed is refused
CLOSED_STREAMS_KEPT = 4096

#: The start-up probe's prompt: plain prose, ~60 tokens on the default experts' tokenizers. Long
#: enough that prefill ms/token is not all per-step overhead, short enough to cost well under a
#: joule on the dev machine's CPU.
PROBE_PROMPT = (
    "The river rose slowly through the night, and by morning the low fields beside the old mill were "
    "under water. The farmers gathered on the bridge to watch the current carry branches past the "
    "stone arches, and they talked about the harvest, the weather and the long winter ahead."
)
PROBE_OUTPUT_TOKENS = 8


def _process_start_unix_s() -> float:
    """When this process started (Ray may hand an actor a worker it started earlier)."""
    try:
        import psutil

        return float(psutil.Process().create_time())
    except Exception:  # noqa: BLE001 - a diagnostic only
        return float("nan")


class ExpertWorker(GovernedDevice):
    """One replica of one expert. Construction loads the model (seconds) and starts the loop."""

    def __init__(self, spec: ExpertSpec, replica: int, cache_dir: str, exit_on_failure: bool = True) -> None:
        # Start-up phases as wall-clock times (the server on the same host lines them up with its
        # own: docs/benchmarks.md "Start-up time").
        self.startup: dict[str, float] = {"init_unix_s": time.time(), "process_unix_s": _process_start_unix_s()}
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.spec = spec
        self.replica = replica
        self.exit_on_failure = exit_on_failure
        model_dir: Path | None = None
        if spec.model is not None:
            model_dir = prepare_for_engine(spec.model, spec.engine.kind, Path(cache_dir), progress=log.info)
        self.startup["model_files_unix_s"] = time.time()
        self.loop = self._serving_loop(spec, model_dir)
        self.startup["model_loaded_unix_s"] = time.time()
        self.loop.started.add_done_callback(lambda _: self.startup.setdefault("engine_ready_unix_s", time.time()))
        self.device = self.loop.device
        self.loop.start()
        self._outboxes: dict[str, Outbox] = {}  # stream id -> its caller's requests (workers/streams.py)
        self._closed_streams: dict[str, None] = {}  # insertion-ordered, at most CLOSED_STREAMS_KEPT
        self._probes = 0  # start-up probes served (not client requests)
        self._probe_j = 0.0  # and their energy, part of the loop ledger's requests_j
        self._init_governed()
        info = self.loop.info
        log.info(
            "expert %s/%d %s: %s on %s (%s), %d params",
            spec.name, replica, "ready" if self.loop.started.done() else "starting", info.model,
            info.device, self.device.energy_source, info.params,
        )

    def _serving_loop(self, spec: ExpertSpec, model_dir: Path | None) -> ServingLoop:
        """The torch and synthetic engines are stepped by an EngineLoop; vLLM schedules itself and
        runs behind a VllmRunner with the same surface (docs/vllm.md)."""
        if spec.engine.kind == "vllm":
            from .engines.vllm_engine import VllmRunner

            def device_for(params: int):
                return open_device(spec.device, model_params=params, include_child_processes=True)

            return VllmRunner(spec, model_dir, device_for, on_fatal=self._on_fatal)
        engine = build_engine(spec, model_dir)
        device = open_device(spec.device, model_params=engine.info.params)
        return EngineLoop(engine, device, max_queue=spec.max_queue, on_fatal=self._on_fatal)

    async def ready(self) -> bool:
        """True once the engine can take requests (vLLM starts in the background); raises
        EngineDead naming the cause if it failed to start."""
        await asyncio.wrap_future(self.loop.started)
        return True

    async def probe(self) -> dict:
        """Serve one short internal request (:data:`PROBE_PROMPT`, greedy, exactly
        :data:`PROBE_OUTPUT_TOKENS` tokens) through the engine loop like any other, so this
        replica's profile holds measured prefill ms/token, decode ms/step and busy power before
        the router relies on them: without it an expert is priced by ``router.cost_priors`` until
        it has served a client, and one measured expert against one priced by a prior is an
        unfair comparison (docs/routing.md section 2). Its energy is metered like a request's and
        reported apart (``EnergyTotals.probe_j``; ``requests_finished`` excludes probes); no
        tenant is charged, because the gateway never sees it. Returns what it measured."""
        await self.ready()
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()
        events = []

        def sink(item) -> None:
            loop.call_soon_threadsafe(_collect, done, events, item)

        self._probes += 1  # before submitting: a profile read mid-probe must not count it as a client's
        call = GenerateCall(
            request_id=f"wattserve-probe:{self.spec.name}:{self.replica}:{self._probes}",
            prompt=PROBE_PROMPT, max_tokens=PROBE_OUTPUT_TOKENS,
            sampling=SamplingParams(temperature=0.0, ignore_eos=True), tenant="",
        )
        try:
            self.loop.submit(call, sink)
            usage = await done
        except BaseException:
            self._probes -= 1
            raise
        self._probe_j += usage.energy_j
        prof = self.loop.profile
        log.info("expert %s/%d: start-up probe %d+%d tokens, %.3f J (%s), %.0f ms", self.spec.name, self.replica,
                 usage.prompt_tokens, usage.completion_tokens, usage.energy_j, usage.energy_source, usage.latency_ms)
        return {"prompt_tokens": usage.prompt_tokens, "completion_tokens": usage.completion_tokens,
                "energy_j": usage.energy_j, "energy_source": usage.energy_source, "latency_ms": usage.latency_ms,
                "prefill_ms_per_token": prof.prefill_ms_per_token, "decode_ms_per_token": prof.decode_ms_per_token,
                "busy_power_w": prof.busy_power_w, "prefill_power_w": prof.prefill_power_w,
                "decode_power_w": prof.decode_power_w}

    async def startup_phases(self) -> dict[str, float]:
        """Wall-clock times (POSIX s) of this replica's start-up: its process started
        (``process_unix_s``), ``__init__`` began (imports done: ``init_unix_s``), model files were
        found or converted, the model was loaded, the engine could take requests."""
        return dict(self.startup)

    async def engine_metrics(self) -> str:
        """The engine's own Prometheus metrics in text format (vLLM's ``vllm:*``; empty for the
        torch engine, whose figures are in the profile)."""
        return self.loop.engine_metrics()

    async def engine_state(self) -> dict:
        """The engine's own view of its requests and load (vLLM: unfinished requests, scheduler
        counts, KV cache usage, the finish reasons it reported); for operators and tests."""
        return self.loop.engine_state()

    async def open_stream(self, stream_id: str) -> AsyncIterator[list[StreamItem]]:
        """The caller's multiplexed stream (``workers/streams.py``): batches of ``(request_id,
        events or exception)`` for every request it submits with :meth:`submit` under
        ``stream_id``, until it closes the stream; its unfinished requests are aborted then."""
        try:
            async for batch in self._outbox(stream_id).batches():
                yield batch
        finally:
            self._close_stream(stream_id)

    async def submit(self, stream_id: str, calls: list[GenerateCall]) -> list[BaseException | None]:
        """Start ``calls``, their events going to stream ``stream_id``; per call None (started) or
        the exception that refused it (InvalidRequest, QueueFull, EngineDead, or ExpertUnavailable
        when the stream has already closed: nobody would read the events), in order."""
        if stream_id in self._closed_streams:
            return [ExpertUnavailable(f"expert {self.spec.name}/{self.replica}: the stream this call was "
                                      "sent on has closed; retry") for _ in calls]
        outbox = self._outbox(stream_id)
        results: list[BaseException | None] = []
        for call in calls:
            try:
                self.loop.submit(call, outbox.sink_for(call.request_id))
            except Exception as exc:  # noqa: BLE001 - the caller raises it for that request alone
                results.append(exc)
                continue
            outbox.requests.add(call.request_id)
            self.note_priority(call.priority)
            results.append(None)
        return results

    def _outbox(self, stream_id: str) -> Outbox:
        # Either call may come first: Ray starts an async actor's tasks concurrently. A submit
        # that comes first gives the stream STREAM_OPEN_GRACE_S to be opened.
        outbox = self._outboxes.get(stream_id)
        if outbox is None:
            loop = asyncio.get_running_loop()
            outbox = self._outboxes[stream_id] = Outbox(loop, self.loop.abort)
            loop.call_later(STREAM_OPEN_GRACE_S, self._reap_unopened, stream_id, outbox)
        return outbox

    def _reap_unopened(self, stream_id: str, outbox: Outbox) -> None:
        if self._outboxes.get(stream_id) is outbox and not outbox.opened:
            log.warning("stream %s was never opened: aborting its %d requests", stream_id, len(outbox.requests))
            outbox.abort_all()
            self._close_stream(stream_id)

    def _close_stream(self, stream_id: str) -> None:
        self._outboxes.pop(stream_id, None)
        self._closed_streams[stream_id] = None
        while len(self._closed_streams) > CLOSED_STREAMS_KEPT:
            del self._closed_streams[next(iter(self._closed_streams))]

    async def score(self, call: ScoreCall) -> ScoreResult:
        """Log-probabilities of ``call.choices`` given ``call.prompt``, computed by the engine loop
        between steps; its energy is metered and attributed like a generation's."""
        loop = asyncio.get_running_loop()
        done: asyncio.Future = loop.create_future()

        def sink(item) -> None:
            loop.call_soon_threadsafe(_settle, done, item)

        self.loop.submit_score(call, sink)
        return await done

    async def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    async def profile(self) -> ExpertProfile:
        power_w, limit_w, clock, max_clock, cap = await asyncio.to_thread(self._device_telemetry)
        snap = self.loop.snapshot()
        prof = self.loop.profile
        info = self.loop.info
        return ExpertProfile(
            expert=self.spec.name,
            replica=self.replica,
            model=info.model,
            engine=info.engine,
            device=self.device.name,
            energy_source=self.device.energy_source,
            priority_class=self.spec.priority_class,
            max_batch=info.max_batch,
            max_queue=self.spec.max_queue,
            max_model_len=info.max_model_len,
            params=info.params,
            healthy=not snap.dead,
            running=snap.running,
            waiting=snap.waiting,
            prefill_ms_per_token=prof.prefill_ms_per_token,
            decode_ms_per_token=prof.decode_ms_per_token,
            j_per_token=prof.j_per_token,
            decode_ms_per_step_by_batch=dict(prof.decode_ms_by_batch),
            busy_power_w=prof.busy_power_w,
            prefill_power_w=prof.prefill_power_w,
            decode_power_w=prof.decode_power_w,
            energy=self._client_energy(snap.energy),
            requests_finished=max(0, snap.requests_finished - self._probes),
            error=snap.dead,
            host=socket.gethostname(),
            pid=os.getpid(),
            power_w=power_w,
            power_limit_w=limit_w,
            sm_clock_mhz=clock,
            max_sm_clock_mhz=max_clock,
            num_layers=info.num_layers,
            j_per_layer_token=prof.decode_j_per_layer_token,
            exit_histogram={d: n for d, n in prof.exit_histogram.items() if n},
            sm_clock_cap_mhz=cap,
            kv_cache_usage=snap.kv_cache_usage,
        )

    def _client_energy(self, totals: EnergyTotals) -> EnergyTotals:
        """The loop's totals with the probes' joules moved from ``requests_j`` to ``probe_j``."""
        if not self._probe_j:
            return totals
        return dataclasses.replace(totals, requests_j=totals.requests_j - self._probe_j, probe_j=self._probe_j)

    def _device_telemetry(self) -> tuple[float | None, ...]:
        """Blocking device reads (NVML calls), run off the event loop."""
        d = self.device
        return d.power_w(), d.power_limit_w(), d.sm_clock_mhz(), d.max_sm_clock_mhz(), d.locked_sm_clock_mhz()

    def shutdown(self) -> None:
        self.loop.stop()
        self.device.close()

    def _on_fatal(self, exc: BaseException) -> None:
        if not self.exit_on_failure:
            return
        # A dead engine cannot be trusted (CUDA errors are sticky): leave the process so Ray's
        # max_restarts brings up a fresh replica. The delay lets failure events reach callers.
        log.error("expert %s/%d: engine failed (%s); exiting for a restart", self.spec.name, self.replica, exc)
        threading.Timer(EXIT_DELAY_S, os._exit, args=(1,)).start()


def _collect(fut: asyncio.Future, events: list, item) -> None:
    """A probe's sink: gather its events; settle with its usage (or the exception that ended it)."""
    if fut.done():
        return
    if isinstance(item, BaseException):
        fut.set_exception(item)
        return
    events.extend(item)
    if events and events[-1].usage is not None:
        fut.set_result(events[-1].usage)


def _settle(fut: asyncio.Future, item) -> None:
    if fut.done():  # the caller went away
        return
    if isinstance(item, BaseException):
        fut.set_exception(item)
    else:
        fut.set_result(item)
