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
- a PNG of power, replicas and latency over the day, and the clock-to-power exponent sensitivity.

Everything is modeled (simulated A100 profile, labelled modeled:a100); the numbers are those of
the model, not of hardware. The two traces run in two processes (``--jobs 1``: one after the other).
Run: PYTHONPATH=. python benchmarks/bench_capacity.py [--hours 24] [--skip-sweeps]
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
from runtime.capacity.planner import PlannerConfig
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


def exponent_sweep(hours: float) -> list[dict]:
    sweep = []
    for name in ("conv", "code"):
        for gamma, mem in ((1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (2.0, 1.0)):
            exp = CapacityExperiment(trace=str(TRACES / f"AzureLLMInferenceTrace_{name}.csv"),
                                     hours=hours, start_hour=10.0, share_classes=False, pack_decode=False)
            rows, _ = run_experiment(replace(exp, clock_power_exponent=gamma, mem_clock_power_exponent=mem),
                                     ("static", "dvfs", "both"))
            by = {r.policy: r for r in rows}
            sweep.append({"trace": name, "exponent": gamma, "mem_exponent": mem,
                          "static_kwh": by["static"].energy_kwh,
                          "dvfs_saving": by["dvfs"].saving, "both_saving": by["both"].saving,
                          "both_slo": by["both"].slo_attainment["all"]})
            print(f"{name:<5} exponent {gamma:.1f} (memory term {mem:.0f}): static {by['static'].energy_kwh:7.1f} kWh, "
                  f"dvfs saves {by['dvfs'].saving:6.1%}, both saves {by['both'].saving:6.1%} at SLO "
                  f"{by['both'].slo_attainment['all']:.2%}")
    return sweep


def meets(r, slo: float = 0.99) -> bool:
    return r.slo_attainment["high"] >= slo and r.slo_attainment["low"] >= slo


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--sweep-hours", type=float, default=4.0, help="hours (from 10:00) of the exponent sweep")
    ap.add_argument("--skip-sweeps", action="store_true", help="no warm-tier or exponent sweep")
    ap.add_argument("--skip-exponent-sweep", action="store_true", help="no exponent sweep")
    ap.add_argument("--jobs", type=int, default=2, choices=(1, 2), help="traces run in parallel processes")
    ap.add_argument("--out", default="bench_capacity_out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"cpu: {cpu_model()}  (CPU cost only; energy is modeled)")
    t0 = time.perf_counter()
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
        print(f"\n== clock_power_exponent sensitivity ({args.sweep_hours:g} h from 10:00, both without levers vs static)")
        dump["sweep"] = exponent_sweep(args.sweep_hours)
    (out / "capacity.json").write_text(json.dumps(dump, indent=1, default=float))


if __name__ == "__main__":
    main()
