"""Load-test plots (PNG, matplotlib's Agg backend: no display needed).

* ``latency_cdf.png``: CDFs of TTFT, TPOT, ITL and E2E latency;
* ``timeline.png``: completed requests/s and output tokens/s over time, and the server's power
  (GPU and CPU, from ``/metrics``) against the power budget and the GPUs' enforced power limits
  (caps lower them), with cap events marked;
* ``energy_hist.png``: energy per request, one histogram per expert, labelled with its source.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from .clients import Record
from .report import tpot_ms
from .runner import PowerSample


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def write_plots(records: Sequence[Record], power: Sequence[PowerSample], out_dir: Path) -> list[Path]:
    plt = _pyplot()
    paths = [_latency_cdf(plt, records, out_dir), _timeline(plt, records, power, out_dir), _energy_hist(plt, records, out_dir)]
    plt.close("all")
    return paths


def _cdf(ax, values: Sequence[float], label: str) -> None:
    if not len(values):
        return
    xs = np.sort(np.asarray(values, dtype=float))
    ax.plot(xs, np.arange(1, xs.size + 1) / xs.size, label=f"{label} (n={xs.size})")


def _latency_cdf(plt, records: Sequence[Record], out_dir: Path) -> Path:
    ok = [r for r in records if r.ok]
    fig, axes = plt.subplots(1, 4, figsize=(16, 3.8))
    series = {
        "TTFT": lambda rs: [r.ttft_ms for r in rs if r.ttft_ms is not None],
        "TPOT": lambda rs: [t for r in rs if (t := tpot_ms(r)) is not None],
        "ITL": lambda rs: [x for r in rs for x in r.itl_ms],
        "E2E latency": lambda rs: [r.e2e_ms for r in rs if r.e2e_ms is not None],
    }
    by_expert = defaultdict(list)
    for r in ok:
        by_expert[r.expert].append(r)
    for ax, (title, pick) in zip(axes, series.items(), strict=True):
        for expert, recs in sorted(by_expert.items()):
            _cdf(ax, pick(recs), expert)
        ax.set_title(title)
        ax.set_xlabel("ms")
        ax.set_ylim(0, 1.01)
        ax.grid(alpha=0.3)
        if ax.lines:
            ax.legend(fontsize=7)
    axes[0].set_ylabel("fraction of requests")
    fig.suptitle(f"latency CDFs ({len(ok)} completed requests)")
    fig.tight_layout()
    path = out_dir / "latency_cdf.png"
    fig.savefig(path, dpi=110)
    return path


def _timeline(plt, records: Sequence[Record], power: Sequence[PowerSample], out_dir: Path) -> Path:
    fig, (top, bottom) = plt.subplots(2, 1, figsize=(11, 6.5), sharex=True)
    done = [(r.sent_s + r.e2e_ms / 1000.0, r.completion_tokens) for r in records if r.ok and r.e2e_ms is not None]
    if done:
        end = max(t for t, _ in done)
        bins = np.arange(0.0, end + 1.0, 1.0)
        times = np.asarray([t for t, _ in done])
        reqs, _ = np.histogram(times, bins)
        toks, _ = np.histogram(times, bins, weights=[n for _, n in done])
        top.step(bins[:-1], reqs, where="post", label="completed requests/s")
        twin = top.twinx()
        twin.step(bins[:-1], toks, where="post", color="tab:orange", label="output tokens/s")
        twin.set_ylabel("tokens/s")
        twin.legend(loc="upper right", fontsize=8)
    top.set_ylabel("requests/s")
    top.legend(loc="upper left", fontsize=8)
    top.set_title("throughput over time")
    top.grid(alpha=0.3)
    _power_panel(bottom, power)
    bottom.set_xlabel("seconds since start")
    fig.tight_layout()
    path = out_dir / "timeline.png"
    fig.savefig(path, dpi=110)
    return path


def _power_panel(ax, power: Sequence[PowerSample]) -> None:
    ax.set_title("server power")
    ax.set_ylabel("W")
    ax.grid(alpha=0.3)
    if not power:
        ax.text(0.5, 0.5, "no power telemetry: pass --metrics-url (automatic with --api openai)",
                transform=ax.transAxes, ha="center", va="center")
        return
    t = [p.t_s for p in power]
    if any(p.gpu_power_w for p in power):
        ax.plot(t, [p.gpu_power_w for p in power], label="GPU power (sum)")
    if any(p.cpu_power_w for p in power):
        ax.plot(t, [p.cpu_power_w for p in power], label="CPU power, modeled (sum)")
    if any(p.power_limit_w for p in power):
        ax.step(t, [p.power_limit_w for p in power], where="post", linestyle="--", label="GPU power limits (caps)")
    budgets = [p.budget_w for p in power]
    if any(b is not None for b in budgets):
        ax.step(t, [b if b is not None else np.nan for b in budgets], where="post", color="red", label="power budget")
    for prev, cur in zip(power, power[1:], strict=False):
        if cur.cap_events > prev.cap_events:
            ax.axvline(cur.t_s, color="purple", alpha=0.4, linewidth=1)
    ax.legend(fontsize=8)


def _energy_hist(plt, records: Sequence[Record], out_dir: Path) -> Path:
    fig, ax = plt.subplots(figsize=(8, 4.5))
    groups: dict[str, list[float]] = defaultdict(list)
    sources: dict[str, set[str]] = defaultdict(set)
    for r in records:
        if r.ok and r.energy_j is not None:
            groups[r.expert].append(r.energy_j)
            sources[r.expert].add(r.energy_source)
    values = [v for vs in groups.values() for v in vs]
    if values:
        bins = np.histogram_bin_edges(values, bins=min(40, max(5, len(values) // 5)))
        for expert, vs in sorted(groups.items()):
            ax.hist(vs, bins=bins, alpha=0.6, label=f"{expert} ({', '.join(sorted(sources[expert]))}, n={len(vs)})")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no completed request reported energy", transform=ax.transAxes, ha="center")
    ax.set_xlabel("energy per request (J)")
    ax.set_ylabel("requests")
    ax.set_title("energy per request by expert")
    ax.grid(alpha=0.3)
    fig.tight_layout()
    path = out_dir / "energy_hist.png"
    fig.savefig(path, dpi=110)
    return path
