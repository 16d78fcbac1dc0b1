"""``wattserve simulate capacity``: a day of an Azure trace on simulated replicas under the
capacity policies (static, autoscale, dvfs, both, both+polca); no server needed. ``wattserve
capacity show``: the live controller of a running server."""

from __future__ import annotations

import argparse
import datetime as dt
import json
import sys
from dataclasses import asdict
from pathlib import Path

from .connect import add_connection_args, admin_call

POLICY_CHOICES = ("static", "autoscale", "dvfs", "both", "both+polca")
ANALYSIS_CHOICES = ("oracle",)  # the planner told the arrivals ahead: a ceiling, never a serving policy


def cmd_simulate_capacity(args) -> int:
    from ..capacity.planner import SLO, PlannerConfig
    from ..capacity.report import CapacityExperiment, format_table, plot_day, run_experiment, saving_sources
    from ..capacity.sim import WarmTier
    from ..capacity.workload import DayShape

    policies = list(POLICY_CHOICES) if args.policy == "all" else [p for p in args.policy.split(",") if p]
    bad = [p for p in policies if p not in POLICY_CHOICES + ANALYSIS_CHOICES]
    if bad:
        print(f"error: unknown policy {', '.join(bad)}; choose from {', '.join(POLICY_CHOICES + ANALYSIS_CHOICES)} "
              "or all", file=sys.stderr)
        return 2
    if "static" not in policies:
        policies.insert(0, "static")  # the reference every saving is measured against
    try:
        exp = CapacityExperiment(
            trace=args.trace, peak_rate_rps=args.peak_rate_rps, hours=args.hours, start_hour=args.start_hour,
            hp_fraction=args.hp_fraction, profile=args.profile, gpus_per_replica=args.gpus_per_replica,
            model_params=args.model_params, max_batch=args.max_batch, clock_power_exponent=args.clock_power_exponent,
            mem_clock_power_exponent=args.mem_clock_power_exponent,
            hp_slo=SLO(ttft_ms=args.hp_ttft_ms, tpot_ms=args.hp_tpot_ms),
            lp_slo=SLO(ttft_ms=args.lp_ttft_ms, tpot_ms=args.lp_tpot_ms),
            min_replicas=args.min_replicas, cold_start_s=args.cold_start_s,
            cold_start_power_fraction=args.cold_start_power_fraction,
            planner=PlannerConfig(interval_s=args.interval_s), budget_fraction=args.budget_fraction,
            clock_interval_s=args.clock_interval_s,
            released_replica_power_w=args.released_replica_power_w,
            share_classes=args.share_classes, pack_decode=args.pack_decode, pack_migrate=args.pack_migrate,
            oracle_window_s=args.oracle_window_s,
            oracle_planner=None if args.oracle_load_headroom is None else PlannerConfig(
                interval_s=args.interval_s, load_headroom=args.oracle_load_headroom),
            warm=None if args.warm_wake_s is None else WarmTier(args.warm_wake_s, args.warm_power_w, args.warm_keep_s),
            shape=DayShape(trough_fraction=args.trough_fraction, peak_hour=args.peak_hour), seed=args.seed,
        )
    except ValueError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    rows, results = run_experiment(exp, tuple(policies))
    first = next(iter(results.values()))
    print(f"{Path(args.trace).name}: {args.hours:g} h from {args.start_hour:g}:00, peak {args.peak_rate_rps:g} req/s, "
          f"{args.hp_fraction:.0%} high priority; replicas of {args.gpus_per_replica} x {args.profile}, "
          f"fleet {rows[0].replicas_max} replicas (busiest minute at max clock); energy {first.energy_source}")
    print(format_table(rows))
    print(saving_sources(rows))
    for name, r in results.items():
        if r.brakes_at_s:
            print(f"{name}: power brake at " + ", ".join(f"{t / 3600:.2f} h" for t in r.brakes_at_s))
    if args.json:
        Path(args.json).write_text(json.dumps([asdict(r) for r in rows], indent=1))
    if args.plot:
        print(f"plot: {plot_day(results, Path(args.plot), f'{Path(args.trace).stem}: capacity policies')}")
    return 0


def cmd_capacity_show(args) -> int:
    from ..api.gen import wattserve_pb2 as pb

    status = admin_call(args, "GetCapacityStatus", pb.GetCapacityStatusRequest(max_events=args.events))
    if status is None:
        return 1
    print(render_capacity(status))
    return 0


def render_capacity(status) -> str:
    """Human-readable capacity status: per expert replicas wanted/running, clock target, estimate."""
    if not status.enabled:
        return "capacity controller: off (set capacity.enabled: true in the server config)"
    out = [f"  {'expert':<16} {'wanted':>6} {'running':>7} {'starting':>8} {'cold starts':>11} {'start s':>7} "
           f"{'clock MHz':>12} {'saved J (estimate)':>18}  energy"]
    for e in status.experts:
        clock = "-" if not e.HasField("target_sm_clock_mhz") else \
            f"{e.target_sm_clock_mhz:.0f}{'' if e.clock_applied else ' (n/a)'}"
        out.append(f"  {e.expert:<16} {e.replicas_wanted:>6} {e.replicas_running:>7} {e.replicas_starting:>8} "
                   f"{e.cold_starts:>11} {e.cold_start_s:>7.1f} {clock:>12} {e.energy_saved_j:>18.0f}  {e.energy_source}")
    out.append("  clock targets are recorded, not applied ((n/a)); saved energy is an estimate (idle power x "
               "replica-seconds not running, against max_replicas always on)")
    for e in status.experts:
        if e.reason:
            out.append(f"  {e.expert}: {e.reason}")
    if status.events:
        out.append("  recent decisions:")
        for ev in status.events:
            when = dt.datetime.fromtimestamp(ev.time_unix_s).strftime("%H:%M:%S")
            out.append(f"    {when} {ev.expert} {ev.action} {ev.replicas_from} -> {ev.replicas_to}: {ev.reason}")
    return "\n".join(["capacity controller:", *out])


def register(sub) -> None:
    capacity = sub.add_parser("capacity", help="see the capacity controller of a running server")
    csub = capacity.add_subparsers(dest="capacity_command", required=True)
    s = csub.add_parser("show", help="replicas wanted and running per expert, clock targets, recent decisions")
    s.add_argument("--events", type=int, default=20, help="recent decisions to show")
    add_connection_args(s, operator=True)
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_capacity_show)


def register_simulate(ssub) -> None:
    """Add ``capacity`` under the ``simulate`` command (created by runtime.cli.power)."""
    s = ssub.add_parser("capacity", help="replicas and clocks vs load: a day of a trace under capacity policies")
    s.add_argument("--trace", required=True, help="Azure LLM inference trace CSV (shared/data/traces/azure_llm_2023)")
    s.add_argument("--policy", default="all",
                   help=f"{', '.join(POLICY_CHOICES)}, a comma list, or all (the serving policies); also oracle, "
                   "the planner told the arrivals ahead (a ceiling, not a serving policy)")
    s.add_argument("--peak-rate-rps", type=float, default=8.0, help="request rate at the day's peak hour")
    s.add_argument("--hours", type=float, default=24.0, help="hours simulated")
    s.add_argument("--start-hour", type=float, default=0.0, help="hour of day the run starts at")
    s.add_argument("--trough-fraction", type=float, default=0.35, help="diurnal trough as a fraction of the peak")
    s.add_argument("--peak-hour", type=float, default=14.0, help="hour of the diurnal peak")
    s.add_argument("--hp-fraction", type=float, default=0.5, help="share of requests at high priority")
    s.add_argument("--profile", default="a100", help="simulated GPU profile (a100, h100, b200)")
    s.add_argument("--gpus-per-replica", type=int, default=8)
    s.add_argument("--model-params", type=float, default=70e9, help="model size, split over a replica's GPUs")
    s.add_argument("--max-batch", type=int, default=64)
    s.add_argument("--clock-power-exponent", type=float, help="override the profile's assumed exponent (2.0)")
    s.add_argument("--mem-clock-power-exponent", type=float, default=0.0,
                   help="sensitivity: memory-bound power also scales as clock ratio**this (0: the device model)")
    s.add_argument("--hp-ttft-ms", type=float, default=2000.0)
    s.add_argument("--hp-tpot-ms", type=float, default=100.0)
    s.add_argument("--lp-ttft-ms", type=float, default=10000.0)
    s.add_argument("--lp-tpot-ms", type=float, default=200.0)
    s.add_argument("--min-replicas", type=int, default=0, help="per pool; 0 allows scale to zero")
    s.add_argument("--cold-start-s", type=float, default=60.0, help="seconds from 'add a replica' to serving (assumed)")
    s.add_argument("--cold-start-power-fraction", type=float, default=0.5,
                   help="a starting replica draws this fraction of its GPUs' TDP (assumed; 0: starts cost no energy)")
    s.add_argument("--interval-s", type=float, default=10.0, help="planner control period")
    s.add_argument("--clock-interval-s", type=float,
                   help="also re-plan clocks (replicas fixed) this often between replica plans (default: off)")
    s.add_argument("--budget-fraction", type=float, default=0.6,
                   help="both+polca: budget P as a fraction of the static fleet's nameplate power")
    s.add_argument("--released-replica-power-w", type=float, default=0.0,
                   help="power a released replica still draws (0: powered down or lent elsewhere)")
    s.add_argument("--share-classes", action=argparse.BooleanOptionalAction, default=True,
                   help="both priority classes on shared replicas at low load (high first), split when busy")
    s.add_argument("--pack-decode", action=argparse.BooleanOptionalAction, default=True,
                   help="decode packed at admission: a new sequence goes to the fullest replica with batch room and "
                        "stays there (never migrated); replicas left without sequences idle as hot spares")
    s.add_argument("--pack-migrate", action="store_true",
                   help="with --pack-decode: IDEALISED upper bound, the batch re-packed every tick as if sequences "
                        "could move between replicas (no serving engine does this)")
    s.add_argument("--warm-wake-s", type=float,
                   help="lever: released replicas keep weights in host memory and wake in this many s (assumed)")
    s.add_argument("--warm-power-w", type=float, default=100.0, help="power a warm released replica draws (assumed)")
    s.add_argument("--warm-keep-s", type=float, default=float("inf"), help="a released replica stays warm this long")
    s.add_argument("--oracle-window-s", type=float, default=60.0,
                   help="oracle: plan for the busiest window this long among the arrivals ahead")
    s.add_argument("--oracle-load-headroom", type=float,
                   help="oracle: plan for its window's rate times this (default: the planner's 1.3)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--plot", default="capacity_sim.png", help="PNG of power, replicas and TTFT ('' for none)")
    s.add_argument("--json", help="write the summary rows as JSON here")
    s.set_defaults(func=cmd_simulate_capacity)
