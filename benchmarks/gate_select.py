"""Choosing the gate's training settings on a validation split, then reporting on held-out rows.

For each seed, the labelled rows are split as ``wattserve gate fit --seed N`` splits them (20 %
held out). The held-out rows are touched once, at the end. Inside the training rows a second
seeded split (20 %) is the validation set: every candidate setting (window, epochs, weight decay,
dropout, hidden units) trains on the rest and is scored on it by log loss (the training
objective: it punishes bad ranking and bad calibration alike). The setting with the lowest mean
validation log loss over the seeds is chosen; then it and the shipped defaults are each trained
on the full training split and reported on the held-out split (``router/gate_fit.py``'s report:
top choice vs always-one-expert and the oracle, Brier, ECE, AUC, within-task AUC).

A yardstick that serving cannot use: ``task prior`` predicts each expert's training-set accuracy
on the row's task (it knows the task label; a served prompt comes without one). A gate that only
learned the tasks scores about like it, with within-task AUC 0.5.

    .venv/bin/python benchmarks/gate_select.py [--labels data/quality/labels_local.csv]
"""

from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router.gate_fit import embed_cached, fit_gate, read_labelled, report, split, train_mlp  # noqa: E402

METRICS = ("top_choice_quality", "brier", "ece", "auc", "within_task_auc")
SHIPPED = {"window": "head_tail", "epochs": 60, "weight_decay": 1e-3, "dropout": 0.1, "hidden": 64}
GRID = {
    "window": ("head_tail", "head"),
    "epochs": (10, 20, 40, 60, 120),
    "weight_decay": (1e-3, 1e-2, 1e-1),
    "dropout": (0.1, 0.3),
    "hidden": (16, 64),
}


def log_loss(logits: np.ndarray, y: np.ndarray) -> float:
    p = np.clip(1.0 / (1.0 + np.exp(-logits)), 1e-6, 1 - 1e-6)
    return float(-(y * np.log(p) + (1 - y) * np.log(1 - p)).mean())


def predict(x_tr, y_tr, x_ev, cfg: dict, seed: int) -> np.ndarray:
    import torch

    mlp = train_mlp(x_tr, y_tr, hidden=cfg["hidden"], epochs=cfg["epochs"], weight_decay=cfg["weight_decay"],
                    dropout=cfg["dropout"], seed=seed)
    with torch.inference_mode():
        return mlp(torch.as_tensor(x_ev)).numpy()


def task_prior(groups, y, tr, ev) -> np.ndarray:
    """Logits of each expert's training accuracy on the row's task (smoothed towards the mean)."""
    base = y[tr].mean(0)
    out = np.zeros((len(ev), y.shape[1]))
    for k, i in enumerate(ev):
        rows = [j for j in tr if groups[j] == groups[i]]
        p = (y[rows].sum(0) + 2 * base) / (len(rows) + 2)
        out[k] = np.log(p / (1 - p))
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", default=str(ROOT / "data" / "quality" / "labels_local.csv"))
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--val", type=float, default=0.2, help="share of the training rows used to choose settings")
    args = ap.parse_args()
    import torch

    torch.set_num_threads(1)  # a shared machine; the fits are small
    data = read_labelled(args.labels)
    y, groups = data.quality.astype(np.float32), data.groups
    cache = Path(os.environ.get("WATTSERVE_CACHE_DIR") or ROOT / ".cache" / "wattserve") / "embeddings"
    emb = {w: embed_cached(data.prompts, cache, window=w) for w in GRID["window"]}
    print(f"{len(data.prompts)} prompts, experts {data.experts}; seeds {args.seeds}; "
          f"{args.holdout:.0%} held out, {args.val:.0%} of the rest for validation")
    keys = list(GRID)
    configs = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*GRID.values())]
    val_loss: dict[int, list[float]] = {i: [] for i in range(len(configs))}
    t0 = time.monotonic()
    splits = {}
    for seed in args.seeds:
        tr, ho = split(len(y), args.holdout, seed)
        itr_pos, iva_pos = split(len(tr), args.val, seed + 1000)
        itr, iva = tr[itr_pos], tr[iva_pos]
        splits[seed] = (tr, ho)
        for i, cfg in enumerate(configs):
            x = emb[cfg["window"]]
            val_loss[i].append(log_loss(predict(x[itr], y[itr], x[iva], cfg, seed), y[iva]))
    mean_loss = {i: statistics.mean(v) for i, v in val_loss.items()}
    ranked = sorted(mean_loss, key=mean_loss.get)
    shipped_i = next(i for i, c in enumerate(configs) if c == SHIPPED)
    print(f"{len(configs)} settings x {len(args.seeds)} seeds in {time.monotonic() - t0:.0f} s; validation log loss:")
    for i in ranked[:5]:
        print(f"  {mean_loss[i]:.4f}  {configs[i]}")
    print(f"  {mean_loss[shipped_i]:.4f}  {SHIPPED}  (the previous settings; rank {ranked.index(shipped_i) + 1})")
    chosen = configs[ranked[0]]

    results: dict[str, list[dict]] = {"previous settings": [], "chosen on validation": [], "task prior (yardstick)": []}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            tr, ho = splits[seed]
            g_ho = [groups[i] for i in ho] if groups else None
            for name, cfg in (("previous settings", SHIPPED), ("chosen on validation", chosen)):
                rep = fit_gate(data, emb[cfg["window"]], Path(tmp) / f"{seed}", holdout=args.holdout, seed=seed,
                               hidden=cfg["hidden"], epochs=cfg["epochs"], weight_decay=cfg["weight_decay"],
                               dropout=cfg["dropout"], window=cfg["window"])
                results[name].append(rep)
            if groups:
                results["task prior (yardstick)"].append(report(task_prior(groups, y, list(tr), list(ho)), y[ho],
                                                                data.experts, g_ho))
    print(f"held-out means over seeds {args.seeds} ({len(splits[args.seeds[0]][1])} prompts each); chosen: {chosen}")
    print(f"  {'gate':<24}" + "".join(f"{m:>18}" for m in METRICS) + "   always " + " / ".join(data.experts) + " / oracle")
    for name, reps in results.items():
        if not reps:
            continue
        vals = [statistics.mean(r[m] if r[m] is not None else float("nan") for r in reps) for m in METRICS]
        always = " / ".join(f"{statistics.mean(r['expert_quality'][e] for r in reps):.3f}" for e in data.experts)
        print(f"  {name:<24}" + "".join(f"{v:18.3f}" for v in vals)
              + f"   {always} / {statistics.mean(r['oracle_quality'] for r in reps):.3f}")
    for name in ("previous settings", "chosen on validation"):
        reps = results[name]
        print(f"  per seed, {name}:")
        for seed, r in zip(args.seeds, reps, strict=True):
            acc = r["top_choice_accuracy_where_experts_disagree"]
            print(f"    seed {seed}: top {r['top_choice_quality']:.3f}  always "
                  + " / ".join(f"{r['expert_quality'][e]:.3f}" for e in data.experts)
                  + f"  oracle {r['oracle_quality']:.3f}  Brier {r['brier']:.3f}  ECE {r['ece']:.3f}"
                  f"  AUC {r['auc']:.3f}  within-task {r['within_task_auc']:.3f}"
                  f"  right where they disagree {round(acc * r['disagreeing_rows']) if acc is not None else 0} of {r['disagreeing_rows']}"
                  f"  picks " + ", ".join(f"{e} {s:.0%}" for e, s in r["top_choice_share"].items()))


if __name__ == "__main__":
    main()
