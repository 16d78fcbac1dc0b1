"""Cut the shipped extract from an AlpacaEval checkout (github.com/tatsu-lab/alpaca_eval).

    python data/routing/alpacaeval1_ladder/extract.py /path/to/alpaca_eval > data/routing/alpacaeval1_ladder/alpacaeval1_ladder.csv

For each model below it reads ``results/<model>/alpaca_eval_gpt4/annotations.json``: AlpacaEval 1's
annotator (GPT-4 choosing between the model's answer and text-davinci-003's) on the 805
instructions. One row per instruction: ``sample_id, prompt, eval_name`` (the AlpacaEval source
subset), then per model the quality (1 when the judge preferred the model's answer, 0 when it
preferred the reference, 0.5 for a draw, which AlpacaEval encodes as 0 or 1.5; blank when the
annotation is missing) and ``<model>|output_chars`` (the length of the model's answer).
"""

from __future__ import annotations

import csv
import json
import sys
from pathlib import Path

MODELS = [  # (column, AlpacaEval results folder, parameters in billions)
    ("phi-2", "phi-2", 2.78),
    ("llama-2-7b-chat", "llama-2-7b-chat-hf", 6.74),
    ("tulu-2-dpo-7b", "tulu-2-dpo-7b", 6.74),
    ("llama-2-13b-chat", "llama-2-13b-chat-hf", 13.0),
    ("tulu-2-dpo-13b", "tulu-2-dpo-13b", 13.0),
    ("yi-34b-chat", "Yi-34B-Chat", 34.4),
    ("llama-2-70b-chat", "llama-2-70b-chat-hf", 69.0),
    ("tulu-2-dpo-70b", "tulu-2-dpo-70b", 69.0),
]


def quality(preference: object) -> str:
    """AlpacaEval's preference (1: reference better, 2: model better, 0 or 1.5: draw) -> [0, 1]."""
    if preference in (None, ""):
        return ""
    p = float(preference)
    if p in (0.0, 1.5):
        return "0.5"
    if p not in (1.0, 2.0):
        raise ValueError(f"unexpected preference {preference!r}")
    return f"{p - 1.0:.1f}"


def main(root: Path) -> None:
    per_model = {}
    for col, folder, _ in MODELS:
        rows = json.loads((root / "results" / folder / "alpaca_eval_gpt4" / "annotations.json").read_text())
        per_model[col] = {r["instruction"]: r for r in rows}
    first = json.loads((root / "results" / MODELS[0][1] / "alpaca_eval_gpt4" / "annotations.json").read_text())
    w = csv.writer(sys.stdout, lineterminator="\n")
    w.writerow(["sample_id", "prompt", "eval_name"] + [c for c, _, _ in MODELS] + [f"{c}|output_chars" for c, _, _ in MODELS])
    for i, r in enumerate(first):
        ins = r["instruction"]
        got = [per_model[c].get(ins) for c, _, _ in MODELS]
        q = [quality(g.get("preference")) if g else "" for g in got]
        chars = [str(len(g.get("output_2") or "")) if g else "" for g in got]
        w.writerow([f"alpacaeval.{i}", ins, r["dataset"]] + q + chars)


if __name__ == "__main__":
    main(Path(sys.argv[1]))
