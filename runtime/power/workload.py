"""Request workloads for the cluster simulator, from the Azure LLM inference traces.

The 2023 traces (``shared/data/traces/azure_llm_2023``; Patel et al., Splitwise, ISCA'24) list
one request per row: arrival time, context (prompt) tokens and generated tokens, for about an
hour of one service (conv ~5.5 req/s, code ~2.6 req/s). A simulated row needs a chosen rate per
server, so the trace is *replicated*: ``k`` copies, each shifted (circularly) by its own seeded
random offset of at most ``shift_window_s`` (default 60 s), then thinned at random to exactly
the wanted mean rate. Small shifts keep what matters for power: all copies share the service's
minute-scale load swings (conv varies 2.3x between its quietest and busiest minute, code goes
from idle to bursts of 600 requests a minute), while the exact arrival instants of different
copies decorrelate as independent users' would. Prompt and output sizes are the trace's own.
Priority is drawn per request (high with probability ``hp_fraction``), as POLCA assigns
priority per workload.
"""

from __future__ import annotations

import csv
import datetime as dt
import math
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wattserve.errors import ConfigError


@dataclass(slots=True, frozen=True)
class Trace:
    """Requests sorted by arrival: seconds from the first arrival, prompt and output tokens."""

    name: str
    arrival_s: np.ndarray
    prompt_tokens: np.ndarray
    output_tokens: np.ndarray

    @property
    def duration_s(self) -> float:
        return float(self.arrival_s[-1]) if len(self.arrival_s) else 0.0

    @property
    def rate_per_s(self) -> float:
        return len(self.arrival_s) / self.duration_s if self.duration_s > 0 else 0.0


@dataclass(slots=True, frozen=True)
class Workload(Trace):
    """A trace scaled to a cluster, with a priority per request."""

    high_priority: np.ndarray = None  # bool per request


def load_trace(path: str | Path) -> Trace:
    """Read an Azure LLM inference trace CSV (TIMESTAMP, ContextTokens, GeneratedTokens)."""
    path = Path(path)
    try:
        with path.open(newline="") as fh:
            rows = list(csv.DictReader(fh))
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the trace ({exc.strerror})") from None
    need = {"TIMESTAMP", "ContextTokens", "GeneratedTokens"}
    if not rows or not need <= set(rows[0]):
        raise ConfigError(f"{path}: expected columns {', '.join(sorted(need))} (an Azure LLM inference trace)")
    stamps = np.array([_seconds(r["TIMESTAMP"]) for r in rows])
    order = np.argsort(stamps, kind="stable")
    prompt = np.array([int(r["ContextTokens"]) for r in rows])[order]
    output = np.array([int(r["GeneratedTokens"]) for r in rows])[order]
    stamps = stamps[order] - stamps[order][0]
    return Trace(path.stem, stamps, np.maximum(prompt, 1), np.maximum(output, 1))


def _seconds(stamp: str) -> float:
    # 7 fractional digits: more than datetime parses, so split the fraction off.
    whole, _, frac = stamp.strip().partition(".")
    base = dt.datetime.strptime(whole, "%Y-%m-%d %H:%M:%S").replace(tzinfo=dt.UTC).timestamp()
    return base + (float(f"0.{frac}") if frac else 0.0)


def scale_trace(trace: Trace, rate_per_s: float, *, hp_fraction: float, seed: int,
                duration_s: float | None = None, shift_window_s: float = 60.0) -> Workload:
    """Replicate and thin ``trace`` to a mean of ``rate_per_s`` requests/s over ``duration_s``
    (default: the trace's own duration); each request is high priority with ``hp_fraction``."""
    if rate_per_s <= 0:
        raise ConfigError(f"the request rate must be > 0 (got {rate_per_s})")
    if not 0 <= hp_fraction <= 1:
        raise ConfigError(f"hp_fraction must be in [0, 1] (got {hp_fraction})")
    rng = np.random.default_rng(seed)
    span = trace.duration_s
    horizon = span if duration_s is None else min(duration_s, span)
    copies = rate_per_s / trace.rate_per_s
    n_copies = max(1, math.ceil(copies))
    arrivals, prompts, outputs = [], [], []
    for _ in range(n_copies):
        shifted = (trace.arrival_s + rng.uniform(0.0, min(shift_window_s, span))) % span
        arrivals.append(shifted)
        prompts.append(trace.prompt_tokens)
        outputs.append(trace.output_tokens)
    arrival = np.concatenate(arrivals)
    keep = (rng.random(len(arrival)) < copies / n_copies) & (arrival < horizon)
    order = np.argsort(arrival[keep], kind="stable")
    return Workload(
        name=trace.name,
        arrival_s=arrival[keep][order],
        prompt_tokens=np.concatenate(prompts)[keep][order],
        output_tokens=np.concatenate(outputs)[keep][order],
        high_priority=(rng.random(int(keep.sum())) < hp_fraction),
    )
