"""The body of an expert replica: model + engine + device + engine loop, with an async API.

``runtime/cluster.py`` turns this class into a Ray actor (the only place actors are created);
nothing here imports Ray, so the class also runs in-process in tests. The async methods run on
the actor's event loop while the engine loop thread computes; ``generate`` is an async generator
that Ray exposes as a streaming generator.
"""

from __future__ import annotations

import asyncio
import collections
import logging
import os
import socket
import threading
import time
from collections.abc import AsyncIterator
from pathlib import Path

from wattserve.power import CapResult, DeviceSample, PowerCap
from wattserve.specs import ExpertSpec
from wattserve.types import ExpertProfile, GenerateCall, Priority, StreamEvent

from .devices import open_device
from .devices.control import apply_cap, sample_device
from .engines import build_engine
from .loop import EngineLoop
from .models import prepare_model

log = logging.getLogger(__name__)

#: seconds between a fatal engine error and the process exit that lets Ray restart the actor
EXIT_DELAY_S = 1.0
#: request priorities remembered for the power governor's "serves only low priority" test
PRIORITY_MEMORY = 4096


class ExpertWorker:
    """One replica of one expert. Construction loads the model (seconds) and starts the loop."""

    def __init__(self, spec: ExpertSpec, replica: int, cache_dir: str, exit_on_failure: bool = True) -> None:
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.spec = spec
        self.replica = replica
        self.exit_on_failure = exit_on_failure
        model_dir: Path | None = None
        if spec.model is not None:
            model_dir = prepare_model(spec.model, Path(cache_dir), progress=log.info)
        self.engine = build_engine(spec, model_dir)
        self.device = open_device(spec.device, model_params=self.engine.info.params)
        self.loop = EngineLoop(
            self.engine, self.device, max_queue=spec.max_queue, on_fatal=self._on_fatal
        )
        self.loop.start()
        self._priorities: collections.deque[tuple[float, Priority]] = collections.deque(maxlen=PRIORITY_MEMORY)
        log.info(
            "expert %s/%d ready: %s on %s (%s), %d params",
            spec.name, replica, self.engine.info.model, self.engine.info.device,
            self.device.energy_source, self.engine.info.params,
        )

    async def ready(self) -> bool:
        return True

    async def generate(self, call: GenerateCall) -> AsyncIterator[list[StreamEvent]]:
        """Stream ``call``'s output in chunks of events; the last event carries the usage.

        Errors in validation or admission raise before the first chunk. If the consumer goes
        away (Ray cancels this generator), the request is aborted and its slot freed.
        """
        queue: asyncio.Queue = asyncio.Queue()
        loop = asyncio.get_running_loop()
        self.loop.submit(call, lambda item: loop.call_soon_threadsafe(queue.put_nowait, item))
        self._priorities.append((time.monotonic(), call.priority))
        finished = False
        try:
            while not finished:
                item = await queue.get()
                chunk: list[StreamEvent] = []
                while True:  # coalesce whatever else is ready: fewer, larger Ray objects under load
                    if isinstance(item, BaseException):
                        raise item
                    chunk.extend(item)
                    if queue.empty():
                        break
                    item = queue.get_nowait()
                finished = chunk[-1].finished
                yield chunk
        finally:
            if not finished:
                self.loop.abort(call.request_id)

    async def abort(self, request_id: str) -> None:
        self.loop.abort(request_id)

    async def profile(self) -> ExpertProfile:
        power_w, limit_w, clock, max_clock, cap = await asyncio.to_thread(self._device_telemetry)
        snap = self.loop.snapshot()
        prof = self.loop.profile
        info = self.engine.info
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
            energy=snap.energy,
            requests_finished=snap.requests_finished,
            error=snap.dead,
            host=socket.gethostname(),
            pid=os.getpid(),
            power_w=power_w,
            power_limit_w=limit_w,
            sm_clock_mhz=clock,
            max_sm_clock_mhz=max_clock,
            sm_clock_cap_mhz=cap,
        )

    def _device_telemetry(self) -> tuple[float | None, ...]:
        """Blocking device reads (NVML calls), run off the event loop."""
        d = self.device
        return d.power_w(), d.power_limit_w(), d.sm_clock_mhz(), d.max_sm_clock_mhz(), d.locked_sm_clock_mhz()

    # -- the power governor's door to this replica's device ---------------------------------------
    async def power_sample(self, window_s: float = 60.0) -> DeviceSample:
        """This replica's device reading, its configured priority class and how many requests it
        started in the last ``window_s`` seconds at LOW and at higher priority."""
        since = time.monotonic() - window_s
        recent = [p for t, p in list(self._priorities) if t >= since]
        low = sum(1 for p in recent if p == Priority.LOW)
        return await asyncio.to_thread(
            sample_device, self.device, priority_class=self.spec.priority_class,
            low_requests=low, other_requests=len(recent) - low,
        )

    async def apply_power_cap(self, cap: PowerCap, gpu: str = "") -> CapResult:
        """Lock/unlock the SM clock and set/reset the power limit of this replica's device."""
        result = await asyncio.to_thread(apply_cap, self.device, cap, gpu or f"{self.spec.name}/{self.replica}")
        if result.applied:
            log.info("expert %s/%d: power cap %s (%s)", self.spec.name, self.replica, cap, cap.reason)
        else:
            log.warning("expert %s/%d: cannot apply power cap: %s", self.spec.name, self.replica, result.error)
        return result

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
