"""The held-out live set (data/quality/heldout.jsonl) against the gate's training set: no shared
document, built without touching the training rows, and the live benchmark's overlap check and
paired comparison (benchmarks/bench_routing_live.py)."""

from __future__ import annotations

import gzip
import importlib.util
import json
import sys
from collections import Counter
from pathlib import Path

import pytest

from router.quality import read_items

ROOT = Path(__file__).resolve().parents[2]
DATA = ROOT / "data" / "quality"


def _load(name: str, path: Path):
    spec = importlib.util.spec_from_file_location(name, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def build_set():
    return _load("wattserve_build_set", DATA / "build_set.py")


@pytest.fixture
def live_bench(monkeypatch):
    monkeypatch.syspath_prepend(str(ROOT / "benchmarks"))  # the script imports its neighbour host.py
    module = _load("wattserve_bench_routing_live", ROOT / "benchmarks" / "bench_routing_live.py")
    yield module
    sys.modules.pop("host", None)


def test_shipped_sets_share_no_document(build_set):
    train, held = read_items(DATA / "prompts.jsonl"), read_items(DATA / "heldout.jsonl")
    assert not {it.id for it in train} & {it.id for it in held}
    # The same question under another id (HellaSwag's 0-shot and 5-shot files number one context
    # differently) is the same document.
    assert not {build_set.question_text(it.prompt) for it in train} & {build_set.question_text(it.prompt) for it in held}
    assert not {it.prompt for it in train} & {it.prompt for it in held}
    # Same tasks, 30 each, gold answers present.
    counts = Counter(it.task for it in held)
    assert set(counts) == {it.task for it in train}
    assert set(counts.values()) == {build_set.HELDOUT_PER_TASK}
    assert all((it.kind == "mc" and it.gold is not None) or (it.kind == "exact" and it.answers) for it in held)


def test_shipped_gate_never_trained_on_the_heldout_set(live_bench):
    gate = DATA / "gate-local"
    trained, own_heldout, _ = live_bench.gate_overlap([it.prompt for it in read_items(DATA / "heldout.jsonl")], str(gate))
    assert (trained, own_heldout) == (0, 0)
    # ...and the check does find the training prompts (824 trained on, 206 held out of 1,030).
    trained, own_heldout, _ = live_bench.gate_overlap([it.prompt for it in read_items(DATA / "prompts.jsonl")], str(gate))
    meta = json.loads((gate / "gate.json").read_text())
    assert trained == meta["train_rows"] and own_heldout == len(meta["heldout_prompt_sha1"])


def test_overlap_check_says_when_it_cannot_tell(live_bench, tmp_path):
    assert live_bench.gate_overlap(["q"], None)[0] is None
    (tmp_path / "gate.json").write_text(json.dumps({"experts": ["a", "b"]}))
    trained, _, why = live_bench.gate_overlap(["q"], str(tmp_path))
    assert trained is None and "no training prompts" in why


def _source(tasks_dir: Path, folder: str, kind: str, n_docs: int, question) -> None:
    """A requests.jsonl.gz in the wheel's layout: one request per (document, choice)."""
    path = tasks_dir / folder / "requests.jsonl.gz"
    path.parent.mkdir(parents=True)
    with gzip.open(path, "wt", encoding="utf-8") as f:
        for d in [*range(n_docs), 1_000_000]:  # plus one "unconditioned" request, never a question
            context = f"Example: solved.\n\n{question(d)}\nAnswer:"
            if kind == "mc":
                for idx, choice in enumerate((" yes", " no")):
                    f.write(json.dumps({"doc_id": d, "idx": idx, "label": d % 2, "doc": {},
                                        "request": {"context": context, "continuation": choice}}) + "\n")
            else:
                f.write(json.dumps({"doc_id": d, "idx": 0, "doc": {},
                                    "request": {"context": context, "continuation": f" w{d}"}}) + "\n")


def test_heldout_stage_leaves_the_built_rows_alone_and_skips_repeated_questions(build_set, tmp_path):
    for task, (folder, kind) in build_set.TASKS.items():
        # Documents 80+ repeat the questions of 0-19: a copy under another id must not leak.
        _source(tmp_path, folder, kind, 100, lambda d, t=task: f"{t} question {d % 80}")
    sizes = {t: 70 if t in build_set.FIRST else 8 for t in build_set.TASKS}
    before = build_set.build(tmp_path, seed=3, sizes=sizes)
    held = build_set.build_heldout(tmp_path, seed=3, sizes=sizes, per_task=12)
    assert build_set.build(tmp_path, seed=3, sizes=sizes) == before  # the training rows do not move
    assert build_set.build_heldout(tmp_path, seed=3, sizes=sizes, per_task=12) == held  # seeded
    assert Counter(it["task"] for it in held) == dict.fromkeys(build_set.TASKS, 12)
    assert not {it["id"] for it in before} & {it["id"] for it in held}
    built_q = {build_set.question_text(it["prompt"]) for it in before}
    held_q = [build_set.question_text(it["prompt"]) for it in held]
    assert not built_q & set(held_q) and len(held_q) == len(set(held_q))
    assert all(int(it["id"].rsplit("/", 1)[1]) < 1_000_000 for it in held)
    # Another seed draws other documents.
    assert build_set.build_heldout(tmp_path, seed=4, sizes=sizes, per_task=12) != held


def _result(task: str, item: str, right: bool, energy_j: float, expert: str) -> dict:
    return {"id": item, "task": task, "right": right, "energy_j": energy_j, "experts": [expert]}


def test_paired_comparison_counts_the_items_one_side_got_right(live_bench):
    rights_auto = [1, 1, 0, 1, 0, 1, 1, 0]
    rights_cloud = [1, 0, 0, 1, 1, 1, 0, 0]
    results = {
        "auto": [_result("t", f"i{n}", bool(r), 2.0, "edge") for n, r in enumerate(rights_auto)],
        "cloud": [_result("t", f"i{n}", bool(r), 1.0, "cloud") for n, r in enumerate(rights_cloud)],
    }
    d = live_bench.paired(results, "auto", "cloud", n_boot=500)
    assert d["items"] == 8
    assert d["only_a_right"] == 2 and d["only_b_right"] == 1
    assert d["quality_diff"] == pytest.approx(1 / 8)
    lo, hi = d["quality_diff_ci95"]
    assert lo < d["quality_diff"] < hi and lo < 0  # 2 against 1 discordant items: no evidence either way
    assert d["energy_ratio"] == pytest.approx(2.0) and d["energy_ratio_ci95"] == pytest.approx([2.0, 2.0])


def test_paired_comparison_and_per_task_use_only_items_every_policy_answered(live_bench):
    results = {
        "auto": [_result("a", "x", True, 1.0, "edge"), _result("b", "y", False, 3.0, "cloud")],
        "edge": [_result("a", "x", False, 1.5, "edge")],  # a run cut short before "y"
    }
    d = live_bench.paired(results, "auto", "edge")
    assert d["items"] == 1 and d["quality_diff"] == 1.0 and d["energy_ratio"] == pytest.approx(1 / 1.5)
    table = live_bench.per_task(results)
    assert set(table) == {"a"} and table["a"]["auto"]["answered_by"] == {"edge": 1}
    with pytest.raises(ValueError, match="no item"):
        live_bench.paired({"auto": [], "edge": []}, "auto", "edge")


def test_cost_ranking_reads_the_plans_predicted_joules_and_compares_with_the_pinned_ones(live_bench):
    reason = ("moe2 [gate fitted]: S={edge} predicted q=0.508 (best single, then measured ensemble gains) at price "
              "0.02/J (no budget); edge w=1.00 q=0.51 (28.5 J, 12077 ms); cloud not added: measured gain -0.026 < "
              "price x 29.4 J = 0.588")
    auto = [{**_result("h", "a", True, 20.0, "edge"), "path": "score", "reason": reason},
            {**_result("h", "b", True, 20.0, "edge"), "path": "score", "reason": reason},
            {**_result("g", "c", True, 2.0, "edge"), "path": "generate", "reason": reason}]
    results = {"auto": auto,
               "edge": [_result("h", "a", True, 21.0, "edge"), _result("h", "b", True, 19.0, "edge"),
                        _result("g", "c", True, 2.0, "edge")],
               "cloud": [_result("h", "a", True, 20.0, "cloud"), _result("h", "b", True, 20.0, "cloud"),
                         _result("g", "c", True, 2.0, "cloud")]}
    # predicted edge cheaper (28.5 < 29.4): wrong on "a" (edge measured dearer), right on "b"; Generate not counted
    assert live_bench.cost_ranking(results) == {"h": [1, 2]}
