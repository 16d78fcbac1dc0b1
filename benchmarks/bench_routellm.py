"""Quality vs energy of every routing policy on the RouteLLM MMLU and GSM8K files.

Mixtral-8x7B's measured ML.ENERGY profile for the weak expert, Llama-3.1-405B's as the documented
stand-in for the GPT-4-class strong expert (configs/eval/routellm_mixtral_gpt4.yaml); half of each
file trains the gate, the other half is replayed through the serving policies (``wattserve route
eval``). Prints, per policy, the AIQ, the energy needed to reach 95 % of the strong model's
quality and the share of the oracle's saving there, and writes a PNG per file. Superseded by
``bench_routing.py``, which runs these two files and the many-expert set side by side.

    .venv/bin/python benchmarks/bench_routellm.py [--out-dir bench-out] [--sample N]

The first run embeds every prompt with MiniLM (MMLU: 14,042 prompts, ~15-30 min on 2 cores);
embeddings are cached under $WATTSERVE_CACHE_DIR/embeddings, so later runs take seconds.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from runtime.cli import main as cli  # noqa: E402
from runtime.cli.router import _shared_data_dir  # noqa: E402

FILES = ("gsm8k_correctness_mixtral_vs_gpt4.csv", "mmlu_correctness_mixtral_vs_gpt4.csv")


def main() -> int:
    ap = argparse.ArgumentParser()
    ap.add_argument("--out-dir", default="bench-out")
    ap.add_argument("--sample", type=int, help="evaluate a seeded sample of N prompts per file")
    args = ap.parse_args()
    shared = _shared_data_dir()
    if shared is None or not (shared / "routing" / "routellm").is_dir():
        print("shared/data/routing/routellm not found (set WATTSERVE_SHARED_DATA)", file=sys.stderr)
        return 1
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    for name in FILES:
        stem = name.split("_")[0]
        argv = ["route", "eval", "--data", str(shared / "routing" / "routellm" / name),
                "--experts", str(ROOT / "configs" / "eval" / "routellm_mixtral_gpt4.yaml"),
                "--png", str(out / f"{stem}.png"), "--json", str(out / f"{stem}.json")]
        if args.sample:
            argv += ["--sample", str(args.sample)]
        rc = cli(argv)
        if rc:
            return rc
    return 0


if __name__ == "__main__":
    sys.exit(main())
