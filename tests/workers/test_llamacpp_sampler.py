"""The llama.cpp engine's sampler on plain arrays: each processor, the exact top-p window, and
options that the request type gains later (repetition_penalty, min_p, min_tokens)."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import pytest

from wattserve.types import SamplingParams
from workers.engines.llamacpp_engine.sampler import Sampler, SamplerState, log_prob, min_p, top_p


@dataclass(frozen=True)
class ExtendedParams(SamplingParams):
    """SamplingParams as the HTTP API extends it: the sampler must honour these fields."""

    repetition_penalty: float = 1.0
    min_p: float = 0.0
    min_tokens: int = 0


def test_greedy_is_argmax_and_log_prob_is_the_models():
    logits = np.array([0.0, 3.0, 1.0, -2.0], dtype=np.float32)
    s = Sampler(SamplingParams(), frozenset(), 4)
    assert s.pick(logits) == 1 and s.state.generated == [1]
    expected = 3.0 - np.log(np.exp(logits.astype(np.float64)).sum())
    assert log_prob(logits, 1) == pytest.approx(expected, rel=1e-6)


def test_top_p_keeps_the_smallest_set_reaching_the_mass_exactly():
    rng = np.random.default_rng(0)
    for n in (50, 5000):  # below and above the sorting window
        scores = rng.normal(size=n).astype(np.float32) * 3
        params = SamplingParams(temperature=1.0, top_p=0.9)
        kept = np.isfinite(top_p(scores.copy(), SamplerState(), params))
        probs = np.exp(scores - scores.max())
        probs /= probs.sum()
        order = np.argsort(-probs)
        before = np.cumsum(probs[order]) - probs[order]
        assert set(np.flatnonzero(kept)) == set(order[before < 0.9])


def test_seeded_draws_repeat_and_follow_the_filters():
    logits = np.log(np.array([0.5, 0.3, 0.15, 0.05], dtype=np.float32))
    params = SamplingParams(temperature=1.0, top_k=2, seed=11)
    a = [Sampler(params, frozenset(), 4).pick(logits) for _ in range(3)]
    draws = Sampler(params, frozenset(), 4)
    seq = [draws.pick(logits) for _ in range(200)]
    assert len(set(a)) == 1  # same seed, same first draw
    assert set(seq) == {0, 1}  # top-k 2 keeps the two best only
    assert 0.5 < seq.count(0) / len(seq) < 0.75  # 0.5 / 0.8 = 0.625 renormalised


def test_repetition_penalty_min_tokens_and_min_p_act_when_params_carry_them():
    logits = np.array([2.0, 1.9, -1.0, 0.5], dtype=np.float32)
    rep = Sampler(ExtendedParams(repetition_penalty=2.0), frozenset(), 4)
    assert [rep.pick(logits) for _ in range(2)] == [0, 1]  # 0 once said is penalised below 1
    eos = Sampler(ExtendedParams(min_tokens=2), frozenset({0}), 4)
    assert [eos.pick(logits) for _ in range(3)] == [1, 1, 0]  # EOS (0) barred for two tokens
    scores = min_p(np.array([2.0, 1.9, -1.0, 0.5], dtype=np.float32), SamplerState(), ExtendedParams(min_p=0.2))  # p ratio to best: 1, .90, .05, .22
    assert list(np.isfinite(scores)) == [True, True, False, True]
    assert list(logits) == [2.0, 1.9, -1.0, 0.5]  # the model's row is never modified
