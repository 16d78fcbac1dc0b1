"""The capacity experiment side by side: a day of each Azure trace under static, autoscale, dvfs,
both and both+polca (energy, where the saving comes from, TTFT/TPOT per priority class, SLO
attainment, cold starts, reconfigurations), then what bounds the saving and what moves it:

- the energy floor (every token at its best operating point within the SLO, nothing idle) and the
  ``oracle`` (the same planner told the arrivals still to come; an analysis, never a serving policy);
- the levers, each on the same day: shared replicas across priority classes at low load and decode
  packed at admission (a new sequence goes to the fullest replica with room and stays there; the rest
  hot spares), both on by default, each alone and neither; the idealised bound where sequences
  migrate for free (re-packed every tick: no engine does this);
  a warm tier of released replicas on top (its wake time and power swept: assumptions);
- a PNG of power, replicas and latency over the day, and the clock-to-power exponent sensitivity
  (``--exponent-sweep``: only that, with today's default levers);
- ``--cold-start-sweep``: only the assumed cold start swept (its time, with its energy at the assumed
  start-up power, and its energy alone) for ``both`` and the best oracle, plus a looser TTFT SLO: what
  the 55% goal needs on the code trace.

Everything is modeled (simulated A100 profile, labelled modeled:a100); the numbers are those of
the model, not of hardware. The two traces run in two processes (``--jobs 1``: one after the other).
Run: PYTHONPATH=. python benchmarks/bench_capacity.py [--hours 24] [--skip-sweeps]
     PYTHONPATH=. python benchmarks/bench_capacity.py --exponent-sweep | --cold-start-sweep [--traces code]
"""

from __future__ import annotations

import argparse
import json
import math
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, replace
from pathlib import Path

from benchmarks.host import cpu_model
from runtime.capacity.planner import SLO, PlannerConfig
from runtime.capacity.report import (
    CapacityExperiment,
    energy_floor,
    experiment_workload,
    format_table,
    plot_day,
    run_experiment,
    saving_sources,
    size_fleet,
)
from runtime.capacity.sim import WarmTier
from workers.devices.simulated import load_profile

TRACES = Path("/work/shared/data/traces/azure_llm_2023")
#: the default levers of `both`'s best variant (each kept only where it holds >= 99% SLO on both traces)
ORACLE_WINDOWS_S = (60.0, 10.0)
ORACLE_HEADROOM = (1.3, 1.0)
#: (wake s, W per warm replica, s a released replica stays warm): assumptions, swept
#: (15 s, 100 W, kept for ever) is the "+warm15" lever row
WARM_SWEEP = ((5.0, 100.0, math.inf), (30.0, 100.0, math.inf), (15.0, 320.0, math.inf), (15.0, 100.0, 1800.0))
#: assumed cold-start times (s) swept for `both` and the oracle; the start draws cold_start_power_fraction
#: (0.5) of the replica's TDP for that long, so its energy scales with the time
COLD_START_SWEEP_S = (60.0, 30.0, 10.0, 5.0, 2.0)
#: the oracle variant that held >= 99% SLO per class with the most saving (window s, headroom)
BEST_ORACLE = (10.0, 1.0)


def run_trace(name: str, hours: float, out: Path, sweeps: bool) -> dict:
    """Everything for one trace (a process of its own): rows, floor, plot."""
    t0 = time.perf_counter()
    exp = CapacityExperiment(trace=str(TRACES / f"AzureLLMInferenceTrace_{name}.csv"), hours=hours)
    rows, results = run_experiment(exp)
    static_j = rows[0].energy_kwh * 3.6e6
    plot = plot_day(results, out / f"capacity_{name}.png", f"{name}: a day under capacity policies")

    def variant(e: CapacityExperiment, policy: str, label: str):
        r, res = run_experiment(e, (policy,), label=label, static_j=static_j)
        return r[0], res

    levers = []  # the default `both` shares and packs; each lever alone, none, and the warm tier on top
    for label, e in ((" (no levers)", replace(exp, share_classes=False, pack_decode=False)),
                     (" share only", replace(exp, pack_decode=False)),
                     (" pack only", replace(exp, share_classes=False)),
                     (" migrating pack (idealised bound)", replace(exp, pack_migrate=True)),
                     ("+warm15", replace(exp, warm=WarmTier(15.0, 100.0)))):
        levers.append(variant(e, "both", label)[0])
    oracles = []
    for w in ORACLE_WINDOWS_S:
        for h in ORACLE_HEADROOM:
            e = replace(exp, oracle_window_s=w, oracle_planner=PlannerConfig(load_headroom=h))
            oracles.append(variant(e, "oracle", f"/{w:g}s x{h:g}")[0])
    e = replace(exp, share_classes=False, pack_decode=False, oracle_window_s=10.0,
                oracle_planner=PlannerConfig(load_headroom=1.0))
    oracles.append(variant(e, "oracle", "/10s x1 (no levers)")[0])
    warm = []
    if sweeps:
        for wake, watts, keep in WARM_SWEEP:
            keep_txt = "" if math.isinf(keep) else f"/{keep:g}s"
            warm.append(variant(replace(exp, warm=WarmTier(wake, watts, keep)), "both",
                                f"+warm{wake:g}s/{watts:g}W{keep_txt}")[0])
    work = experiment_workload(exp)
    profile = exp.replica_profile()
    floor = energy_floor(work, size_fleet(exp, work, profile, load_profile(exp.profile).tdp_w), profile)
    return {"name": name, "rows": rows, "levers": levers, "oracles": oracles, "warm": warm, "floor": floor,
            "plot": str(plot), "wall_s": time.perf_counter() - t0}


EXPONENTS = ((1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (2.0, 1.0))  # (compute exponent, memory-term exponent)


def exponent_point(name: str, hours: float, start_hour: float, gamma: float, mem: float, static_kwh: float) -> dict:
    """dvfs and both at one clock-to-power exponent, with the experiment's default levers, against
    ``static_kwh`` (static runs at the max clock, where every exponent gives the same power)."""
    exp = CapacityExperiment(trace=str(TRACES / f"AzureLLMInferenceTrace_{name}.csv"), hours=hours,
                             start_hour=start_hour, clock_power_exponent=gamma, mem_clock_power_exponent=mem)
    rows, _ = run_experiment(exp, ("dvfs", "both"), static_j=static_kwh * 3.6e6)
    by = {r.policy: r for r in rows}
    return {"trace": name, "exponent": gamma, "mem_exponent": mem, "static_kwh": static_kwh,
            "dvfs_saving": by["dvfs"].saving, "both_saving": by["both"].saving,
            "dvfs_slo": {k: by["dvfs"].slo_attainment[k] for k in ("high", "low")},
            "both_slo": {k: by["both"].slo_attainment[k] for k in ("high", "low")}}


def exponent_sweep(hours: float, start_hour: float, traces: list[str], jobs: int) -> list[dict]:
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        static = list(pool.map(_static_row, traces, [hours] * len(traces), [start_hour] * len(traces)))
        points = [(name, hours, start_hour, g, m, st.energy_kwh)
                  for name, st in zip(traces, static, strict=True) for g, m in EXPONENTS]
        sweep = list(pool.map(exponent_point, *zip(*points, strict=True)))
    for p in sweep:
        print(f"{p['trace']:<5} exponent {p['exponent']:.1f} (memory term {p['mem_exponent']:.0f}): static "
              f"{p['static_kwh']:7.1f} kWh, dvfs saves {p['dvfs_saving']:6.1%} (SLO high {p['dvfs_slo']['high']:.2%}, "
              f"low {p['dvfs_slo']['low']:.2%}), both saves {p['both_saving']:6.1%} (SLO high "
              f"{p['both_slo']['high']:.2%}, low {p['both_slo']['low']:.2%})")
    return sweep


def cold_start_variants() -> list[tuple[str, str, dict]]:
    """(policy, row label, experiment overrides) of the cold-start sweep."""
    w, h = BEST_ORACLE
    oracle = {"oracle_window_s": w, "oracle_planner": PlannerConfig(load_headroom=h)}
    out = []
    for cs in COLD_START_SWEEP_S:
        out.append(("both", f" cold {cs:g}s", {"cold_start_s": cs}))
        out.append(("oracle", f"/{w:g}s x{h:g} cold {cs:g}s", {"cold_start_s": cs, **oracle}))
    # the start's energy alone: free (time only) and at full TDP, at the default 60 s
    for frac, txt in ((0.0, "0 J"), (1.0, "full TDP")):
        out.append(("both", f" cold 60s {txt}", {"cold_start_power_fraction": frac}))
        out.append(("oracle", f"/{w:g}s x{h:g} cold 60s {txt}", {"cold_start_power_fraction": frac, **oracle}))
    # the planner's caution sized for a fast start (the defaults are sized for 60 s)
    fast = PlannerConfig(peak_window_s=300.0, scale_down_delay_s=30.0, scale_to_zero_after_s=60.0)
    for cs in (5.0, 2.0):
        out.append(("both", f" cold {cs:g}s, fast knobs", {"cold_start_s": cs, "planner": fast}))
    # a looser high-priority TTFT SLO (2 s -> 4 s) at the default cold start
    out.append(("both", " HP TTFT 4s", {"hp_slo": SLO(ttft_ms=4000.0, tpot_ms=100.0)}))
    return out


def cold_start_run(name: str, hours: float, policy: str, label: str, overrides: dict, static_j: float):
    exp = replace(CapacityExperiment(trace=str(TRACES / f"AzureLLMInferenceTrace_{name}.csv"), hours=hours),
                  **overrides)
    return run_experiment(exp, (policy,), label=label, static_j=static_j)[0][0]


def cold_start_sweep(hours: float, traces: list[str], jobs: int) -> dict[str, list]:
    """Every variant on every trace, ``jobs`` runs at a time; savings against each trace's static."""
    with ProcessPoolExecutor(max_workers=jobs) as pool:
        static = dict(zip(traces, pool.map(_static_row, traces, [hours] * len(traces)), strict=True))
        runs = [(name, hours, p, label, kw, static[name].energy_kwh * 3.6e6)
                for name in traces for p, label, kw in cold_start_variants()]
        rows = list(pool.map(cold_start_run, *zip(*runs, strict=True)))
    out = {}
    for name in traces:
        mine = [static[name], *[r for r, run in zip(rows, runs, strict=True) if run[0] == name]]
        print(f"\n== {name}: cold-start sweep ({hours:g} h; start-up at half TDP unless said; energy modeled)")
        print(format_table(mine))
        ok = [r for r in mine[1:] if meets(r) and r.saving >= 0.55]
        print("55% at >= 99% SLO per class: " + (", ".join(r.policy for r in ok) if ok else "no variant"))
        out[name] = mine
    return out


def _static_row(name: str, hours: float, start_hour: float = 0.0):
    exp = CapacityExperiment(trace=str(TRACES / f"AzureLLMInferenceTrace_{name}.csv"), hours=hours,
                             start_hour=start_hour)
    return run_experiment(exp, ("static",))[0][0]


def meets(r, slo: float = 0.99) -> bool:
    return r.slo_attainment["high"] >= slo and r.slo_attainment["low"] >= slo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--sweep-hours", type=float, default=4.0, help="hours of the exponent sweep")
    ap.add_argument("--sweep-start-hour", type=float, default=10.0, help="hour of day the exponent sweep starts at")
    ap.add_argument("--skip-sweeps", action="store_true", help="no warm-tier or exponent sweep")
    ap.add_argument("--skip-exponent-sweep", action="store_true", help="no exponent sweep")
    ap.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="traces run in parallel processes")
    ap.add_argument("--out", default="bench_capacity_out")
    ap.add_argument("--exponent-sweep", action="store_true", help="only the exponent sweep (--sweep-hours from 10:00)")
    ap.add_argument("--cold-start-sweep", action="store_true", help="only the cold-start sweep (--hours)")
    ap.add_argument("--traces", default="conv,code", help="traces of the --exponent-sweep / --cold-start-sweep")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"cpu: {cpu_model()}  (CPU cost only; energy is modeled)")
    t0 = time.perf_counter()
    traces = [t for t in args.traces.split(",") if t]
    if args.exponent_sweep or args.cold_start_sweep:
        dump = {}
        if args.exponent_sweep:
            print(f"== clock_power_exponent sensitivity ({args.sweep_hours:g} h from {args.sweep_start_hour:g}:00, "
                  "default levers, vs static)")
            dump["exponent"] = exponent_sweep(args.sweep_hours, args.sweep_start_hour, traces, args.jobs)
        if args.cold_start_sweep:
            dump["cold_start"] = {k: [asdict(r) for r in v]
                                  for k, v in cold_start_sweep(args.hours, traces, args.jobs).items()}
        print(f"wall {time.perf_counter() - t0:.0f} s ({args.jobs} process(es))")
        (out / "capacity_sweeps.json").write_text(json.dumps(dump, indent=1, default=float))
        return
    with ProcessPoolExecutor(max_workers=args.jobs) as pool:
        done = list(pool.map(run_trace, ("conv", "code"), [args.hours] * 2, [out] * 2, [not args.skip_sweeps] * 2))
    print(f"both traces: {time.perf_counter() - t0:.0f} s wall ({args.jobs} process(es))")
    dump = {}
    for d in done:
        rows, static = d["rows"], d["rows"][0]
        print(f"\n== {d['name']}: {args.hours:g} h, fleet {static.replicas_max} replicas, {d['wall_s']:.0f} s wall")
        print(format_table(rows + d["levers"]))
        print(saving_sources(rows))
        f = d["floor"]
        print(f"floor ({f.energy_source}): {f.kwh:.1f} kWh = prefill {f.prefill_kwh:.1f} + decode {f.decode_kwh:.1f} "
              f"(J/token prefill {f.prefill_j_per_token['high']:.3f}, decode {f.decode_j_per_token['high']:.2f}); "
              f"no policy saves more than {f.saving_bound(static.energy_kwh):.1%} of static "
              f"({static.energy_kwh:.1f} kWh)")
        print("oracle (told the arrivals ahead: window x headroom):")
        print(format_table([static, *d["oracles"]]))
        ok = [r for r in d["oracles"] if meets(r)]
        best = max(ok, key=lambda r: r.saving) if ok else None
        print(f"ceiling at >= 99% SLO per class: {best.policy} saves {best.saving:.1%}" if best
              else "ceiling: no oracle variant holds >= 99% SLO per class")
        if d["warm"]:
            print("warm tier sweep on the default both (assumed wake time, W per warm replica, how long kept):")
            print(format_table([static, *[r for r in d["levers"] if "warm" in r.policy], *d["warm"]]))
        print(f"plot: {d['plot']}")
        dump[d["name"]] = {k: [asdict(r) for r in d[k]] for k in ("rows", "levers", "oracles", "warm")}
        dump[d["name"]]["floor"] = asdict(f)
    if not (args.skip_sweeps or args.skip_exponent_sweep):
        print(f"\n== clock_power_exponent sensitivity ({args.sweep_hours:g} h from {args.sweep_start_hour:g}:00, "
              "default levers, vs static)")
        dump["sweep"] = exponent_sweep(args.sweep_hours, args.sweep_start_hour, ["conv", "code"], args.jobs)
    (out / "capacity.json").write_text(json.dumps(dump, indent=1, default=float))


if __name__ == "__main__":
    main()
