"""The gate: prior, fitting and prediction (real MiniLM on a slice of RouteLLM when the shared data
is there; a hashing stand-in for the encoder otherwise), renormalisation over subsets."""

from __future__ import annotations

import csv
import json
import zlib
from pathlib import Path

import numpy as np
import pytest

from router.gate import GATE_FILE, FittedGate, PriorGate, load_gate
from router.gate_fit import embed_cached, fit_gate, read_labelled
from wattserve.errors import ConfigError, InvalidRequest


def _routellm() -> Path:
    """shared/data beside the repository (or above it; WATTSERVE_SHARED_DATA overrides)."""
    from runtime.cli.router import _shared_data_dir

    shared = _shared_data_dir()
    return (shared or Path("/nonexistent")) / "routing" / "routellm"


ROUTELLM = _routellm()


class FakeEncoder:
    """Bag of hashed words, 384 dims, L2-normalised: stands in for MiniLM where speed matters."""

    dim = 384

    def encode(self, texts, batch_size=32):
        out = np.zeros((len(texts), self.dim), dtype=np.float32)
        for i, t in enumerate(texts):
            for w in t.lower().split():
                out[i, zlib.crc32(w.encode()) % self.dim] += 1.0
        return out / np.maximum(np.linalg.norm(out, axis=1, keepdims=True), 1e-9)


def test_prior_gate_is_a_softmax_of_prior_logits():
    out = PriorGate({"a": 0.5, "b": 0.8})("anything")
    assert out.source == "prior" and out.quality == {"a": 0.5, "b": 0.8}
    assert out.weights["b"] / out.weights["a"] == pytest.approx(0.8 / 0.2 / (0.5 / 0.5))
    assert sum(out.weights.values()) == pytest.approx(1.0)


def _synthetic_csv(path: Path, n=200):
    """Expert 'math' is right on arithmetic prompts, 'prose' on the others."""
    rng = np.random.default_rng(0)
    rows = []
    for i in range(n):
        arith = i % 2 == 0
        words = ["add", "sum", "multiply", "number"] if arith else ["poem", "story", "write", "essay"]
        prompt = " ".join(rng.choice(words, 6)) + f" item{i}"
        rows.append({"prompt": prompt, "subject": "x", "math": str(arith), "prose": str(not arith)})
    with path.open("w", newline="") as f:
        w = csv.DictWriter(f, fieldnames=["subject", "prompt", "math", "prose"])
        w.writeheader()
        w.writerows(rows)
    return path


def test_fit_learns_which_expert_to_trust_and_renormalises(tmp_path):
    data = read_labelled(_synthetic_csv(tmp_path / "d.csv"))
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
