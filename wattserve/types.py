"""Small message types that cross process boundaries (gateway <-> expert actors <-> router).

Standard library only: these are pickled by Ray on every streamed chunk, so they are slotted
dataclasses, not pydantic models. Units are in the field names.
"""

from __future__ import annotations

import dataclasses
import enum
import operator
import types
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

if TYPE_CHECKING:  # images.py imports Priority from here
    from .images import ImageExpertStats


def _pickled_by_position(cls):
    """Pickle ``cls`` as its field values in order. A slotted dataclass otherwise pickles through
    dataclasses' ``__getstate__``/``__setstate__``, which call ``fields()`` on every object: with
    one streamed chunk per request that was a tenth of the gateway's CPU time (docs/benchmarks.md,
    "Serving-path overhead")."""
    names = tuple(f.name for f in dataclasses.fields(cls))
    values = operator.attrgetter(*names)
    if len(names) == 1:
        def __reduce__(self):
            return cls, (values(self),)
    else:
        def __reduce__(self):
            return cls, values(self)
    cls.__reduce__ = __reduce__
    return cls


class _Copier:
    """How :func:`evolve` copies one class: its fields' values read in one ``attrgetter`` call and
    written through the slots' own descriptors (a frozen dataclass's ``__setattr__`` refuses)."""

    __slots__ = ("names", "index", "values", "setters")

    def __init__(self, cls: type) -> None:
        if not dataclasses.is_dataclass(cls) or hasattr(cls, "__post_init__"):
            raise TypeError(f"evolve() needs a dataclass without __post_init__, not {cls.__name__}")
        fields = dataclasses.fields(cls)
        self.names = tuple(f.name for f in fields if f.init)
        if len(self.names) != len(fields):
            raise TypeError(f"evolve() needs every field of {cls.__name__} to be an __init__ field")
        self.index = {name: i for i, name in enumerate(self.names)}
        getter = operator.attrgetter(*self.names)
        self.values = getter if len(self.names) > 1 else (lambda obj: (getter(obj),))
        slots = all(isinstance(cls.__dict__.get(name), types.MemberDescriptorType) for name in self.names)
        self.setters = (tuple(cls.__dict__[name].__set__ for name in self.names) if slots
                        else tuple(_object_setter(name) for name in self.names))


def _object_setter(name: str):
    return lambda obj, value: object.__setattr__(obj, name, value)


_COPIERS: dict[type, _Copier] = {}


def evolve(obj, **changes):
    """``dataclasses.replace`` for the frozen slotted dataclasses of the request path (no
    ``__post_init__``, every field an ``__init__`` field), without its per-call ``fields()`` walk
    and keyword ``__init__``: a request was copied four times on its way in, an eighth of the
    gateway's own CPU time per request (docs/benchmarks.md, "Serving-path overhead")."""
    cls = type(obj)
    copier = _COPIERS.get(cls)
    if copier is None:
        copier = _COPIERS[cls] = _Copier(cls)
    values = list(copier.values(obj))
    index = copier.index
    for name, value in changes.items():
        i = index.get(name)
        if i is None:
            raise TypeError(f"{cls.__name__} has no field {', '.join(sorted(changes.keys() - index.keys()))}")
        values[i] = value
    new = object.__new__(cls)
    for setter, value in zip(copier.setters, values, strict=True):
        setter(new, value)
    return new


class Priority(enum.IntEnum):
    """Request priority. The power governor caps low-priority work first."""

    LOW = 1
    NORMAL = 2
    HIGH = 3


class FinishReason(enum.StrEnum):
    STOP = "stop"  # EOS token or a stop string
    LENGTH = "length"  # max_tokens or the model's context limit
    ABORT = "abort"  # cancelled by the caller or the gateway
    DEADLINE = "deadline"  # the request's deadline passed inside the engine
    ERROR = "error"  # the engine failed while serving it


@_pickled_by_position
@dataclass(slots=True, frozen=True)
class SamplingParams:
    """How to pick the next token. ``temperature == 0`` is greedy decoding."""

    temperature: float = 0.0
    top_p: float = 1.0
    top_k: int = 0  # 0 disables top-k filtering
    seed: int | None = None
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False  # load tests ask for exactly max_tokens tokens
    # Penalties and filters with vLLM's semantics (vllm.SamplingParams); each default is neutral.
    # They apply to greedy decoding too, before the argmax, as in vLLM.
    #: > 0; tokens already in the prompt or output: positive logits / p, negative logits * p
    repetition_penalty: float = 1.0
    #: in [-2, 2]; subtracted from the logit of every token the output already contains
    presence_penalty: float = 0.0
    #: in [-2, 2]; times the number of times a token occurs in the output, subtracted from its logit
    frequency_penalty: float = 0.0
    #: in [0, 1]; after temperature, drop tokens whose probability is below min_p x the top one's
    min_p: float = 0.0
    #: EOS and stop strings are ignored until this many tokens were generated (<= max_tokens)
    min_tokens: int = 0


@_pickled_by_position
@dataclass(slots=True, frozen=True)
class ChatMessage:
    """One turn of a chat conversation (OpenAI ``messages``); ``role`` is system, user or assistant."""

    role: str
    content: str


@_pickled_by_position
@dataclass(slots=True, frozen=True)
class GenerateCall:
    """One generation request as an expert receives it (already validated by the gateway).

    A chat request carries ``messages`` (and an empty ``prompt``): the expert renders them with
    its own tokenizer's chat template, because only the expert knows its model's format.
    """

    request_id: str
    prompt: str
    max_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    priority: Priority = Priority.NORMAL
    tenant: str = "default"
    deadline_unix_s: float | None = None  # wall clock; the engine drops the request after it
    messages: tuple[ChatMessage, ...] = ()
    # early exit: share of full decoder depth to spend per token, in (0, 1]; None: the expert's default
    compute_budget: float | None = None
    energy_budget_j: float | None = None  # the request's energy budget, for the early-exit depth


@dataclass(slots=True, frozen=True)
class ScoreCall:
    """Score candidate continuations of a prompt (the log-probability of each ``choice`` given
    ``prompt``), as an expert receives it."""

    request_id: str
    prompt: str
    choices: tuple[str, ...]
    priority: Priority = Priority.NORMAL
    tenant: str = "default"


@dataclass(slots=True, frozen=True)
class ScoreResult:
    """One expert's answer to a :class:`ScoreCall`. ``choice_logprobs[k]`` is the sum over the
    tokens of choice k of log p(token | prompt, earlier tokens), in nats."""

    request_id: str
    choice_logprobs: tuple[float, ...]
    choice_tokens: tuple[int, ...]
    prompt_tokens: int
    latency_ms: float  # from arrival at the expert to the result
    energy_j: float
    energy_source: str


@dataclass(slots=True, frozen=True)
class StepWork:
    """What one engine step computed; modeled devices turn it into joules and seconds.

    ``layer_fraction`` is the share of decoder layers actually run, averaged over the step's
    tokens (1.0 without early exit); early exit counts the K/V projections it still runs for
    skipped layers by their share of a layer's weights. ``weight_fraction`` is the share of the
    decoder's weights the step read at all: a layer is read if any row ran it, so in a batch it
    follows the deepest row, which is what memory-bound decode pays for.
    """

    prefill_tokens: int = 0
    decode_tokens: int = 0
    batch_size: int = 0
    layer_fraction: float = 1.0
    weight_fraction: float | None = None  # None: the same as layer_fraction

    @property
    def tokens(self) -> int:
        return self.prefill_tokens + self.decode_tokens


@_pickled_by_position
@dataclass(slots=True, frozen=True)
class ExitUsage:
    """What early exit did for one request's completion tokens (the first comes from prefill,
    at full depth). ``energy_saved_j`` is a *gross* estimate: the skipped compute (in
    layer-equivalents, net of the K/V still computed for skipped layers) times the expert's joules
    per layer, its measured J per layer-token of full-depth decode less the LM head's part, which
    every token pays at any depth; it leaves out what the exit probes cost. ``energy_saved_net_j``
    is measured: full-depth decode steps of the same batch size against the early-exit steps
    that served the request (``workers/energy.py``, ``ExitSavingMeter``), negative when early
    exit cost more, None where no full-depth reference was measured. The request's ``energy_j``
    is what was actually spent."""

    num_layers: int
    avg_exit_layer: float  # decoder layers run per completion token
    layers_skipped: int  # summed over completion tokens
    compute_fraction: float  # effective share of full-depth decoder compute, K/V propagation included
    energy_saved_j: float  # gross estimate (skipped layers x J per layer); see the docstring
    operating_point: str  # the calibrated point that served it ("full" at full depth)
    energy_saved_net_j: float | None = None  # measured against full-depth steps; None: no reference


@_pickled_by_position
@dataclass(slots=True, frozen=True)
class RequestUsage:
    """Final accounting for one request, as measured by the expert that served it."""

    prompt_tokens: int
    completion_tokens: int
    ttft_ms: float  # from arrival at the expert to the first token
    latency_ms: float  # from arrival at the expert to the last token
    energy_j: float
    energy_source: str  # "measured:nvml", "modeled:cpu", "modeled:h100", ...
    finish_reason: FinishReason
    exits: ExitUsage | None = None  # set by engines with early exit enabled
    mean_logprob: float | None = None  # mean log p of the generated tokens under the model (nats)


@_pickled_by_position
@dataclass(slots=True, frozen=True)
class StreamEvent:
    """A piece of one request's output. The last event of a request has ``usage`` set."""

    request_id: str
    text: str = ""
    token_ids: tuple[int, ...] = ()
    usage: RequestUsage | None = None

    @property
    def finished(self) -> bool:
        return self.usage is not None


@dataclass(slots=True, frozen=True)
class EnergyTotals:
    """Energy an expert has seen since it started. ``requests_j + idle_j + probe_j == device_j``:
    ``probe_j`` is what the replica's own start-up probes spent (``ExpertWorker.probe``), kept
    apart from the requests clients sent."""

    requests_j: float
    idle_j: float
    device_j: float
    energy_source: str
    probe_j: float = 0.0


@dataclass(slots=True, frozen=True)
class ExpertProfile:
    """What an expert replica publishes about itself: identity, measured costs and load.

    Cost figures are exponentially weighted averages of what the engine measured (``None``
    until measured). ``decode_ms_per_step_by_batch`` maps batch size to the time of one decode
    step for the whole batch.
    """

    expert: str
    replica: int
    model: str
    engine: str
    device: str
    energy_source: str
    priority_class: str
    max_batch: int
    max_queue: int
    max_model_len: int
    params: int
    healthy: bool
    running: int  # requests in the running batch
    waiting: int  # requests admitted but not yet started
    prefill_ms_per_token: float | None = None
    decode_ms_per_token: float | None = None
    j_per_token: float | None = None
    decode_ms_per_step_by_batch: dict[int, float] = field(default_factory=dict)
    busy_power_w: float | None = None  # EWMA of step energy / step compute time
    # the same over prefill-only and decode-only steps (None until such a step was measured)
    prefill_power_w: float | None = None
    decode_power_w: float | None = None
    energy: EnergyTotals | None = None
    requests_finished: int = 0
    error: str = ""  # why the replica is unhealthy, if it is
    host: str = ""  # where the replica runs, for operators
    pid: int = 0
    # device telemetry (None where the backend cannot know it); the power governor moves these
    power_w: float | None = None
    power_limit_w: float | None = None
    sm_clock_mhz: float | None = None
    max_sm_clock_mhz: float | None = None
    # early exit (torch engine): decoder depth, measured J per layer-token in decode, and how many
    # decode tokens left at each depth since start
    num_layers: int = 0
    j_per_layer_token: float | None = None
    exit_histogram: dict[int, int] = field(default_factory=dict)
    image: ImageExpertStats | None = None  # image experts: frames, UNet evaluations, sessions
    sm_clock_cap_mhz: float | None = None  # the governor's SM clock ceiling in effect; None: uncapped
    kv_cache_usage: float | None = None  # share of the KV cache in use, 0..1 (engines that report it: vllm)

    @property
    def queue_depth(self) -> int:
        return self.running + self.waiting
