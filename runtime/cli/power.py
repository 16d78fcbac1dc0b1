"""``wattserve power set|show`` (operators, against a running server) and ``wattserve simulate
power`` (the POLCA experiment in the row simulator, no server needed)."""

from __future__ import annotations

import datetime as dt
import sys
from pathlib import Path

from ..power.policy import PRESETS
from .connect import add_connection_args, admin_call

POLICY_CHOICES = PRESETS


def cmd_power_set(args) -> int:
    from ..api.gen import wattserve_pb2 as pb

    reply = admin_call(args, "SetPowerBudget",
                       pb.SetPowerBudgetRequest(row=args.row or "", provisioned_power_w=args.budget_w))
    if reply is None:
        return 1
    print(f"row {reply.row.name}: P = {reply.row.provisioned_power_w:.0f} W, now {reply.row.power_w:.0f} W, "
          f"level {reply.row.level}")
    return 0


def cmd_power_show(args) -> int:
    from ..api.gen import wattserve_pb2 as pb

    status = admin_call(args, "GetPowerStatus", pb.GetPowerStatusRequest(max_events=args.events))
    if status is None:
        return 1
    print(render_status(status))
    return 0


def render_status(status) -> str:
    """Human-readable power status (rows, GPUs, alerts, recent events, counters)."""
    if not status.enabled:
        return "power governor: off (set power.enabled: true in the server config)"
    out = [f"power governor: policy {status.policy}, every {status.interval_s:g} s"]
    for r in status.rows:
        budget = f"P {r.provisioned_power_w:.0f} W (T1 {r.t1_w:.0f}, T2 {r.t2_w:.0f})" \
            if r.HasField("provisioned_power_w") else "no budget (monitor only)"
        out.append(f"  row {r.name}: {r.power_w:.0f} W, {budget}, level {r.level}, {r.gpus} GPU(s), capped "
                   f"{r.capped_s:.0f} s{'' if r.telemetry_ok else ', TELEMETRY INCOMPLETE'}")
    out.append(f"  {'gpu':<22} {'prio':<4} {'power W':>8} {'clock':>6} {'cap':>6} {'target':>6}  device")
    for g in status.gpus:
        power = f"{g.power_w:.0f}" if g.HasField("power_w") else "?"
        note = "" if g.can_actuate else f"  (cannot cap: {g.control_reason})"
        out.append(f"  {g.gpu:<22} {g.priority:<4} {power:>8} {_mhz(g, 'sm_clock_mhz'):>6} "
                   f"{_mhz(g, 'locked_sm_clock_mhz'):>6} {_mhz(g, 'target_sm_clock_mhz'):>6}  {g.device}{note}"
                   f"{'  ' + g.error if g.error else ''}")
    out += [f"  ALERT: {a}" for a in status.alerts]
    if status.events:
        out.append("  recent events:")
        for e in status.events:
            when = dt.datetime.fromtimestamp(e.time_unix_s).strftime("%H:%M:%S")
            out.append(f"    {when} {e.kind:<13} {e.gpu + ': ' if e.gpu else ''}{e.reason}")
    if status.counters:
        out.append("  counters: " + ", ".join(f"{k} {v}" for k, v in sorted(status.counters.items())))
    return "\n".join(out)


def _mhz(gpu, field: str) -> str:
    return f"{getattr(gpu, field):.0f}" if gpu.HasField(field) else "-"


def cmd_simulate_power(args) -> int:
    from ..power.policy import PolicyConfig
    from ..power.report import Experiment, format_table, largest_passing, plot_power, run_matrix, write_json
    from ..power.sim import ServerModel

    policies = list(POLICY_CHOICES) if args.policy == "all" else [p for p in args.policy.split(",") if p]
    bad = [p for p in policies if p not in POLICY_CHOICES]
    if bad:
        print(f"error: unknown policy {', '.join(bad)}; choose from {', '.join(POLICY_CHOICES)} or all", file=sys.stderr)
        return 2
    extras = [float(x) for x in str(args.extra_servers).split(",")]
    exp = Experiment(
        trace=args.trace, servers=args.servers, hp_fraction=args.hp_fraction, rate_per_server=args.rate_per_server,
        server=ServerModel(args.profile, args.gpus_per_server, args.model_params, args.max_batch),
        # settle: + 1 s reading window; forecast: a cap not set now acts one interval + the delay later
        policy=PolicyConfig(dwell_s=args.dwell_s, settle_s=args.actuation_delay_s + 1.0,
                            forecast_horizon_s=args.interval_s + args.actuation_delay_s),
        interval_s=args.interval_s, actuation_delay_s=args.actuation_delay_s, tick_s=args.tick_s,
        duration_s=args.duration_s, seed=args.seed,
    )
    rows, results = run_matrix(exp, extras, policies)
    print(f"{Path(args.trace).name}: {args.servers} servers provisioned at P = {exp.provisioned_power_w() / 1000:.1f} kW "
          f"({args.servers} x {args.gpus_per_server} x {args.profile} TDP), {args.rate_per_server:g} req/s per server, "
          f"{args.hp_fraction:.0%} high priority; latency changes vs the same servers uncapped")
    print(format_table(rows))
    for policy in policies:
        best = largest_passing(rows, policy)
        print(f"{policy}: largest oversubscription meeting HP P99 < +5%, LP P99 < +50%, zero brakes: "
              f"{'none' if best is None else f'+{best:.0%}'}")
    if args.json:
        write_json(rows, args.json)
    if args.plot:
        for (policy, extra), (capped, reference) in results.items():
            path = Path(args.plot) if len(results) == 1 else _suffixed(Path(args.plot), f"{policy}-{extra:g}")
            title = f"{Path(args.trace).stem}: {policy}, +{extra:.0%} servers"
            print(f"plot: {plot_power(capped, reference, path, title)}")
    return 0


def _suffixed(path: Path, tag: str) -> Path:
    return path.with_name(f"{path.stem}-{tag}{path.suffix or '.png'}")


def register(sub) -> None:
    power = sub.add_parser("power", help="see and set the power governor of a running server")
    psub = power.add_subparsers(dest="power_command", required=True)
    s = psub.add_parser("set", help="set a row's provisioned power budget P")
    s.add_argument("--budget-w", type=float, required=True, help="provisioned power P of the row in watts")
    s.add_argument("--row", default="", help="row name (default: the default row 'cluster')")
    add_connection_args(s, operator=True)
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_power_set)
    s = psub.add_parser("show", help="rows, per-GPU power, clocks, caps, alerts and recent events")
    s.add_argument("--events", type=int, default=20, help="recent events to show")
    add_connection_args(s, operator=True)
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_power_show)

    simulate = sub.add_parser("simulate", help="offline simulations")
    ssub = simulate.add_subparsers(dest="simulate_command", required=True)
    s = ssub.add_parser("power", help="the POLCA experiment: a row of simulated servers replaying a trace")
    s.add_argument("--trace", required=True, help="Azure LLM inference trace CSV (shared/data/traces/azure_llm_2023)")
    s.add_argument("--servers", type=int, default=40, help="servers the row's budget is provisioned for")
    s.add_argument("--extra-servers", default="0.3", help="oversubscription: extra servers as a fraction (comma list)")
    s.add_argument("--policy", default="polca", help=f"{', '.join(POLICY_CHOICES)}, a comma list, or all")
    s.add_argument("--hp-fraction", type=float, default=0.5, help="share of requests (and servers) at high priority")
    s.add_argument("--rate-per-server", type=float, default=1.0, help="requests/s per deployed server")
    s.add_argument("--profile", default="a100", help="simulated GPU profile (a100, h100, b200)")
    s.add_argument("--gpus-per-server", type=int, default=8)
    s.add_argument("--model-params", type=float, default=70e9, help="model size, split over a server's GPUs")
    s.add_argument("--max-batch", type=int, default=64)
    s.add_argument("--interval-s", type=float, default=2.0, help="telemetry/control period")
    s.add_argument("--actuation-delay-s", type=float, default=1.0, help="decision -> clocks in effect")
    s.add_argument("--dwell-s", type=float, default=10.0, help="release only after this long below the margin")
    s.add_argument("--tick-s", type=float, default=0.2, help="simulation time step")
    s.add_argument("--duration-s", type=float, help="replay only this much of the trace")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--plot", default="power_sim.png", help="PNG of row power vs thresholds ('' for none)")
    s.add_argument("--json", help="write the summary rows as JSON here")
    s.set_defaults(func=cmd_simulate_power)
    from .capacity import register_simulate

    register_simulate(ssub)
