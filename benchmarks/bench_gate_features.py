"""Gate features compared on the labelled set (issue 14, items 1 and 6): MiniLM (what the served
gate reads) against what the edge expert itself computes at prefill, alone and together.

Candidates (``benchmarks/gate_edge_features.py`` computes the edge ones, one forward per prompt):

- ``minilm``: the served gate's input, all-MiniLM-L6-v2 through the ``head_tail`` window;
- ``prompt length``: log(MiniLM word pieces of the whole prompt, before the window cuts it):
  the gate's tokenizer counts them anyway, so it costs nothing at serving time;
- ``edge conf``: the edge model's confidence in the prompt, 6 numbers (prompt NLL mean / std /
  last 32 tokens, next-token entropy and top probability, log prompt tokens);
- ``edge last/mean final|mid``: its hidden state at the last token or averaged over the prompt,
  after the final norm or after layer 15 of 30 (576 numbers);
- concatenations of these with MiniLM.

Protocol (the one ``benchmarks/gate_select.py`` uses for the shipped gate): per split seed, the
rows are split as ``wattserve gate fit --seed N`` splits them (20 % held out); inside the training
rows a second seeded 20 % is the validation set. For each feature set the MLP's settings (epochs
10-80, weight decay 0.01/0.1, hidden units 16/64; dropout 0.3) are chosen by mean validation log
loss over the seeds;
then that setting trains on the whole training split and is reported on the held-out rows, which
are touched once. Each block of features is standardised on the training rows and scaled to unit
norm per row on average (MiniLM is L2-normalised already and kept as served), so no block
outweighs another by its width. Reported per feature set: held-out means of top-choice quality,
Brier, ECE, AUC and within-task AUC (per seed too, and the paired difference from MiniLM), beside
always-edge, always-cloud and the oracle, and each feature's cost in ms per prompt.

    .venv/bin/python benchmarks/bench_gate_features.py [--labels data/quality/labels_local.csv] [--seeds 0 1 2 3 4]
"""

from __future__ import annotations

import argparse
import itertools
import json
import statistics
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from gate_edge_features import CONF_NAMES, default_edge_dir, edge_features  # noqa: E402 - benchmarks/ is the script's directory
from gate_select import log_loss, predict, task_prior  # noqa: E402
from host import cpu_model  # noqa: E402

from router.gate_fit import embed_cached, read_labelled, report, split, train_mlp_epochs  # noqa: E402

METRICS = ("top_choice_quality", "brier", "ece", "auc", "within_task_auc")
SETS = {
    "minilm": ("minilm",),
    "prompt length": ("length",),
    "minilm + prompt length": ("minilm", "length"),
    "edge conf": ("conf",),
    "minilm + edge conf": ("minilm", "conf"),
    "edge last final": ("last_final",),
    "edge mean final": ("mean_final",),
    "edge last mid": ("last_mid",),
    "edge mean mid": ("mean_mid",),
    "edge last+mean final": ("last_final", "mean_final"),
    "minilm + edge last+mean final": ("minilm", "last_final", "mean_final"),
    "minilm + edge mean mid + conf": ("minilm", "mean_mid", "conf"),
}
EPOCHS = (10, 20, 40, 80)
GRID = {"weight_decay": (0.01, 0.1), "dropout": (0.3,), "hidden": (16, 64)}


def validation_losses(x_tr, y_tr, x_va, y_va, cfg: dict, seed: int) -> dict[int, float]:
    """Validation log loss after each of EPOCHS epochs, from one run to the longest (the first k
    epochs of a run are the k-epoch run: ``train_mlp_epochs``)."""
    import torch

    losses: dict[int, float] = {}
    for epoch, mlp in train_mlp_epochs(x_tr, y_tr, hidden=cfg["hidden"], epochs=max(EPOCHS),
                                       weight_decay=cfg["weight_decay"], dropout=cfg["dropout"], seed=seed):
        if epoch in EPOCHS:
            mlp.eval()
            with torch.inference_mode():
                losses[epoch] = log_loss(mlp(torch.as_tensor(x_va)).numpy(), y_va)
    return losses


def blocks_for(names, raw: dict[str, np.ndarray], train: np.ndarray) -> np.ndarray:
    """Concatenate the named feature blocks, each standardised on ``train`` rows and divided by
    sqrt(width) (MiniLM: as served)."""
    parts = []
    for name in names:
        x = raw[name].astype(np.float64)
        if name != "minilm":
            mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
            x = (x - mu) / sd / np.sqrt(x.shape[1])
        parts.append(x)
    return np.concatenate(parts, axis=1).astype(np.float32)


def minilm_ms(prompts: list[str], n: int = 100) -> float:
    """MiniLM's cost as the gateway pays it: one prompt per call (mean over ``n`` prompts)."""
    from router.gate import shared_encoder

    enc = shared_encoder("head_tail")
    enc.encode_with_cuts(["warm-up"])
    step = max(1, len(prompts) // n)
    sample = prompts[::step][:n]
    t0 = time.perf_counter()
    for p in sample:
        enc.encode_with_cuts([p])
    return 1000 * (time.perf_counter() - t0) / len(sample)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", default=str(ROOT / "data" / "quality" / "labels_local.csv"))
    ap.add_argument("--edge-dir", default=None, help="HF-format edge model (default: the prepared cache copy)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--holdout", type=float, default=0.2)
    ap.add_argument("--val", type=float, default=0.2)
    ap.add_argument("--served-cost", type=int, default=0, metavar="N",
                    help="also time MiniLM against the edge expert's llama.cpp prefill on N prompts, alternating")
    ap.add_argument("--sets", default=None, help="comma-separated feature sets to run (default: all; MiniLM always)")
    ap.add_argument("--json", default=None, help="write every held-out report here")
    args = ap.parse_args()
    sets = SETS
    if args.sets:
        wanted = ["minilm", *(n.strip() for n in args.sets.split(",") if n.strip() != "minilm")]
        unknown = [n for n in wanted if n not in SETS]
        if unknown:
            ap.error(f"unknown feature sets {unknown}; known: {', '.join(SETS)}")
        sets = {n: SETS[n] for n in wanted}
    import torch

    torch.set_num_threads(1)  # a shared machine; the fits are small
    data = read_labelled(args.labels)
    y, groups = data.quality.astype(np.float32), data.groups
    edge = edge_features(data.prompts, Path(args.edge_dir) if args.edge_dir else default_edge_dir())
    from gate_edge_features import cache_dir

    from router.gate import embed_windows, load_minilm_tokenizer

    tok = load_minilm_tokenizer()
    cut_minilm = int(sum(embed_windows(tok, data.prompts, "head_tail")[1]))
    pieces = np.asarray([len(ids) for ids in tok(data.prompts, add_special_tokens=False)["input_ids"]], dtype=np.float64)
    raw = {"minilm": embed_cached(data.prompts, cache_dir(), window="head_tail"), "conf": edge["conf"],
           "length": np.log(pieces)[:, None],
           **{k: edge[k] for k in ("last_final", "mean_final", "last_mid", "mean_mid")}}
    print(f"{len(data.prompts)} prompts, experts {data.experts}; CPU: {cpu_model()}")
    print(f"feature cost per prompt: MiniLM {minilm_ms(data.prompts):.0f} ms (one prompt per call); the edge forward "
          f"that extracted its features (torch float32, 16 prompts a batch: not the serving path, see --served-cost) "
          f"{float(edge['ms'].mean()):.0f} ms mean, {float(np.median(edge['ms'])):.0f} ms median when computed; "
          f"{float(edge['tokens'].mean()):.0f} edge tokens per prompt")
    if args.served_cost:
        from gate_edge_features import served_cost

        c = served_cost(data.prompts, args.served_cost)
        print(f"served cost per prompt ({c['prompts']} prompts, one at a time, alternating): MiniLM "
              f"{c['minilm_mean_ms']:.0f} ms mean / {c['minilm_median_ms']:.0f} median; edge prefill on llama.cpp "
              f"{c['edge_prefill_mean_ms']:.0f} ms mean / {c['edge_prefill_median_ms']:.0f} median: {c['ratio']:.1f}x MiniLM")
    print(f"cut: MiniLM head_tail window {cut_minilm} of {len(data.prompts)} prompts (> 254 word pieces); "
          f"edge {int(edge['cut'].sum())} (> 2048 tokens)")

    keys = list(GRID)
    configs = [dict(zip(keys, vals, strict=True)) for vals in itertools.product(*GRID.values())]
    settings = [{**c, "epochs": e} for c in configs for e in EPOCHS]
    splits = {s: split(len(y), args.holdout, s) for s in args.seeds}
    t0 = time.monotonic()
    chosen: dict[str, dict] = {}
    for name, names in sets.items():
        losses = {i: [] for i in range(len(settings))}
        for seed in args.seeds:
            tr, _ = splits[seed]
            itr_pos, iva_pos = split(len(tr), args.val, seed + 1000)
            itr, iva = tr[itr_pos], tr[iva_pos]
            x = blocks_for(names, raw, itr)  # standardised on the inner training rows only
            for cfg in configs:
                by_epochs = validation_losses(x[itr], y[itr], x[iva], y[iva], cfg, seed)
                for e, loss in by_epochs.items():
                    losses[settings.index({**cfg, "epochs": e})].append(loss)
        best = min(losses, key=lambda i: statistics.mean(losses[i]))
        chosen[name] = {**settings[best], "val_log_loss": statistics.mean(losses[best])}
        print(f"  {name}: chosen {chosen[name]}", flush=True)
    print(f"settings chosen on validation rows ({len(settings)} per feature set x {len(args.seeds)} seeds, "
          f"{time.monotonic() - t0:.0f} s)")

    results: dict[str, list[dict]] = {name: [] for name in [*sets, "task prior (yardstick)"]}
    for seed in args.seeds:
        tr, ho = splits[seed]
        g_ho = [groups[i] for i in ho] if groups else None
        for name, names in sets.items():
            x = blocks_for(names, raw, tr)
            logits = predict(x[tr], y[tr], x[ho], chosen[name], seed)
            results[name].append(report(logits, y[ho], data.experts, g_ho))
        if groups:
            results["task prior (yardstick)"].append(report(task_prior(groups, y, list(tr), list(ho)), y[ho], data.experts, g_ho))

    n_ho = len(splits[args.seeds[0]][1])
    print(f"\nheld-out means over seeds {args.seeds} ({n_ho} prompts each); always "
          + " / ".join(data.experts) + " / oracle: "
          + " / ".join(f"{statistics.mean(r['expert_quality'][e] for r in results['minilm']):.3f}" for e in data.experts)
          + f" / {statistics.mean(r['oracle_quality'] for r in results['minilm']):.3f}")
    print(f"  {'features':<32}" + "".join(f"{m.replace('_quality', ''):>13}" for m in METRICS)
          + "   right/disagree   wt-AUC per seed          paired wt-AUC diff vs minilm   settings")
    base = [r["within_task_auc"] for r in results["minilm"]]
    for name, reps in results.items():
        if not reps:
            continue
        vals = [statistics.mean(r[m] for r in reps) for m in METRICS]
        right = sum(round((r["top_choice_accuracy_where_experts_disagree"] or 0) * r["disagreeing_rows"]) for r in reps)
        disagree = sum(r["disagreeing_rows"] for r in reps)
        wt = [r["within_task_auc"] for r in reps]
        diff = [a - b for a, b in zip(wt, base, strict=True)]
        cfg = chosen.get(name)
        setting = f"{cfg['epochs']} ep, wd {cfg['weight_decay']}, h {cfg['hidden']} (val {cfg['val_log_loss']:.4f})" if cfg else ""
        print(f"  {name:<32}" + "".join(f"{v:13.3f}" for v in vals) + f"   {right:>4} of {disagree:<6}"
              + "   " + " ".join(f"{w:.2f}" for w in wt)
              + f"   {statistics.mean(diff):+.3f} [{min(diff):+.3f}, {max(diff):+.3f}]   {setting}")
    print(f"\nconfidence features: {', '.join(CONF_NAMES)}")
    if args.json:
        Path(args.json).write_text(json.dumps({"chosen": chosen, "results": results}, indent=1, default=float) + "\n")


if __name__ == "__main__":
    main()
