"""The interface every engine implements (torch here; vLLM plugs in behind the same one).

An engine is synchronous and single-threaded: only the engine loop thread (``workers/loop.py``)
calls :meth:`Engine.add`, :meth:`Engine.abort` and :meth:`Engine.step`. :meth:`Engine.validate`
is the exception: it is pure and thread-safe, so callers get INVALID_ARGUMENT before anything is
queued. One step is ``schedule -> execute -> update``; it returns what each request produced.
"""

from __future__ import annotations

import abc
from dataclasses import dataclass, field

from wattserve.types import ExitUsage, FinishReason, GenerateCall, ScoreCall, StepWork


@dataclass(slots=True)
class PreparedRequest:
    """A validated request: the call plus its prompt token ids."""

    call: GenerateCall
    prompt_ids: list[int]
    arrival_s: float  # engine-loop clock (monotonic seconds) at admission
    deadline_s: float | None = None  # same clock; the engine ends the request after it


@dataclass(slots=True)
class ActiveRequest:
    """Base of an engine's per-request state; satisfies the scheduler's ``Schedulable``."""

    req: PreparedRequest

    @property
    def request_id(self) -> str:
        return self.req.call.request_id

    @property
    def priority(self) -> int:
        return int(self.req.call.priority)

    @property
    def prompt_len(self) -> int:
        return len(self.req.prompt_ids)

    @property
    def deadline_s(self) -> float | None:
        return self.req.deadline_s


@dataclass(slots=True)
class SequenceOutput:
    """What one request produced in one step (or its end, when ``finish_reason`` is set)."""

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    finish_reason: FinishReason | None = None
    prompt_tokens: int = 0
    completion_tokens: int = 0
    error: str = ""
    exits: ExitUsage | None = None  # early-exit summary, on the final output only
    logprob_sum: float = 0.0  # sum of log p (model distribution, nats) of the tokens generated so far


@dataclass(slots=True)
class StepTimings:
    """Wall time of the step's phases, in seconds, and what each phase covered."""

    prefill_s: float = 0.0
    prefill_tokens: int = 0
    decode_s: float = 0.0
    decode_batch: int = 0
    # a Score's choices after its prompt (inside prefill_s, not in prefill_tokens): each choice
    # token also runs the output layer over the vocabulary, so it is not a prompt token's cost
    scored_s: float = 0.0


@dataclass(slots=True)
class StepResult:
    outputs: list[SequenceOutput] = field(default_factory=list)
    work: StepWork = field(default_factory=StepWork)
    # tokens each request had processed in this step: the key for splitting the step's energy
    tokens_by_request: dict[str, int] = field(default_factory=dict)
    timings: StepTimings = field(default_factory=StepTimings)
    # early exit: decode tokens that left at each depth (decoder layers run) in this step
    exit_counts: dict[int, int] = field(default_factory=dict)
    # early exit: this step's decode ran the exit probes (so it is no full-depth reference)
    exit_probes: bool = False


@dataclass(slots=True)
class PreparedScore:
    """A validated scoring request: prompt token ids and each choice's token ids."""

    call: ScoreCall
    prompt_ids: list[int]
    choice_ids: list[list[int]]
    arrival_s: float  # engine-loop clock at admission


@dataclass(slots=True)
class ScoreOutput:
    """Per-choice summed log-probabilities (nats) and what computing them cost."""

    logprobs: list[float]
    work: StepWork
    timings: StepTimings


@dataclass(slots=True, frozen=True)
class EngineInfo:
    """Static facts about the loaded model, for profiles and validation."""

    model: str
    engine: str
    params: int
    max_model_len: int
    max_batch: int
    device: str  # torch device the engine computes on, e.g. "cpu" or "cuda:0"
    num_layers: int = 0  # decoder layers loaded (0: no layered model, e.g. synthetic)


class Engine(abc.ABC):
    """A model behind continuous batching. See the module docstring for threading rules."""

    info: EngineInfo

    @abc.abstractmethod
    def validate(self, call: GenerateCall, arrival_s: float) -> PreparedRequest:
        """Tokenize and check a request against the model's limits.

        Raises ``InvalidRequest`` naming what to fix. Pure and thread-safe.
        """

    @abc.abstractmethod
    def add(self, request: PreparedRequest) -> None:
        """Queue a validated request; it joins the running batch at a step boundary."""

    @abc.abstractmethod
    def abort(self, request_id: str, reason: FinishReason = FinishReason.ABORT) -> SequenceOutput | None:
        """Remove a request at once, freeing its batch slot and KV cache.

        Returns its final output, or None if the engine does not know it (already finished).
        """

    @abc.abstractmethod
    def step(self, now_s: float) -> StepResult:
        """Run one iteration: admit waiting requests, compute, and report outputs."""

    @abc.abstractmethod
    def validate_score(self, call: ScoreCall, arrival_s: float) -> PreparedScore:
        """Tokenize a scoring request and check it against the model's limits. Thread-safe."""

    @abc.abstractmethod
    def score(self, request: PreparedScore) -> ScoreOutput:
        """Log-probability of every choice given the prompt. Called by the engine loop between
        steps (never concurrently with :meth:`step`); leaves the running batch untouched."""

    @abc.abstractmethod
    def has_work(self) -> bool:
        """Whether any request is waiting or running."""

    @abc.abstractmethod
    def load(self) -> tuple[int, int]:
        """(running, waiting) request counts."""

    def observe_energy(self, prefill_j_per_layer_token: float | None, decode_j_per_layer_token: float | None) -> None:
        """The loop's latest measured joules per layer-token (early exit maps energy budgets
        to depth with them). Engines without early exit ignore this."""

    def close(self) -> None:
        """Free model memory."""
