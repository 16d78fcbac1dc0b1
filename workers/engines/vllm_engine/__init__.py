"""The vLLM engine: vLLM's AsyncLLM inside an expert's actor, behind the same surface as the torch
engine's loop (see ``runner.py`` for the adapter and ``docs/vllm.md`` for the design).

Importing this package does not import vLLM; :class:`VllmRunner` checks that it is installed and
names the package to install if not.
"""

from __future__ import annotations

from .runner import VllmRunner
from .settings import INSTALL_HINT, require_vllm, vllm_available

__all__ = ["INSTALL_HINT", "VllmRunner", "require_vllm", "vllm_available"]
