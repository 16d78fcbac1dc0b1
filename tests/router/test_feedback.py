"""Online quality corrections from feedback: bounded, shrunk per tenant, forgetting, persistable."""

from __future__ import annotations

import pytest

from router.feedback import ALL_TENANTS, FeedbackSettings, QualityFeedback
from router.gate import PriorGate


def test_a_score_moves_the_correction_by_its_residual_shrunk_by_the_prior_weight():
    fb = QualityFeedback(FeedbackSettings(prior_weight=2.0, max_weight=20.0, max_correction=0.5))
    assert fb.correction("a") == 0.0
    fb.update("a", "t1", score=0.0, predicted=0.6)
    assert fb.correction("a") == pytest.approx(-0.6 / 3)  # global: S / (W + k)
    # the tenant's own residual, shrunk towards the global correction
    assert fb.correction("a", "t1") == pytest.approx((-0.6 + 2 * (-0.2)) / 3)
    assert fb.correction("a", "t2") == pytest.approx(-0.2)  # no scores of its own: the global one
    assert fb.corrections("t2", ["a", "b"]) == {"a": pytest.approx(-0.2)}
    assert fb.received == 1


def test_corrections_are_bounded_and_scores_validated():
    fb = QualityFeedback(FeedbackSettings(prior_weight=1.0, max_weight=50.0, max_correction=0.3))
    for _ in range(40):
        fb.update("a", "t", score=0.0, predicted=1.0)
    assert fb.correction("a", "t") == -0.3
    for bad in (-0.1, 1.1, float("nan")):
        with pytest.raises(ValueError):
            fb.update("a", "t", score=bad, predicted=0.5)


def test_old_scores_fade_so_a_change_shows_within_a_bounded_number_of_scores():
    fb = QualityFeedback(FeedbackSettings(prior_weight=2.0, max_weight=10.0, max_correction=1.0))
    for _ in range(1000):  # a long bad history...
        fb.update("a", ALL_TENANTS, score=0.0, predicted=0.5)
    assert fb.stats[(ALL_TENANTS, "a")].weight == pytest.approx(10.0)  # capped
    n = 0
    while fb.correction("a") < 0:  # ...is outweighed by a few good scores
        fb.update("a", ALL_TENANTS, score=1.0, predicted=0.5)
        n += 1
    assert n <= 10


def test_apply_corrects_quality_not_weights_and_says_so():
    gate = PriorGate({"edge": 0.35, "cloud": 0.5})("")
    fb = QualityFeedback()
    assert fb.apply(gate, "t") is gate  # nothing learned: the gate itself
    fb.update("cloud", "t", score=0.0, predicted=0.5)
    out = fb.apply(gate, "t")
    assert out.weights == gate.weights and out.quality["edge"] == 0.35
    assert out.quality["cloud"] == pytest.approx(0.5 + fb.correction("cloud", "t"))
    assert out.source == "prior+feedback"


def test_rows_round_trip_and_bad_rows_are_skipped():
    fb = QualityFeedback()
    fb.update("a", "t", 1.0, 0.4)
    fb.update("b", "u", 0.0, 0.9)
    again = QualityFeedback()
    again.restore(fb.rows() + [("t", "c", float("nan"), 1.0, 1), ("t", "d", 1.0, 0.0, 1)])
    assert again.rows() == fb.rows()
    assert again.correction("a", "t") == fb.correction("a", "t")
