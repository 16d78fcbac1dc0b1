"""The capacity experiment side by side: a day of each Azure trace under static, autoscale, dvfs,
both and both+polca (energy, where the saving comes from, TTFT/TPOT per priority class, SLO
attainment, cold starts, reconfigurations), a PNG of power, replicas and TTFT over the day, and
the clock-to-power exponent sensitivity (1.0 / 2.0 / 3.0) of `both` against `static`.

Everything is modeled (simulated A100 profile, labelled modeled:a100); the numbers are those of
the model, not of hardware. Run: PYTHONPATH=. python benchmarks/bench_capacity.py [--hours 24]
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from dataclasses import asdict, replace
from pathlib import Path

from runtime.capacity.report import CapacityExperiment, format_table, plot_day, run_experiment, saving_sources

TRACES = Path("/work/shared/data/traces/azure_llm_2023")


def main() -> None:
    ap = argparse.ArgumentParser()
    ap.add_argument("--hours", type=float, default=24.0)
    ap.add_argument("--sweep-hours", type=float, default=4.0, help="hours (from 10:00) of the exponent sweep")
    ap.add_argument("--out", default="bench_capacity_out")
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    print(f"cpu: {platform.processor() or platform.machine()}  (CPU cost only; energy is modeled)")
    rows_all = []
    for name in ("conv", "code"):
        exp = CapacityExperiment(trace=str(TRACES / f"AzureLLMInferenceTrace_{name}.csv"), hours=args.hours)
        t0 = time.perf_counter()
        rows, results = run_experiment(exp)
        rows_all += rows
        print(f"\n== {name}: {args.hours:g} h, fleet {rows[0].replicas_max} replicas, "
              f"{time.perf_counter() - t0:.0f} s wall")
        print(format_table(rows))
        print(saving_sources(rows))
        print(f"plot: {plot_day(results, out / f'capacity_{name}.png', f'{name}: a day under capacity policies')}")
    print(f"\n== clock_power_exponent sensitivity ({args.sweep_hours:g} h from 10:00, both vs static)")
    sweep = []
    for name in ("conv", "code"):
        for gamma, mem in ((1.0, 0.0), (2.0, 0.0), (3.0, 0.0), (2.0, 1.0)):
            exp = CapacityExperiment(trace=str(TRACES / f"AzureLLMInferenceTrace_{name}.csv"),
                                     hours=args.sweep_hours, start_hour=10.0)
            rows, _ = run_experiment(replace(exp, clock_power_exponent=gamma, mem_clock_power_exponent=mem),
                                     ("static", "dvfs", "both"))
            by = {r.policy: r for r in rows}
            sweep.append({"trace": name, "exponent": gamma, "mem_exponent": mem,
                          "static_kwh": by["static"].energy_kwh,
                          "dvfs_saving": by["dvfs"].saving, "both_saving": by["both"].saving,
                          "both_slo": by["both"].slo_attainment["all"]})
            print(f"{name:<5} exponent {gamma:.1f} (memory term {mem:.0f}): static {by['static'].energy_kwh:7.1f} kWh, dvfs saves "
                  f"{by['dvfs'].saving:6.1%}, both saves {by['both'].saving:6.1%} at SLO "
                  f"{by['both'].slo_attainment['all']:.2%}")
    (out / "capacity.json").write_text(json.dumps({"rows": [asdict(r) for r in rows_all], "sweep": sweep}, indent=1))


if __name__ == "__main__":
    main()
