"""The cost model: predictions from live profiles, clock response, queueing, online learning."""

from __future__ import annotations

import dataclasses

import pytest

from router.cost import CostModel, CostPrior
from wattserve.types import ExpertProfile


def profile(**kw):
    base = dict(
        expert="e", replica=0, model="m", engine="torch", device="d", energy_source="modeled:h100", priority_class="high",
        max_batch=4, max_queue=8, max_model_len=4096, params=1, healthy=True, running=0, waiting=0,
        prefill_ms_per_token=0.5, decode_ms_per_token=10.0, j_per_token=1.0,
        decode_ms_per_step_by_batch={1: 10.0, 4: 16.0}, busy_power_w=300.0, sm_clock_mhz=1980.0, max_sm_clock_mhz=1980.0,
    )
    base.update(kw)
    return ExpertProfile(**base)


def test_prediction_from_a_measured_profile():
    est = CostModel().predict(profile(), "e", prompt_tokens=100, output_tokens=11)
    assert est.basis == "measured" and est.queue_ms == 0
    assert est.latency_ms == pytest.approx(100 * 0.5 + 10 * 10.0)
    # energy follows compute time: 50 ms of prefill + 11 decode steps of 10 ms at batch 1, at 300 W
    assert est.energy_j == pytest.approx(300.0 * (50 + 11 * 10.0) / 1000)


def test_batch_shares_decode_energy_and_interpolates_step_time():
    est = CostModel().predict(profile(running=1), "e", 0, 10)  # joins a batch of 2
    step = 10.0 + (16.0 - 10.0) * (2 - 1) / (4 - 1)
    assert est.latency_ms == pytest.approx(step * 9)
    assert est.energy_j == pytest.approx(300.0 * step / 2 * 10 / 1000)


def test_a_lowered_clock_slows_prefill_and_saves_energy_at_once():
    model = CostModel()
    full = model.predict(profile(), "e", 1000, 1)
    capped = model.predict(profile(sm_clock_mhz=990.0), "e", 1000, 1)  # same figures, half the clock
    assert capped.latency_ms == pytest.approx(2 * full.latency_ms)  # prefill ~ 1/clock
    assert capped.energy_j < full.energy_j
    # once new figures are measured at the lower clock they are taken as they are
    remeasured = model.predict(profile(sm_clock_mhz=990.0, prefill_ms_per_token=1.0), "e", 1000, 1)
    assert remeasured.latency_ms == pytest.approx(1000 * 1.0)


def test_queue_adds_whole_batches_ahead():
    est = CostModel().predict(profile(running=4, waiting=4), "e", 0, 10)
    assert est.queue_ms == pytest.approx(2 * 10 * 16.0)
    assert CostModel().predict(profile(), "e", 0, 10, inflight=4).queue_ms == pytest.approx(10 * 16.0)
    assert CostModel().predict(profile(running=4), "e", 10, 0, queue=False).queue_ms == 0


def test_priors_before_measurements_and_none_without():
    model = CostModel(priors={"e": CostPrior(prefill_ms_per_token=1.0, decode_ms_per_token=20.0, j_per_token=2.0)})
    unmeasured = profile(prefill_ms_per_token=None, decode_ms_per_token=None, j_per_token=None, busy_power_w=None,
                         decode_ms_per_step_by_batch={})
    est = model.predict(unmeasured, "e", 10, 5)
    assert est.basis == "prior" and est.energy_j == pytest.approx(2.0 * 15) and est.latency_ms == pytest.approx(10 + 80)
    assert CostModel().predict(unmeasured, "e", 10, 5) is None
    assert model.predict(None, "e", 10, 5).basis == "prior"


UNMEASURED = dict(prefill_ms_per_token=None, decode_ms_per_token=None, j_per_token=None, busy_power_w=None,
                  decode_ms_per_step_by_batch={})


def test_a_power_prior_predicts_like_the_measurements_it_stands_for():
    """A prior with busy power goes through the measured path's formula: the same figures, the
    same prediction, whether they come from the config or from the replica."""
    figures = dict(prefill_ms_per_token=0.5, decode_ms_per_token=10.0, busy_power_w=300.0)
    model = CostModel(priors={"e": CostPrior(**figures)})
    measured = CostModel().predict(profile(decode_ms_per_step_by_batch={}, **figures), "e", 100, 11)
    prior = model.predict(profile(**UNMEASURED), "e", 100, 11)
    assert prior.basis == "prior" and measured.basis == "measured"
    assert prior.energy_j == pytest.approx(measured.energy_j) == pytest.approx(300.0 * (50 + 11 * 10.0) / 1000)
    assert prior.latency_ms == pytest.approx(measured.latency_ms)
    # a busy replica shares its decode steps: the prior's energy follows the batch like a measurement
    shared = model.predict(profile(running=3, **UNMEASURED), "e", 0, 10)
    assert shared.energy_j == pytest.approx(300.0 * 10.0 / 4 * 10 / 1000)


def test_power_priors_rank_experts_by_the_shape_of_the_request():
    """A shallow wide model (fast prefill, slow decode steps) against a deep narrow one: the
    wide one is cheaper for a long prompt with a one-token answer, the deep one for a short
    prompt with a long answer. One J/token per expert cannot say both."""
    priors = {"wide": CostPrior(prefill_ms_per_token=1.0, decode_ms_per_token=30.0, busy_power_w=8.0),
              "deep": CostPrior(prefill_ms_per_token=2.0, decode_ms_per_token=20.0, busy_power_w=8.0)}
    model = CostModel(priors=priors)

    def cheaper(prompt_tokens: int, output_tokens: int) -> str:
        return min(priors, key=lambda e: model.predict(None, e, prompt_tokens, output_tokens).energy_j)

    assert cheaper(400, 1) == "wide"  # 3.4 J against 6.6 J
    assert cheaper(10, 128) == "deep"  # 20.6 J against 30.8 J
    assert model.predict(None, "wide", 400, 1).energy_j == pytest.approx(8.0 * (400 * 1.0 + 30.0) / 1000)
    assert model.predict(None, "deep", 0, 0).energy_j == 0.0  # nothing to compute, nothing to pay


def test_each_phase_is_priced_at_its_own_power():
    """A prompt keeps every core busy and a small decode batch does not: prefill tokens at the
    prefill power, decode steps at the decode power, busy power where a phase is unmeasured."""
    split = profile(decode_ms_per_step_by_batch={}, prefill_power_w=400.0, decode_power_w=200.0)
    est = CostModel().predict(split, "e", prompt_tokens=100, output_tokens=11)
    assert est.energy_j == pytest.approx((400.0 * 50 + 200.0 * 11 * 10.0) / 1000)
    half = CostModel().predict(profile(decode_ms_per_step_by_batch={}, prefill_power_w=400.0), "e", 100, 11)
    assert half.energy_j == pytest.approx((400.0 * 50 + 300.0 * 11 * 10.0) / 1000)  # decode at busy 300 W
    prior = CostModel(priors={"e": CostPrior(0.5, 10.0, busy_power_w=300.0, prefill_power_w=400.0,
                                             decode_power_w=200.0)})
    assert prior.predict(None, "e", 100, 11).energy_j == pytest.approx(est.energy_j)
    with pytest.raises(ValueError, match="refine busy_power_w"):
        CostPrior(0.5, 10.0, j_per_token=1.0, prefill_power_w=400.0)


def test_an_energy_per_token_prior_still_works_and_one_figure_is_required():
    legacy = CostModel(priors={"e": CostPrior(1.0, 20.0, j_per_token=0.5)})
    assert legacy.predict(None, "e", 10, 6).energy_j == pytest.approx(0.5 * 16)
    with pytest.raises(ValueError, match="busy_power_w"):
        CostPrior(1.0, 20.0)


def test_learning_corrects_bias_and_tracks_error():
    model = CostModel(alpha=0.5)
    p = profile()
    raw = model.raw(p, "e", 100, 11)
    for _ in range(30):  # the expert always uses 20 % more energy and takes half the time
        model.learn(p, "e", 100, 11, raw.energy_j * 1.2, raw.latency_ms * 0.5)
    err = model.errors["e"]
    assert err.samples == 30
    assert err.energy_correction == pytest.approx(1.2, rel=1e-3) and err.latency_correction == pytest.approx(0.5, rel=1e-3)
    assert err.energy_rel_error < 0.01 and err.latency_rel_error < 0.01
    assert model.predict(p, "e", 100, 11).energy_j == pytest.approx(raw.energy_j * 1.2, rel=1e-3)


def test_scoring_and_generating_learn_their_own_corrections():
    """Live, Score (prefill only) ran 1.0-2.0x its predicted joules while Generate was close: one
    shared correction per expert moved both."""
    model = CostModel(alpha=0.5)
    p = profile()
    gen, score = model.raw(p, "e", 100, 11), model.raw(p, "e", 400, 0)
    for _ in range(30):
        model.learn(p, "e", 100, 11, gen.energy_j, gen.latency_ms)  # Generate: predicted right
        model.learn(p, "e", 400, 0, score.energy_j * 2.0, score.latency_ms * 2.0, queue=False)  # Score: 2x
    assert model.errors["e"].energy_correction == pytest.approx(1.0)
    assert model.prefill_only_errors["e"].energy_correction == pytest.approx(2.0, rel=1e-3)
    assert model.predict(p, "e", 100, 11).energy_j == pytest.approx(gen.energy_j)
    assert model.predict(p, "e", 400, 0, queue=False).energy_j == pytest.approx(2.0 * score.energy_j, rel=1e-3)


def test_tiny_requests_cannot_bend_the_correction_of_large_ones():
    """One-token answers cost far more than their prediction (fixed per-request work); on the real
    default experts an average of ratios let a few of them inflate every prediction by ~1.7x."""
    model = CostModel(alpha=0.1)
    p = profile()
    big, tiny = model.raw(p, "e", 20, 64), model.raw(p, "e", 20, 1)
    for k in range(40):
        if k % 4 == 3:
            model.learn(p, "e", 20, 1, tiny.energy_j * 5, tiny.latency_ms * 5)
        else:
            model.learn(p, "e", 20, 64, big.energy_j, big.latency_ms)
    assert model.errors["e"].energy_correction < 1.1


def test_the_first_outcome_reports_the_raw_error():
    model = CostModel()
    p = profile()
    raw = model.raw(p, "e", 100, 11)
    model.learn(p, "e", 100, 11, raw.energy_j * 2, raw.latency_ms)
    assert model.errors["e"].energy_rel_error == pytest.approx(0.5)
    assert model.errors["e"].latency_rel_error == pytest.approx(0.0)
    assert dataclasses.asdict(model.errors["e"])["samples"] == 1


def test_outcomes_of_prior_based_predictions_do_not_bend_measured_ones():
    model = CostModel(priors={"e": CostPrior(1.0, 20.0, 2.0)})
    cold = profile(prefill_ms_per_token=None, decode_ms_per_token=None, j_per_token=None, busy_power_w=None,
                   decode_ms_per_step_by_batch={})
    raw = model.raw(cold, "e", 10, 5)
    model.learn(cold, "e", 10, 5, raw.energy_j / 10, raw.latency_ms)  # the prior was 10x too high
    err = model.errors["e"]
    assert err.samples == 1 and err.learned == 0 and err.energy_correction == 1.0
    assert err.energy_rel_error == pytest.approx(9.0)  # still reported
    assert model.predict(profile(), "e", 10, 5) == model.raw(profile(), "e", 10, 5)


def test_score_prices_its_prompt_once_and_each_choice_token_as_a_decode_step():
    """The engine runs a Score's prompt once, then every choice token with the output layer: the
    prompt at the prefill rate, the choices at the batch-1 decode step (not n_choices x prompt)."""
    model, p = CostModel(), profile()
    est = model.raw(p, "e", 100, 0, queue=False, scored_tokens=12)
    prefill_ms, scored_ms = 0.5 * 100, 10.0 * 12  # decode_ms_per_step_by_batch[1] = 10 ms
    assert est.latency_ms == pytest.approx(prefill_ms + scored_ms)
    assert est.energy_j == pytest.approx(300.0 * (prefill_ms + scored_ms) / 1000.0)
    assert model.raw(p, "e", 100, 0, queue=False).energy_j == pytest.approx(300.0 * prefill_ms / 1000.0)


def test_score_ranks_experts_by_the_shape_of_the_request():
    """Measured live on the default experts: a model with a huge output layer (cloud: cheap
    prompt tokens, dear scored tokens) is the dearer one on a short question with long choices and
    the cheaper one on a long few-shot prompt with one-word choices."""
    model = CostModel(priors={
        "edge": CostPrior(prefill_ms_per_token=4.0, decode_ms_per_token=29.0, busy_power_w=5.0),
        "cloud": CostPrior(prefill_ms_per_token=2.9, decode_ms_per_token=37.2, busy_power_w=5.0),
    })

    def joules(expert, prompt, scored):
        return model.predict(None, expert, prompt, 0, queue=False, scored_tokens=scored).energy_j

    assert joules("cloud", 30, 20) > joules("edge", 30, 20)      # 0-shot question, four sentence-long choices
    assert joules("cloud", 600, 8) < joules("edge", 600, 8)      # 5-shot prompt, four two-token choices


def test_score_learns_against_the_tokens_it_ran():
    """A Score outcome matching the two-rate prediction leaves the correction at 1."""
    model, p = CostModel(alpha=0.5), profile()
    est = model.raw(p, "e", 80, 0, queue=False, scored_tokens=9)
    for _ in range(5):
        model.learn(p, "e", 80, 0, est.energy_j, est.latency_ms, queue=False, scored_tokens=9)
    assert model.prefill_only_errors["e"].energy_correction == pytest.approx(1.0)
    assert model.predict(p, "e", 80, 0, queue=False, scored_tokens=9).energy_j == pytest.approx(est.energy_j)
