"""Quality vs energy of every routing policy on every labelled data set, side by side (issue 14, item 5).

Data sets (each through ``wattserve route eval``: half the rows train the gate and the kNN/MLP
routers, the other half is replayed through the policies):

- ``gsm8k``, ``mmlu``: RouteLLM's per-prompt correctness of Mixtral-8x7B vs GPT-4
  (shared/data/routing/routellm; profiles configs/eval/routellm_mixtral_gpt4.yaml: Mixtral's
  measured ML.ENERGY row, Llama-3.1-405B's as GPT-4's stand-in);
- ``alpacaeval_8``: eight chat models of 1.2B-69B parameters judged per prompt on AlpacaEval 2.0
  (data/routing/alpacaeval_8; profiles configs/eval/alpacaeval_8.yaml: ML.ENERGY size law);
- ``alpacaeval1_ladder``: eight chat models of 2.8B-69B (the Llama-2 7/13/70B ladder as Meta's
  chat models and as Tulu-2-DPO, Phi-2, Yi-34B) judged 0/1 by AlpacaEval 1's GPT-4 annotator
  (data/routing/alpacaeval1_ladder; configs/eval/alpacaeval1_ladder.yaml: ML.ENERGY size law).

Per data set and policy, averaged over the split seeds (``--seeds``; each seed is another
random half evaluated): the AIQ (mean quality over energy from the cheapest expert's to the
strongest's, on the policy's hull), the energy to reach 95 % of the strongest expert's quality
(x the strongest's energy), the share of the oracle's saving captured there and the share of the
*attainable* saving (the ``ceiling_*`` curves: what a router knowing each prompt's expected
quality could reach, router/eval_ceiling.py); then MoE²'s quality minus threshold's and kNN's at
the energy of their points. Writes ``<out-dir>/<set>-s<seed>.json`` per set and seed and
``<out-dir>/routing.json`` with the table.

    .venv/bin/python benchmarks/bench_routing.py [--out-dir bench-out] [--seeds 0,1,2,3,4] [--steps 41]
                                                 [--mmlu-sample 3000] [--only alpacaeval_8,...] [--png]
                                                 [--inner-folds 5] [--gate-knn-weight W]

MoE²'s gate knobs (training length, weight decay, neighbours and their weight) are chosen by
``--inner-folds`` folds inside each training half (router/gate_cv.py); the evaluated half never
steers them. ``--inner-folds 0`` runs the fixed rule of before for a side-by-side comparison.

MiniLM embeddings are cached under $WATTSERVE_CACHE_DIR/embeddings (the first run embeds every
prompt: ~10 prompts/s on 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router.evaluate import Curve, equal_energy  # noqa: E402
from runtime.cli import main as cli  # noqa: E402
from runtime.cli.router import _shared_data_dir, add_eval_gate_args  # noqa: E402

POLICIES = ("moe2", "threshold", "knn", "mlp", "random", "cheapest", "strongest", "ceiling_denoised",
            "ceiling_insample", "oracle")


def sets(shared: Path | None, mmlu_sample: int) -> list[tuple[str, Path, Path, list[str]]]:
    """(name, data, profiles, extra route-eval arguments) of every data set found."""
    out = []
    routellm = shared / "routing" / "routellm" if shared else None
    profiles = ROOT / "configs" / "eval" / "routellm_mixtral_gpt4.yaml"
    if routellm and routellm.is_dir():
        out.append(("gsm8k", routellm / "gsm8k_correctness_mixtral_vs_gpt4.csv", profiles, []))
        out.append(("mmlu", routellm / "mmlu_correctness_mixtral_vs_gpt4.csv", profiles,
                    ["--sample", str(mmlu_sample), "--sample-seed", "0"] if mmlu_sample else []))
    else:
        print("shared/data/routing/routellm not found (set WATTSERVE_SHARED_DATA): RouteLLM sets skipped", file=sys.stderr)
    out.append(("alpacaeval_8", ROOT / "data" / "routing" / "alpacaeval_8" / "alpacaeval_8.csv",
                ROOT / "configs" / "eval" / "alpacaeval_8.yaml", []))
    out.append(("alpacaeval1_ladder", ROOT / "data" / "routing" / "alpacaeval1_ladder" / "alpacaeval1_ladder.csv",
                ROOT / "configs" / "eval" / "alpacaeval1_ladder.yaml", ["--skip-blank"]))
    return out


def _mean(values: list) -> float | None:
    v = [x for x in values if x is not None]
    return float(np.mean(v)) if len(v) == len(values) and v else None


def _curve(points: list[dict], name: str) -> Curve:
    c = Curve(name)
    c.points = [(p["energy_j"], p["quality"], p["knob"]) for p in points]
    return c


def summarise(runs: list[dict]) -> dict:
    """Means over seeds of each policy's figures (None where any seed had none), per-seed shares,
    and MoE²'s mean quality gain at equal energy over threshold and kNN (min over seeds too)."""
    out = {"rows": [r["rows"] for r in runs], "strong": runs[0]["strong"], "experts": len(runs[0]["experts"]),
           "gate": {k: _mean([r["gate"][k] for r in runs]) for k in ("brier", "ece", "auc", "within_task_auc")},
           "policies": {}, "moe2_vs": {},
           "gate_choice_by_seed": [{k: (r.get("gate_choice") or {}).get(k) for k in ("epochs", "weight_decay", "knn_k", "knn_weight")}
                                   for r in runs]}
    for p in runs[0]["policies"]:
        ms = [r["policies"][p] for r in runs]
        out["policies"][p] = {
            "aiq": _mean([m["aiq"] for m in ms]), "e95_x_strong": _mean([m["e95_x_strong"] for m in ms]),
            "oracle_saving_share": _mean([m["oracle_saving_share"] for m in ms]),
            "attainable_saving_share": _mean([m.get("attainable_saving_share") for m in ms]),
            "oracle_saving_share_by_seed": [m["oracle_saving_share"] for m in ms],
        }
    for other in ("threshold", "knn"):
        gains = []
        for r in runs:
            if other not in r["curves"]:
                continue
            diffs = equal_energy(_curve(r["curves"]["moe2"], "moe2"), _curve(r["curves"][other], other))
            gains.append([mq - q for _, mq, q in diffs])
        if gains:
            means = [float(np.mean(g)) for g in gains]
            out["moe2_vs"][other] = {"mean": float(np.mean(means)), "min": float(min(min(g) for g in gains)),
                                     "seed_means": means, "seeds": len(gains)}
    return out


def table(results: dict[str, dict]) -> list[str]:
    names = list(results)
    head = f"{'policy':<17}" + "".join(f" | {n[:30]:^31}" for n in names)
    sub = f"{'':<17}" + "".join(f" | {'AIQ':>6} {'E95 x':>6} {'oracle':>7} {'attain':>7} " for _ in names)
    lines = [head, sub]
    for p in POLICIES:
        cells = []
        for n in names:
            m = results[n]["policies"].get(p)
            if m is None:
                cells.append(f" | {'':>31}")
                continue
            aiq = f"{m['aiq']:.3f}" if m["aiq"] is not None else "-"
            e95 = f"{m['e95_x_strong']:.2f}x" if m["e95_x_strong"] is not None else "never"
            share = f"{m['oracle_saving_share']:.0%}" if m["oracle_saving_share"] is not None else "-"
            att = f"{m['attainable_saving_share']:.0%}" if m["attainable_saving_share"] is not None else "-"
            cells.append(f" | {aiq:>6} {e95:>6} {share:>7} {att:>7} ")
        lines.append(f"{p:<17}" + "".join(cells))
    for n in names:
        r = results[n]
        g = r["gate"]
        fmt = lambda v: f"{v:.3f}" if v is not None else "-"  # noqa: E731
        vs = "; ".join(f"vs {o} {v['mean']:+.4f} (seed means {min(v['seed_means']):+.4f} to {max(v['seed_means']):+.4f}, "
                       f"worst point {v['min']:+.4f})" for o, v in r["moe2_vs"].items())
        chosen = ", ".join(f"{c['epochs']}ep/wd{c['weight_decay']:g}/k{c['knn_k']}/w{c['knn_weight']:g}"
                           for c in r["gate_choice_by_seed"] if c.get("epochs") is not None)
        by_seed = ", ".join(f"{x:.0%}" if x is not None else "never" for x in r["policies"]["moe2"]["oracle_saving_share_by_seed"])
        lines.append(f"{n}: {r['rows'][0]} evaluated prompts x {len(r['rows'])} seeds, {r['experts']} experts, strongest "
                     f"{r['strong']}; gate AUC {fmt(g['auc'])}, within-task AUC {fmt(g['within_task_auc'])}, "
                     f"Brier {fmt(g['brier'])}, ECE {fmt(g['ece'])}; moe2's oracle share by seed {by_seed}; "
                     f"moe2 quality at equal energy {vs}; gate knobs by seed {chosen or '-'}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default="bench-out")
    ap.add_argument("--mmlu-sample", type=int, default=3000, help="seeded sample of MMLU rows (0: all 14,042)")
    ap.add_argument("--only", help="comma-separated data set names to run (default: all)")
    ap.add_argument("--reuse", action="store_true",
                    help="read <set>-s<seed>.json where --out-dir has it instead of running it again (e.g. after "
                         "running sets side by side with --only)")
    ap.add_argument("--png", action="store_true", help="also write a quality-vs-energy PNG per data set")
    ap.add_argument("--seeds", default="0,1,2,3,4", help="split seeds, comma-separated (the MMLU sample stays the seed-0 sample)")
    add_eval_gate_args(ap)  # MoE²'s gate in every run, as `route eval` takes them
    ap.add_argument("--steps", type=int, default=41, help="knob values per swept policy (the same for every policy)")
    args = ap.parse_args()
    seeds = [int(x) for x in args.seeds.split(",")]
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    only = set(args.only.split(",")) if args.only else None
    for name, data, profiles, extra in sets(_shared_data_dir(), args.mmlu_sample):
        if only and name not in only:
            continue
        runs = []
        for seed in seeds:
            path = out / f"{name}-s{seed}.json"
            if args.reuse and path.exists():
                runs.append(json.loads(path.read_text()))
                continue
            argv = ["route", "eval", "--data", str(data), "--experts", str(profiles), "--json", str(path),
                    "--seed", str(seed), "--steps", str(args.steps),
                    "--inner-folds", str(args.inner_folds), "--calibration", args.calibration, *extra]
            if args.gate_knn_weight is not None:
                argv += ["--gate-knn-weight", str(args.gate_knn_weight)]
            if args.png:
                argv += ["--png", str(out / f"{name}-s{seed}.png")]
            rc = cli(argv)
            if rc:
                return rc
            runs.append(json.loads(path.read_text()))
        results[name] = summarise(runs)
    lines = table(results)
    print("\n" + "\n".join(lines))
    (out / "routing.json").write_text(json.dumps({"seeds": seeds, "steps": args.steps, "gate_knn_weight": args.gate_knn_weight,
                                                  "inner_folds": args.inner_folds, "sets": results}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
