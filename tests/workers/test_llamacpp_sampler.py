"""The llama.cpp engine's sampler on plain arrays: each processor, the exact top-p window, and
the vLLM sampling extensions with the torch sampler's semantics."""

from __future__ import annotations

import numpy as np
import pytest

from wattserve.types import SamplingParams
from workers.engines.llamacpp_engine.sampler import Sampler, SamplerState, log_prob, min_p, top_p


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


def test_repetition_penalty_min_tokens_and_min_p():
    logits = np.array([2.0, 1.9, -1.0, 0.5], dtype=np.float32)
    rep = Sampler(SamplingParams(repetition_penalty=2.0), frozenset(), 4)
    assert [rep.pick(logits) for _ in range(2)] == [0, 1]  # 0 once said is penalised below 1
    eos = Sampler(SamplingParams(min_tokens=2), frozenset({0}), 4)
    assert [eos.pick(logits) for _ in range(3)] == [1, 1, 0]  # EOS (0) barred for two tokens
    scores = min_p(np.array([2.0, 1.9, -1.0, 0.5], dtype=np.float32), SamplerState(), SamplingParams(min_p=0.2))  # p ratio to best: 1, .90, .05, .22
    assert list(np.isfinite(scores)) == [True, True, False, True]
    assert list(logits) == [2.0, 1.9, -1.0, 0.5]  # the model's row is never modified


def test_penalties_match_the_torch_sampler_prompt_and_output_alike():
    """Repetition over prompt and output, frequency per occurrence and presence once, over the
    output only: the same numbers as the torch engine's sampler (vLLM's semantics)."""
    import torch

    from workers.engines.llamacpp_engine.sampler import penalties
    from workers.engines.torch_engine.sampling import apply_penalties

    rng = np.random.default_rng(3)
    logits = rng.normal(size=12).astype(np.float32) * 2
    prompt, output = [1, 4, 4, 7], [2, 4, 2, 2, 9]
    params = SamplingParams(repetition_penalty=1.3, frequency_penalty=0.4, presence_penalty=0.25)
    ours = penalties(logits.copy(), SamplerState(generated=list(output), prompt=tuple(prompt)), params)
    theirs = apply_penalties(torch.from_numpy(logits.copy()), params, prompt, output).numpy()
    np.testing.assert_allclose(ours, theirs, rtol=1e-6, atol=1e-6)
    untouched = [i for i in range(12) if i not in set(prompt) | set(output)]
    np.testing.assert_array_equal(ours[untouched], logits[untouched])


def test_presence_penalty_changes_the_greedy_choice_and_the_prompt_counts_for_repetition():
    logits = np.array([2.0, 1.8, 0.0], dtype=np.float32)
    greedy = Sampler(SamplingParams(presence_penalty=0.5), frozenset(), 3)
    assert [greedy.pick(logits) for _ in range(3)] == [0, 1, 0]  # each said token is pushed down once
    rep = Sampler(SamplingParams(repetition_penalty=2.0), frozenset(), 3, prompt_ids=[0])
    assert rep.pick(logits) == 1  # token 0 is in the prompt: penalised before it is ever generated
