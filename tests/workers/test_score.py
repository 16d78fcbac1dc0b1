"""Scoring on the engines and through the engine loop: correct log-probs, metered energy, no race."""

from __future__ import annotations

import threading

import pytest
import torch

from tests.workers.engine_helpers import TV_MEDIANS, exit_engine, make_engine
from wattserve.devices import parse_device_spec
from wattserve.errors import InvalidRequest
from wattserve.specs import ExpertSpec
from wattserve.types import GenerateCall, SamplingParams, ScoreCall
from workers.devices import open_device
from workers.engines.base import PreparedScore
from workers.engines.synthetic import SyntheticEngine, fake_logprob
from workers.engines.torch_engine import TorchEngine
from workers.loop import EngineLoop


@pytest.fixture(scope="module")
def engine(tiny_llama):
    spec = ExpertSpec(name="t", model={"kind": "local", "path": str(tiny_llama)}, engine={"kind": "torch", "threads": 1},
                      max_batch=4, max_model_len=128)
    return TorchEngine(tiny_llama, spec)


def test_torch_score_equals_the_models_own_log_probs(engine):
    call = ScoreCall("s1", "The capital of France is", (" Paris.", " energy in joules"))
    prepared = engine.validate_score(call, 0.0)
    out = engine.score(prepared)
    for ids, got in zip(prepared.choice_ids, out.logprobs, strict=True):
        full = prepared.prompt_ids + ids
        with torch.no_grad():
            logits = engine.model(input_ids=torch.tensor([full])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        want = sum(float(lp[len(prepared.prompt_ids) - 1 + k, t]) for k, t in enumerate(ids))
        assert got == pytest.approx(want, abs=1e-4)
    n = len(prepared.prompt_ids)
    assert out.work.prefill_tokens == n + sum(len(c) - 1 for c in prepared.choice_ids)  # prompt once
    assert out.timings.prefill_tokens == n and 0 < out.timings.scored_s < out.timings.prefill_s
    with pytest.raises(InvalidRequest, match="at least one non-empty choice"):
        engine.validate_score(ScoreCall("s2", "x", ()), 0.0)
    with pytest.raises(InvalidRequest, match="exceeds"):
        engine.validate_score(ScoreCall("s3", "word " * 200, ("a",)), 0.0)


def _score_each_choice_in_full(model, prompt, choices) -> list[float]:
    """The reference: one plain forward over prompt + choice per choice (the engine's old Score)."""
    want = []
    for ids in choices:
        with torch.no_grad():
            logits = model(input_ids=torch.tensor([prompt + ids])).logits[0].float()
        lp = torch.log_softmax(logits, -1)
        want.append(sum(float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(ids)))
    return want


# one-token choices among longer ones, a repeated one, and more multi-token choices than max_batch
CHOICES = ([7], [40, 41, 42, 43, 44], [9], [50, 51], [60, 61, 62], [7], [70, 71, 72, 73, 74, 75, 76, 77, 78, 79, 80])


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2", "qwen3"])
def test_prompt_once_equals_a_full_forward_per_choice(tiny_model_dirs, family):
    """Gemma's sliding window (8) is crossed by the prompt and by the longest choice."""
    eng = make_engine(tiny_model_dirs[family], max_batch=2)
    prompt = eng.tokenizer("Energy is measured in joules and power in watts. The capital of France is").input_ids
    assert len(prompt) > 8
    out = eng.score(PreparedScore(ScoreCall("s", "p", ("c",) * len(CHOICES)), prompt, [list(c) for c in CHOICES], 0.0))
    assert out.logprobs == pytest.approx(_score_each_choice_in_full(eng.model, prompt, CHOICES), abs=1e-4)
    assert out.logprobs[0] == out.logprobs[5]
    assert out.work.prefill_tokens == len(prompt) + sum(len(c) - 1 for c in CHOICES)
    assert out.timings.prefill_tokens == len(prompt)
    assert eng.cache.used == 0 and all(s is None for s in eng.slots)  # the generation slots were not used


def test_only_one_token_choices_need_no_forward_after_the_prompt(engine):
    prompt = engine.tokenizer("The capital of France is").input_ids
    out = engine.score(PreparedScore(ScoreCall("s", "p", ("a", "b")), prompt, [[5], [6]], 0.0))
    assert out.logprobs == pytest.approx(_score_each_choice_in_full(engine.model, prompt, [[5], [6]]), abs=1e-4)
    assert out.work.prefill_tokens == len(prompt)


def test_early_exit_experts_score_with_the_full_model(deep_llama):
    """Exits are for decode: an expert with exits on scores exactly as the same model without."""
    plain, exits = make_engine(deep_llama), exit_engine(deep_llama, thresholds=TV_MEDIANS, default_compute_budget=0.3)
    call = ScoreCall("s", "The capital of France is", (" Paris.", " energy in joules", "!"))
    want = plain.score(plain.validate_score(call, 0.0)).logprobs
    prepared = exits.validate_score(call, 0.0)
    assert exits.score(prepared).logprobs == pytest.approx(want, abs=1e-5)
    assert want == pytest.approx(_score_each_choice_in_full(plain.model, prepared.prompt_ids, prepared.choice_ids), abs=1e-4)


def test_synthetic_score_is_deterministic():
    eng = SyntheticEngine(ExpertSpec(name="syn", engine={"kind": "synthetic"}))
    call = ScoreCall("s", "a b c", ("x", "y z"))
    out = eng.score(eng.validate_score(call, 0.0))
    assert out.logprobs == [fake_logprob("syn", "a b c", "x", 1), fake_logprob("syn", "a b c", "y z", 2)]
    assert out.logprobs == eng.score(eng.validate_score(call, 0.0)).logprobs


def test_scoring_between_steps_is_metered_and_leaves_generation_alone(engine):
    dev = open_device(parse_device_spec("simulated:h100"), model_params=engine.info.params)
    loop = EngineLoop(engine, dev, max_queue=4)
    loop.start()
    try:
        done, events = threading.Event(), []

        def sink(item):
            events.extend(item)
            if item[-1].usage is not None:
                done.set()

        loop.submit(GenerateCall("g", "Energy is measured in", 20, SamplingParams(ignore_eos=True)), sink)
        results = []
        got = threading.Event()
        for i in range(3):
            loop.submit_score(ScoreCall(f"s{i}", "The capital of France is", (" Paris", " Rome")),
                              lambda r: (results.append(r), got.set() if len(results) == 3 else None))
        assert got.wait(60) and done.wait(60)
        assert all(not isinstance(r, BaseException) for r in results)
        assert all(r.energy_j > 0 and r.energy_source == "modeled:h100" and len(r.choice_logprobs) == 2 for r in results)
        assert results[0].choice_logprobs == results[1].choice_logprobs  # same input, same answer
        assert events[-1].usage.completion_tokens == 20
        snap = loop.snapshot()
        assert snap.energy.requests_j + snap.energy.idle_j == pytest.approx(snap.energy.device_j, rel=1e-9)
        assert snap.energy.requests_j == pytest.approx(sum(r.energy_j for r in results) + events[-1].usage.energy_j, rel=1e-9)
    finally:
        loop.stop()


def test_generation_reports_its_mean_token_log_prob(engine):
    """The confidence the cascade reads: mean log p of the generated tokens under the model."""
    dev = open_device(parse_device_spec("cpu"), model_params=engine.info.params)
    loop = EngineLoop(engine, dev, max_queue=4)
    loop.start()
    try:
        done, events = threading.Event(), []

        def sink(item):
            events.extend(item)
            if item[-1].usage is not None:
                done.set()

        loop.submit(GenerateCall("c", "Energy is measured in", 6, SamplingParams(ignore_eos=True)), sink)
        assert done.wait(60)
    finally:
        loop.stop()
    usage = events[-1].usage
    prompt = engine.tokenizer("Energy is measured in").input_ids
    out = [t for ev in events for t in ev.token_ids]
    with torch.no_grad():
        lp = torch.log_softmax(engine.model(input_ids=torch.tensor([prompt + out])).logits[0].float(), -1)
    want = sum(float(lp[len(prompt) - 1 + k, t]) for k, t in enumerate(out)) / len(out)
    assert usage.mean_logprob == pytest.approx(want, abs=1e-3)
