"""How well predicted qualities match measured ones: Brier score, expected calibration error, and
ranking (AUC) overall and within groups (tasks).

A gate can separate tasks (easy vs hard benchmarks) and still rank the prompts *inside* a task no
better than chance; the pooled AUC hides that, so ``within_group_auc`` reports the pair-weighted mean
of per-group AUCs over groups that hold both a good and a bad answer. Pure numpy; used by
``gate fit`` (held-out report) and ``route eval``.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np


def brier(p: np.ndarray, y: np.ndarray) -> float:
    """Mean squared error between predicted probabilities ``p`` and outcomes ``y`` in [0, 1]."""
    p, y = np.asarray(p, dtype=float), np.asarray(y, dtype=float)
    return float(((p - y) ** 2).mean())


def ece(p: np.ndarray, y: np.ndarray, bins: int = 10) -> float:
    """Expected calibration error over ``bins`` equal-width probability bins (weighted by count)."""
    p, y = np.asarray(p, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    idx = np.minimum((p * bins).astype(int), bins - 1)
    total = 0.0
    for b in range(bins):
        m = idx == b
        if m.any():
            total += m.sum() / p.size * abs(float(p[m].mean()) - float(y[m].mean()))
    return float(total)


def _binary(y: np.ndarray) -> np.ndarray:
    # Fractional qualities (judge scores) count as good at >= 0.5.
    return np.asarray(y, dtype=float) >= 0.5


def auc(p: np.ndarray, y: np.ndarray) -> float | None:
    """Probability that a random good answer is scored above a random bad one (ties count half);
    None when ``y`` holds only one class."""
    p = np.asarray(p, dtype=float).ravel()
    good = _binary(y).ravel()
    n_pos, n_neg = int(good.sum()), int((~good).sum())
    if n_pos == 0 or n_neg == 0:
        return None
    # Mann-Whitney U through average ranks (handles ties).
    order = np.argsort(p, kind="mergesort")
    ranks = np.empty(p.size, dtype=float)
    sorted_p = p[order]
    i = 0
    while i < p.size:
        j = i
        while j + 1 < p.size and sorted_p[j + 1] == sorted_p[i]:
            j += 1
        ranks[order[i:j + 1]] = (i + j) / 2.0 + 1.0
        i = j + 1
    u = ranks[good].sum() - n_pos * (n_pos + 1) / 2.0
    return float(u / (n_pos * n_neg))


def within_group_auc(p: np.ndarray, y: np.ndarray, groups: Sequence[object]) -> tuple[float | None, int]:
    """Pair-weighted mean AUC inside each group (e.g. task); returns (auc, groups used).

    Groups with only good or only bad answers carry no ranking information and are skipped."""
    p, y = np.asarray(p, dtype=float).ravel(), np.asarray(y, dtype=float).ravel()
    g = np.asarray(list(groups), dtype=object).ravel()
    if g.size != p.size:
        raise ValueError(f"groups has {g.size} entries for {p.size} predictions")
    num = den = 0.0
    used = 0
    for key in dict.fromkeys(g.tolist()):
        m = g == key
        a = auc(p[m], y[m])
        if a is None:
            continue
        good = _binary(y[m])
        pairs = float(good.sum()) * float((~good).sum())
        num += a * pairs
        den += pairs
        used += 1
    return (num / den if den else None), used
