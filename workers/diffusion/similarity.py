"""Stochastic similarity filter (StreamDiffusion §3.5): skip frames that look like the last one
the model processed, with a probability that grows with their similarity.

For a frame with cosine similarity ``c`` to the last *processed* frame (the pixels in [-1, 1],
flattened), the skip probability is ``max(0, (c - eta) / (1 - eta))``: 0 below ``eta``, rising
linearly to 1 for an identical frame. Drawing rather than thresholding keeps the output moving
smoothly when a scene changes slowly. At most ``max_skip_frames`` frames are skipped in a row,
so even a frozen scene is re-rendered periodically. A skipped frame costs one similarity (a
dot product) instead of a VAE encode, n UNet rows and a decode; it returns the previous output.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch


@dataclass(slots=True, frozen=True)
class FilterDecision:
    skip: bool
    similarity: float | None  # None for the first frame (nothing to compare with)
    skip_probability: float


class SimilarityFilter:
    """Decides per frame whether to skip it. ``rng`` is injectable and seeded for repeatability."""

    def __init__(self, threshold: float = 0.98, max_skip_frames: int = 10, rng: random.Random | None = None) -> None:
        if not 0.0 <= threshold <= 1.0:
            raise ValueError(f"threshold must be in [0, 1], got {threshold}")
        if max_skip_frames < 0:
            raise ValueError(f"max_skip_frames must be >= 0, got {max_skip_frames}")
        self.threshold = threshold
        self.max_skip_frames = max_skip_frames
        self.rng = rng or random.Random(0)
        self._reference: torch.Tensor | None = None
        self.consecutive_skips = 0
        self.skipped = 0
        self.processed = 0

    def skip_probability(self, similarity: float) -> float:
        if self.threshold >= 1.0:
            return 0.0
        return min(1.0, max(0.0, (similarity - self.threshold) / (1.0 - self.threshold)))

    def decide(self, frame: torch.Tensor, can_skip: bool = True) -> FilterDecision:
        """Look at ``frame`` (any shape, values in [-1, 1]); if it is to be processed it becomes
        the new reference. ``can_skip`` False forces processing (e.g. nothing to repeat yet)."""
        flat = frame.reshape(-1).float()
        if self._reference is None:
            return self._process(flat, None, 0.0)
        sim = float(torch.nn.functional.cosine_similarity(flat, self._reference, dim=0, eps=1e-6))
        prob = self.skip_probability(sim)
        # Draw for every compared frame so the random stream does not depend on can_skip.
        draw = self.rng.random()
        if can_skip and self.consecutive_skips < self.max_skip_frames and draw < prob:
            self.consecutive_skips += 1
            self.skipped += 1
            return FilterDecision(True, sim, prob)
        return self._process(flat, sim, prob)

    def _process(self, flat: torch.Tensor, sim: float | None, prob: float) -> FilterDecision:
        self._reference = flat.clone()
        self.consecutive_skips = 0
        self.processed += 1
        return FilterDecision(False, sim, prob)
