"""The torch engine's sampler against vLLM's semantics, on hand-made logits."""

from __future__ import annotations

import torch

from wattserve.types import SamplingParams
from workers.engines.torch_engine.sampling import StopChecker, apply_penalties, sample


def test_repetition_penalty_divides_positive_and_multiplies_negative_logits_of_seen_tokens():
    logits = torch.tensor([2.0, -1.0, 3.0, 0.5, -2.0])
    out = apply_penalties(logits, SamplingParams(repetition_penalty=2.0), prompt_ids=[0], output_ids=[1, 1])
    # token 0 (prompt) and 1 (output) are penalised; 2, 3, 4 never appeared
    assert out.tolist() == [1.0, -2.0, 3.0, 0.5, -2.0]
    assert logits.tolist() == [2.0, -1.0, 3.0, 0.5, -2.0]  # the caller's tensor is untouched


def test_frequency_and_presence_penalties_count_output_tokens_only():
    logits = torch.zeros(4)
    params = SamplingParams(frequency_penalty=0.5, presence_penalty=0.25)
    out = apply_penalties(logits, params, prompt_ids=[3, 3, 3], output_ids=[1, 1, 2])
    assert out.tolist() == [0.0, -1.25, -0.75, 0.0]


def test_neutral_values_change_nothing():
    logits = torch.tensor([0.3, 1.2, -0.7])
    assert apply_penalties(logits, SamplingParams(), [0, 1], [2]) is logits
    assert sample(logits, SamplingParams(repetition_penalty=1.0), None, prompt_ids=[1], output_ids=[1]) == 1


def test_penalties_apply_to_greedy_decoding():
    logits = torch.tensor([1.0, 1.1, 0.0])
    assert sample(logits, SamplingParams(), None, output_ids=[1]) == 1
    assert sample(logits, SamplingParams(repetition_penalty=1.5), None, output_ids=[1]) == 0
    assert sample(logits, SamplingParams(presence_penalty=0.2), None, output_ids=[1]) == 0


def test_banned_ids_are_never_drawn():
    logits = torch.tensor([5.0, 0.0, 0.0])
    assert sample(logits, SamplingParams(), None, banned_ids=frozenset({0})) != 0
    gen = torch.Generator().manual_seed(0)
    draws = {sample(logits, SamplingParams(temperature=1.0, seed=0), gen, banned_ids=[0]) for _ in range(50)}
    assert 0 not in draws


def test_min_p_keeps_only_tokens_near_the_top_probability():
    # probabilities 0.5, 0.3, 0.15, 0.05: min_p 0.2 keeps those >= 0.1 (tokens 0, 1, 2)
    logits = torch.tensor([0.5, 0.3, 0.15, 0.05]).log()
    params = SamplingParams(temperature=1.0, min_p=0.2, seed=1)
    gen = torch.Generator().manual_seed(1)
    draws = [sample(logits, params, gen) for _ in range(400)]
    assert set(draws) == {0, 1, 2}
    gen = torch.Generator().manual_seed(1)
    assert set(sample(logits, SamplingParams(temperature=1.0, min_p=0.7), gen) for _ in range(100)) == {0}


def test_stop_strings_are_not_checked_before_min_tokens():
    stops = StopChecker(("END",))
    assert stops.push("xEND", check=False) == ("xEND", False)
    assert stops.push("yEN", check=True) == ("y", False)  # "EN" held back: it may begin a stop
    assert stops.push("D", check=True) == ("", True)
