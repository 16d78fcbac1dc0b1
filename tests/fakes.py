"""Test doubles shared by the suite: each stands where the real thing cannot run in a unit test
(a clock that moves only when told, pynvml without a driver, a Ray actor handle without Ray, a
device whose joules the test decides, MiniLM without its weights, an expert replica without Ray
behind the gateway's ``ReplicaClient`` seam)."""

from __future__ import annotations

import asyncio
import threading
import zlib
from collections.abc import Callable

import numpy as np
import pynvml

from router.base import Plan
from router.policies.base import by_expert, eligible
from runtime.gateway.replicas import ReplicaClient, ReplicaDied, ReplicaStream
from wattserve.errors import QueueFull
from wattserve.types import (
    ExpertProfile,
    FinishReason,
    GenerateCall,
    RequestUsage,
    ScoreCall,
    ScoreResult,
    StepWork,
    StreamEvent,
)
from workers.devices.base import Device


class FakeClock:
    """A clock that moves only when told to. It starts away from 0 so code that takes 0 for
    'never' shows up."""

    def __init__(self, t: float = 100.0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


class FakePynvml:
    """Stands in for the pynvml module where no NVIDIA driver exists (patched where it is used)."""

    NVMLError = pynvml.NVMLError

    def __init__(self, *, fail: dict[str, int] | None = None, energy_mj=(1_000_000,),
                 power_mw: int = 250_000, count: int = 1) -> None:
        self.fail = dict(fail or {})
        self.energy_mj = list(energy_mj)
        self.power_mw = power_mw
        self.count = count
        self.shutdowns = 0

    def __getattr__(self, name: str):
        if name.startswith("NVML_"):  # constants: the real module's values
            return getattr(pynvml, name)
        raise AttributeError(name)

    def _check(self, function: str) -> None:
        if function in self.fail:
            raise pynvml.NVMLError(self.fail[function])

    def nvmlInit(self):
        self._check("nvmlInit")

    def nvmlShutdown(self):
        self.shutdowns += 1

    def nvmlDeviceGetCount(self):
        return self.count

    def nvmlDeviceGetHandleByIndex(self, index):
        return ("handle", index)

    def nvmlDeviceGetName(self, handle):
        return b"NVIDIA H100 80GB HBM3"

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-0000000{handle[1]}-fake"

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        self._check("nvmlDeviceGetTotalEnergyConsumption")
        return self.energy_mj.pop(0) if len(self.energy_mj) > 1 else self.energy_mj[0]

    def nvmlDeviceGetPowerUsage(self, handle):
        self._check("nvmlDeviceGetPowerUsage")
        return self.power_mw

    def nvmlDeviceGetEnforcedPowerLimit(self, handle):
        return 700_000

    def nvmlDeviceGetClockInfo(self, handle, clock_type):
        assert clock_type == pynvml.NVML_CLOCK_SM
        return 1755


class ControlFakePynvml(FakePynvml):
    """FakePynvml plus the control calls, recording every call with its arguments."""

    def __init__(self, *, deny: set[str] = frozenset(), **kw) -> None:
        super().__init__(**kw)
        self.calls: list[tuple] = []
        self.deny = deny

    def _control(self, name, *args):
        if name in self.deny:
            raise pynvml.NVMLError(pynvml.NVML_ERROR_NO_PERMISSION)
        self.calls.append((name, *args))

    def nvmlDeviceSetGpuLockedClocks(self, handle, lo, hi):
        self._control("nvmlDeviceSetGpuLockedClocks", handle, lo, hi)

    def nvmlDeviceResetGpuLockedClocks(self, handle):
        self._control("nvmlDeviceResetGpuLockedClocks", handle)

    def nvmlDeviceSetPowerManagementLimit(self, handle, limit_mw):
        self._control("nvmlDeviceSetPowerManagementLimit", handle, limit_mw)

    def nvmlDeviceGetPowerManagementDefaultLimit(self, handle):
        return 700_000

    def nvmlDeviceGetPowerManagementLimitConstraints(self, handle):
        return 200_000, 700_000

    def nvmlDeviceGetMaxClockInfo(self, handle, clock_type):
        return 1980

    def nvmlDeviceGetSupportedMemoryClocks(self, handle):
        return [2619, 1593]

    def nvmlDeviceGetSupportedGraphicsClocks(self, handle, mem_mhz):
        assert mem_mhz == 2619  # the graphics clocks listed at the highest memory clock
        return [1980, 1965, 900, 345]

    def nvmlDeviceGetUUID(self, handle):
        return f"GPU-{1234 + handle[1]}".encode()


class FakeActor:
    """Stands for a Ray actor handle over a plain object: ``handle.method.remote(*a)`` returns an
    awaitable of the method's result (awaited too when the method is a coroutine)."""

    def __init__(self, obj) -> None:
        self._obj = obj

    def __getattr__(self, name):
        method = getattr(self._obj, name)

        class _Method:
            @staticmethod
            def remote(*args, **kwargs):
                async def call():
                    result = method(*args, **kwargs)
                    return await result if asyncio.iscoroutine(result) else result
                return call()

        return _Method()


class FakeDevice(Device):
    """A device whose joule counter the test drives: by hand (``joules``) or per step
    (``step_cost_j(work)``, booked at ``end_step``). Records the step hooks a modeled device gets."""

    def __init__(self, step_cost_j: Callable[[StepWork], float] | None = None) -> None:
        self.joules = 0.0
        self.step_cost_j = step_cost_j
        self.hooks: list[tuple[str, StepWork | None]] = []
        self.models_step_work = step_cost_j is not None  # it books the work it is told about

    @property
    def name(self) -> str:
        return "fake"

    @property
    def energy_source(self) -> str:
        return "modeled:fake"

    def energy_j(self) -> float:
        return self.joules

    def power_w(self) -> float:
        return 0.0

    def begin_step(self) -> None:
        self.hooks.append(("begin", None))

    def end_step(self, work: StepWork) -> None:
        self.hooks.append(("end", work))
        if self.step_cost_j is not None:
            self.joules += self.step_cost_j(work)


class FakeEncoder:
    """Bag of hashed words, 384 dims, L2-normalised: stands in for MiniLM where speed matters."""

    dim = 384

    def encode(self, texts, batch_size=32):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


class Collector:
    """An engine loop's sink that keeps every chunk and the error, and says when the request ended."""

    def __init__(self):
        self.events = []
        self.error = None
        self.done = threading.Event()

    def __call__(self, item):
        if isinstance(item, BaseException):
            self.error = item
            self.done.set()
            return
        self.events.extend(item)
        if item[-1].usage is not None:
            self.done.set()

    @property
    def usage(self):
        return self.events[-1].usage if self.events else None


class FakeReplicaClient(ReplicaClient):
    """An in-memory expert replica behind the gateway's ``ReplicaClient`` seam.

    Generate answers ``tokens`` tokens (" t0", " t1", ...) in batches of one, then a usage of
    ``energy_j`` joules. Behaviours for the failure paths, settable at any time:

    - ``full``: refuse every call with QueueFull (as an engine whose queue is full);
    - ``die_after``: the process dies after streaming this many tokens (0: before the first);
    - ``hang_after``: stop sending after this many tokens, until cancelled;
    - ``mean_logprob``: the confidence reported in the usage (cascades read it);
    - ``dead``: telemetry fails as for a dead process.

    It records what reached it: ``calls`` (GenerateCall), ``aborted`` (request ids) and
    ``open_streams`` (calls started and not yet finished, cancelled or aborted).
    """

    def __init__(self, expert: str, index: int = 0, *, tokens: int = 4, energy_j: float = 1.0,
                 mean_logprob: float | None = None, max_batch: int = 4, step_s: float = 0.0,
                 choice_logprobs: tuple[float, ...] | None = None) -> None:
        super().__init__(expert, index)
        self.tokens = tokens
        self.energy_j = energy_j
        self.mean_logprob = mean_logprob
        self.max_batch = max_batch
        self.step_s = step_s
        self.choice_logprobs = choice_logprobs
        self.full = False
        self.dead = False
        self.die_after: int | None = None
        self.hang_after: int | None = None
        self.calls: list[GenerateCall] = []
        self.scores: list[ScoreCall] = []
        self.aborted: list[str] = []
        self.open_streams: set[str] = set()

    async def profile(self) -> ExpertProfile:
        if self.dead:
            raise ReplicaDied(f"expert {self.name} died while answering telemetry (FakeActorDied); retry")
        return ExpertProfile(
            expert=self.expert, replica=self.index, model="fake", engine="fake", device="cpu",
            energy_source="modeled:fake", priority_class="normal", max_batch=self.max_batch, max_queue=16,
            max_model_len=2048, params=1000, healthy=True, running=len(self.open_streams), waiting=0,
            prefill_ms_per_token=1.0, decode_ms_per_token=5.0, j_per_token=self.energy_j / max(1, self.tokens),
        )

    def generate(self, call: GenerateCall) -> ReplicaStream:
        self.calls.append(call)
        return _FakeStream(self, call)

    def abort(self, request_id: str) -> None:
        self.aborted.append(request_id)
        self.open_streams.discard(request_id)

    async def score(self, call: ScoreCall) -> ScoreResult:
        if self.full:
            raise QueueFull(f"expert {self.name} is full", retry_after_ms=100)
        if self.dead or self.die_after == 0:
            self.dead = True
            raise ReplicaDied(f"expert {self.name} died while scoring (FakeActorDied); retry")
        self.scores.append(call)
        logprobs = self.choice_logprobs or tuple(-float(i + 1) for i in range(len(call.choices)))
        return ScoreResult(call.request_id, logprobs, tuple(1 for _ in call.choices), 3, 5.0, self.energy_j,
                           "modeled:fake")


class _FakeStream(ReplicaStream):
    def __init__(self, client: FakeReplicaClient, call: GenerateCall) -> None:
        self.client, self.call = client, call
        self.sent = 0
        self.started = False
        self.cancelled = False

    async def next(self) -> list:
        c, rid = self.client, self.call.request_id
        if not self.started:
            self.started = True
            if c.full:
                raise QueueFull(f"expert {c.name} is full", retry_after_ms=100)
            c.open_streams.add(rid)
        if c.step_s:
            await asyncio.sleep(c.step_s)
        if c.die_after is not None and self.sent >= c.die_after or c.dead:
            c.dead = True
            c.open_streams.discard(rid)
            raise ReplicaDied(f"expert {c.name} died while serving this request (FakeActorDied); retry")
        if c.hang_after is not None and self.sent >= c.hang_after:
            await asyncio.Event().wait()  # until cancelled
        n = min(self.call.max_tokens, c.tokens)
        if self.sent < n:
            self.sent += 1
            return [StreamEvent(rid, f" t{self.sent - 1}", (self.sent - 1,))]
        c.open_streams.discard(rid)
        usage = RequestUsage(prompt_tokens=3, completion_tokens=self.sent, ttft_ms=1.0, latency_ms=5.0,
                             energy_j=c.energy_j, energy_source="modeled:fake", finish_reason=FinishReason.LENGTH,
                             mean_logprob=c.mean_logprob)
        return [StreamEvent(rid, usage=usage)]

    def cancel(self) -> None:
        self.cancelled = True


class FixedOrderPolicy:
    """A routing policy that ranks experts in a fixed order (each expert's replicas least loaded
    first, a cold candidate last); optionally it plans a cascade. The routing service builds its
    policy from a factory: calling this one returns it, ready."""

    name = "fixed"
    uses_gate = False

    def __init__(self, order: list[str], cascade: tuple[str, str] | None = None, below: float = -1.0) -> None:
        self.order, self.cascade, self.below = order, cascade, below

    def __call__(self, **_) -> FixedOrderPolicy:
        return self

    def plan(self, request, candidates) -> Plan:
        groups = by_expert(eligible(request, candidates))
        experts = [e for e in self.order if e in groups]
        ranked = tuple(c for e in experts for c in groups[e])
        return Plan(ranked=ranked, policy=self.name, reason="fixed order", subset=tuple(experts[:1]),
                    weights={experts[0]: 1.0}, predicted_energy_j=2.0,
                    cascade=self.cascade or (), cascade_below_logprob=self.below if self.cascade else None)
