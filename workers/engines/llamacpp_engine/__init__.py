"""llama.cpp engine for GGUF models (``engine: {kind: llamacpp}``); see docs/llamacpp.md.

Files: ``model.py`` (load, context, errors), ``batch.py`` (one llama_batch per step),
``sampler.py`` (logit processors and the pick), ``text.py`` (tokenizer facade, chat templates,
detokenizer), ``engine.py`` (continuous batching behind the Engine interface).
"""

from .engine import LlamaCppEngine

__all__ = ["LlamaCppEngine"]
