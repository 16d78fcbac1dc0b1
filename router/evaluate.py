"""Offline evaluation: replay labelled prompts through the routing policies (``wattserve route eval``).

Each expert is a column of per-prompt quality in the data (e.g. RouteLLM's correctness of
Mixtral-8x7B and GPT-4) plus a measured energy profile (an ML.ENERGY leaderboard row: J per
output token, time per output token, batch size). Every prompt of the held-out split goes through
the *serving* policy objects (``router/policies.py``, ``router/moe2.py``) with a candidate per
expert whose live profile is that row, so the cost model and the selector run exactly as online.
A policy with a knob is swept into a curve:

- ``moe2``: the price of energy ``quality_per_j`` (experts not worth their joules at that price
  are left out; see ``router/moe2.py``);
- ``threshold`` (RouteLLM-style): the quality-gain threshold;
- ``random`` (RouteLLM's random router): the share sent to the strongest expert;
- ``cheapest``, ``strongest``, ``round_robin``, ``least_loaded`` are single points; ``oracle``
  (the cheapest correct expert per prompt) is the upper bound.

Output: mean quality vs mean energy per request for every point, quality at equal energy, the
energy needed to reach 95 % of the strongest expert's quality, and a PNG of all curves.
"""

from __future__ import annotations

import csv
import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from wattserve.errors import InvalidRequest
from wattserve.types import ExpertProfile

from .base import Candidate, RequestFeatures, RouterSettings
from .gate import GateOutput
from .policies import make_policy


@dataclass(slots=True, frozen=True)
class EvalExpert:
    name: str
    column: str  # quality column in the data (and gate output)
    j_per_token: float  # measured J per output token
    tpot_ms: float  # measured time per output token
    batch: float  # average batch size of the measurement
    max_batch: int
    source: str  # where the numbers come from
    note: str = ""


@dataclass(slots=True)
class Curve:
    policy: str
    points: list[tuple[float, float, str]] = field(default_factory=list)  # (energy J, quality, knob)

    def pareto(self) -> list[tuple[float, float]]:
        """Points sorted by energy keeping only those that raise quality."""
        out: list[tuple[float, float]] = []
        for e, q, _ in sorted(self.points):
            if not out or q > out[-1][1]:
                out.append((e, q))
        return out

    def quality_at(self, energy_j: float) -> float | None:
        """Best quality at or below ``energy_j``, interpolating between Pareto points."""
        pts = self.pareto()
        if not pts or energy_j < pts[0][0] - 1e-9:
            return None
        for (e0, q0), (e1, q1) in zip(pts, pts[1:], strict=False):
            if e0 <= energy_j <= e1:
                return q0 + (q1 - q0) * (energy_j - e0) / (e1 - e0) if e1 > e0 else max(q0, q1)
        return pts[-1][1] if energy_j >= pts[-1][0] else pts[0][1]

    def energy_for(self, quality: float) -> float | None:
        """Least energy reaching ``quality`` (interpolated), None if never reached."""
        pts = self.pareto()
        for (e0, q0), (e1, q1) in zip([pts[0]] + pts, pts, strict=False):
            if q1 >= quality:
                if q1 == q0 or q0 >= quality:
                    return e1 if q0 < quality else e0
                return e0 + (e1 - e0) * (quality - q0) / (q1 - q0)
        return None


# -- profiles -----------------------------------------------------------------------------------
def mlenergy_row(csv_path: Path, model: str, gpu: str, max_batch_size: int, task: str = "") -> dict:
    with csv_path.open(newline="") as f:
        rows = [r for r in csv.DictReader(f) if r["model"] == model and r["gpu"] == gpu
                and int(float(r["max_batch_size"])) == max_batch_size and (not task or r["task"] == task)]
    if not rows:
        raise InvalidRequest(f"{csv_path}: no ML.ENERGY row for {model} on {gpu} at max batch {max_batch_size}")
    return rows[0]


def load_experts(spec: Mapping, base_dir: Path, shared_dir: Path | None) -> list[EvalExpert]:
    """Experts of an eval profile file (see configs/eval/*.yaml)."""
    csv_ref = str(spec.get("mlenergy_csv", ""))
    if csv_ref.startswith("shared:"):
        if shared_dir is None:
            raise InvalidRequest("the profile file refers to shared data but no shared/data folder was found")
        csv_path = shared_dir / csv_ref.removeprefix("shared:")
    else:
        csv_path = base_dir / csv_ref
    experts = []
    for e in spec.get("experts", []):
        if "mlenergy" in e:
            m = e["mlenergy"]
            row = mlenergy_row(csv_path, m["model"], m["gpu"], int(m["max_batch_size"]), m.get("task", ""))
            experts.append(EvalExpert(
                name=e["name"], column=e["column"], j_per_token=float(row["energy_per_output_token_J"]),
                tpot_ms=float(row["avg_tpot_or_itl_ms"]), batch=float(row["avg_batch_size"]),
                max_batch=int(float(row["max_batch_size"])),
                source=f"ML.ENERGY {row['source']} {row['task']}: {row['model']} on {row['num_gpus']} x {row['gpu']}",
                note=e.get("note", ""),
            ))
        else:
            experts.append(EvalExpert(e["name"], e["column"], float(e["j_per_token"]), float(e["tpot_ms"]),
                                      float(e.get("batch", 1)), int(e.get("max_batch", 1)), "profile file", e.get("note", "")))
    if len(experts) < 2:
        raise InvalidRequest("an evaluation needs at least two experts")
    return experts


def candidate(e: EvalExpert) -> Candidate:
    """A replica whose live profile is the measured row: the cost model predicts J/token x tokens
    and TPOT x tokens for it."""
    # The measured row already is per request at its batch size: present it as a batch-1 step
    # of TPOT ms whose power makes one token cost the measured joules. No live load offline.
    prof = ExpertProfile(
        expert=e.name, replica=0, model=e.column, engine="offline", device=e.source, energy_source="measured:mlenergy",
        priority_class="high", max_batch=max(1, e.max_batch), max_queue=0, max_model_len=1 << 20, params=0,
        healthy=True, running=0, waiting=0, prefill_ms_per_token=0.0, decode_ms_per_token=e.tpot_ms,
        j_per_token=e.j_per_token, decode_ms_per_step_by_batch={1: e.tpot_ms},
        busy_power_w=e.j_per_token * 1000.0 / e.tpot_ms,
    )
    return Candidate(e.name, 0, True, 0, prof)


# -- replay -------------------------------------------------------------------------------------
def replay(policy_name: str, settings: RouterSettings, experts: Sequence[EvalExpert], gates: Sequence[GateOutput],
           quality: np.ndarray, output_tokens: int, seed: int = 0) -> tuple[float, float, dict[str, float]]:
    """Mean energy (J) and quality of one policy configuration over the rows; and routing shares."""
    policy = make_policy(policy_name, rng=random.Random(seed), settings=settings)
    cands = [candidate(e) for e in experts]
    col = {e.name: i for i, e in enumerate(experts)}
    energy = {e.name: e.j_per_token * output_tokens for e in experts}
    total_e, total_q, shares = 0.0, 0.0, dict.fromkeys(col, 0)
    for row, gate in enumerate(gates):
        features = RequestFeatures(prompt_chars=0, max_tokens=output_tokens, prompt_tokens=0, gate=gate)
        chosen = policy.plan(features, cands).experts[0]
        total_e += energy[chosen]
        total_q += float(quality[row, col[chosen]])
        shares[chosen] += 1
    n = max(1, len(gates))
    return total_e / n, total_q / n, {k: v / n for k, v in shares.items()}


def evaluate(experts: Sequence[EvalExpert], gates: Sequence[GateOutput], quality: np.ndarray, prior: Mapping[str, float],
             output_tokens: int, steps: int = 21, seed: int = 0, progress: Callable[[str], None] | None = None) -> list[Curve]:
    """Every policy's curve on the rows (``quality[row, k]`` belongs to ``experts[k]``)."""
    base = RouterSettings(infeasible="serve_cheapest", quality_prior=dict(prior))
    strong = max(prior, key=lambda e: (prior[e], e))
    weak = min(prior, key=lambda e: (prior[e], e))
    energy = {e.name: e.j_per_token * output_tokens for e in experts}
    curves = []

    def sweep(name: str, knobs: Sequence[tuple[str, RouterSettings]], policy: str | None = None) -> None:
        curve = Curve(name)
        for label, settings in knobs:
            e, q, _ = replay(policy or name, settings, experts, gates, quality, output_tokens, seed)
            curve.points.append((e, q, label))
        curves.append(curve)
        if progress:
            progress(name)

    prices = _price_grid(experts, gates, energy, steps)
    sweep("moe2", [(f"price {p:.3g}", replace(base, quality_per_j=p)) for p in prices])
    gains = np.array([g.quality[strong] - g.quality[weak] for g in gates])
    taus = sorted({*np.quantile(gains, np.linspace(0, 1, steps)).tolist(), float(gains.max()) + 1e-6})
    sweep("threshold", [(f"tau {t:+.3f}", replace(base, strong=strong, weak=weak, threshold=t)) for t in taus])
    for name in ("cheapest", "strongest", "round_robin", "least_loaded"):
        sweep(name, [("", base)])
    curves.append(random_curve(experts, quality, output_tokens, strong, weak, steps, seed))
    curves.append(oracle(experts, quality, output_tokens))
    return curves


def _price_grid(experts, gates, energy, steps) -> list[float]:
    """Prices (quality per joule) at which the k = 1 choice between two experts flips on some
    prompt: (q_i - q_j) / (E_i - E_j); their quantiles span every routing mix."""
    flips = []
    for g in gates:
        for a in experts:
            for b in experts:
                de = energy[a.name] - energy[b.name]
                dq = g.quality[a.name] - g.quality[b.name]
                if de > 0 and dq > 0:
                    flips.append(dq / de)
    if not flips:
        return [0.0]
    grid = np.quantile(np.asarray(flips), np.linspace(0, 1, steps)).tolist()
    return sorted({0.0, *grid, max(flips) * 1.01})


def random_curve(experts, quality, output_tokens, strong, weak, steps, seed) -> Curve:
    """RouteLLM's random router: the strong expert with probability p, else the weak one."""
    col = {e.name: i for i, e in enumerate(experts)}
    energy = {e.name: e.j_per_token * output_tokens for e in experts}
    rng = random.Random(seed)
    curve = Curve("random")
    for p in np.linspace(0, 1, steps):
        picks = [strong if rng.random() < p else weak for _ in range(len(quality))]
        curve.points.append((
            float(np.mean([energy[x] for x in picks])),
            float(np.mean([quality[r, col[x]] for r, x in enumerate(picks)])),
            f"p {p:.2f}",
        ))
    return curve


def oracle(experts, quality, output_tokens) -> Curve:
    """Upper bound: per prompt the cheapest expert that is best on it."""
    order = sorted(range(len(experts)), key=lambda k: experts[k].j_per_token)
    e_tot = q_tot = 0.0
    for row in quality:
        best = row.max()
        k = next(k for k in order if row[k] >= best)
        e_tot += experts[k].j_per_token * output_tokens
        q_tot += float(best)
    n = max(1, len(quality))
    return Curve("oracle", [(e_tot / n, q_tot / n, "")])


# -- reporting ----------------------------------------------------------------------------------
def summary(curves: Sequence[Curve], strong_quality: float, strong_energy: float) -> list[str]:
    """Text lines: per policy, quality at fixed energies and the energy to reach 95 % of strong."""
    target = 0.95 * strong_quality
    fractions = (0.25, 0.5, 0.75)
    lines = [
        f"{'policy':<13} {'points':>6} " + " ".join(f"{'Q@' + format(f, '.0%') + ' E':>9}" for f in fractions)
        + f" {'E for 95% Q':>12} {'(x strong)':>10}"
    ]
    for c in curves:
        qs = [c.quality_at(f * strong_energy) for f in fractions]
        e95 = c.energy_for(target)
        lines.append(
            f"{c.policy:<13} {len(c.points):>6} " + " ".join(f"{q:>9.4f}" if q is not None else f"{'-':>9}" for q in qs)
            + (f" {e95:>10.1f} J {e95 / strong_energy:>9.2f}x" if e95 is not None else f" {'never':>12} {'':>10}")
        )
    ours = next((c for c in curves if c.policy == "moe2"), None)
    if ours is not None:
        lines.append("moe2 at the energy of each other policy's point(s) (quality moe2 vs theirs):")
        for c in curves:
            if c is ours:
                continue
            diffs = [(e, ours.quality_at(e), q) for e, q, _ in c.points if ours.quality_at(e) is not None]
            if not diffs:
                continue
            gain = [m - q for _, m, q in diffs]
            if len(diffs) == 1:
                e, m, q = diffs[0]
                lines.append(f"  vs {c.policy:<12} {m:.4f} vs {q:.4f} at {e:.0f} J ({m - q:+.4f})")
            else:
                lines.append(f"  vs {c.policy:<12} mean {np.mean(gain):+.4f}, min {min(gain):+.4f}, max {max(gain):+.4f} over {len(diffs)} points")
    return lines


def plot(curves: Sequence[Curve], path: Path, title: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(8, 5.5), dpi=110)
    for c in curves:
        pts = sorted((e, q) for e, q, _ in c.points)
        xs, ys = [p[0] for p in pts], [p[1] for p in pts]
        style = dict(marker="o", markersize=3 if len(pts) > 1 else 8, linewidth=1.5 if len(pts) > 1 else 0)
        if c.policy == "moe2":
            style.update(linewidth=2.5, color="black")
        ax.plot(xs, ys, label=c.policy, **style)
    ax.set_xlabel("mean energy per request (J)")
    ax.set_ylabel("mean quality (accuracy)")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
