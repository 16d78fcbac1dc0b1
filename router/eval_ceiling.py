"""How much of the oracle's saving is attainable at all: noise ceilings for ``route eval``.

The oracle routes with each evaluated prompt's *sampled* labels. A label is one draw (one answer,
one judgement) around the quality the expert has on that prompt in expectation; where a weak
expert happened to win a draw, the oracle sends the prompt to it and "saves" energy that no
router can save, however good its features. The data hold one label per cell, so the expected
quality is not observed; two estimates of what a router that knew it could capture:

- ``denoised`` (labels only, this module): labels ``Y`` (prompts x experts) = column means + a
  rank-``r`` signal + independent noise. ``r`` is chosen by cross-validation over hidden *cells*
  (a tenth of single labels is hidden, the rank-``r`` fit of the rest predicts them): the rank
  that best predicts a label it did not see carries what repeats across experts (how hard a
  prompt is, what kind of prompt each expert does well), not one label's noise. The router then
  routes by the rank-``r`` reconstruction. Optimistic in that a cell's own noise enters its
  reconstruction through the prompt's coordinates; pessimistic in that quality particular to
  one expert on one prompt is treated as noise.
- ``in-sample`` (``route eval``): MoE²'s own quality predictor fitted on *all* rows, the
  evaluated ones included, then scored on the evaluated rows: what its features and model class
  could capture if they had learned the expected quality perfectly (optimistic: it also
  memorises some of the evaluated labels' noise).

A per-cell estimate from the *other* experts' labels only (leave the cell out) looks cleaner but
is biased against the winner: where expert j won and k lost, k's estimate is high and j's low, so
routing by it picks the loser (measured: it never reaches 95 % of the strongest's quality on
AlpacaEval-8). It is not offered.

Pure numpy.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import numpy as np


def _svd_fit(y: np.ndarray, rank: int) -> tuple[np.ndarray, np.ndarray]:
    """Column means and the rank-``rank`` reconstruction of ``y`` minus them."""
    mean = y.mean(axis=0)
    if rank <= 0:
        return mean, np.zeros_like(y)
    u, s, vt = np.linalg.svd(y - mean, full_matrices=False)
    return mean, (u[:, :rank] * s[:rank]) @ vt[:rank]


def impute(y: np.ndarray, hidden: np.ndarray, rank: int, iters: int = 100) -> np.ndarray:
    """Rank-``rank`` fit of ``y`` that never reads the cells where ``hidden`` is True (hard
    impute: fill them with column means, fit, refill them with the fit, until they settle)."""
    seen = np.where(hidden, np.nan, y)
    col = np.nan_to_num(np.nanmean(seen, axis=0))
    filled = np.where(hidden, col[None, :], y)
    fit = filled
    for _ in range(iters):
        mean, low = _svd_fit(filled, rank)
        fit = mean + low
        new = np.where(hidden, fit, y)
        if np.max(np.abs(new - filled)) < 1e-7:
            break
        filled = new
    return fit


def rank_cv(y: np.ndarray, ranks: Sequence[int], hide: float = 0.1, folds: int = 5, seed: int = 0) -> dict[int, float]:
    """Mean squared error on hidden cells per rank, over ``folds`` random masks of ``hide`` of the cells."""
    y = np.asarray(y, dtype=np.float64)
    rng = np.random.default_rng(seed)
    err = dict.fromkeys(ranks, 0.0)
    for _ in range(folds):
        hidden = rng.random(y.shape) < hide
        if not hidden.any():  # a small table: hide one cell at least
            hidden[rng.integers(y.shape[0]), rng.integers(y.shape[1])] = True
        for r in ranks:
            err[r] += float(((impute(y, hidden, r) - y)[hidden] ** 2).mean()) / folds
    return err


@dataclass(slots=True)
class Denoised:
    rank: int  # chosen by cell cross-validation
    cv_mse: dict[int, float]  # per rank tried
    quality: np.ndarray  # the rank-r reconstruction, clipped to [0, 1]


def denoise(y: np.ndarray, seed: int = 0) -> Denoised:
    """Choose the rank by cell cross-validation (ranks 0 .. experts - 2: experts - 1 and more
    reproduce every label, i.e. the oracle) and reconstruct ``y`` at that rank."""
    y = np.asarray(y, dtype=np.float64)
    if y.ndim != 2 or y.shape[1] < 2 or y.shape[0] < 10:
        raise ValueError(f"denoising needs at least 10 rows and 2 experts, got shape {y.shape}")
    cv = rank_cv(y, list(range(0, max(1, y.shape[1] - 1))), seed=seed)
    r = min(cv, key=lambda k: (round(cv[k], 9), k))
    mean, low = _svd_fit(y, r)
    return Denoised(r, cv, np.clip(mean + low, 0.0, 1.0))
