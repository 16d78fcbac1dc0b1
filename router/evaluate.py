"""Offline evaluation: replay labelled prompts through the routing policies (``wattserve route eval``).

Each expert is a column of per-prompt quality in the data plus an energy profile
(``router/eval_profiles.py``: a measured ML.ENERGY row, a stand-in's row, or a size law fitted
on those rows, each labelled so). Every held-out prompt goes through the *serving* policy objects
(``router/policies/``) with a candidate per expert whose live profile is
that row, so the cost model and the selector run exactly as online. A policy with a knob is
swept into a curve:

- ``moe2``: the price of energy ``quality_per_j`` (k = 1: argmax q - price E, see router/policies/moe2.py);
- ``threshold`` (RouteLLM): the strongest expert when the gate predicts it gains at least tau over
  the *cheapest* expert, else the cheapest;
- ``random`` (RouteLLM's random router): the strongest with probability p, else the cheapest;
- ``knn``, ``mlp`` (RouterBench's baselines, ``router/eval_baselines.py``): argmax of predicted
  quality minus price x energy, with quality predicted by the k nearest training prompts or by an
  MLP regressor;
- ``cheapest``, ``strongest``, ``round_robin``, ``least_loaded`` are single points;
- ``oracle``: the true qualities under the same price rule, the least energy that reaches each
  quality with perfect knowledge;
- ``ceiling_*`` (``route eval`` adds them): estimates of what a router that knew each prompt's
  *expected* quality, not its sampled label, could reach (``router/eval_ceiling.py``).

Figures of merit, per policy (``metrics``): the energy needed to reach 95 % of the strongest
expert's quality (interpolating on the curve's upper convex hull, as mixing two operating points
at random reaches any point between them), the share of the oracle's saving there,
``(E_strong - E95) / (E_strong - E95_oracle)``, the share of the attainable saving (the same with
the most saving ``ceiling_*`` curve in place of the oracle), and the AIQ: the mean of that hull's quality over
normalised energy ``x = E / E_strong`` from the cheapest expert's ``x`` to 1 (RouterBench's
Average Improvement in Quality with joules in place of dollars; a policy scores 0 where it cannot
operate, below its cheapest point; single-point policies get none).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field, replace
from pathlib import Path

import numpy as np

from .base import RequestFeatures, RouterSettings
from .eval_baselines import price_curve, price_grid
from .eval_profiles import EvalExpert, candidate, load_experts  # noqa: F401  (re-exported)
from .gate import GateOutput
from .policies import make_policy

TARGET_SHARE = 0.95  # of the strongest expert's quality
CEILING_PREFIX = "ceiling_"  # curves that estimate what is attainable (router/eval_ceiling.py)


@dataclass(slots=True)
class Curve:
    policy: str
    points: list[tuple[float, float, str]] = field(default_factory=list)  # (energy J, quality, knob)
    shares: list[dict[str, float]] = field(default_factory=list)  # routing shares of each point

    def pareto(self) -> list[tuple[float, float]]:
        """Points sorted by energy keeping only those that raise quality."""
        out: list[tuple[float, float]] = []
        for e, q, _ in sorted(self.points):
            if not out or q > out[-1][1]:
                out.append((e, q))
        return out

    def hull(self) -> list[tuple[float, float]]:
        """Upper convex hull of the Pareto points: what mixing operating points at random reaches."""
        out: list[tuple[float, float]] = []
        for p in self.pareto():
            while len(out) >= 2:
                (e0, q0), (e1, q1) = out[-2], out[-1]
                # drop the middle point if it lies on or below the chord from out[-2] to p
                if (q1 - q0) * (p[0] - e0) <= (p[1] - q0) * (e1 - e0):
                    out.pop()
                else:
                    break
            out.append(p)
        return out

    def quality_at(self, energy_j: float) -> float | None:
        """Best quality at or below ``energy_j`` on the hull; None below the cheapest point."""
        pts = self.hull()
        if not pts or energy_j < pts[0][0] - 1e-9:
            return None
        for (e0, q0), (e1, q1) in zip(pts, pts[1:], strict=False):
            if e0 <= energy_j <= e1:
                return q0 + (q1 - q0) * (energy_j - e0) / (e1 - e0) if e1 > e0 else max(q0, q1)
        return pts[-1][1] if energy_j >= pts[-1][0] else pts[0][1]

    def energy_for(self, quality: float) -> float | None:
        """Least energy reaching ``quality`` on the hull, None if never reached."""
        pts = self.hull()
        if not pts:
            return None
        if pts[0][1] >= quality:
            return pts[0][0]
        for (e0, q0), (e1, q1) in zip(pts, pts[1:], strict=False):
            if q1 >= quality:
                return e0 + (e1 - e0) * (quality - q0) / (q1 - q0)
        return None

    def aiq(self, lo_j: float, hi_j: float, samples: int = 2001) -> float:
        """Mean hull quality over energies in [lo_j, hi_j] (0 where the policy cannot operate)."""
        if hi_j <= lo_j:
            q = self.quality_at(hi_j)
            return q or 0.0
        xs = np.linspace(lo_j, hi_j, samples)
        ys = np.array([self.quality_at(float(x)) or 0.0 for x in xs])
        return float(np.trapezoid(ys, xs) / (hi_j - lo_j))

    def shares_near(self, energy_j: float) -> dict[str, float]:
        """Routing shares of the cheapest point at or above ``energy_j`` (the last point if none)."""
        if not self.shares:
            return {}
        order = sorted(range(len(self.points)), key=lambda i: self.points[i][0])
        for i in order:
            if self.points[i][0] >= energy_j - 1e-9:
                return self.shares[i]
        return self.shares[order[-1]]


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


def pair(experts: Sequence[EvalExpert], prior: Mapping[str, float]) -> tuple[str, str]:
    """(strongest by prior quality, cheapest by energy): the two experts of RouteLLM's routers.
    Ties: the strongest among equally good is the cheaper; the cheapest among equally cheap is
    the better."""
    strong = min(experts, key=lambda e: (-prior[e.name], e.j_per_token, e.name)).name
    cheap = min(experts, key=lambda e: (e.j_per_token, -prior[e.name], e.name)).name
    return strong, cheap


def energy_ties(experts: Sequence[EvalExpert], rel: float = 1e-6) -> list[tuple[str, str]]:
    """Pairs of experts whose energy per request is the same: curves between them collapse."""
    out = []
    for i, a in enumerate(experts):
        for b in experts[i + 1:]:
            if abs(a.j_per_token - b.j_per_token) <= rel * max(a.j_per_token, b.j_per_token):
                out.append((a.name, b.name))
    return out


def evaluate(experts: Sequence[EvalExpert], gates: Sequence[GateOutput], quality: np.ndarray, prior: Mapping[str, float],
             output_tokens: int, steps: int = 21, seed: int = 0, progress: Callable[[str], None] | None = None,
             predictions: Mapping[str, np.ndarray] | None = None) -> list[Curve]:
    """Every policy's curve on the rows (``quality[row, k]`` belongs to ``experts[k]``);
    ``predictions`` adds offline routers by name (e.g. ``knn``: predicted quality per row/expert)."""
    base = RouterSettings(infeasible="serve_cheapest", quality_prior=dict(prior))
    strong, cheap = pair(experts, prior)
    names = [e.name for e in experts]
    energy = np.array([e.j_per_token * output_tokens for e in experts])
    curves = []

    def sweep(name: str, knobs: Sequence[tuple[str, RouterSettings]], policy: str | None = None) -> None:
        curve = Curve(name)
        for label, settings in knobs:
            e, q, shares = replay(policy or name, settings, experts, gates, quality, output_tokens, seed)
            curve.points.append((e, q, label))
            curve.shares.append(shares)
        curves.append(curve)
        if progress:
            progress(name)

    gate_q = np.array([[g.quality[n] for n in names] for g in gates])
    sweep("moe2", [(f"price {p:.3g}", replace(base, quality_per_j=p)) for p in price_grid(gate_q, energy, steps)])
    if strong != cheap:
        gains = gate_q[:, names.index(strong)] - gate_q[:, names.index(cheap)]
        taus = sorted({*np.quantile(gains, np.linspace(0, 1, steps)).tolist(), float(gains.max()) + 1e-6})
        sweep("threshold", [(f"tau {t:+.3f}", replace(base, strong=strong, weak=cheap, threshold=t)) for t in taus])
    for name, pred in (predictions or {}).items():
        curve = Curve(name)
        for e, q, label, shares in price_curve(pred, quality, energy, names, steps):
            curve.points.append((e, q, label))
            curve.shares.append(shares)
        curves.append(curve)
    for name in ("cheapest", "strongest", "round_robin", "least_loaded"):
        sweep(name, [("", base)])
    curves.append(random_curve(experts, quality, output_tokens, strong, cheap, steps, seed))
    curves.append(oracle(experts, quality, output_tokens, steps))
    return curves


def random_curve(experts, quality, output_tokens, strong, cheap, steps, seed) -> Curve:
    """RouteLLM's random router: the strongest expert with probability p, else the cheapest."""
    col = {e.name: i for i, e in enumerate(experts)}
    energy = {e.name: e.j_per_token * output_tokens for e in experts}
    rng = random.Random(seed)
    curve = Curve("random")
    for p in np.linspace(0, 1, steps):
        picks = [strong if rng.random() < p else cheap for _ in range(len(quality))]
        curve.points.append((
            float(np.mean([energy[x] for x in picks])),
            float(np.mean([quality[r, col[x]] for r, x in enumerate(picks)])),
            f"p {p:.2f}",
        ))
        share = sum(x == strong for x in picks) / max(1, len(picks))
        curve.shares.append({strong: share, cheap: 1.0 - share} if strong != cheap else {strong: 1.0})
    return curve


def oracle(experts, quality, output_tokens, steps: int = 21) -> Curve:
    """Perfect knowledge: per prompt argmax q - price E over a sweep of prices; its top point
    (price -> 0) is the cheapest expert among the best on each prompt."""
    names = [e.name for e in experts]
    energy = np.array([e.j_per_token * output_tokens for e in experts])
    curve = Curve("oracle")
    for e, q, label, shares in price_curve(np.asarray(quality, dtype=np.float64), quality, energy, names, steps):
        curve.points.append((e, q, label))
        curve.shares.append(shares)
    return curve


# -- figures of merit ---------------------------------------------------------------------------
def metrics(curves: Sequence[Curve], experts: Sequence[EvalExpert], quality: np.ndarray, strong: str,
            output_tokens: int) -> dict:
    """Per policy: AIQ, energy for 95 % of the strongest's quality (J and x strongest), the share
    of the oracle's saving captured there, and routing shares at that point."""
    k = [e.name for e in experts].index(strong)
    strong_q = float(quality[:, k].mean())
    strong_e = experts[k].j_per_token * output_tokens
    lo = min(e.j_per_token for e in experts) * output_tokens
    target = TARGET_SHARE * strong_q
    by = {c.policy: c for c in curves}
    oracle_e95 = by["oracle"].energy_for(target) if "oracle" in by else None
    ceilings = [e for c in curves if c.policy.startswith(CEILING_PREFIX) and (e := c.energy_for(target)) is not None]
    attainable_e95 = min(ceilings) if ceilings else None
    oracle_top = min((e for e, q, _ in by["oracle"].points if q >= max(qq for _, qq, _ in by["oracle"].points) - 1e-12),
                     default=None) if "oracle" in by else None
    out = {"strong": strong, "strong_quality": strong_q, "strong_energy_j": strong_e, "target_quality": target,
           "aiq_range_j": [lo, strong_e], "oracle_e95_j": oracle_e95, "oracle_top_energy_j": oracle_top,
           "attainable_e95_j": attainable_e95, "policies": {}}
    for c in curves:
        e95 = c.energy_for(target)
        share = None
        if e95 is not None and oracle_e95 is not None and strong_e - oracle_e95 > 1e-12:
            share = round((strong_e - e95) / (strong_e - oracle_e95), 9) + 0.0  # no "-0%" from rounding noise
        attainable = None
        if e95 is not None and attainable_e95 is not None and strong_e - attainable_e95 > 1e-12:
            attainable = round((strong_e - e95) / (strong_e - attainable_e95), 9) + 0.0
        out["policies"][c.policy] = {
            # a single operating point has no curve to integrate (RouterBench scores routers only)
            "aiq": c.aiq(lo, strong_e) if strong_e > lo and len(c.points) > 1 else None,
            "e95_j": e95, "e95_x_strong": e95 / strong_e if e95 is not None else None,
            "oracle_saving_share": share,
            "attainable_saving_share": attainable,
            "shares_at_e95": c.shares_near(e95) if e95 is not None else (c.shares[-1] if c.shares else {}),
            "points": len(c.points),
        }
    return out


def equal_energy(ours: Curve, other: Curve) -> list[tuple[float, float, float]]:
    """(energy, our quality, their quality) at each of ``other``'s points where ours operates."""
    out = []
    for e, q, _ in other.points:
        m = ours.quality_at(e)
        if m is not None:
            out.append((e, m, q))
    return out


def summary(curves: Sequence[Curve], m: Mapping) -> list[str]:
    """Text lines: per policy AIQ, energy to 95 % of the strongest's quality, the oracle's saving
    captured there, routing shares at that point; then MoE² at the energy of the others' points."""
    strong_e = m["strong_energy_j"]
    lines = [f"{'policy':<17} {'points':>6} {'AIQ':>7} {'E for 95% Q':>12} {'x strong':>8} {'oracle saving':>13} "
             f"{'attainable':>10}  shares at that point"]
    for c in curves:
        p = m["policies"][c.policy]
        aiq = f"{p['aiq']:>7.4f}" if p["aiq"] is not None else f"{'-':>7}"
        e95 = (f"{p['e95_j']:>10.1f} J {p['e95_x_strong']:>7.2f}x" if p["e95_j"] is not None else f"{'never':>12} {'':>8}")
        share = f"{p['oracle_saving_share']:>12.0%}" if p["oracle_saving_share"] is not None else f"{'-':>12}"
        att = p.get("attainable_saving_share")
        share += f" {att:>10.0%}" if att is not None else f" {'-':>10}"
        mix = ", ".join(f"{k} {v:.0%}" for k, v in sorted(p["shares_at_e95"].items(), key=lambda kv: -kv[1]) if v >= 0.005)
        lines.append(f"{c.policy:<17} {len(c.points):>6} {aiq} {e95} {share}   {mix}")
    by = {c.policy: c for c in curves}
    ours = by.get("moe2")
    if ours is not None:
        lines.append(f"moe2 at the energy of each other policy's point(s) (quality moe2 vs theirs; strongest = {strong_e:.0f} J):")
        for c in curves:
            if c is ours or c.policy.startswith(CEILING_PREFIX):
                continue
            diffs = equal_energy(ours, c)
            if not diffs:
                continue
            gain = [mq - q for _, mq, q in diffs]
            if len(diffs) == 1:
                e, mq, q = diffs[0]
                lines.append(f"  vs {c.policy:<12} {mq:.4f} vs {q:.4f} at {e:.0f} J ({mq - q:+.4f})")
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
        elif c.policy == "oracle":
            style.update(color="crimson", linestyle=":")
        elif c.policy.startswith(CEILING_PREFIX):
            style.update(linestyle="--")
        ax.plot(xs, ys, label=c.policy, **style)
    ax.set_xlabel("mean energy per request (J)")
    ax.set_ylabel("mean quality")
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path)
    plt.close(fig)
