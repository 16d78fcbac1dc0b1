"""Engines behind one interface (``base.Engine``); ``build_engine`` imports only the chosen one."""

from __future__ import annotations

from pathlib import Path

from wattserve.specs import ExpertSpec

from .base import Engine


def build_engine(expert: ExpertSpec, model_dir: Path | None) -> Engine:
    """The engine of ``expert``; ``model_dir`` is its HF-format directory, or its GGUF file for llamacpp."""
    kind = expert.engine.kind
    if kind == "torch":
        from .torch_engine import TorchEngine

        return TorchEngine(model_dir, expert, model_label=expert.model_label)
    if kind == "llamacpp":
        from .llamacpp_engine import LlamaCppEngine

        return LlamaCppEngine(model_dir, expert, model_label=expert.model_label)
    if kind == "synthetic":
        from .synthetic import SyntheticEngine

        return SyntheticEngine(expert)
    if kind == "vllm":  # vLLM schedules itself: workers/expert.py runs it behind a VllmRunner
        raise ValueError("engine vllm is not a stepped engine; ExpertWorker serves it with VllmRunner")
    raise ValueError(f"unknown engine {kind!r}")
