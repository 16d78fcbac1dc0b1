"""``wattserve loadtest``: drive a running server with a trace or synthetic load, then report."""

from __future__ import annotations

import asyncio
import os
import sys
import time
from pathlib import Path

from ..loadtest.traces import FORMAT_NAMES, formats_help
from . import say


def cmd_loadtest(args) -> int:
    from ..loadtest import Bounds, LoadTestOptions, WorkloadSpec, run_loadtest
    from ..loadtest.report import parse_slos

    arrival = args.arrival or ("auto" if args.trace else "poisson")
    workload = WorkloadSpec(
        arrival=arrival, trace=args.trace, trace_format=args.trace_format, trace_time_unit=args.trace_time_unit, rate_per_s=args.rate, burstiness=args.burstiness,
        time_scale=args.time_scale, rate_scale=args.rate_scale, trace_offset_s=args.trace_offset_s,
        input_tokens=args.input_tokens, output_tokens=args.output_tokens, max_input_tokens=args.max_input_tokens,
        max_output_tokens=args.max_output_tokens, prompt_file=args.prompt_file, tokenizer=args.tokenizer,
        model_mix=args.model, priority_mix=args.priority_mix, energy_budget_mix=args.energy_budget_mix,
        latency_budget_mix=args.latency_budget_mix, seed=args.seed,
    )
    concurrency = args.concurrency if arrival == "closed" else args.max_concurrency
    out_dir = Path(args.out or f"loadtest-{time.strftime('%Y%m%d-%H%M%S')}")
    opts = LoadTestOptions(
        api=args.api, target=args.target, allow_remote=args.allow_remote, workload=workload,
        bounds=Bounds(duration_s=args.duration_s, max_requests=args.max_requests, max_concurrency=concurrency,
                      timeout_s=args.timeout_s),
        tenant=args.tenant or "", temperature=args.temperature, ignore_eos=not args.respect_eos,
        slos_ms=parse_slos(args.goodput), out_dir=out_dir, record_formats=tuple(args.records.split(",")),
        plots=not args.no_plots, metrics_url=args.metrics_url, metrics_interval_s=args.metrics_interval_s,
        progress=not args.no_progress, api_key=args.api_key or os.environ.get("WATTSERVE_API_KEY"),
        metrics_key=os.environ.get("WATTSERVE_OPERATOR_KEY"),
    )
    report = asyncio.run(run_loadtest(opts))
    _print_summary(report.summary)
    for path in report.files:
        say(f"wrote {path}")
    return 0 if report.summary["completed"] else 1


def _fmt(value) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _print_summary(s: dict) -> None:
    lines = [
        ("requests completed / failed", f"{s['completed']} / {s['failed']}"),
        ("duration (s)", _fmt(s["duration"])),
        ("request throughput (req/s)", _fmt(s["request_throughput"])),
        ("request goodput (req/s)", _fmt(s["request_goodput"])),
        ("output token throughput (tok/s)", _fmt(s["output_throughput"])),
    ]
    for metric in ("ttft", "tpot", "itl", "e2el"):
        lines.append((f"{metric.upper()} mean / median / p99 (ms)",
                      " / ".join(_fmt(s[f"{k}_{metric}_ms"]) for k in ("mean", "median", "p99"))))
    lines += [
        ("energy total (J)", _fmt(s["total_energy_j"])),
        ("J per output token", _fmt(s["energy_per_output_token_j"])),
        ("J per request mean / p99", f"{_fmt(s['mean_energy_per_request_j'])} / {_fmt(s['p99_energy_per_request_j'])}"),
        ("goodput requests per J", _fmt(s["goodput_requests_per_joule"])),
        ("energy sources", ", ".join(f"{k} x{v}" for k, v in s["energy_sources"].items()) or "-"),
        ("budget violations", ", ".join(f"{k} {v}" for k, v in s["budget_violations"].items())),
        ("errors by status", ", ".join(f"{k} x{v}" for k, v in s["errors_by_status"].items()) or "none"),
    ]
    for status, error in s.get("first_error_by_status", {}).items():
        shown = error if len(error) <= 300 else error[:297] + "..."
        lines.append((f"  first {status}", shown or "-"))
    width = max(len(k) for k, _ in lines)
    print("=" * 20 + " wattserve load test " + "=" * 20)
    for k, v in lines:
        print(f"{k:<{width}}  {v}")
    sys.stdout.flush()


def register(sub) -> None:
    s = sub.add_parser("loadtest", help="load-test a running server (trace replay or synthetic arrivals) and report")
    g = s.add_argument_group("target")
    g.add_argument("--api", choices=["grpc", "openai"], default="grpc", help="gRPC (default) or the OpenAI-compatible HTTP API")
    g.add_argument("--target", help="host:port for grpc (default 127.0.0.1:50051), base URL for openai (default http://127.0.0.1:8000)")
    g.add_argument("--allow-remote", action="store_true", help="allow a non-loopback target (it must be named with --target)")
    g.add_argument("--api-key", help="client API key (default $WATTSERVE_API_KEY; /metrics uses $WATTSERVE_OPERATOR_KEY if set)")
    g = s.add_argument_group("workload")
    g.add_argument("--trace", help="conv or code (Azure LLM 2023 in shared/data), or a trace file (CSV, JSONL or "
                                   "JSON; format detected from its columns, see --trace-format)")
    g.add_argument("--trace-format", choices=FORMAT_NAMES, default="auto",
                   help="force the trace file's format (default auto: detected). " + formats_help().replace("%", "%%"))
    g.add_argument("--trace-time-unit", choices=["auto", "s", "ms"], default="auto",
                   help="numeric trace timestamps: seconds or milliseconds (auto: the format's unit, a *_ms/*_s "
                        "column name, epoch magnitude, else seconds)")
    g.add_argument("--arrival", choices=["trace", "poisson", "gamma", "closed"],
                   help="arrival process (default: trace with a timed --trace, poisson otherwise)")
    g.add_argument("--rate", type=float, default=1.0, help="poisson/gamma: mean requests per second")
    g.add_argument("--burstiness", type=float, default=1.0, help="gamma shape: 1 Poisson, <1 burstier")
    g.add_argument("--concurrency", type=int, default=8, help="closed loop: requests kept in flight")
    g.add_argument("--time-scale", type=float, default=1.0, help="trace: multiply trace time (0.01 replays 1 h in 36 s)")
    g.add_argument("--rate-scale", type=float, default=1.0, help="trace: scale the request rate, keeping the time span")
    g.add_argument("--trace-offset-s", type=float, default=0.0, help="trace: start this many seconds into it")
    g.add_argument("--input-tokens", type=int, default=32, help="without a trace: prompt tokens per request")
    g.add_argument("--output-tokens", type=int, default=32, help="without a trace: max_tokens per request")
    g.add_argument("--max-input-tokens", type=int, help="cap prompt lengths (tiny models have short contexts)")
    g.add_argument("--max-output-tokens", type=int, help="cap max_tokens (CPU models cannot emit 1000s quickly)")
    g.add_argument("--prompt-file", help="prompts to send in turn (text: one per line; .jsonl: a 'prompt' field)")
    g.add_argument("--tokenizer", help="a local HF tokenizer directory to synthesise prompts of exact token counts")
    g = s.add_argument_group("request mix (value=weight,...; 'none' is no value)")
    g.add_argument("--model", default="auto", help="expert mix, e.g. auto or edge=3,cloud=1 (default auto: the router)")
    g.add_argument("--priority-mix", default="normal", help="e.g. high=1,normal=2,low=1")
    g.add_argument("--energy-budget-mix", default="none", help="joules, e.g. none=1,0.5=1,2=1")
    g.add_argument("--latency-budget-mix", default="none", help="milliseconds, e.g. none=1,2000=1")
    g.add_argument("--tenant", help="tenant sent with every request")
    g.add_argument("--temperature", type=float, default=0.0)
    g.add_argument("--respect-eos", action="store_true", help="stop at EOS instead of generating exactly max_tokens")
    g.add_argument("--seed", type=int, default=0)
    g = s.add_argument_group("bounds")
    g.add_argument("--duration-s", type=float, default=60.0, help="send no request after this (default 60)")
    g.add_argument("--max-requests", type=int, default=1000, help="send at most this many (default 1000)")
    g.add_argument("--max-concurrency", type=int, help="open loop: cap on requests in flight")
    g.add_argument("--timeout-s", type=float, default=120.0, help="per request; also how long stragglers may run")
    g = s.add_argument_group("report")
    g.add_argument("--goodput", action="append", default=[], help="SLO in ms, vLLM style: ttft:500 tpot:50 e2el:3000")
    g.add_argument("--out", help="output directory (default loadtest-<time>)")
    g.add_argument("--records", default="csv,jsonl", help="record formats: csv, jsonl or both")
    g.add_argument("--no-plots", action="store_true")
    g.add_argument("--metrics-url", default="auto", help="wattserve /metrics to sample power from (auto: with --api openai)")
    g.add_argument("--metrics-interval-s", type=float, default=1.0)
    g.add_argument("--no-progress", action="store_true")
    s.set_defaults(func=cmd_loadtest)
