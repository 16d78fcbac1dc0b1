"""Helpers the router tests share: labelled data sets and expert profiles."""

from __future__ import annotations

import csv
from pathlib import Path

import numpy as np

from wattserve.types import ExpertProfile


def synthetic_csv(path: Path, n=200):
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


def clustered(n, seed, dim=16, clusters=12, experts=4):
    """Prompts from clusters; each cluster has an expected quality per expert; labels are one
    Bernoulli draw of it (the structure of judged labels: noisy single samples)."""
    rng = np.random.default_rng(seed)
    centres = np.random.default_rng(99).normal(0, 1, (clusters, dim))
    expected = np.random.default_rng(98).uniform(0.05, 0.95, (clusters, experts))
    c = rng.integers(0, clusters, n)
    x = (centres[c] + rng.normal(0, 0.35, (n, dim))).astype(np.float32)
    return x, expected[c], (rng.random((n, experts)) < expected[c]).astype(np.float32)


def prof(expert, replica=0, *, power_w, step_ms, running=0, waiting=0, max_batch=4, clock=None):
    return ExpertProfile(
        expert=expert, replica=replica, model="m", engine="synthetic", device="d", energy_source="modeled:x",
        priority_class="high", max_batch=max_batch, max_queue=8, max_model_len=4096, params=1, healthy=True,
        running=running, waiting=waiting, prefill_ms_per_token=0.1, decode_ms_per_token=step_ms, j_per_token=1.0,
        decode_ms_per_step_by_batch={1: step_ms}, busy_power_w=power_w, sm_clock_mhz=clock, max_sm_clock_mhz=clock,
    )
