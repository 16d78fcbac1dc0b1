"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    from tests.tiny_models import build_model

    return build_model(tmp_path_factory.mktemp("eng") / "llama", "llama", layers=8, seed=1, layer_gain=10.0)


@pytest.fixture
def text_worker(tmp_path):
    """A text expert replica in-process: the synthetic engine on the CPU device (batch 4, queue 2)."""
    from wattserve.specs import ExpertSpec
    from workers.expert import ExpertWorker

    spec = ExpertSpec.model_validate({"name": "synth", "engine": {"kind": "synthetic", "step_ms": 2},
                                      "device": "cpu", "max_batch": 4, "max_queue": 2})
    w = ExpertWorker(spec, 0, str(tmp_path), exit_on_failure=False)
    yield w
    w.shutdown()
