"""What a load test sends and when: arrivals, lengths, prompts, budgets and priorities.

Arrivals come from a production trace (Azure LLM inference 2023, ``conv`` or ``code``, or a
trace file in one of the public formats of ``traces.py``) replayed with a time scale and a rate scale, from a Poisson or gamma process at a rate, or from a
closed loop (``send_at_s`` None: a request leaves when a slot frees). Lengths come from the
trace's token counts (or fixed values), capped so tiny models can keep up. Prompts are
synthesised to the wanted token count from common English words that are one token each in the
usual BPE vocabularies (exact with ``tokenizer``), or read from a prompt file. Budgets,
priorities and experts are drawn per request from weighted mixes. Everything is seeded.
"""

from __future__ import annotations

import itertools
import json
import math
import os
import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

from wattserve.errors import InvalidRequest

from .traces import TraceRow, load_trace

__all__ = ["RequestSpec", "TraceRow", "WorkloadSpec", "build_workload", "load_trace", "trace_path"]

TRACE_FILES = {"conv": "AzureLLMInferenceTrace_conv.csv", "code": "AzureLLMInferenceTrace_code.csv"}
TRACE_SUBDIR = Path("traces") / "azure_llm_2023"

# Short, frequent words: one token each (with their leading space) in Llama/SmolLM2/Gemma BPEs.
WORDS = (
    "the of and to in is that for it as was with be by on not he this are or his from at which but "
    "have an they you were her she there one all we can their has been if more when will would who "
    "so no time year people way day man thing woman life child world school state family student "
    "group country problem hand part place case week company system program question work number "
    "night point home water room mother area money story fact month lot right study book eye job "
    "word business issue side kind head house service friend father power hour game line end member"
).split()


@dataclass(slots=True, frozen=True)
class RequestSpec:
    """One request of a load test."""

    index: int
    send_at_s: float | None  # offset from the start of the run; None: closed loop
    prompt: str
    input_tokens: int  # the length asked for (the server reports what it counted)
    max_tokens: int
    expert: str = ""  # "" or "auto": the router decides
    energy_budget_j: float | None = None
    latency_budget_ms: float | None = None
    priority: str = "normal"


def shared_data_dir() -> Path | None:
    """``shared/data``: $WATTSERVE_SHARED_DATA, or beside / above the repository, or None."""
    env = os.environ.get("WATTSERVE_SHARED_DATA")
    repo = Path(__file__).resolve().parents[2]
    for cand in ([Path(env)] if env else []) + [repo / "shared" / "data", repo.parent / "shared" / "data", Path("/work/shared/data")]:
        if cand.is_dir():
            return cand
    return None


def trace_path(name: str) -> Path:
    """A trace by name (conv, code) in shared/data, or a trace file's path (any format of
    ``runtime/loadtest/traces.py``)."""
    if name in TRACE_FILES:
        base = shared_data_dir()
        if base is None:
            raise InvalidRequest(f"trace {name!r} needs shared/data (set WATTSERVE_SHARED_DATA to its path)")
        return base / TRACE_SUBDIR / TRACE_FILES[name]
    path = Path(name)
    if not path.is_file():
        raise InvalidRequest(f"trace {name!r} is neither conv, code nor a readable file")
    return path


# -- arrivals ------------------------------------------------------------------------------------
def trace_arrivals(rows: Sequence[TraceRow], time_scale: float, rate_scale: float, rng: random.Random,
                   offset_s: float = 0.0) -> Iterator[tuple[float, TraceRow]]:
    """(send time, row) pairs of a trace replay.

    ``time_scale`` multiplies trace time (0.01 replays an hour in 36 s). ``rate_scale`` changes
    the request rate without changing the time span: below 1 each request is kept with that
    probability; above 1 each request is sent floor(rate_scale) times, once more with the
    fractional probability, the copies at uniform times before the next original arrival.
    """
    if time_scale <= 0 or rate_scale <= 0:
        raise InvalidRequest("time_scale and rate_scale must be positive")
    rows = [r for r in rows if r.t_s >= offset_s]
    for k, row in enumerate(rows):
        t = (row.t_s - offset_s) * time_scale
        gap = ((rows[k + 1].t_s - row.t_s) * time_scale) if k + 1 < len(rows) else 0.0
        copies = int(rate_scale) + (1 if rng.random() < rate_scale - int(rate_scale) else 0)
        for when in sorted([t] + [t + rng.random() * gap for _ in range(copies - 1)])[:copies]:
            yield when, row


def process_arrivals(rate_per_s: float, burstiness: float, rng: random.Random) -> Iterator[float]:
    """Send times of a gamma process with mean rate ``rate_per_s``; burstiness (the gamma shape)
    1 is Poisson, below 1 burstier, above 1 more regular (coefficient of variation 1/sqrt(k))."""
    if rate_per_s <= 0 or burstiness <= 0:
        raise InvalidRequest("rate and burstiness must be positive")
    t = 0.0
    while True:
        t += rng.gammavariate(burstiness, 1.0 / (rate_per_s * burstiness))
        yield t


# -- prompts -------------------------------------------------------------------------------------
class PromptSource:
    """Prompts of a wanted token count, synthesised (seeded) or taken in turn from a file."""

    def __init__(self, rng: random.Random, prompt_file: str | None = None, tokenizer_dir: str | None = None) -> None:
        self.rng = rng
        self.prompts = _read_prompts(prompt_file) if prompt_file else None
        self._cycle = itertools.cycle(self.prompts) if self.prompts else None
        self.tokenizer = None
        if tokenizer_dir:
            from transformers import AutoTokenizer

            self.tokenizer = AutoTokenizer.from_pretrained(tokenizer_dir)

    def make(self, tokens: int) -> str:
        if self._cycle is not None:
            return next(self._cycle)
        words = [self.rng.choice(WORDS) for _ in range(tokens)]
        if self.tokenizer is None:
            return " ".join(words)
        # Words that split into several tokens exist in some vocabularies: cut at exactly `tokens`.
        ids = self.tokenizer(" ".join(words), add_special_tokens=False).input_ids[:tokens]
        return self.tokenizer.decode(ids)


def _read_prompts(path: str) -> list[str]:
    """A text file (one prompt per line) or JSONL with a ``prompt`` field."""
    out = []
    for line in Path(path).read_text().splitlines():
        if not line.strip():
            continue
        out.append(json.loads(line)["prompt"] if path.endswith(".jsonl") else line)
    if not out:
        raise InvalidRequest(f"prompt file {path} holds no prompts")
    return out


# -- mixes ---------------------------------------------------------------------------------------
class Mix:
    """A weighted choice among values, from ``"a=3,b=1"`` (``none`` is no value)."""

    def __init__(self, spec: str, convert=str) -> None:
        self.values: list = []
        self.weights: list[float] = []
        for part in filter(None, (p.strip() for p in spec.split(","))):
            value, _, weight = part.partition("=")
            try:
                w = float(weight) if weight else 1.0
                v = None if value.strip().lower() == "none" else convert(value.strip())
            except ValueError:
                raise InvalidRequest(f"mix {spec!r}: cannot read {part!r} (expected value=weight)") from None
            if not (w >= 0 and math.isfinite(w)):
                raise InvalidRequest(f"mix {spec!r}: weight of {value!r} must be >= 0")
            self.values.append(v)
            self.weights.append(w)
        if not self.values or sum(self.weights) <= 0:
            raise InvalidRequest(f"mix {spec!r} is empty or all weights are 0")

    def draw(self, rng: random.Random):
        return rng.choices(self.values, self.weights)[0] if len(self.values) > 1 else self.values[0]


def _priority(value: str) -> str:
    if value not in ("low", "normal", "high"):
        raise ValueError(value)
    return value


@dataclass(slots=True)
class WorkloadSpec:
    """How to build the request stream (the CLI's workload flags)."""

    arrival: str = "poisson"  # trace | poisson | gamma | closed | auto (trace if it has times, else poisson)
    trace: str | None = None
    trace_format: str = "auto"  # a name of traces.FORMATS, or auto (detected from the columns)
    trace_time_unit: str = "auto"  # numeric timestamps: s, ms or auto
    rate_per_s: float = 1.0
    burstiness: float = 1.0
    time_scale: float = 1.0
    rate_scale: float = 1.0
    trace_offset_s: float = 0.0
    input_tokens: int = 32
    output_tokens: int = 32
    max_input_tokens: int | None = None
    max_output_tokens: int | None = None
    prompt_file: str | None = None
    tokenizer: str | None = None
    model_mix: str = "auto"
    priority_mix: str = "normal"
    energy_budget_mix: str = "none"
    latency_budget_mix: str = "none"
    seed: int = 0


def build_workload(spec: WorkloadSpec) -> Iterator[RequestSpec]:
    """The (possibly endless) stream of requests; the runner's bounds end it."""
    rng = random.Random(spec.seed)
    arrival = spec.arrival
    if arrival == "trace" and not spec.trace:
        raise InvalidRequest("arrival 'trace' needs a trace (conv, code or a trace file)")
    rows = load_trace(trace_path(spec.trace), spec.trace_format, spec.trace_time_unit) if spec.trace else None
    timed = bool(rows) and rows[0].t_s is not None
    if arrival == "auto":
        arrival = "trace" if timed else "poisson"
    if arrival == "trace" and not timed:
        raise InvalidRequest(f"trace {spec.trace} has no arrival times (its format carries prompts and lengths "
                             "only): use --arrival poisson, gamma or closed with it")
    if arrival == "trace":
        timed = trace_arrivals(rows, spec.time_scale, spec.rate_scale, rng, spec.trace_offset_s)
    elif arrival in ("poisson", "gamma"):
        times = process_arrivals(spec.rate_per_s, 1.0 if arrival == "poisson" else spec.burstiness, rng)
        timed = zip(times, _lengths(rows, spec), strict=False)
    elif arrival == "closed":
        timed = ((None, row) for row in _lengths(rows, spec))
    else:
        raise InvalidRequest(f"unknown arrival {arrival!r}: trace, poisson, gamma, closed or auto")
    prompts = PromptSource(rng, spec.prompt_file, spec.tokenizer)
    mixes = (Mix(spec.model_mix), Mix(spec.priority_mix, _priority), Mix(spec.energy_budget_mix, float),
             Mix(spec.latency_budget_mix, float))
    for index, (send_at, row) in enumerate(timed):
        n_in = _cap(row.input_tokens, spec.max_input_tokens)
        expert, priority, energy, latency = (m.draw(rng) for m in mixes)
        # A trace that carries its prompts is sent as written, unless --prompt-file overrides it.
        prompt = row.prompt if row.prompt is not None and not spec.prompt_file else prompts.make(n_in)
        yield RequestSpec(
            index=index, send_at_s=send_at, prompt=prompt, input_tokens=n_in,
            # 0: the trace gives no output length for this row (vLLM custom without output_tokens)
            max_tokens=_cap(row.output_tokens or spec.output_tokens, spec.max_output_tokens),
            expert="" if expert in (None, "auto") else expert, energy_budget_j=energy,
            latency_budget_ms=latency, priority=priority or "normal",
        )


def _lengths(rows: Sequence[TraceRow] | None, spec: WorkloadSpec) -> Iterator[TraceRow]:
    """Lengths for process or closed-loop arrivals: the trace's rows in order, or fixed."""
    if rows:
        start = [r for r in rows if r.t_s is None or r.t_s >= spec.trace_offset_s] or list(rows)
        return itertools.cycle(start)
    return itertools.repeat(TraceRow(0.0, spec.input_tokens, spec.output_tokens))


def _cap(value: int, cap: int | None) -> int:
    return max(1, min(value, cap) if cap else value)
