"""The noise ceiling: rank chosen by cell cross-validation, denoising toward the known signal."""

from __future__ import annotations

import numpy as np
import pytest

from router.eval_baselines import price_curve
from router.eval_ceiling import denoise, impute, rank_cv
from router.evaluate import Curve


def _rank1(n=400, k=6, noise=0.15, seed=0):
    """Quality = column mean + prompt difficulty x expert sensitivity (rank 1) + noise."""
    rng = np.random.default_rng(seed)
    theta = rng.normal(0, 1, n)
    sens = np.linspace(0.05, 0.2, k)
    signal = np.clip(np.linspace(0.3, 0.8, k)[None, :] + theta[:, None] * sens[None, :], 0, 1)
    labels = np.clip(signal + rng.normal(0, noise, (n, k)), 0, 1)
    return signal, labels


def test_cross_validation_finds_the_rank_of_the_signal_and_denoising_moves_toward_it():
    signal, labels = _rank1()
    d = denoise(labels)
    assert d.rank == 1
    assert d.cv_mse[1] < d.cv_mse[0] and d.cv_mse[1] < d.cv_mse[max(d.cv_mse)]
    assert ((d.quality - signal) ** 2).mean() < 0.5 * ((labels - signal) ** 2).mean()
    assert d.quality.min() >= 0 and d.quality.max() <= 1


def test_impute_never_reads_the_hidden_cells():
    _, labels = _rank1(n=100)
    hidden = np.random.default_rng(1).random(labels.shape) < 0.1
    changed = labels.copy()
    changed[hidden] = 1.0 - changed[hidden]
    assert np.allclose(impute(labels, hidden, 1), impute(changed, hidden, 1))
    assert set(rank_cv(labels, [0, 1], folds=2)) == {0, 1}


def test_the_ceiling_sits_between_a_static_choice_and_the_oracle():
    """Routing by the denoised qualities needs more energy than the oracle (which spends the
    labels' noise) for the same quality, and less than always using the best expert."""
    signal, labels = _rank1(noise=0.25)
    energy = np.linspace(1.0, 10.0, labels.shape[1])
    target = 0.95 * labels[:, -1].mean()

    def e95(pred):
        c = Curve("x")
        c.points = [(e, q, k) for e, q, k, _ in price_curve(pred, labels, energy, list("abcdef"), 41)]
        return c.energy_for(target)

    oracle, ceiling = e95(labels), e95(denoise(labels).quality)
    assert oracle is not None and ceiling is not None
    assert oracle < ceiling < energy[-1]


def test_denoise_refuses_too_little_data():
    with pytest.raises(ValueError):
        denoise(np.zeros((5, 3)))
    with pytest.raises(ValueError):
        denoise(np.zeros((50, 1)))
