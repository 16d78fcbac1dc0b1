import numpy as np
import pytest

from router import calibration


def test_brier_and_ece_of_a_perfect_and_a_constant_predictor():
    y = np.array([1, 0, 1, 0], dtype=float)
    assert calibration.brier(y, y) == 0.0
    assert calibration.ece(y, y) == 0.0
    half = np.full(4, 0.5)
    assert calibration.brier(half, y) == pytest.approx(0.25)
    assert calibration.ece(half, y) == pytest.approx(0.0)  # 0.5 predicted, 0.5 observed
    assert calibration.ece(np.full(4, 0.9), y) == pytest.approx(0.4)


def test_auc_counts_ties_half_and_needs_both_classes():
    assert calibration.auc([0.9, 0.1], [1, 0]) == 1.0
    assert calibration.auc([0.1, 0.9], [1, 0]) == 0.0
    assert calibration.auc([0.5, 0.5], [1, 0]) == 0.5
    assert calibration.auc([0.2, 0.3], [1, 1]) is None


def test_within_group_auc_sees_what_pooled_auc_hides():
    # Two tasks: task a is easy (all good, high p), task b hard (mostly bad, low p). Inside each
    # task the predictor ranks backwards; pooled it looks excellent.
    p = np.array([0.9, 0.8, 0.85, 0.2, 0.1, 0.15, 0.12])
    y = np.array([1, 1, 0, 1, 0, 0, 0])
    groups = ["a", "a", "a", "b", "b", "b", "b"]
    pooled = calibration.auc(p, y)
    within, used = calibration.within_group_auc(p, y, groups)
    assert pooled > 0.7
    assert used == 2
    # a: good {0.9, 0.8} vs bad {0.85}: 1 of 2 pairs right; b: good {0.2} vs 3 bad: 3 of 3 right.
    assert within == pytest.approx((0.5 * 2 + 1.0 * 3) / 5)
    with pytest.raises(ValueError):
        calibration.within_group_auc(p, y, groups[:3])
