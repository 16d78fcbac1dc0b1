"""The torch/transformers engine (CPU and CUDA)."""

from .engine import TorchEngine

__all__ = ["TorchEngine"]
