"""Test doubles shared by the test suite (each stands only where the real thing cannot run)."""

from __future__ import annotations

import asyncio

from runtime.gateway.replicas import ReplicaClient, ReplicaDied, ReplicaStream
from wattserve.errors import QueueFull
from wattserve.types import ExpertProfile, FinishReason, GenerateCall, RequestUsage, ScoreCall, ScoreResult, StreamEvent


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
