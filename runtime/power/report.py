"""Run POLCA experiments in the row simulator and report them: latency change per priority
against an uncapped run of the same servers and load, time capped, cap and brake events, and a
PNG of row power against the thresholds.

Setup (``Experiment``): ``servers`` is the row the budget was provisioned for; the budget is
``servers x gpus_per_server x TDP`` ("nameplate-derived": every GPU at its board limit). An
oversubscribed run deploys ``round(servers x (1 + extra))`` servers under the SAME budget and
serves proportionally more load (the rate per server is fixed), which is what adding servers to
a row is for. The uncapped reference runs the same servers and requests with no budget at all.
"""

from __future__ import annotations

import json
import math
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path

import numpy as np

from workers.devices.simulated import load_profile

from .policy import PRESETS, PolicyConfig
from .sim import RowSimulator, ServerModel, SimResult, SimSettings
from .workload import Trace, load_trace, scale_trace

#: the paper's claim, which each run is checked against
HP_P99_LIMIT, LP_P99_LIMIT = 0.05, 0.50


@dataclass(slots=True, frozen=True)
class Experiment:
    """One row configuration and load; policies and oversubscription levels vary per run."""

    trace: str
    servers: int = 40
    hp_fraction: float = 0.5
    rate_per_server: float = 1.0  # requests/s per deployed server
    server: ServerModel = field(default_factory=ServerModel)
    policy: PolicyConfig = field(default_factory=PolicyConfig)
    interval_s: float = 2.0
    actuation_delay_s: float = 1.0
    tick_s: float = 0.2
    duration_s: float | None = None
    seed: int = 0

    def provisioned_power_w(self) -> float:
        return self.servers * self.server.gpus_per_server * load_profile(self.server.profile).tdp_w


@dataclass(slots=True, frozen=True)
class RunSummary:
    trace: str
    policy: str
    extra: float
    servers: int
    requests: int
    hp_p50: float  # relative change vs the uncapped reference, e.g. 0.03 = +3%
    hp_p99: float
    lp_p50: float
    lp_p99: float
    hp_ttft_p99: float
    lp_ttft_p99: float
    capped_fraction: float  # of the run's duration
    cap_events: int
    brake_events: int
    gpu_actuations: int
    peak_power_fraction: float  # highest tick power / P
    peak_telemetry_fraction: float  # highest reading the policy saw / P
    unfinished: int
    seconds: float  # wall time of the capped run

    @property
    def meets_paper(self) -> bool:
        """HP P99 impact < 5%, LP P99 < 50%, zero brakes, every request served."""
        return (self.hp_p99 < HP_P99_LIMIT and self.lp_p99 < LP_P99_LIMIT and self.brake_events == 0
                and self.unfinished == 0)


def run_matrix(exp: Experiment, extras: list[float], policies: list[str],
               trace: Trace | None = None) -> tuple[list[RunSummary], dict[tuple[str, float], tuple]]:
    """Every (policy, extra) run plus one uncapped reference per extra. Returns summaries and,
    per run, ``(capped result, reference result)`` for plotting."""
    trace = trace or load_trace(exp.trace)
    summaries, results = [], {}
    for extra in extras:
        deployed = max(2, int(round(exp.servers * (1.0 + extra))))
        workload = scale_trace(trace, exp.rate_per_server * deployed, hp_fraction=exp.hp_fraction,
                               seed=exp.seed, duration_s=exp.duration_s)
        reference = _simulate(exp, workload, deployed, None, exp.policy)
        for name in policies:
            started = time.perf_counter()
            capped = _simulate(exp, workload, deployed, exp.provisioned_power_w(), exp.policy.model_copy(update={"preset": name}))
            took = time.perf_counter() - started
            summaries.append(summarize(exp, name, extra, deployed, capped, reference, took, trace.name))
            results[(name, extra)] = (capped, reference)
    return summaries, results


def _simulate(exp: Experiment, workload, deployed: int, budget_w: float | None, policy: PolicyConfig) -> SimResult:
    hp_servers = _hp_servers(deployed, exp.hp_fraction)
    settings = SimSettings(servers=deployed, hp_servers=hp_servers, provisioned_power_w=budget_w, policy=policy,
                           interval_s=exp.interval_s, actuation_delay_s=exp.actuation_delay_s, tick_s=exp.tick_s)
    return RowSimulator(workload, exp.server, settings).run()


def _hp_servers(deployed: int, hp_fraction: float) -> int:
    if hp_fraction <= 0:
        return 0
    if hp_fraction >= 1:
        return deployed
    return min(deployed - 1, max(1, int(round(deployed * hp_fraction))))


def summarize(exp: Experiment, policy: str, extra: float, deployed: int, capped: SimResult,
              reference: SimResult, seconds: float, trace_name: str) -> RunSummary:
    hp = capped.high_priority
    p = exp.provisioned_power_w()
    duration = max(capped.time_s[-1] if len(capped.time_s) else 0.0, 1e-9)
    return RunSummary(
        trace=trace_name, policy=policy, extra=extra, servers=deployed, requests=len(capped.latency_s),
        hp_p50=_change(capped.latency_s, reference.latency_s, hp, 50),
        hp_p99=_change(capped.latency_s, reference.latency_s, hp, 99),
        lp_p50=_change(capped.latency_s, reference.latency_s, ~hp, 50),
        lp_p99=_change(capped.latency_s, reference.latency_s, ~hp, 99),
        hp_ttft_p99=_change(capped.ttft_s, reference.ttft_s, hp, 99),
        lp_ttft_p99=_change(capped.ttft_s, reference.ttft_s, ~hp, 99),
        capped_fraction=capped.capped_s / duration, cap_events=capped.cap_events,
        brake_events=capped.brake_events, gpu_actuations=capped.gpu_actuations,
        peak_power_fraction=float(capped.row_power_w.max() / p) if len(capped.row_power_w) else 0.0,
        peak_telemetry_fraction=float(capped.telemetry_w.max() / p) if len(capped.telemetry_w) else 0.0,
        unfinished=capped.unfinished, seconds=seconds,
    )


def _change(capped: np.ndarray, reference: np.ndarray, mask: np.ndarray, q: float) -> float:
    """Relative change of the q-th percentile; unfinished requests count as infinitely late."""
    if not mask.any():
        return float("nan")
    a = np.where(np.isnan(capped[mask]), np.inf, capped[mask])
    b = np.where(np.isnan(reference[mask]), np.inf, reference[mask])
    with np.errstate(invalid="ignore"):  # interpolating between two infinities: inf, quietly
        qa, qb = np.percentile(a, q), np.percentile(b, q)
    if not math.isfinite(qa):
        return float("inf")
    return float(qa / qb - 1.0) if qb > 0 else float("nan")


# -- output -------------------------------------------------------------------------------------------


def format_table(rows: list[RunSummary]) -> str:
    """A fixed-width table of runs; latency columns are changes vs the uncapped run."""
    head = (f"{'trace':<6} {'policy':<18} {'servers':>12} {'HP P50':>7} {'HP P99':>7} {'LP P50':>7} {'LP P99':>7} "
            f"{'HP TTFT99':>9} {'LP TTFT99':>9} {'capped':>7} {'caps':>5} {'brakes':>6} {'peak/P':>6}  paper")
    lines = [head, "-" * len(head)]
    for r in rows:
        servers = f"{r.servers} (+{r.extra:.0%})"
        lines.append(
            f"{r.trace.rsplit('_', 1)[-1][:6]:<6} {r.policy:<18} {servers:>12} {_pct(r.hp_p50):>7} {_pct(r.hp_p99):>7} "
            f"{_pct(r.lp_p50):>7} {_pct(r.lp_p99):>7} {_pct(r.hp_ttft_p99):>9} {_pct(r.lp_ttft_p99):>9} "
            f"{r.capped_fraction:>6.1%} {r.cap_events:>5} {r.brake_events:>6} {r.peak_telemetry_fraction:>6.2f}  "
            f"{'yes' if r.meets_paper else 'no'}{f' ({r.unfinished} unfinished)' if r.unfinished else ''}"
        )
    return "\n".join(lines)


def _pct(x: float) -> str:
    if x is None or (isinstance(x, float) and math.isnan(x)):
        return "n/a"
    return "inf" if math.isinf(x) else f"{x:+.1%}"


def largest_passing(rows: list[RunSummary], policy: str) -> float | None:
    """The largest oversubscription at which ``policy`` meets all of the paper's limits, with
    every smaller level meeting them too."""
    best = None
    for r in sorted((r for r in rows if r.policy == policy), key=lambda r: r.extra):
        if not r.meets_paper:
            break
        best = r.extra
    return best


def write_json(rows: list[RunSummary], path: str | Path) -> None:
    Path(path).write_text(json.dumps([asdict(r) for r in rows], indent=1))


def plot_power(capped: SimResult, reference: SimResult, path: str | Path, title: str) -> Path:
    """PNG of row power (1 s means) with the policy's thresholds and its cap levels."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (ax, lv) = plt.subplots(2, 1, figsize=(11, 5.5), sharex=True, gridspec_kw={"height_ratios": [4, 1]})
    for result, label, style in ((reference, "uncapped", dict(color="0.7", lw=0.8)),
                                 (capped, "governed", dict(color="C0", lw=0.9))):
        t, w = _per_second(result)
        ax.plot(t / 60.0, w / 1000.0, label=label, **style)
    colors = {"T1": "C1", "T2": "C3", "BRAKE": "k"}
    for name, watts in capped.thresholds_w.items():
        ax.axhline(watts / 1000.0, color=colors.get(name, "k"), ls="--", lw=0.8,
                   label=f"{'P (brake)' if name == 'BRAKE' else name} {watts / 1000:.1f} kW")
    ax.set_ylabel("row GPU power (kW)")
    ax.set_title(title, fontsize=10)
    ax.legend(loc="lower right", fontsize=8, ncol=3)
    lv.step(capped.control_time_s / 60.0, capped.levels, where="post", color="C3", lw=0.8)
    lv.set_yticks([0, 1, 2, 3], ["none", "T1", "T2", "brake"], fontsize=8)
    lv.set_xlabel("time (min)")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def _per_second(result: SimResult) -> tuple[np.ndarray, np.ndarray]:
    dt = result.time_s[1] - result.time_s[0] if len(result.time_s) > 1 else 1.0
    k = max(1, int(round(1.0 / dt)))
    n = len(result.row_power_w) // k * k
    return result.time_s[:n:k], result.row_power_w[:n].reshape(-1, k).mean(axis=1)


__all__ = ["PRESETS", "Experiment", "RunSummary", "format_table", "largest_passing", "plot_power", "run_matrix"]
