"""Quality vs energy of every routing policy on every labelled data set, side by side (issue 14, item 5).

Data sets (each through ``wattserve route eval``: half the rows train the gate and the kNN/MLP
routers, the other half is replayed through the policies):

- ``gsm8k``, ``mmlu``: RouteLLM's per-prompt correctness of Mixtral-8x7B vs GPT-4
  (shared/data/routing/routellm; profiles configs/eval/routellm_mixtral_gpt4.yaml: Mixtral's
  measured ML.ENERGY row, Llama-3.1-405B's as GPT-4's stand-in);
- ``alpacaeval_8``: eight chat models of 1.2B-69B parameters judged per prompt on AlpacaEval 2.0
  (data/routing/alpacaeval_8; profiles configs/eval/alpacaeval_8.yaml: ML.ENERGY size law).

Per data set and policy: the AIQ (mean quality over energy from the cheapest expert's to the
strongest's, on the policy's hull), the energy to reach 95 % of the strongest expert's quality
(x the strongest's energy), and the share of the oracle's saving captured there. Writes
``<out-dir>/<set>.json`` per set and ``<out-dir>/routing.json`` with the table.

    .venv/bin/python benchmarks/bench_routing.py [--out-dir bench-out] [--mmlu-sample 3000] [--png]

MiniLM embeddings are cached under $WATTSERVE_CACHE_DIR/embeddings (the first run embeds every
prompt: ~10 prompts/s on 2 shared cores).
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.cli import main as cli  # noqa: E402
from runtime.cli.router import _shared_data_dir  # noqa: E402

POLICIES = ("moe2", "threshold", "knn", "mlp", "random", "cheapest", "strongest", "oracle")


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
    return out


def table(results: dict[str, dict]) -> list[str]:
    names = list(results)
    head = f"{'policy':<11}" + "".join(f" | {n[:22]:^26}" for n in names)
    sub = f"{'':<11}" + "".join(f" | {'AIQ':>6} {'E95 x':>6} {'saving':>8}" + " " * 3 for _ in names)
    lines = [head, sub]
    for p in POLICIES:
        cells = []
        for n in names:
            m = results[n]["policies"].get(p)
            if m is None:
                cells.append(f" | {'':>26}")
                continue
            aiq = f"{m['aiq']:.3f}" if m["aiq"] is not None else "-"
            e95 = f"{m['e95_x_strong']:.2f}x" if m["e95_x_strong"] is not None else "never"
            share = f"{m['oracle_saving_share']:.0%}" if m["oracle_saving_share"] is not None else "-"
            cells.append(f" | {aiq:>6} {e95:>6} {share:>8}   ")
        lines.append(f"{p:<11}" + "".join(cells))
    for n in names:
        r = results[n]
        g = r["gate"]
        wt = f"{g['within_task_auc']:.3f}" if g["within_task_auc"] is not None else "-"
        lines.append(f"{n}: {r['rows']} evaluated prompts, {len(r['experts'])} experts, strongest {r['strong']} "
                     f"(quality {r['strong_quality']:.3f}, {r['strong_energy_j']:.0f} J), gate AUC {g['auc']:.3f}, "
                     f"within-task AUC {wt}, Brier {g['brier']:.3f}, ECE {g['ece']:.3f}")
    return lines


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default="bench-out")
    ap.add_argument("--mmlu-sample", type=int, default=3000, help="seeded sample of MMLU rows (0: all 14,042)")
    ap.add_argument("--only", help="comma-separated data set names to run (default: all)")
    ap.add_argument("--png", action="store_true", help="also write a quality-vs-energy PNG per data set")
    ap.add_argument("--seed", type=int, default=0, help="split seed (the MMLU sample stays the seed-0 sample)")
    args = ap.parse_args()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    results = {}
    only = set(args.only.split(",")) if args.only else None
    for name, data, profiles, extra in sets(_shared_data_dir(), args.mmlu_sample):
        if only and name not in only:
            continue
        argv = ["route", "eval", "--data", str(data), "--experts", str(profiles), "--json", str(out / f"{name}.json"),
                "--seed", str(args.seed), *extra]
        if args.png:
            argv += ["--png", str(out / f"{name}.png")]
        rc = cli(argv)
        if rc:
            return rc
        results[name] = json.loads((out / f"{name}.json").read_text())
    lines = table(results)
    print("\n" + "\n".join(lines))
    (out / "routing.json").write_text(json.dumps({
        n: {"rows": r["rows"], "strong": r["strong"], "gate": r["gate"], "policies": {
            p: {k: v for k, v in m.items() if k != "shares_at_e95"} | {"shares_at_e95": m["shares_at_e95"]}
            for p, m in r["policies"].items()}} for n, r in results.items()}, indent=1))
    return 0


if __name__ == "__main__":
    sys.exit(main())
