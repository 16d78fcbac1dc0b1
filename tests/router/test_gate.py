"""The gate: prior, fitting and prediction (real MiniLM on a slice of RouteLLM when the shared data
is there; a hashing stand-in for the encoder otherwise), renormalisation over subsets."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from router.gate import (
    GATE_FILE,
    MAX_EMBED_TOKENS,
    FittedGate,
    PriorGate,
    embed_windows,
    load_gate,
    load_minilm_tokenizer,
)
from router.gate_fit import count_truncated, embed_cached, fit_gate, prompt_sha1, read_labelled, report
from tests.fakes import FakeEncoder
from tests.router.helpers import clustered, synthetic_csv
from wattserve.errors import ConfigError, InvalidRequest


def _routellm() -> Path:
    """shared/data beside the repository (or above it; WATTSERVE_SHARED_DATA overrides)."""
    from runtime.cli.router import _shared_data_dir

    shared = _shared_data_dir()
    return (shared or Path("/nonexistent")) / "routing" / "routellm"


ROUTELLM = _routellm()


def test_prior_gate_is_a_softmax_of_prior_logits():
    out = PriorGate({"a": 0.5, "b": 0.8})("anything")
    assert out.source == "prior" and out.quality == {"a": 0.5, "b": 0.8}
    assert out.weights["b"] / out.weights["a"] == pytest.approx(0.8 / 0.2 / (0.5 / 0.5))
    assert sum(out.weights.values()) == pytest.approx(1.0)


def test_fit_learns_which_expert_to_trust_and_renormalises(tmp_path):
    data = read_labelled(synthetic_csv(tmp_path / "d.csv"))
    assert data.experts == ["math", "prose"]  # 'subject' is not a quality column
    emb = embed_cached(data.prompts, tmp_path / "cache", encoder_factory=FakeEncoder)
    assert list((tmp_path / "cache").glob("minilm-*.npy"))  # cached for the next run
    rep = fit_gate(data, emb, tmp_path / "gate", epochs=400, hidden=16)
    assert rep["top_choice_quality"] > 0.95 and rep["ece"] < 0.2
    meta = json.loads((tmp_path / "gate" / GATE_FILE).read_text())
    assert meta["experts"] == ["math", "prose"] and meta["heldout_report"] == rep
    gate = FittedGate(tmp_path / "gate", {"m": "math", "p": "prose"}, encoder=FakeEncoder())
    out = gate("please add and multiply this number")
    assert out.source.startswith("fitted:") and max(out.weights, key=out.weights.get) == "m"
    assert out.quality["m"] > 0.8 > out.quality["p"]
    sub = out.renormalised(["p"])
    assert sub == {"p": 1.0}
    with pytest.raises(ConfigError, match="no output for 'nope'"):
        FittedGate(tmp_path / "gate", {"m": "nope"})


def test_weight_decay_and_dropout_are_used_and_recorded(tmp_path):
    from safetensors.numpy import load_file

    data = read_labelled(synthetic_csv(tmp_path / "d.csv"))
    emb = embed_cached(data.prompts, None, encoder_factory=FakeEncoder)
    norms = {}
    for wd in (0.0, 10.0):
        fit_gate(data, emb, tmp_path / f"g{wd}", epochs=100, hidden=16, weight_decay=wd, dropout=0.3)
        meta = json.loads((tmp_path / f"g{wd}" / GATE_FILE).read_text())
        assert meta["weight_decay"] == wd and meta["dropout"] == 0.3
        norms[wd] = float(np.linalg.norm(load_file(str(tmp_path / f"g{wd}" / "gate.safetensors"))["0.weight"]))
    assert norms[10.0] < 0.5 * norms[0.0]  # AdamW's decay shrank the first layer


def test_the_shipped_gate_was_fitted_on_the_shipped_labels():
    """data/quality/gate-local (configs/local.yaml's gate) saw exactly the rows of labels_local.csv."""
    root = Path(__file__).resolve().parents[2] / "data" / "quality"
    meta = json.loads((root / "gate-local" / GATE_FILE).read_text())
    data = read_labelled(root / "labels_local.csv")
    assert meta["experts"] == data.experts == ["edge", "cloud"]
    seen = sorted(meta["train_prompt_sha1"] + meta["heldout_prompt_sha1"])
    assert seen == sorted(prompt_sha1(p) for p in data.prompts)
    assert meta["heldout_report"]["prompts"] == len(data.prompts)


def test_bad_data_files_say_what_is_wrong(tmp_path):
    bad = tmp_path / "bad.csv"
    bad.write_text("text,a,b\nx,1,0\n")
    with pytest.raises(InvalidRequest, match="'prompt' column"):
        read_labelled(bad)
    bad.write_text("prompt,a\nx,1\n")
    with pytest.raises(InvalidRequest, match="at least two expert quality columns"):
        read_labelled(bad)
    with pytest.raises(ConfigError, match="cannot read the fitted gate"):
        load_gate(str(tmp_path / "missing"), {"a": 0.5})


@pytest.mark.skipif(not ROUTELLM.exists(), reason="shared/data/routing/routellm not present")
def test_fit_and_predict_on_a_slice_of_routellm_with_minilm(tmp_path):
    data = read_labelled(ROUTELLM / "gsm8k_correctness_mixtral_vs_gpt4.csv", sample=80, seed=1)
    assert data.experts == ["mistralai/Mixtral-8x7B-Instruct-v0.1", "gpt-4-1106-preview"]
    emb = embed_cached(data.prompts, None)  # the real MiniLM encoder, offline
    assert emb.shape == (80, 384) and np.allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-4)
    rep = fit_gate(data, emb, tmp_path / "gate", epochs=10)
    assert rep["rows"] == 16 and 0 <= rep["brier"] <= 1
    names = {"weak": data.experts[0], "strong": data.experts[1]}
    gate = load_gate(str(tmp_path / "gate"), {"weak": 0.6, "strong": 0.8}, names)
    out = gate(data.prompts[0])
    assert set(out.weights) == {"weak", "strong"} and sum(out.weights.values()) == pytest.approx(1.0)
    # the gate's mean predicted quality follows the data: GPT-4 is right more often than Mixtral
    assert rep["predicted_mean_quality"][names["strong"]] > rep["predicted_mean_quality"][names["weak"]]


def test_gate_json_records_train_and_heldout_prompts(tmp_path):
    data = read_labelled(synthetic_csv(tmp_path / "d.csv", n=50))
    emb = embed_cached(data.prompts, None, encoder_factory=FakeEncoder)
    fit_gate(data, emb, tmp_path / "gate", holdout=0.2, epochs=2, hidden=8)
    meta = json.loads((tmp_path / "gate" / GATE_FILE).read_text())
    train, held = meta["train_prompt_sha1"], meta["heldout_prompt_sha1"]
    assert len(train) == 40 and len(held) == 10 and not set(train) & set(held)
    import hashlib

    everything = {hashlib.sha1(p.encode("utf-8")).hexdigest()[:16] for p in data.prompts}
    assert set(train) | set(held) == everything
    assert prompt_sha1("é") == hashlib.sha1("é".encode()).hexdigest()[:16] and len(prompt_sha1("x")) == 16


def test_report_gives_within_task_auc_beside_pooled_auc():
    # Two tasks with different base rates; inside each, the logits rank right above wrong for
    # expert "a" and upside down for expert "b"; within-task AUC tells them apart.
    groups = ["easy"] * 4 + ["hard"] * 4
    y_a, z_a = [1, 1, 1, 0, 1, 0, 0, 0], [3, 3, 2, 1, 0, -1, -2, -2]
    y_b, z_b = [1, 1, 0, 0, 1, 0, 0, 0], [1.0, 1.1, 2.0, 2.1, -2, -1, -0.5, 0]
    y = np.array([y_a, y_b], dtype=float).T
    logits = np.array([z_a, z_b], dtype=float).T
    rep = report(logits, y, ["a", "b"], groups)
    assert rep["within_task_auc_by_expert"]["a"] == pytest.approx(1.0)
    assert rep["within_task_auc_by_expert"]["b"] == pytest.approx(0.0)
    assert rep["auc"] > 0.5  # pooled over tasks and experts, the base rates hide b's inversion
    # pair-weighted over (task, expert) groups: a has 3 + 3 pairs at AUC 1, b has 4 + 3 at AUC 0
    assert rep["tasks_ranked"] == 4 and rep["within_task_auc"] == pytest.approx(6 / 13)
    assert report(logits, y, ["a", "b"])["within_task_auc"] is None  # no task column: said, not invented


def test_read_labelled_keeps_the_task_column_as_groups(tmp_path):
    path = tmp_path / "labels.csv"
    path.write_text("id,task,prompt,edge,cloud\nx/1,arc,Q1,1,0\nx/2,lambada,Q2,0,0\n")
    data = read_labelled(path)
    assert data.experts == ["edge", "cloud"] and data.groups == ["arc", "lambada"]


def test_long_prompts_are_counted_and_the_head_tail_window_keeps_the_question():
    tok = load_minilm_tokenizer()
    prefix = "Example: the sky is blue and grass is green. " * 60  # a long shared few-shot prefix
    prompts = [prefix + "Question: what colour is snow?", prefix + "Question: how many legs has a cat?", "short"]
    assert count_truncated(prompts, tok) == 2
    head, cut = embed_windows(tok, prompts, "head")
    assert cut == [True, True, False] and all(len(ids) == MAX_EMBED_TOKENS for ids in head[:2])
    assert head[0] == head[1]  # cut to the shared prefix: one embedding for both questions
    both, _ = embed_windows(tok, prompts, "head_tail", head_tokens=16)
    assert len(both[0]) == MAX_EMBED_TOKENS and both[0] != both[1]
    assert tok.decode(both[1][-12:-1]).endswith("how many legs has a cat?")
    assert both[2] == head[2]  # short prompts are read whole either way


def test_serving_gate_embeds_with_its_window_and_logs_cuts(tmp_path, caplog):
    data = read_labelled(synthetic_csv(tmp_path / "d.csv", n=30))
    emb = embed_cached(data.prompts, None, encoder_factory=FakeEncoder)
    fit_gate(data, emb, tmp_path / "gate", epochs=1, hidden=8, window="head_tail", head_tokens=16)

    class CountingEncoder(FakeEncoder):
        def __init__(self):
            self.tok = load_minilm_tokenizer()

        def encode_with_cuts(self, texts, batch_size=32):
            return self.encode(texts), embed_windows(self.tok, texts, "head_tail", 16)[1]

    gate = FittedGate(tmp_path / "gate", encoder=CountingEncoder())
    assert gate.window == "head_tail" and gate.head_tokens == 16
    with caplog.at_level("INFO", logger="wattserve.gate"):
        gate("short prompt")
        gate("word " * 400)
    assert (gate.prompts_seen, gate.prompts_cut) == (2, 1)
    assert "was cut (head_tail window); 1 of 2 prompts" in caplog.text


def test_neighbours_lower_the_error_of_the_predicted_quality_on_noisy_labels(tmp_path):
    """On noisy single-draw labels the average of the MLP and the nearest training prompts is
    closer to the expected quality than the MLP alone (what argmax q - price E compares)."""
    from router.gate import Neighbours, blend
    from router.gate_fit import train_mlp

    x, _, y = clustered(400, seed=0)
    xt, expected, _ = clustered(400, seed=1)
    import torch

    mlp = train_mlp(x, y, epochs=60, hidden=32, seed=0)
    with torch.inference_mode():
        p_mlp = 1 / (1 + np.exp(-mlp(torch.as_tensor(xt)).numpy()))
    p_blend = blend(p_mlp, Neighbours(x, y, k=20).predict(xt), 0.5)
    err_mlp, err_blend = ((p_mlp - expected) ** 2).mean(), ((p_blend - expected) ** 2).mean()
    assert err_blend < 0.9 * err_mlp


def test_a_gate_with_neighbours_is_saved_loaded_and_blends(tmp_path):
    from router.gate import NEIGHBOURS_FILE, blend

    data = read_labelled(synthetic_csv(tmp_path / "d.csv", n=60))
    emb = FakeEncoder().encode(data.prompts)
    fit_gate(data, emb, tmp_path / "gate", epochs=3, hidden=8, knn_weight=0.5, knn_k=5)
    meta = json.loads((tmp_path / "gate" / GATE_FILE).read_text())
    assert meta["knn_weight"] == 0.5 and meta["knn_k"] == 5
    assert (tmp_path / "gate" / NEIGHBOURS_FILE).exists()
    gate = FittedGate(tmp_path / "gate", encoder=FakeEncoder())
    assert gate.neighbours is not None and len(gate.neighbours.quality) == meta["train_rows"]
    q = gate.quality(emb[:4])
    p = 1 / (1 + np.exp(-gate.logits(emb[:4]).astype(np.float64)))
    assert np.allclose(q, blend(p, gate.neighbours.predict(emb[:4]), 0.5))
    out = gate(data.prompts[0])
    assert out.quality["math"] == pytest.approx(q[0][0], abs=1e-5) and sum(out.weights.values()) == pytest.approx(1.0)
    # refitting without neighbours removes the stale file and the gate reads the MLP alone
    fit_gate(data, emb, tmp_path / "gate", epochs=3, hidden=8)
    assert not (tmp_path / "gate" / NEIGHBOURS_FILE).exists()
    assert FittedGate(tmp_path / "gate", encoder=FakeEncoder()).neighbours is None
    with pytest.raises(ConfigError):
        blend(p, p, 1.5)
