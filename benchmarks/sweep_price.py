"""What a price of energy does on the labelled set: quality, joules and split of Generate's
``argmax_i q_i(x) - lam E_i(x)`` as lam varies, offline (no server).

q_i(x) are out-of-sample gate predictions: each gate directory given (fitted with different
``--seed``, e.g. seeds 0-4) predicts only the rows it held out (its ``heldout_prompt_sha1``),
and a row held out by several gates is counted once per gate. The quality of a choice is the
measured label of that expert on that prompt (``wattserve quality measure``). E_i(x) is what the
router's cost model (``router/cost.py``) predicts from the config's ``router.cost_priors`` alone
(prompt and output tokens priced apart when a prior gives ``busy_power_w``), the cold-start
prediction the router uses before an expert has measured itself; prompt tokens are estimated as
characters / 4 (no tokenizer needed). Output lengths are a parameter: the price only matters
through the energy gap, which grows with the answer.

    .venv/bin/python benchmarks/sweep_price.py --labels data/quality/labels_local.csv \
        --gates /tmp/gate-s0 /tmp/gate-s1 ... [--out-tokens 8 64 256] [--prices 0 0.01 0.02 0.05 0.1]
"""

from __future__ import annotations

import argparse
import csv
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router.cost import CostModel  # noqa: E402
from router.gate import FittedGate  # noqa: E402
from router.gate_fit import prompt_sha1  # noqa: E402
from runtime.config import load_config  # noqa: E402


def predictions(gate_dirs: list[str], rows: list[dict], experts: list[str]) -> list[tuple[dict, dict]]:
    """(row, predicted quality per expert) for every row a gate held out, per gate."""
    out = []
    for d in gate_dirs:
        gate = FittedGate(d)
        held = set(gate.meta["heldout_prompt_sha1"])
        mine = [r for r in rows if prompt_sha1(r["prompt"]) in held]
        if not mine:
            raise SystemExit(f"{d}: none of its held-out prompts are in the labels file")
        emb, _ = gate._encoder().encode_with_cuts([r["prompt"] for r in mine])
        for r, q in zip(mine, gate.quality(emb), strict=True):  # with its neighbours, if it keeps them
            out.append((r, dict(gate.output_for_quality(q).quality)))
    return out


def sweep(preds, experts, cost: CostModel, out_tokens: int, prices: list[float]) -> list[dict]:
    res = []
    for lam in prices:
        q = e = 0.0
        split = dict.fromkeys(experts, 0)
        for r, qual in preds:
            prompt_tokens = round(len(r["prompt"]) / 4)
            energy = {x: cost.predict(None, x, prompt_tokens, out_tokens).energy_j for x in experts}
            best = max(experts, key=lambda x: (qual[x] - lam * energy[x], -experts.index(x)))
            split[best] += 1
            q += float(r[best])
            e += energy[best]
        n = len(preds)
        res.append({"price": lam, "quality": q / n, "j_per_request": e / n,
                    "split": {x: c / n for x, c in split.items()}})
    return res


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", default=str(ROOT / "data" / "quality" / "labels_local.csv"))
    ap.add_argument("--gates", nargs="+", required=True, help="gate directories (different seeds)")
    ap.add_argument("--config", default=str(ROOT / "configs" / "local.yaml"))
    ap.add_argument("--out-tokens", type=int, nargs="+", default=[8, 64, 256])
    ap.add_argument("--prices", type=float, nargs="+", default=[0.0, 0.01, 0.02, 0.05, 0.1])
    args = ap.parse_args()
    cfg = load_config(args.config)
    experts = [e.name for e in cfg.experts]
    priors = {x: cfg.router.cost_priors[x] for x in experts}
    cost = CostModel(priors={x: p.prior() for x, p in priors.items()})
    with open(args.labels, newline="", encoding="utf-8") as f:
        rows = [r for r in csv.DictReader(f) if all(r.get(x, "") != "" for x in experts)]
    preds = predictions(args.gates, rows, experts)
    print(f"{len(preds)} out-of-sample predictions from {len(args.gates)} gates; cost_priors: "
          + "; ".join(f"{x} {p.model_dump(exclude_none=True)}" for x, p in priors.items()))
    for x in experts:
        print(f"  always {x}: quality {sum(float(r[x]) for r, _ in preds) / len(preds):.3f}")
    print(f"  oracle: quality {sum(max(float(r[x]) for x in experts) for r, _ in preds) / len(preds):.3f}")
    for n in args.out_tokens:
        print(f"output tokens {n}:")
        print(f"  {'price /J':>9} {'quality':>8} {'J/request':>10}  split")
        for s in sweep(preds, experts, cost, n, args.prices):
            split = ", ".join(f"{x} {v:.0%}" for x, v in s["split"].items())
            print(f"  {s['price']:9.3f} {s['quality']:8.3f} {s['j_per_request']:10.2f}  {split}")


if __name__ == "__main__":
    main()
