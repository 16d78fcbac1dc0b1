"""Scoring answers against labelled prompts (router/quality.py): normalisation, exact and prefix
match, multiple choice from log-likelihoods, and the checks on a labelled JSONL file."""

from __future__ import annotations

import json

import pytest

from router.quality import (
    LabelledItem,
    exact_match,
    first_answer_line,
    mc_choice,
    mc_correct,
    normalise_answer,
    read_items,
    summarise,
)
from wattserve.errors import InvalidRequest


@pytest.mark.parametrize(("raw", "norm"), [
    ("  The Eiffel Tower. ", "eiffel tower"),
    ("1,000.", "1000"),
    ("-12", "-12"),
    ("well-known", "well known"),
    ("An apple, a day!", "apple day"),
    ("", ""),
])
def test_normalise_answer(raw, norm):
    assert normalise_answer(raw) == norm


def test_exact_match_reads_the_first_line_and_keeps_signs():
    assert exact_match(" 32\n\n5 + 5 = 10", ["32"])
    assert not exact_match(" 320", ["32"])
    assert not exact_match(" -32", ["32"])
    assert exact_match("-32", ["-32"])
    assert exact_match("\n\n Paris.", ["paris", "Paris, France"])
    assert not exact_match("", ["x"]) and first_answer_line("\n \n") == ""


def test_prefix_match_wants_a_word_boundary():
    assert exact_match(" Council coming down the street.", ["Council"], match="prefix")
    assert not exact_match(" Councillors came.", ["Council"], match="prefix")
    assert not exact_match(" Council coming", ["Council"], match="exact")


def test_multiple_choice_takes_the_argmax_per_character_or_summed():
    choices = (" a cat", " an extraordinarily long answer")
    lps = [-6.0, -12.0]  # per character: -1.2 vs about -0.39
    assert mc_choice(lps, choices, "sum") == 0
    assert mc_choice(lps, choices, "per_char") == 1
    item = LabelledItem("x", "t", "mc", "Q", choices=choices, gold=1)
    assert mc_correct(lps, item) and not mc_correct(lps, item, "sum")
    assert mc_choice([-1.0, -1.0], (" a", " b"), "sum") == 0  # ties go to the first choice
    with pytest.raises(ValueError, match="2 log-probabilities for 3 choices"):
        mc_choice([-1.0, -2.0], (" a", " b", " c"))


def test_read_items_checks_every_line(tmp_path):
    good = [
        {"id": "a/1", "task": "a", "kind": "mc", "prompt": "Q?", "choices": [" x", " y"], "gold": 1},
        {"id": "b/1", "task": "b", "kind": "exact", "prompt": "1+1=", "answers": ["2"]},
        {"id": "c/1", "task": "c", "kind": "exact", "prompt": "The", "answers": ["end"], "match": "prefix"},
    ]
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in good) + "\n\n")
    items = read_items(path)
    assert [i.kind for i in items] == ["mc", "exact", "exact"] and items[0].gold == 1 and items[2].match == "prefix"
    bad_rows = [
        ({**good[0], "gold": 2}, "'gold' must be the index"),
        ({**good[0], "choices": [" x"]}, "two or more"),
        ({**good[1], "answers": []}, "needs 'answers'"),
        ({**good[1], "kind": "judge"}, "kind 'judge'"),
        ({**good[1], "match": "fuzzy"}, "match 'fuzzy'"),
        ({**good[1], "prompt": ""}, "'prompt' must be"),
    ]
    for row, msg in bad_rows:
        path.write_text(json.dumps(row) + "\n")
        with pytest.raises(InvalidRequest, match=msg):
            read_items(path)
    path.write_text(json.dumps(good[0]) + "\n" + json.dumps(good[0]) + "\n")
    with pytest.raises(InvalidRequest, match=":2: duplicate id"):
        read_items(path)
    path.write_text("{not json\n")
    with pytest.raises(InvalidRequest, match=":1: not JSON"):
        read_items(path)


def test_summarise_counts_accuracy_and_disagreement():
    rows = [{"task": "t", "e": "1", "c": "0"}, {"task": "t", "e": "1", "c": "1"}, {"task": "u", "e": "0", "c": "0"}]
    s = summarise(rows, ["e", "c"])
    assert s["t"] == {"rows": 2, "accuracy": {"e": 1.0, "c": 0.5}, "disagree_share": 0.5}
    assert s["u"]["disagree_share"] == 0.0
