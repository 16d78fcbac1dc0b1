"""Scoring answers against labelled prompts: the pure half of ``wattserve quality measure``.

A labelled prompt set is a JSONL file, one item per line::

    {"id": "arc_easy/Mercury_7220990", "task": "arc_easy", "kind": "mc",
     "prompt": "Question: ...\\nAnswer:", "choices": [" a", " b", ...], "gold": 2}
    {"id": "arithmetic/17", "task": "arithmetic", "kind": "exact",
     "prompt": "47 + 12 = 59\\n\\n...\\n4 * 8 =", "answers": ["32"]}

- ``mc`` (multiple choice): the expert scores every choice as a continuation of the prompt
  (``log p(choice | prompt)``, the engines' Score path); it is right when the gold choice has the
  highest score. Scores are normalised per character of the choice by default, so long choices
  are not penalised for their length (lm-eval's ``acc_norm`` idea); ``sum`` keeps raw sums.
- ``exact`` (short answer): the expert generates greedily; the first line of its answer,
  normalised (:func:`normalise_answer`), must equal one of the normalised ``answers``. An item
  with ``"match": "prefix"`` (a next-word task such as LAMBADA, where the model writes on) is
  right when that line *starts* with an answer followed by a word boundary.

Quality labels are 1.0 (right) or 0.0 (wrong) per (prompt, expert): the shape ``gate fit`` reads.
No Ray, no gRPC, no torch: the runtime feeds engine outputs in and writes the labels out.
"""

from __future__ import annotations

import json
import math
import re
import string
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path

from wattserve.errors import InvalidRequest

KINDS = ("mc", "exact")
MATCHES = ("exact", "prefix")
MC_NORMS = ("per_char", "sum")
_ARTICLES = re.compile(r"\b(a|an|the)\b")
_PUNCT = str.maketrans("", "", string.punctuation.replace("-", ""))  # "-" may be a sign
_NOT_A_SIGN = re.compile(r"-(?!\d)")


@dataclass(slots=True, frozen=True)
class LabelledItem:
    """One prompt with what counts as a right answer."""

    id: str
    task: str
    kind: str  # "mc" or "exact"
    prompt: str
    choices: tuple[str, ...] = ()
    gold: int = -1  # index into choices (mc)
    answers: tuple[str, ...] = ()  # accepted answers (exact)
    match: str = "exact"  # "exact" or "prefix" (short answers)
    meta: dict = field(default_factory=dict)


def _item(raw: dict, where: str) -> LabelledItem:
    for key in ("id", "task", "kind", "prompt"):
        if not isinstance(raw.get(key), str) or not raw[key]:
            raise InvalidRequest(f"{where}: field {key!r} must be a non-empty string")
    kind = raw["kind"]
    if kind not in KINDS:
        raise InvalidRequest(f"{where}: kind {kind!r} is not one of {', '.join(KINDS)}")
    if kind == "mc":
        choices = raw.get("choices")
        gold = raw.get("gold")
        if not isinstance(choices, list) or len(choices) < 2 or not all(isinstance(c, str) and c for c in choices):
            raise InvalidRequest(f"{where}: a multiple-choice item needs 'choices', two or more non-empty strings")
        if not isinstance(gold, int) or not 0 <= gold < len(choices):
            raise InvalidRequest(f"{where}: 'gold' must be the index of the right choice (0..{len(choices) - 1})")
        return LabelledItem(raw["id"], raw["task"], kind, raw["prompt"], choices=tuple(choices), gold=gold)
    answers = raw.get("answers")
    if not isinstance(answers, list) or not answers or not all(isinstance(a, str) and a.strip() for a in answers):
        raise InvalidRequest(f"{where}: a short-answer item needs 'answers', one or more non-empty strings")
    match = raw.get("match", "exact")
    if match not in MATCHES:
        raise InvalidRequest(f"{where}: match {match!r} is not one of {', '.join(MATCHES)}")
    return LabelledItem(raw["id"], raw["task"], kind, raw["prompt"], answers=tuple(answers), match=match)


def read_items(path: str | Path) -> list[LabelledItem]:
    """Items of a labelled JSONL file; raises InvalidRequest naming the bad line."""
    path = Path(path)
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from None
    items, seen = [], set()
    for n, line in enumerate(lines, start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
        except ValueError as exc:
            raise InvalidRequest(f"{path}:{n}: not JSON ({exc})") from None
        if not isinstance(raw, dict):
            raise InvalidRequest(f"{path}:{n}: expected a JSON object")
        item = _item(raw, f"{path}:{n}")
        if item.id in seen:
            raise InvalidRequest(f"{path}:{n}: duplicate id {item.id!r}")
        seen.add(item.id)
        items.append(item)
    if not items:
        raise InvalidRequest(f"{path}: no items")
    return items


# -- exact match --------------------------------------------------------------------------------
def normalise_answer(text: str) -> str:
    """Lower case, no punctuation, no articles, single spaces (SQuAD-style normalisation).
    A number keeps its digits and sign: ``"-1,000."`` -> ``"-1000"``."""
    text = _NOT_A_SIGN.sub(" ", text.lower().translate(_PUNCT))
    text = _ARTICLES.sub(" ", text)
    return " ".join(text.split())


def first_answer_line(generated: str) -> str:
    """The answer a model gave before it went on (models continue with a new example)."""
    for line in generated.strip().splitlines():
        if line.strip():
            return line.strip()
    return ""


def exact_match(generated: str, answers: Sequence[str], match: str = "exact") -> bool:
    """Whether the first line of ``generated`` equals one of ``answers`` after normalisation
    (``match="prefix"``: starts with one, followed by a space or the end)."""
    got = normalise_answer(first_answer_line(generated))
    if not got:
        return False
    for a in answers:
        want = normalise_answer(a)
        if want and (got == want or (match == "prefix" and got.startswith(want + " "))):
            return True
    return False


# -- multiple choice ----------------------------------------------------------------------------
def mc_choice(logprobs: Sequence[float], choices: Sequence[str], norm: str = "per_char") -> int:
    """Index of the choice with the highest (normalised) log-likelihood; ties go to the first."""
    if len(logprobs) != len(choices) or not choices:
        raise ValueError(f"{len(logprobs)} log-probabilities for {len(choices)} choices")
    scores = choice_scores(logprobs, choices, norm)
    return max(range(len(scores)), key=lambda i: (scores[i], -i))


def choice_scores(logprobs: Sequence[float], choices: Sequence[str], norm: str = "per_char") -> list[float]:
    """The choices' log-likelihoods as ranked under ``norm``: ``sum`` as given (summed over the
    choice's tokens), ``per_char`` divided by the choice's length in characters (lm-eval's
    ``acc_norm``: long choices are not penalised for their length). The served Score path and the
    labels use this one function, so the router's quality is that of the answer it serves."""
    if norm not in MC_NORMS:
        raise ValueError(f"norm must be one of {MC_NORMS}, got {norm!r}")
    if norm == "per_char":
        return [lp / max(1, len(c.strip()) or len(c)) for lp, c in zip(logprobs, choices, strict=True)]
    return list(logprobs)


def softmax(row: Sequence[float]) -> list[float]:
    """Probabilities from log-scores (shifted by the largest, so long choices cannot overflow)."""
    top = max(row)
    exp = [math.exp(v - top) for v in row]
    z = sum(exp)
    return [v / z for v in exp]


def combine(weights: Mapping[str, float], scores: Mapping[str, Sequence[float]]) -> list[float]:
    """The MoE² ensemble over choices: sum_i w_i * softmax_k(score_i[k]), w renormalised over the
    experts that answered (``scores``: each expert's :func:`choice_scores`). Returns a probability
    per choice (sums to 1). The served Score path and the ensemble measurement both mix with it."""
    experts = [e for e in scores if e in weights]
    total = sum(weights[e] for e in experts)
    if not experts or total <= 0:
        raise ValueError("combine needs at least one answering expert with positive weight")
    mix = [0.0] * len(next(iter(scores.values())))
    for e in experts:
        for k, p in enumerate(softmax(scores[e])):
            mix[k] += weights[e] / total * p
    return mix


def mc_correct(logprobs: Sequence[float], item: LabelledItem, norm: str = "per_char") -> bool:
    """Whether the expert's top choice is the gold one."""
    return mc_choice(logprobs, item.choices, norm) == item.gold


# -- label tables -------------------------------------------------------------------------------
def summarise(rows: Iterable[dict], experts: Sequence[str]) -> dict:
    """Per task: rows, each expert's accuracy, and how often the experts disagree."""
    by_task: dict[str, list[dict]] = {}
    for r in rows:
        by_task.setdefault(r["task"], []).append(r)
    out = {}
    for task, rs in sorted(by_task.items()):
        acc = {e: sum(float(r[e]) for r in rs) / len(rs) for e in experts}
        disagree = sum(1 for r in rs if len({float(r[e]) for e in experts}) > 1)
        out[task] = {"rows": len(rs), "accuracy": acc, "disagree_share": disagree / len(rs)}
    return out
