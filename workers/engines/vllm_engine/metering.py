"""Per-step energy metering of a vLLM engine, feeding the same ``EnergyLedger`` and
``ProfileTracker`` as the torch engine's loop.

vLLM's engine core runs its steps in a child process and sends one batch of outputs per step to
the front end (the expert's process). Two hooks on that stream, both called on the runner's event
loop, give the metering its step boundaries:

* :meth:`StepMeter.on_outputs` wraps ``OutputProcessor.process_outputs`` and sees the step's raw
  per-request outputs: new token ids, and for a request's first output its prompt tokens
  actually computed (prefix-cache hits excluded). That is the step's ``tokens_by_request``.
* :meth:`StepMeter.on_step` is a vLLM stat logger's ``record``, called once per step after the
  outputs were handed to the requests. It reads the device counter, books the energy since the
  previous reading over the step's tokens (``EnergyLedger.add_step``), feeds the profile with the
  engine core's own step time (``iteration_details``) and keeps vLLM's load signals (running,
  waiting, KV cache usage).

Every counter delta lands in exactly one place (a step's requests, idle, or carried to the next
step that produces output), so requests + idle == device holds exactly, as in the torch loop.
What is approximate is *which* step a delta belongs to: the core computes step k+1 while the front
end processes step k, so a delta is the energy between two output batches, not of one model call
(see docs/vllm.md).
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from dataclasses import dataclass

from wattserve.types import StepWork

from ...devices.base import Device
from ...energy import EnergyLedger
from ...profile import ProfileTracker
from ..base import StepTimings


@dataclass(slots=True, frozen=True)
class EngineLoad:
    """vLLM's scheduler view after the latest step."""

    running: int = 0
    waiting: int = 0
    kv_cache_usage: float = 0.0  # share of KV cache blocks in use, 0..1


class StepMeter:
    """Books device energy per vLLM step. Runner-loop only, except :meth:`totals`-style reads of
    ``ledger`` and ``load``, which take ``lock``."""

    def __init__(self, device: Device, ledger: EnergyLedger, profile: ProfileTracker, lock: threading.Lock) -> None:
        self.device = device
        self.ledger = ledger
        self.profile = profile
        self.lock = lock
        self.load = EngineLoad()
        self.steps = 0
        self._last_j = 0.0
        self._carry_j = 0.0  # energy of steps that computed but produced no output yet
        self._tokens: dict[str, int] = {}  # the open step: request id -> tokens processed
        self._step_open = False
        self._waiters: list[Callable[[], None]] = []
        self._busy = False  # a step is under way on a modeled device (between begin/end_step)

    # -- lifecycle ------------------------------------------------------------------------------
    def start(self) -> None:
        """The engine is up: energy from here on is booked (start-up is not)."""
        self._last_j = self.device.energy_j()

    def work_arrived(self) -> None:
        """A request entered the engine: book idle up to now and start timing a step."""
        if self._busy:
            return
        self.idle_tick()
        self.device.begin_step()
        self._busy = True

    def idle_tick(self) -> None:
        """Nothing is running: book the energy since the last reading as idle (and any carry,
        which belonged to requests that ended before producing output)."""
        if self._busy or self._step_open:
            return
        now_j = self.device.energy_j()
        with self.lock:
            self.ledger.add_idle(now_j - self._last_j + self._carry_j)
        self._carry_j = 0.0
        self._last_j = now_j

    def settle(self) -> None:
        """No request is left. vLLM sends no further output batch after the last request ends
        (an abort between steps, say), so end the modeled step here and book the rest as idle."""
        if self._step_open:
            return  # on_step is coming and will see that nothing is busy
        if self._busy:
            self.device.end_step(StepWork())
            self._busy = False
        self.idle_tick()

    def finish(self) -> None:
        """The engine stops: end a modeled step still open and book everything since the last
        reading (and any carry), freshly synced, as idle, so the run's requests + idle equal
        the device counter's delta (``tests/workers/test_energy_conservation.py`` for the loop)."""
        if self._busy:
            self.device.end_step(StepWork())
            self._busy = False
        self._step_open = False
        self._tokens.clear()
        self.device.sync()
        self.idle_tick()

    def when_metered(self, callback: Callable[[], None]) -> None:
        """Run ``callback`` once the step whose outputs are being processed has been booked (at
        once if none is): a finished request's energy is complete only then."""
        if self._step_open:
            self._waiters.append(callback)
        else:
            callback()

    # -- the two vLLM hooks ---------------------------------------------------------------------
    def on_outputs(self, outputs, request_states) -> None:
        """``process_outputs`` is about to handle one step's EngineCoreOutputs."""
        self._step_open = True
        for out in outputs:
            state = request_states.get(out.request_id)
            if state is None:
                continue  # already aborted
            tokens = len(out.new_token_ids)
            if state.is_prefilling:  # this output completes the prompt's prefill
                stats = out.prefill_stats
                tokens += stats.num_computed_tokens if stats is not None else state.prompt_len
            rid = state.external_req_id or out.request_id
            self._tokens[rid] = self._tokens.get(rid, 0) + tokens

    def on_step(self, scheduler_stats, still_busy: bool) -> None:
        """The step's outputs were delivered; book its energy. ``still_busy``: requests remain."""
        details = getattr(scheduler_stats, "iteration_details", None) if scheduler_stats else None
        work = _work(details, self._tokens)
        if self._busy:
            self.device.end_step(work)
            self._busy = False
        now_j = self.device.energy_j()
        delta_j = now_j - self._last_j
        self._last_j = now_j
        tokens, self._tokens = self._tokens, {}
        with self.lock:
            if tokens:
                self.ledger.add_step(delta_j + self._carry_j, tokens)
                self._carry_j = 0.0
            elif work.tokens:  # a prefill chunk with no output yet: its requests pay later
                self._carry_j += delta_j
            else:
                self.ledger.add_idle(delta_j)
            if scheduler_stats is not None:
                self.load = EngineLoad(
                    scheduler_stats.num_running_reqs, scheduler_stats.num_waiting_reqs,
                    float(scheduler_stats.kv_cache_usage),
                )
        if details is not None and not details.is_dummy and work.tokens:
            self.profile.observe(_timings(details), delta_j, work.tokens)
            self.steps += 1
        if still_busy:
            self.device.begin_step()
            self._busy = True
        self._step_open = False
        waiters, self._waiters = self._waiters, []
        for callback in waiters:
            callback()


def _work(details, tokens: dict[str, int]) -> StepWork:
    """What the step computed: the core's own counts when it reports them, else what the outputs
    show (a request's first output carries its prompt tokens)."""
    if details is not None:
        return StepWork(
            prefill_tokens=details.num_ctx_tokens, decode_tokens=details.num_generation_tokens,
            batch_size=details.num_ctx_requests + details.num_generation_requests,
        )
    total = sum(tokens.values())
    return StepWork(decode_tokens=total, batch_size=len(tokens))


def _timings(details) -> StepTimings:
    """The core's model time of one step, as the profile wants it. Pure prefill and pure decode
    steps are exact; a mixed step (vLLM batches prefill chunks with decodes) counts toward busy
    power and J/token but not toward the per-phase milliseconds, which it would blur."""
    elapsed_s = details.elapsed_ms / 1000.0
    if details.num_generation_requests == 0:
        return StepTimings(prefill_s=elapsed_s, prefill_tokens=details.num_ctx_tokens)
    if details.num_ctx_requests == 0:
        return StepTimings(decode_s=elapsed_s, decode_batch=details.num_generation_requests)
    return StepTimings(prefill_s=elapsed_s)


def stat_logger_factory(on_record: Callable[[object], None]):
    """A vLLM per-engine stat logger class whose ``record`` calls ``on_record(scheduler_stats)``."""
    from vllm.v1.metrics.loggers import StatLoggerBase

    class WattserveStepLogger(StatLoggerBase):
        def __init__(self, vllm_config, engine_index: int = 0) -> None:
            self.engine_index = engine_index

        def record(self, scheduler_stats, iteration_stats, mm_cache_stats=None, engine_idx: int = 0) -> None:
            on_record(scheduler_stats)

        def log_engine_initialized(self) -> None:
            pass

    return WattserveStepLogger


def tap_outputs(llm, on_outputs: Callable[[list, dict], None]) -> None:
    """Have ``llm``'s output processor report each step's outputs to ``on_outputs`` first.

    This wraps one method of vLLM's ``OutputProcessor`` instance (an internal interface, checked
    here so a vLLM that changed it fails loudly at start instead of metering nothing).
    """
    processor = getattr(llm, "output_processor", None)
    original = getattr(processor, "process_outputs", None)
    states = getattr(processor, "request_states", None)
    if original is None or not isinstance(states, dict):
        raise RuntimeError(
            "this vLLM's AsyncLLM has no output_processor.process_outputs/request_states; "
            "wattserve's per-step energy metering supports the vLLM 0.32 line"
        )

    def process_outputs(engine_core_outputs, *args, **kwargs):
        on_outputs(engine_core_outputs, states)
        return original(engine_core_outputs, *args, **kwargs)

    processor.process_outputs = process_outputs
