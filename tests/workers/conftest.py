"""Fixtures of the engine tests."""

from __future__ import annotations

import pytest


@pytest.fixture(scope="module")
def deep_llama(tmp_path_factory):
    from tests.tiny_models import build_model

    return build_model(tmp_path_factory.mktemp("eng") / "llama", "llama", layers=8, seed=1, layer_gain=10.0)
