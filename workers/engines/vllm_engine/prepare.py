"""Request validation for the vLLM engine, before anything reaches vLLM.

Prompts are tokenized here with the model's Hugging Face tokenizer (the one vLLM loads too) and
handed to vLLM as token ids, so a vLLM expert counts prompt tokens, renders chat messages and
refuses over-long requests exactly like the torch engine (``workers/engines/chat.py``), and the
caller gets INVALID_ARGUMENT before a slot is taken. Thread-safe: the actor's event loop calls it.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass
from pathlib import Path

from wattserve.errors import InvalidRequest
from wattserve.types import GenerateCall, ScoreCall, ScoreResult

from ..chat import encode_checked
from . import settings


@dataclass(slots=True, frozen=True)
class Prepared:
    """A validated generation: its prompt token ids and vLLM sampling parameters."""

    call: GenerateCall
    prompt_ids: list[int]
    params: object  # vllm.SamplingParams


@dataclass(slots=True, frozen=True)
class PreparedScoreJob:
    """A validated scoring request: prompt ids and each choice's ids (no special tokens)."""

    call: ScoreCall
    prompt_ids: list[int]
    choice_ids: list[list[int]]
    arrival_s: float

    def result(self, logprobs: list[float], latency_ms: float, energy_j: float, energy_source: str) -> ScoreResult:
        return ScoreResult(
            request_id=self.call.request_id,
            choice_logprobs=tuple(logprobs),
            choice_tokens=tuple(len(c) for c in self.choice_ids),
            prompt_tokens=len(self.prompt_ids),
            latency_ms=latency_ms,
            energy_j=energy_j,
            energy_source=energy_source,
        )


class Tokenizing:
    """The expert's tokenizer and limits."""

    def __init__(self, model_dir: Path, expert: str, max_model_len: int, report_logprobs: bool) -> None:
        from transformers import AutoTokenizer

        self.tokenizer = AutoTokenizer.from_pretrained(model_dir)
        self.expert = expert
        self.max_model_len = max_model_len
        self.report_logprobs = report_logprobs
        self._lock = threading.Lock()  # fast tokenizers are not safe for concurrent use

    def prepare(self, call: GenerateCall) -> Prepared:
        with self._lock:
            ids, call = encode_checked(self.tokenizer, call, expert=self.expert, max_model_len=self.max_model_len)
        return Prepared(call=call, prompt_ids=ids, params=settings.sampling_params(call, self.report_logprobs))

    def prepare_score(self, call: ScoreCall, arrival_s: float) -> PreparedScoreJob:
        if not call.prompt or not call.choices or not all(call.choices):
            raise InvalidRequest("scoring needs a prompt and at least one non-empty choice")
        with self._lock:
            prompt_ids = list(self.tokenizer(call.prompt).input_ids)
            # Choices continue the prompt: tokenized without special tokens (no second BOS).
            choice_ids = [list(self.tokenizer(c, add_special_tokens=False).input_ids) for c in call.choices]
        if not prompt_ids or not all(choice_ids):
            raise InvalidRequest("the prompt or a choice tokenizes to nothing")
        longest = max(len(c) for c in choice_ids)
        # vLLM generates one token after the scored text: it needs room for it.
        if len(prompt_ids) + longest + 1 > self.max_model_len:
            raise InvalidRequest(
                f"prompt ({len(prompt_ids)} tokens) plus the longest choice ({longest} tokens) exceeds "
                f"expert {self.expert!r}'s limit of {self.max_model_len - 1} tokens for scoring"
            )
        return PreparedScoreJob(call, prompt_ids, choice_ids, arrival_s)
