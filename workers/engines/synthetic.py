"""The synthetic (null) engine: no model, every step emits one token per running request.

Its config kind is ``synthetic`` because a bare ``null`` in YAML means "no value".

It exists to measure the serving path itself (gateway, Ray streaming, accounting) without model
compute, and to load-test routing. Prompt tokens are whitespace-separated words; each output
token is the text `` tok``. Its energy is whatever its device backend reports, labelled as such.
Scoring and the confidence of generated tokens are deterministic fake log-probabilities (hashes
of expert, prompt and choice), so ensemble and cascade tests are exact without a model.
"""

from __future__ import annotations

import time
import zlib
from dataclasses import dataclass

from wattserve.errors import InvalidRequest
from wattserve.specs import ExpertSpec, SyntheticEngineSpec
from wattserve.types import FinishReason, GenerateCall, ScoreCall, StepWork

from .base import (
    ActiveRequest,
    Engine,
    EngineInfo,
    PreparedRequest,
    PreparedScore,
    ScoreOutput,
    SequenceOutput,
    StepResult,
    StepTimings,
)
from .chat import prompt_text
from .scheduler import Scheduler

TOKEN_TEXT = " tok"


@dataclass(slots=True)
class _SyntheticSeq(ActiveRequest):
    produced: int = 0


class SyntheticEngine(Engine):
    def __init__(self, expert: ExpertSpec) -> None:
        spec = expert.engine
        assert isinstance(spec, SyntheticEngineSpec)
        self.step_s = spec.step_ms / 1000.0
        self.max_model_len = spec.max_model_len
        self.expert = expert.name
        self.scheduler: Scheduler[_SyntheticSeq] = Scheduler(expert.max_batch, max_prefill_tokens=1 << 30)
        self.info = EngineInfo(
            model="none", engine="synthetic", params=spec.model_params, max_model_len=spec.max_model_len,
            max_batch=expert.max_batch, device="none",
        )

    def validate(self, call: GenerateCall, arrival_s: float) -> PreparedRequest:
        words = prompt_text(call).split()
        if not words:
            raise InvalidRequest("prompt is empty: send at least one word")
        if len(words) + call.max_tokens > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(words)} tokens) plus max_tokens ({call.max_tokens}) exceeds "
                f"expert {self.expert!r}'s limit of {self.max_model_len} tokens"
            )
        return PreparedRequest(call=call, prompt_ids=list(range(len(words))), arrival_s=arrival_s)

    def add(self, request: PreparedRequest) -> None:
        self.scheduler.add(_SyntheticSeq(request))

    def validate_score(self, call: ScoreCall, arrival_s: float) -> PreparedScore:
        words = call.prompt.split()
        choices = [c.split() for c in call.choices]
        if not words or not choices or not all(choices):
            raise InvalidRequest("scoring needs a prompt and at least one non-empty choice")
        longest = max(len(c) for c in choices)
        if len(words) + longest > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(words)} tokens) plus the longest choice ({longest}) exceeds "
                f"expert {self.expert!r}'s limit of {self.max_model_len} tokens"
            )
        return PreparedScore(call, list(range(len(words))), [list(range(len(c))) for c in choices], arrival_s)

    def score(self, request: PreparedScore) -> ScoreOutput:
        t0 = time.perf_counter()
        if self.step_s:
            time.sleep(self.step_s)
        logprobs = [fake_logprob(self.expert, request.call.prompt, c, len(ids))
                    for c, ids in zip(request.call.choices, request.choice_ids, strict=True)]
        tokens = sum(len(request.prompt_ids) + len(ids) for ids in request.choice_ids)
        elapsed = time.perf_counter() - t0
        work = StepWork(prefill_tokens=tokens, batch_size=len(request.choice_ids))
        return ScoreOutput(logprobs, work, StepTimings(prefill_s=elapsed, prefill_tokens=tokens))

    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> SequenceOutput | None:
        seq = self.scheduler.remove(request_id)
        return None if seq is None else self._output(seq, "", reason)

    def has_work(self) -> bool:
        return bool(self.scheduler.running) or self.scheduler.num_waiting > 0

    def load(self) -> tuple[int, int]:
        return len(self.scheduler.running), self.scheduler.num_waiting

    def step(self, now_s: float) -> StepResult:
        result = StepResult()
        for seq in self.scheduler.expired(now_s):
            result.outputs.append(self.abort(seq.request_id, FinishReason.DEADLINE))
        admitted = self.scheduler.admit()
        t0 = time.perf_counter()
        if self.step_s:
            time.sleep(self.step_s)
        batch = list(self.scheduler.running)
        for seq in batch:
            new = seq in admitted
            result.tokens_by_request[seq.request_id] = 1 + (seq.prompt_len if new else 0)
            seq.produced += 1
            done = seq.produced >= seq.req.call.max_tokens
            if done:
                self.scheduler.remove(seq.request_id)
            result.outputs.append(self._output(seq, TOKEN_TEXT, FinishReason.LENGTH if done else None))
        prefill = sum(s.prompt_len for s in admitted)
        elapsed = time.perf_counter() - t0
        result.work = StepWork(prefill_tokens=prefill, decode_tokens=len(batch), batch_size=len(batch))
        result.timings = StepTimings(decode_s=elapsed, decode_batch=len(batch), prefill_tokens=prefill)
        return result

    def _output(self, seq: _SyntheticSeq, text: str, reason: FinishReason | None) -> SequenceOutput:
        return SequenceOutput(
            request_id=seq.request_id,
            text=text,
            token_ids=(0,) if text else (),
            finish_reason=reason,
            prompt_tokens=seq.prompt_len,
            completion_tokens=seq.produced,
            logprob_sum=seq.produced * fake_token_logprob(self.expert, prompt_text(seq.req.call)) if reason else 0.0,
        )


def fake_token_logprob(expert: str, prompt: str) -> float:
    """Deterministic stand-in for a generated token's log p: -0.05 to -2.55 nats, per (expert, prompt)."""
    h = zlib.crc32(f"{expert}\x1e{prompt}".encode())
    return -(0.05 + (h % 1000) / 400.0)


def fake_logprob(expert: str, prompt: str, choice: str, tokens: int) -> float:
    """Deterministic stand-in for log p(choice | prompt): between -0.5 and -2.5 nats per token."""
    h = zlib.crc32(f"{expert}\x1f{prompt}\x1f{choice}".encode())
    return -(0.5 + (h % 1000) / 500.0) * tokens
