"""`wattserve exits fit` and `wattserve exits calibrate` on a config's expert, then serving with
what they wrote (in-process: the commands load the model themselves, no server needed)."""

from __future__ import annotations

import random

import pytest

from runtime.cli import main
from runtime.config import load_config
from wattserve.types import GenerateCall, SamplingParams


@pytest.fixture(scope="module")
def setup(tmp_path_factory):
    from tests.tiny_models import CORPUS, build_model

    base = tmp_path_factory.mktemp("cli-exits")
    model = build_model(base / "llama", "llama", layers=8, seed=1, layer_gain=10.0)
    rng = random.Random(1)
    words = " ".join(CORPUS[:5]).split()
    (base / "text.txt").write_text("\n\n".join(" ".join(rng.choice(words) for _ in range(8)) for _ in range(40)))
    config = base / "exits.yaml"
    config.write_text(
        f"""
model_cache_dir: cache
experts:
  - name: edge
    model: {{kind: local, path: "{model}"}}
    engine:
      kind: torch
      threads: 1
      early_exit: {{exit_every: 2, thresholds_path: exits/edge.json, adapters_path: exits/edge.safetensors}}
    max_batch: 8
    max_model_len: 256
"""
    )
    return base, config


def test_fit_then_calibrate_then_serve(setup, capsys):
    base, config = setup
    args = ["--config", str(config), "--expert", "edge", "--data", str(base / "text.txt"), "--new-tokens", "12"]
    assert main(["exits", "fit", *args, "--out", str(base / "exits/edge.safetensors"), "--epochs", "1"]) == 0
    out = capsys.readouterr().out
    assert "fitted 4 exit adapters" in out and "before" in out and "after" in out
    assert main(["exits", "calibrate", *args, "--budget-fraction", "0.5", "0.75"]) == 0
    out = capsys.readouterr().out
    assert "calibrated 2 operating points" in out
    assert (base / "exits/edge.json").is_file()  # the expert's configured thresholds_path, relative to the config

    from workers.engines.torch_engine import TorchEngine

    spec = load_config(config).experts[0]
    engine = TorchEngine(spec.model.path, spec)
    assert engine.exits.adapters_sha256 and len(engine.exits.chooser.points) == 2
    prompt = (base / "text.txt").read_text().split("\n\n")[0]  # text like the calibration text
    engine.add(engine.validate(GenerateCall("a", prompt, 12, SamplingParams(ignore_eos=True), compute_budget=0.5), 0.0))
    final = None
    while engine.has_work():
        final = next((o for o in engine.step(0.0).outputs if o.finish_reason), final)
    assert final.exits.operating_point == "L4" and final.exits.avg_exit_layer < 8


def test_bad_arguments_are_clear_errors(setup, capsys):
    base, config = setup
    assert main(["exits", "calibrate", "--config", str(config), "--expert", "nope", "--data", str(base / "text.txt"),
                 "--budget-layers", "4"]) == 2
    assert "no expert 'nope'" in capsys.readouterr().err
    (base / "empty.txt").write_text("\n\n")
    assert main(["exits", "calibrate", "--config", str(config), "--expert", "edge", "--data", str(base / "empty.txt"),
                 "--budget-layers", "4"]) == 2
    assert "no text" in capsys.readouterr().err
