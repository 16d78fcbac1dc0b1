"""Load-test results: the summary JSON and the per-request records (CSV and JSONL).

The summary uses the keys of vLLM's serving benchmark where they mean the same thing
(``completed``, ``request_throughput``, ``output_throughput``, ``mean_ttft_ms``,
``p99_tpot_ms``, ``median_itl_ms``, ``p90_e2el_ms``, ``request_goodput`` ...), with the same
definitions: TPOT = (E2E - TTFT) / (output tokens - 1) per request with more than one output
token; ITL = every gap between streamed chunks; percentiles are numpy's linear interpolation.
It adds energy (J per output token, J per request, goodput per joule, energy sources), budget
violations and errors by status code.
"""

from __future__ import annotations

import csv
import json
from collections import Counter, defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from wattserve.errors import InvalidRequest

from .clients import Record

PERCENTILES = (90, 99)
SLO_METRICS = ("ttft", "tpot", "e2el")


def parse_slos(items: Sequence[str]) -> dict[str, float]:
    """``["ttft:500", "e2el:3000"]`` -> {"ttft": 500.0, ...} (milliseconds, as vLLM's --goodput)."""
    slos = {}
    for item in items:
        for part in item.split():
            key, _, value = part.partition(":")
            if key not in SLO_METRICS:
                raise InvalidRequest(f"goodput SLO {part!r}: the metric must be one of {', '.join(SLO_METRICS)}")
            try:
                slos[key] = float(value)
            except ValueError:
                raise InvalidRequest(f"goodput SLO {part!r}: {value!r} is not a number of milliseconds") from None
    return slos


def tpot_ms(rec: Record) -> float | None:
    if rec.ok and rec.completion_tokens > 1 and rec.ttft_ms is not None and rec.e2e_ms is not None:
        return (rec.e2e_ms - rec.ttft_ms) / (rec.completion_tokens - 1)
    return None


def stats(name: str, values: Sequence[float]) -> dict[str, float | None]:
    """mean/median/std/p90/p99 of ``values`` as ``{stat}_{name}_ms`` keys (None when empty)."""
    arr = np.asarray(values, dtype=float)
    keys = [f"mean_{name}_ms", f"median_{name}_ms", f"std_{name}_ms"] + [f"p{p}_{name}_ms" for p in PERCENTILES]
    if arr.size == 0:
        return dict.fromkeys(keys)
    vals = [arr.mean(), np.median(arr), arr.std()] + [np.percentile(arr, p) for p in PERCENTILES]
    return {k: float(v) for k, v in zip(keys, vals, strict=True)}


def is_good(rec: Record, slos: dict[str, float]) -> bool:
    """Finished and within every SLO (vLLM's goodput definition)."""
    if not rec.ok:
        return False
    measured = {"ttft": rec.ttft_ms, "tpot": tpot_ms(rec), "e2el": rec.e2e_ms}
    return all(measured[k] is None or measured[k] <= limit for k, limit in slos.items())


def summarize(records: Sequence[Record], duration_s: float, slos: dict[str, float] | None = None,
              meta: dict | None = None) -> dict:
    """The summary of a run (see the module docstring for definitions)."""
    slos = slos or {}
    ok = [r for r in records if r.ok]
    out_tokens = sum(r.completion_tokens for r in ok)
    in_tokens = sum(r.prompt_tokens for r in ok)
    good = [r for r in ok if is_good(r, slos)]
    summary: dict = dict(meta or {})
    summary.update({
        "duration": duration_s,
        "num_prompts": len(records),
        "completed": len(ok),
        "failed": len(records) - len(ok),
        "total_input_tokens": in_tokens,
        "total_output_tokens": out_tokens,
        "request_throughput": len(ok) / duration_s,
        "request_goodput": len(good) / duration_s,
        "output_throughput": out_tokens / duration_s,
        "total_token_throughput": (in_tokens + out_tokens) / duration_s,
        "goodput_slos_ms": slos,
    })
    summary.update(stats("ttft", [r.ttft_ms for r in ok if r.ttft_ms is not None]))
    summary.update(stats("tpot", [t for r in ok if (t := tpot_ms(r)) is not None]))
    summary.update(stats("itl", [x for r in ok for x in r.itl_ms]))
    summary.update(stats("e2el", [r.e2e_ms for r in ok if r.e2e_ms is not None]))
    summary.update(stats("send_lag", [lag for r in records if (lag := r.send_lag_ms) is not None]))
    summary.update(_energy(ok, good))
    summary.update(_budgets(ok))
    summary["errors_by_status"] = dict(Counter(r.status for r in records if not r.ok))
    # what the server said, once per status: a run whose every request failed says why on screen
    summary["first_error_by_status"] = {}
    for r in records:
        if not r.ok:
            summary["first_error_by_status"].setdefault(r.status, r.error)
    summary["per_expert"] = _per_expert(ok)
    return summary


def _energy(ok: Sequence[Record], good: Sequence[Record]) -> dict:
    measured = [r for r in ok if r.energy_j is not None]
    total_j = sum(r.energy_j for r in measured)
    out_tokens = sum(r.completion_tokens for r in measured)
    per_request = [r.energy_j for r in measured]
    out = {
        "total_energy_j": total_j,
        "energy_per_output_token_j": total_j / out_tokens if out_tokens else None,
        "energy_per_token_j": total_j / (out_tokens + sum(r.prompt_tokens for r in measured)) if measured else None,
        "energy_sources": dict(Counter(r.energy_source for r in measured)),
        "goodput_requests_per_joule": len(good) / total_j if total_j > 0 else None,
        "goodput_output_tokens_per_joule": sum(r.completion_tokens for r in good) / total_j if total_j > 0 else None,
    }
    arr = np.asarray(per_request, dtype=float)
    for label, fn in (("mean", np.mean), ("median", np.median)):
        out[f"{label}_energy_per_request_j"] = float(fn(arr)) if arr.size else None
    for p in PERCENTILES:
        out[f"p{p}_energy_per_request_j"] = float(np.percentile(arr, p)) if arr.size else None
    return out


def _budgets(ok: Sequence[Record]) -> dict:
    energy = [r for r in ok if r.energy_budget_j is not None]
    latency = [r for r in ok if r.latency_budget_ms is not None]
    return {
        "requests_with_energy_budget": len(energy),
        "requests_with_latency_budget": len(latency),
        "budget_violations": {
            "energy": sum(1 for r in energy if r.energy_j is not None and r.energy_j > r.energy_budget_j),
            "latency": sum(1 for r in latency if r.e2e_ms is not None and r.e2e_ms > r.latency_budget_ms),
        },
        "budget_met": sum(1 for r in ok if r.budget_met is True),
    }


def _per_expert(ok: Sequence[Record]) -> dict:
    groups: dict[str, list[Record]] = defaultdict(list)
    for r in ok:
        groups[r.expert].append(r)
    out = {}
    for expert, recs in sorted(groups.items()):
        energy = [r.energy_j for r in recs if r.energy_j is not None]
        out[expert] = {
            "completed": len(recs),
            "output_tokens": sum(r.completion_tokens for r in recs),
            "energy_j": sum(energy),
            "mean_e2el_ms": float(np.mean([r.e2e_ms for r in recs])),
            "energy_sources": sorted({r.energy_source for r in recs}),
        }
    return out


CSV_FIELDS = (
    "index", "api", "status", "ok", "scheduled_s", "sent_s", "send_lag_ms", "ttft_ms", "e2e_ms", "itl_ms",
    "prompt_tokens", "completion_tokens", "target_input_tokens", "max_tokens", "expert", "energy_j",
    "energy_source", "energy_budget_j", "latency_budget_ms", "priority", "budget_met", "error",
)


def write_records(records: Sequence[Record], out_dir: Path, formats: Sequence[str] = ("csv", "jsonl")) -> list[Path]:
    """records.csv (inter-token latencies joined by ';') and/or records.jsonl (a list)."""
    written = []
    if "jsonl" in formats:
        path = out_dir / "records.jsonl"
        with open(path, "w") as f:
            for r in records:
                f.write(json.dumps(r.to_dict()) + "\n")
        written.append(path)
    if "csv" in formats:
        path = out_dir / "records.csv"
        with open(path, "w", newline="") as f:
            writer = csv.DictWriter(f, fieldnames=CSV_FIELDS)
            writer.writeheader()
            for r in records:
                row = r.to_dict()
                row["itl_ms"] = ";".join(f"{x:.3f}" for x in r.itl_ms)
                writer.writerow(row)
        written.append(path)
    return written
