"""Decode packing measured live: ``gateway.replica_order`` packed against least_loaded, on real Ray
with the capacity controller on, replaying a slice of the Azure conversation trace.

Each run starts an in-process server (the real gateway, gRPC server and capacity controller; experts
are Ray actors on an embedded Ray with num_cpus=2) with one expert: the synthetic engine (no model)
on a simulated A100 standing for a 13B model, ``step_ms`` set to that device's modeled decode step
(~37 ms), so wall time inside steps and the modeled step latency agree and the device's idle power
(40 W, the profile's assumption) is charged between steps. The controller sizes it from 1 to
``--max-replicas`` replicas (plans every 2 s, scale-down after 15 s wanted). The load is the conv
trace from ``--offset-s``, rate-scaled (``--rate-scale``: each request kept with that probability)
and time-scaled 1:1, output tokens capped at ``--max-output-tokens`` and prompts at
``--max-input-tokens`` (synthetic words), for ``--duration-s`` of sending; requests still running
then finish. MoE² routes (one expert), with the side's replica order.

Sides alternate ABBA... (``--runs`` per side). Per run and per side (mean over runs, range) it
prints: replica-seconds (replicas alive, draining included, integrated at 4 Hz), device energy of
every replica that lived in the window (idle included; labelled with the replicas' energy source,
``modeled:a100``; a started replica's start-up probe included), of which idle, TTFT and TPOT
p50/p99 and SLO attainment, requests lost, scale up/down events; and the ratios packed/least_loaded.

    .venv/bin/python benchmarks/bench_capacity_live.py [--runs 2] [--duration-s 150] [--rate-scale 0.12]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import sys
import tempfile
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from host import cpu_model  # noqa: E402 - benchmarks/ is the script's directory

from runtime.config import parse_config  # noqa: E402
from runtime.loadtest.clients import GrpcClient  # noqa: E402
from runtime.loadtest.runner import Bounds, run_load  # noqa: E402
from runtime.loadtest.workload import WorkloadSpec, build_workload  # noqa: E402

SIDES = ("least_loaded", "packed")
#: the simulated A100's modeled decode step for 13B parameters at batch 1-8 is 36-41 ms
STEP_MS = 37.0
SAMPLE_S = 0.25


@dataclass(slots=True)
class RunStats:
    side: str
    requests: int
    lost: int
    replica_s: float
    energy_j: float
    idle_j: float
    energy_source: str
    ttft_p50_ms: float
    ttft_p99_ms: float
    tpot_p50_ms: float
    tpot_p99_ms: float
    slo_attained: float
    scale_ups: int
    scale_downs: int
    wall_s: float
    peak_replicas: int
    notes: list[str] = field(default_factory=list)


def server_config(order: str, args, cache: str):
    return parse_config({
        "auth": {"enabled": False},
        "http": {"enabled": False},
        "gateway": {"port": 0, "max_inflight": 128, "health_interval_s": SAMPLE_S, "routing_policy": "moe2",
                    "replica_order": order},
        "model_cache_dir": cache,
        "experts": [{"name": "syn", "engine": {"kind": "synthetic", "step_ms": STEP_MS,
                                               "model_params": 13_000_000_000},
                     "device": "simulated:a100", "replicas": 1, "max_batch": args.max_batch, "max_queue": 64}],
        "capacity": {
            "enabled": True, "interval_s": 2.0,
            "planner": {"peak_window_s": 0, "ewma_s": 20.0},
            "experts": {"syn": {"min_replicas": 1, "max_replicas": args.max_replicas, "scale_down_delay_s": 15.0,
                                "cold_start_s": 2.0,
                                "slo": {"ttft_ms": args.slo_ttft_ms, "tpot_ms": args.slo_tpot_ms}}},
        },
    }, f"bench-capacity-live-{order}")


class ReplicaMeter:
    """Samples the gateway's replica set: replicas alive (draining included) over time, and each
    replica's device energy counter (keyed by replica and process: an index may come back)."""

    def __init__(self, replica_set) -> None:
        self.rs = replica_set
        self.first: dict[tuple[int, int], tuple[float, float]] = {}  # at the window's start
        self.last: dict[tuple[int, int], tuple[float, float]] = {}
        self.sources: set[str] = set()
        self.replica_s = 0.0
        self.peak = 0
        self._t: float | None = None

    def sample(self) -> None:
        now = time.monotonic()
        alive = len(self.rs.states)
        if self._t is not None:
            self.replica_s += alive * (now - self._t)
        self._t = now
        self.peak = max(self.peak, alive)
        for index, st in self.rs.states.items():
            e = st.profile.energy if st.profile is not None else None
            if e is None:
                continue
            key = (index, st.profile.pid)
            self.first.setdefault(key, (0.0, 0.0))  # started in the window: its whole counter
            self.last[key] = (e.device_j, e.idle_j)
            self.sources.add(e.energy_source)

    def start(self) -> None:
        """Mark the window's start: counters of replicas alive now count from here."""
        self.last = {}
        self.first = {}
        for index, st in self.rs.states.items():
            e = st.profile.energy if st.profile is not None else None
            if e is not None:
                self.first[(index, st.profile.pid)] = (e.device_j, e.idle_j)
                self.last[(index, st.profile.pid)] = (e.device_j, e.idle_j)
        self._t = time.monotonic()

    def energy(self) -> tuple[float, float]:
        dev = sum(self.last[k][0] - self.first[k][0] for k in self.last)
        idle = sum(self.last[k][1] - self.first[k][1] for k in self.last)
        return dev, idle

    async def run(self) -> None:
        while True:
            await asyncio.sleep(SAMPLE_S)
            self.sample()


def pct(values, q) -> float:
    return float(np.percentile(values, q)) if len(values) else float("nan")


async def one_run(order: str, args) -> RunStats:
    from runtime.api.server import WattserveServer

    with tempfile.TemporaryDirectory() as cache:
        server = WattserveServer(server_config(order, args, cache), progress=lambda msg: None)
        await server.start()
        try:
            rs = server.gateway.replicas.sets["syn"]
            while not (rs.states and all(s.healthy and s.profile and s.profile.energy for s in rs.states.values())):
                await asyncio.sleep(0.1)
            meter = ReplicaMeter(rs)
            seen = len(server.gateway.admin.capacity_view(last_events=100_000).events)
            workload = build_workload(WorkloadSpec(
                arrival="trace", trace="conv", time_scale=1.0, rate_scale=args.rate_scale,
                trace_offset_s=args.offset_s, max_input_tokens=args.max_input_tokens,
                max_output_tokens=args.max_output_tokens, seed=args.seed))
            t0 = time.monotonic()
            meter.start()
            sampler = asyncio.create_task(meter.run())
            async with GrpcClient(f"127.0.0.1:{server.port}", timeout_s=300.0) as client:
                result = await run_load(workload, client, Bounds(duration_s=args.duration_s, max_requests=100_000,
                                                                 timeout_s=300.0))
            meter.sample()
            sampler.cancel()
            wall = time.monotonic() - t0
            events = server.gateway.admin.capacity_view(last_events=100_000).events[seen:]
        finally:
            await server.stop()
    recs = result.records
    ok = [r for r in recs if r.ok]
    ttft = [r.ttft_ms for r in ok if r.ttft_ms is not None]
    tpot = [(r.e2e_ms - r.ttft_ms) / (r.completion_tokens - 1) for r in ok
            if r.ttft_ms is not None and r.completion_tokens > 1]
    met = [r for r in ok if r.ttft_ms is not None and r.ttft_ms <= args.slo_ttft_ms and (
        r.completion_tokens <= 1 or (r.e2e_ms - r.ttft_ms) / (r.completion_tokens - 1) <= args.slo_tpot_ms)]
    dev, idle = meter.energy()
    return RunStats(
        side=order, requests=len(recs), lost=len(recs) - len(ok), replica_s=meter.replica_s, energy_j=dev,
        idle_j=idle, energy_source=",".join(sorted(meter.sources)) or "?",
        ttft_p50_ms=pct(ttft, 50), ttft_p99_ms=pct(ttft, 99), tpot_p50_ms=pct(tpot, 50), tpot_p99_ms=pct(tpot, 99),
        slo_attained=len(met) / max(1, len(recs)),
        scale_ups=sum(e.action == "scale_up" for e in events),
        scale_downs=sum(e.action in ("scale_down", "scale_to_zero") for e in events),
        wall_s=wall, peak_replicas=meter.peak,
        notes=sorted({r.status + ": " + r.error[:120] for r in recs if not r.ok})[:5],
    )


def schedule(runs: int) -> list[str]:
    """ABBA...: each side first as often as the other, so drift in the host's load hits both."""
    out = []
    for i in range(runs):
        pair = SIDES if i % 2 == 0 else SIDES[::-1]
        out.extend(pair)
    return out


METRICS = (("requests", "requests", "{:.0f}"), ("lost", "requests lost", "{:.0f}"),
           ("replica_s", "replica-seconds", "{:.1f}"), ("energy_j", "energy J (idle incl.)", "{:.0f}"),
           ("idle_j", "  of which idle J", "{:.0f}"), ("ttft_p50_ms", "TTFT p50 ms", "{:.0f}"),
           ("ttft_p99_ms", "TTFT p99 ms", "{:.0f}"), ("tpot_p50_ms", "TPOT p50 ms", "{:.1f}"),
           ("tpot_p99_ms", "TPOT p99 ms", "{:.1f}"), ("slo_attained", "SLO attained", "{:.3f}"),
           ("scale_ups", "scale-up events", "{:.0f}"), ("scale_downs", "scale-down events", "{:.0f}"),
           ("peak_replicas", "most replicas", "{:.0f}"), ("wall_s", "wall s", "{:.0f}"))


def table(stats: list[RunStats]) -> str:
    by = {s: [r for r in stats if r.side == s] for s in SIDES}
    lines = [f"{'':24} {'least_loaded':>24} {'packed':>24} {'packed/least_loaded':>20}"]
    for key, label, fmt in METRICS:
        cells, means = [], {}
        for s in SIDES:
            vals = [getattr(r, key) for r in by[s]]
            means[s] = float(np.mean(vals)) if vals else float("nan")
            rng = f" [{fmt.format(min(vals))}-{fmt.format(max(vals))}]" if len(vals) > 1 else ""
            cells.append(f"{fmt.format(means[s])}{rng}")
        ratio = means["packed"] / means["least_loaded"] if means["least_loaded"] else float("nan")
        lines.append(f"{label:24} {cells[0]:>24} {cells[1]:>24} {ratio:>20.3f}")
    return "\n".join(lines)


async def main_async(args) -> list[RunStats]:
    import ray

    os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    ray.init(num_cpus=2, object_store_memory=128 * 1024 * 1024, _node_ip_address="127.0.0.1",
             include_dashboard=False, namespace="bench-capacity-live", log_to_driver=False)
    stats = []
    try:
        for i, side in enumerate(schedule(args.runs)):
            s = await one_run(side, args)
            stats.append(s)
            print(f"run {i + 1} {side}: {s.requests} requests, {s.lost} lost, {s.replica_s:.1f} replica-s, "
                  f"{s.energy_j:.0f} J ({s.energy_source}, idle {s.idle_j:.0f} J), TTFT p50/p99 "
                  f"{s.ttft_p50_ms:.0f}/{s.ttft_p99_ms:.0f} ms, TPOT p50/p99 {s.tpot_p50_ms:.1f}/{s.tpot_p99_ms:.1f} ms, "
                  f"SLO {s.slo_attained:.3f}, up {s.scale_ups} down {s.scale_downs}, peak {s.peak_replicas}"
                  + (f"; failures: {s.notes}" if s.notes else ""), flush=True)
    finally:
        ray.shutdown()
    return stats


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--runs", type=int, default=2, help="runs per side (alternated ABBA)")
    p.add_argument("--duration-s", type=float, default=150.0, help="seconds of sending per run")
    p.add_argument("--rate-scale", type=float, default=0.12, help="share of the conv trace's requests kept")
    p.add_argument("--offset-s", type=float, default=0.0, help="where in the trace's hour to start (s)")
    p.add_argument("--max-output-tokens", type=int, default=256)
    p.add_argument("--max-input-tokens", type=int, default=1024)
    p.add_argument("--max-batch", type=int, default=8)
    p.add_argument("--max-replicas", type=int, default=3)
    p.add_argument("--slo-ttft-ms", type=float, default=2000.0)
    p.add_argument("--slo-tpot-ms", type=float, default=100.0)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--json", type=Path, help="write every run's numbers here")
    args = p.parse_args()
    logging.basicConfig(level=logging.WARNING)
    print(f"CPU: {cpu_model()} ({os.cpu_count()} cores); conv trace from {args.offset_s:g} s, rate x{args.rate_scale:g}, "
          f"{args.duration_s:g} s per run, outputs <= {args.max_output_tokens} tokens; synthetic engine {STEP_MS:g} ms "
          f"steps on simulated:a100 (13B), max_batch {args.max_batch}, 1-{args.max_replicas} replicas; "
          f"SLO TTFT {args.slo_ttft_ms:g} ms, TPOT {args.slo_tpot_ms:g} ms", flush=True)
    stats = asyncio.run(main_async(args))
    print()
    print(table(stats))
    if args.json:
        args.json.write_text(json.dumps([asdict(s) for s in stats], indent=2))


if __name__ == "__main__":
    main()
