"""Cut the shipped extract from an AlpacaEval checkout (github.com/tatsu-lab/alpaca_eval).

    python data/routing/alpacaeval_8/extract.py /path/to/alpaca_eval > data/routing/alpacaeval_8/alpacaeval_8.csv

For each of the eight models below it reads ``results/<model>/weighted_alpaca_eval_gpt4_turbo/
annotations.json`` (805 instructions, each judged by GPT-4-Turbo against GPT-4-1106-preview's answer)
and writes one row per instruction: ``sample_id, prompt, eval_name`` (the AlpacaEval source subset),
then per model the judged quality ``preference - 1`` (the judge's probability that the model's answer
is the better one, in [0, 1]) and ``<model>|output_chars`` (length of the model's answer).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

MODELS = [  # (column, AlpacaEval results folder, parameters in billions)
    ("fusechat-llama-3.2-1b", "FuseChat-Llama-3.2-1B-Instruct", 1.24),
    ("fusechat-llama-3.2-3b", "FuseChat-Llama-3.2-3B-Instruct", 3.21),
    ("fusechat-qwen-2.5-7b", "FuseChat-Qwen-2.5-7B-Instruct", 7.62),
    ("fusechat-llama-3.1-8b", "FuseChat-Llama-3.1-8B-Instruct", 8.03),
    ("fusechat-gemma-2-9b", "FuseChat-Gemma-2-9B-Instruct", 9.24),
    ("vicuna-13b-v1.5", "vicuna-13b-v1.5", 13.0),
    ("oasst-sft-llama-33b", "oasst-sft-llama-33b", 32.5),
    ("humpback-llama2-70b", "humpback-llama2-70b", 69.0),
]


def main(root: Path) -> None:
    per_model = {}
    for col, folder, _ in MODELS:
        rows = json.loads((root / "results" / folder / "weighted_alpaca_eval_gpt4_turbo" / "annotations.json").read_text())
        per_model[col] = {r["instruction"]: r for r in rows}
    first = json.loads((root / "results" / MODELS[0][1] / "weighted_alpaca_eval_gpt4_turbo" / "annotations.json").read_text())
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(["sample_id", "prompt", "eval_name"] + [c for c, _, _ in MODELS] + [f"{c}|output_chars" for c, _, _ in MODELS])
    for i, r in enumerate(first):
        ins = r["instruction"]
        got = [per_model[c].get(ins) for c, _, _ in MODELS]
        q = [(f"{float(g['preference']) - 1.0:.4f}" if g and g.get("preference") not in (None, "") else "") for g in got]
        chars = [str(len(g["output_2"] or "")) if g else "" for g in got]
        w.writerow([f"alpacaeval.{i}", ins, r["dataset"]] + q + chars)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
