"""Reading public LLM request traces: which file format, which columns, which time unit.

A trace gives, per request, an arrival time (optional) and input/output lengths in tokens, or a
prompt text. The formats below are the ones public LLM traces and vLLM's benchmark datasets
use; :func:`detect_format` tells them apart by the file's columns (or JSON keys), and
``--trace-format`` forces one. Anything else is refused with the columns that were found.

Numeric timestamps are seconds or milliseconds: each format names its unit; the generic
reader takes it from the column name (``*_ms``, ``*_s``) or ``--trace-time-unit``, and
otherwise from magnitude (epoch milliseconds are > 1e11); relative numbers default to seconds.
Date-times (``2023-11-16 18:15:46.6805900``, ISO 8601 with or without a zone) are read as such.
Lengths from text (ShareGPT turns, vLLM custom prompts without a count) are word counts, an
estimate of tokens unless ``--tokenizer`` is given; the records hold what the server counted.
"""

from __future__ import annotations

import csv
import json
import math
import re
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path

from wattserve.errors import InvalidRequest


@dataclass(slots=True, frozen=True)
class TraceRow:
    t_s: float | None  # seconds since the trace's first request; None: the trace has no times
    input_tokens: int
    output_tokens: int
    prompt: str | None = None  # the request's own text, where the trace carries it


@dataclass(slots=True, frozen=True)
class TraceFormat:
    name: str
    description: str
    time: tuple[str, ...]  # column names, first found wins; () for untimed formats
    input: tuple[str, ...]
    output: tuple[str, ...]
    time_unit: str = "auto"  # s | ms | auto (column name, magnitude or date-time)
    prompt: tuple[str, ...] = ()
    signature: tuple[str, ...] = ()  # columns whose presence identifies the format


FORMATS: dict[str, TraceFormat] = {f.name: f for f in (
    TraceFormat("azure", "Azure LLM inference 2023/2024 CSV: TIMESTAMP (date-time), ContextTokens, GeneratedTokens",
                ("TIMESTAMP",), ("ContextTokens",), ("GeneratedTokens",), signature=("ContextTokens", "GeneratedTokens")),
    TraceFormat("burstgpt", "BurstGPT CSV: Timestamp (s), Request tokens, Response tokens",
                ("Timestamp",), ("Request tokens",), ("Response tokens",), "s",
                signature=("Request tokens", "Response tokens")),
    TraceFormat("mooncake", "Mooncake JSONL: timestamp (ms), input_length, output_length (text_input optional)",
                ("timestamp",), ("input_length",), ("output_length",), "ms", ("text_input",),
                signature=("input_length", "output_length")),
    TraceFormat("generic", "CSV or JSONL with a time column (timestamp, arrival_time, time, ts; *_ms for ms) "
                "and length columns (input_tokens/prompt_tokens/input_len, output_tokens/completion_tokens/output_len)",
                ("arrival_time_ms", "timestamp_ms", "time_ms", "arrival_time_s", "timestamp_s", "time_s",
                 "arrival_time", "timestamp", "time", "ts", "created_at"),
                ("input_tokens", "prompt_tokens", "input_len", "prompt_len", "num_input_tokens", "input_length"),
                ("output_tokens", "completion_tokens", "output_len", "num_output_tokens", "output_length")),
    TraceFormat("vllm-custom", "vLLM bench custom JSONL: prompt, output_tokens (optional); no times",
                (), (), ("output_tokens",), prompt=("prompt",), signature=("prompt",)),
    TraceFormat("sharegpt", "ShareGPT JSON (vLLM bench sharegpt): conversations of human/gpt turns; no times",
                (), (), (), signature=("conversations",)),
)}
FORMAT_NAMES = ("auto", *FORMATS)


def formats_help() -> str:
    """One line per format, for ``--help`` and errors."""
    return "; ".join(f"{f.name}: {f.description}" for f in FORMATS.values())


# -- reading records -----------------------------------------------------------------------------
def _records(path: Path) -> tuple[list[dict], str]:
    """The file's records as dicts, and its kind (csv, jsonl or json)."""
    try:
        text = path.read_text(encoding="utf-8-sig")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"trace {path}: cannot read it ({exc})") from None
    head = text.lstrip()[:1]
    if head == "[":
        try:
            data = json.loads(text)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"trace {path}: starts like a JSON array but is not valid JSON ({exc})") from None
        if not all(isinstance(r, dict) for r in data):
            raise InvalidRequest(f"trace {path}: a JSON trace must be an array of objects")
        return data, "json"
    if head == "{":
        out = []
        for n, line in enumerate(text.splitlines(), 1):
            if not line.strip():
                continue
            try:
                rec = json.loads(line)
            except json.JSONDecodeError as exc:
                raise InvalidRequest(f"trace {path} line {n}: not a JSON object ({exc})") from None
            if not isinstance(rec, dict):
                raise InvalidRequest(f"trace {path} line {n}: not a JSON object")
            out.append(rec)
        return out, "jsonl"
    return list(csv.DictReader(text.splitlines())), "csv"


def _columns(records: list[dict]) -> list[str]:
    seen: dict[str, None] = {}
    for rec in records[:100]:
        seen.update(dict.fromkeys(k for k in rec if k is not None))
    return list(seen)


def detect_format(columns: Iterable[str]) -> str | None:
    """The first format whose identifying columns are all present, else None."""
    cols = set(columns)
    for fmt in FORMATS.values():
        if fmt.signature:
            if set(fmt.signature) <= cols:
                return fmt.name
        elif all(any(c in cols for c in names) for names in (fmt.time, fmt.input, fmt.output)):
            return fmt.name  # generic: any time column and both lengths (before the untimed formats)
    return None


def _refuse(path: Path, columns: list[str], why: str) -> InvalidRequest:
    found = ", ".join(repr(c) for c in columns) or "none"
    return InvalidRequest(f"trace {path}: {why}; columns found: {found}. Formats read "
                          f"(--trace-format to force one): {formats_help()}")


# -- values --------------------------------------------------------------------------------------
_FRACTION = re.compile(r"(\.\d{6})\d+")


def parse_datetime_s(text: str) -> float:
    """POSIX seconds of a date-time (naive ones are read as UTC); fractions beyond microseconds
    (Azure writes 7 digits) are rounded away."""
    value = _FRACTION.sub(r"\1", text.strip().replace("Z", "+00:00"))
    stamp = datetime.fromisoformat(value)
    if stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=UTC)
    return stamp.timestamp()


def _number(value, what: str) -> float:
    try:
        out = float(value)
    except (TypeError, ValueError):
        raise ValueError(f"{what} {value!r} is not a number") from None
    if not math.isfinite(out):
        raise ValueError(f"{what} {value!r} is not finite")
    return out


def _tokens(value, what: str) -> int:
    out = _number(value, what)
    if out < 0 or out != int(out):
        raise ValueError(f"{what} {value!r} is not a whole number >= 0")
    return int(out)


def _words(text: str) -> int:
    return max(1, len(text.split()))


def _time_reader(column: str, unit: str, sample) -> Callable[[object], float]:
    """A function from a time cell to seconds, choosing the unit for the whole column."""
    try:
        first = float(sample)
    except (TypeError, ValueError):
        return lambda v: parse_datetime_s(str(v))
    if unit == "auto":
        if column.endswith("_ms"):
            unit = "ms"
        elif column.endswith("_s") or first > 1e9 and first < 1e11:
            unit = "s"
        else:
            unit = "ms" if first >= 1e11 else "s"
    scale = 1e-3 if unit == "ms" else 1.0
    return lambda v: _number(v, column) * scale


def _first(columns: list[str], names: tuple[str, ...]) -> str | None:
    return next((n for n in names if n in columns), None)


# -- per-format rows -----------------------------------------------------------------------------
def _sharegpt_row(rec: dict) -> TraceRow | None:
    turns = rec.get("conversations") or []
    if len(turns) < 2 or not isinstance(turns[0], dict) or not isinstance(turns[1], dict):
        return None  # vLLM's sharegpt dataset also skips conversations without a reply
    prompt, reply = str(turns[0].get("value", "")), str(turns[1].get("value", ""))
    if not prompt.strip():
        return None
    return TraceRow(None, _words(prompt), _words(reply), prompt)


def _tabular_rows(records: list[dict], fmt: TraceFormat, time_unit: str, path: Path, columns: list[str]) -> list[TraceRow]:
    tcol = _first(columns, fmt.time)
    if fmt.time and tcol is None and fmt.name != "generic":
        raise _refuse(path, columns, f"format {fmt.name} needs a time column ({' or '.join(fmt.time)})")
    icol, ocol, pcol = _first(columns, fmt.input), _first(columns, fmt.output), _first(columns, fmt.prompt)
    if icol is None and pcol is None:
        raise _refuse(path, columns, f"format {fmt.name} needs an input length ({', '.join(fmt.input)}) "
                                     f"or a prompt ({', '.join(fmt.prompt) or '-'})")
    if ocol is None and fmt.name != "vllm-custom":
        raise _refuse(path, columns, f"format {fmt.name} needs an output length ({', '.join(fmt.output)})")
    unit = time_unit if time_unit != "auto" else fmt.time_unit
    to_s = _time_reader(tcol, unit, records[0].get(tcol)) if tcol else None
    rows = []
    for n, rec in enumerate(records, 1):
        try:
            prompt = str(rec[pcol]) if pcol and rec.get(pcol) not in (None, "") else None
            n_in = _tokens(rec[icol], icol) if icol and rec.get(icol) not in (None, "") else None
            if n_in is None:
                if prompt is None:
                    raise ValueError(f"neither {icol or '-'} nor {pcol or '-'} is set")
                n_in = _words(prompt)
            n_out = _tokens(rec[ocol], ocol) if ocol and rec.get(ocol) not in (None, "") else 0
            t = to_s(rec[tcol]) if to_s else None
        except (KeyError, ValueError) as exc:
            raise InvalidRequest(f"trace {path} record {n}: {exc}") from None
        rows.append(TraceRow(t, n_in, n_out, prompt))
    return rows


def load_trace(path: str | Path, trace_format: str = "auto", time_unit: str = "auto") -> list[TraceRow]:
    """Rows of a trace file in any format of :data:`FORMATS`, sorted by time and relative to the
    first request where the trace has times (kept in file order where it has none).

    ``trace_format`` forces a format (``auto``: detect it); ``time_unit`` (s, ms, auto) how to
    read numeric timestamps. Raises :class:`InvalidRequest` naming the columns found when the
    file is none of them.
    """
    path = Path(path)
    if trace_format not in FORMAT_NAMES:
        raise InvalidRequest(f"unknown trace format {trace_format!r}: one of {', '.join(FORMAT_NAMES)}")
    if time_unit not in ("auto", "s", "ms"):
        raise InvalidRequest(f"unknown trace time unit {time_unit!r}: auto, s or ms")
    records, _kind = _records(path)
    if not records:
        raise InvalidRequest(f"trace {path} has no rows")
    columns = _columns(records)
    name = detect_format(columns) if trace_format == "auto" else trace_format
    if name is None:
        raise _refuse(path, columns, "not a trace format this harness reads")
    fmt = FORMATS[name]
    if name == "sharegpt":
        if "conversations" not in columns:
            raise _refuse(path, columns, "format sharegpt needs a 'conversations' list")
        rows = [r for r in map(_sharegpt_row, records) if r is not None]
    else:
        rows = _tabular_rows(records, fmt, time_unit, path, columns)
    if not rows:
        raise InvalidRequest(f"trace {path} has no usable rows")
    if rows[0].t_s is None:
        return rows
    rows.sort(key=lambda r: r.t_s)
    t0 = rows[0].t_s
    return [TraceRow(r.t_s - t0, r.input_tokens, r.output_tokens, r.prompt) for r in rows]
