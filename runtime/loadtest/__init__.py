"""``wattserve loadtest``: replay traces or synthetic arrivals against a running server and report
latency, throughput, energy and budgets (see docs/loadtest.md).

``traces`` reads public trace files (Azure, BurstGPT, Mooncake, vLLM bench formats), ``workload``
builds the request stream, ``clients`` send and time requests (gRPC or the
OpenAI-compatible HTTP API), ``runner`` keeps the schedule and the bounds, ``report`` writes
the summary and records, ``plots`` the PNGs. :func:`run_loadtest` ties them together for the CLI,
the tests and the benchmarks.
"""

from __future__ import annotations

import json
import sys
from dataclasses import dataclass, field
from pathlib import Path

from .clients import GrpcClient, OpenAIClient, Record
from .report import summarize, write_records
from .runner import Bounds, PowerSampler, Progress, RunResult, check_target, run_load
from .workload import RequestSpec, WorkloadSpec, build_workload

__all__ = [
    "Bounds", "LoadTestOptions", "LoadTestReport", "Record", "RequestSpec", "WorkloadSpec", "run_loadtest",
]

DEFAULT_TARGETS = {"grpc": "127.0.0.1:50051", "openai": "http://127.0.0.1:8000"}


@dataclass(slots=True)
class LoadTestOptions:
    api: str = "grpc"  # grpc | openai
    target: str | None = None  # host:port (grpc) or a base URL (openai); default: loopback
    allow_remote: bool = False
    workload: WorkloadSpec = field(default_factory=WorkloadSpec)
    bounds: Bounds = field(default_factory=Bounds)
    tenant: str = ""
    temperature: float = 0.0
    ignore_eos: bool = True  # generate exactly max_tokens, as the trace's output counts say
    slos_ms: dict[str, float] = field(default_factory=dict)
    out_dir: Path | None = None
    record_formats: tuple[str, ...] = ("csv", "jsonl")
    plots: bool = True
    metrics_url: str | None = "auto"  # auto: <target>/metrics with --api openai, else none
    metrics_interval_s: float = 1.0
    progress: bool = True
    api_key: str | None = None  # client key: `authorization: Bearer` on every request
    metrics_key: str | None = None  # operator key for /metrics (default: api_key)


@dataclass(slots=True)
class LoadTestReport:
    summary: dict
    result: RunResult
    files: list[Path]


def _client(opts: LoadTestOptions, target: str):
    common = dict(tenant=opts.tenant, temperature=opts.temperature, ignore_eos=opts.ignore_eos,
                  timeout_s=opts.bounds.timeout_s, api_key=opts.api_key)
    if opts.api == "grpc":
        return GrpcClient(target, **common)
    if opts.api == "openai":
        return OpenAIClient(target, **common)
    raise ValueError(f"unknown api {opts.api!r}: grpc or openai")


def _metrics_url(opts: LoadTestOptions, target: str) -> str | None:
    if opts.metrics_url == "auto":
        return target.rstrip("/") + "/metrics" if opts.api == "openai" else None
    return opts.metrics_url or None


async def run_loadtest(opts: LoadTestOptions, progress_stream=None) -> LoadTestReport:
    """Run one load test; write records, summary.json and plots into ``opts.out_dir`` if set."""
    target = opts.target or DEFAULT_TARGETS[opts.api]
    check_target(target, opts.allow_remote)
    metrics_url = _metrics_url(opts, target)
    if metrics_url:
        check_target(metrics_url, opts.allow_remote)
    workload = build_workload(opts.workload)
    sampler = PowerSampler(metrics_url, opts.metrics_interval_s, api_key=opts.metrics_key or opts.api_key) \
        if metrics_url else None
    progress = Progress(opts.bounds.max_requests, enabled=opts.progress, stream=progress_stream or sys.stderr)
    async with _client(opts, target) as client:
        result = await run_load(workload, client, opts.bounds, progress=progress, sampler=sampler)
    meta = {
        "api": opts.api, "target": target, "arrival": opts.workload.arrival, "trace": opts.workload.trace,
        "request_rate": opts.workload.rate_per_s if opts.workload.arrival in ("poisson", "gamma") else None,
        "burstiness": opts.workload.burstiness if opts.workload.arrival == "gamma" else None,
        "max_concurrency": opts.bounds.max_concurrency, "time_scale": opts.workload.time_scale,
        "rate_scale": opts.workload.rate_scale, "seed": opts.workload.seed, "started_unix_s": result.started_unix_s,
    }
    summary = summarize(result.records, result.duration_s, opts.slos_ms, meta)
    if result.power:
        summary["mean_power_w"] = sum(p.gpu_power_w + p.cpu_power_w for p in result.power) / len(result.power)
    summary["power_samples"] = len(result.power)
    if result.power_error:
        summary["power_telemetry_error"] = result.power_error
    files: list[Path] = []
    if opts.out_dir is not None:
        out = Path(opts.out_dir)
        out.mkdir(parents=True, exist_ok=True)
        files += write_records(result.records, out, opts.record_formats)
        path = out / "summary.json"
        path.write_text(json.dumps(summary, indent=2) + "\n")
        files.append(path)
        if opts.plots:
            from .plots import write_plots

            files += write_plots(result.records, result.power, out)
    return LoadTestReport(summary, result, files)
