"""The torch engine in-process: continuous batching, sampling, stops, limits, aborts, deadlines."""

from __future__ import annotations

import pytest

from tests.workers.engine_helpers import make_engine, run
from wattserve.errors import InvalidRequest
from wattserve.types import FinishReason, GenerateCall, SamplingParams


@pytest.fixture(scope="module")
def engine(tiny_llama):
    return make_engine(tiny_llama)


def call(rid, prompt="The capital of France is", max_tokens=8, **sampling) -> GenerateCall:
    return GenerateCall(request_id=rid, prompt=prompt, max_tokens=max_tokens, sampling=SamplingParams(**sampling))


def test_batched_output_equals_solo_output(engine):
    prompts = ["The capital of France is", "Energy is measured in", "Hello world! How", "A small model"]
    solo = {}
    for i, p in enumerate(prompts):
        _, ids, _, _ = run(engine, [call(f"s{i}", p, max_tokens=10, ignore_eos=True)])
        solo[f"r{i}"] = ids[f"s{i}"]
    # two start together, two join while they are running (continuous batching)
    texts, ids, reasons, batches = run(
        engine,
        [call("r0", prompts[0], 10, ignore_eos=True), call("r1", prompts[1], 10, ignore_eos=True)],
        join_at={3: [call("r2", prompts[2], 10, ignore_eos=True)], 5: [call("r3", prompts[3], 10, ignore_eos=True)]},
    )
    assert ids == solo
    assert max(batches) == 4  # all four were in one step at some point
    assert all(r == FinishReason.LENGTH for r in reasons.values())
    assert engine.load() == (0, 0) and engine.cache.used == 0


def test_streamed_text_equals_full_decode(engine):
    texts, ids, _, _ = run(engine, [call("a", max_tokens=24, ignore_eos=True)])
    assert texts["a"] == engine.tokenizer.decode(ids["a"], skip_special_tokens=True)
    assert len(ids["a"]) == 24


def test_stop_string_truncates_and_finishes(engine):
    _, ids, _, _ = run(engine, [call("free", max_tokens=20, ignore_eos=True)])
    full = engine.tokenizer.decode(ids["free"], skip_special_tokens=True)
    stop = full[len(full) // 2 : len(full) // 2 + 2]
    assert stop.strip(), "the tiny model must produce some text"
    texts, _, reasons, _ = run(engine, [call("stopped", max_tokens=20, ignore_eos=True, stop=(stop,))])
    assert reasons["stopped"] == FinishReason.STOP
    assert texts["stopped"] == full[: full.index(stop)]


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(engine):
    a = run(engine, [call("a", max_tokens=12, temperature=1.5, seed=3, ignore_eos=True)])[1]["a"]
    b = run(engine, [call("b", max_tokens=12, temperature=1.5, seed=3, ignore_eos=True)])[1]["b"]
    c = run(engine, [call("c", max_tokens=12, temperature=1.5, seed=4, ignore_eos=True)])[1]["c"]
    greedy = run(engine, [call("g", max_tokens=12, ignore_eos=True)])[1]["g"]
    topk1 = run(engine, [call("k", max_tokens=12, temperature=0.8, top_k=1, seed=9, ignore_eos=True)])[1]["k"]
    assert a == b and a != c
    assert topk1 == greedy


def test_abort_frees_the_slot_at_once(engine):
    for c in (call("x", max_tokens=50, ignore_eos=True), call("y", max_tokens=50, ignore_eos=True)):
        engine.add(engine.validate(c, 0.0))
    engine.step(0.0)
    assert engine.load() == (2, 0) and engine.cache.used == 2
    out = engine.abort("x")
    assert out.finish_reason == FinishReason.ABORT and out.completion_tokens == 1
    assert engine.load() == (1, 0) and engine.cache.used == 1
    assert engine.abort("x") is None  # idempotent
    res = engine.step(1.0)
    assert [o.request_id for o in res.outputs] == ["y"]
    engine.abort("y")
    assert not engine.has_work() and engine.cache.used == 0


def test_deadline_ends_request_inside_the_engine(engine):
    prepared = engine.validate(call("d", max_tokens=50, ignore_eos=True), 0.0)
    prepared.deadline_s = 2.5
    engine.add(prepared)
    reasons = {}
    for t in range(10):
        for out in engine.step(float(t)).outputs:
            if out.finish_reason:
                reasons[out.request_id] = (out.finish_reason, out.completion_tokens)
        if not engine.has_work():
            break
    assert reasons["d"] == (FinishReason.DEADLINE, 3)
    assert engine.cache.used == 0


def test_max_batch_queues_the_rest(tiny_llama):
    eng = make_engine(tiny_llama, max_batch=2)
    texts, _, reasons, batches = run(eng, [call(f"q{i}", max_tokens=3, ignore_eos=True) for i in range(5)])
    assert max(batches) == 2 and len(reasons) == 5


@pytest.mark.parametrize(
    "bad, match",
    [
        (call("e", prompt=""), "empty"),
        (call("l", max_tokens=200), "at most 128 tokens"),
    ],
)
def test_invalid_requests_are_rejected_before_queueing(engine, bad, match):
    with pytest.raises(InvalidRequest, match=match):
        engine.validate(bad, 0.0)
    assert not engine.has_work()


def test_eos_finishes_with_stop(engine, monkeypatch):
    eos = min(engine.eos_ids)
    real = engine.runner.logits

    def eos_wins(h):
        out = real(h)
        out[:, eos] = out.max() + 10.0
        return out

    monkeypatch.setattr(engine.runner, "logits", eos_wins)
    texts, ids, reasons, _ = run(engine, [call("eos", max_tokens=10)])
    assert reasons["eos"] == FinishReason.STOP and ids["eos"] == [eos] and texts["eos"] == ""


def test_a_plain_format_chat_stops_at_the_next_turn(engine):
    # the tiny tokenizer has no chat template: the conversation is rendered as "Role: text" turns
    from wattserve.types import ChatMessage
    from workers.engines.chat import TURN_STOPS

    chat = GenerateCall("c", "", 4, SamplingParams(stop=("END",)), messages=(ChatMessage("user", "hi"),))
    prepared = engine.validate(chat, 0.0)
    assert prepared.call.sampling.stop == ("END", "\nSystem:", "\nUser:", "\nAssistant:") == ("END", *TURN_STOPS)
    load_test = GenerateCall("c", "", 4, SamplingParams(ignore_eos=True), messages=(ChatMessage("user", "hi"),))
    assert engine.validate(load_test, 0.0).call.sampling.stop == ()  # asked for exactly max_tokens
    assert engine.validate(call("p"), 0.0).call.sampling.stop == ()  # a completion is left alone


def test_min_tokens_holds_eos_back_and_penalties_change_greedy_output(engine, monkeypatch):
    eos = min(engine.eos_ids)
    real = engine.runner.logits

    def eos_wins(h):
        out = real(h)
        out[:, eos] = out.max() + 10.0
        return out

    monkeypatch.setattr(engine.runner, "logits", eos_wins)
    _, ids, reasons, _ = run(engine, [call("m", max_tokens=10, min_tokens=3)])
    assert reasons["m"] == FinishReason.STOP and len(ids["m"]) == 4 and ids["m"][-1] == eos
    assert eos not in ids["m"][:3]
    monkeypatch.undo()
    greedy = run(engine, [call("g", max_tokens=16, ignore_eos=True)])[1]["g"]
    neutral = run(engine, [call("n", max_tokens=16, ignore_eos=True, repetition_penalty=1.0)])[1]["n"]
    penalised = run(engine, [call("p", max_tokens=16, ignore_eos=True, frequency_penalty=2.0)])[1]["p"]
    assert neutral == greedy
    assert len(set(greedy)) < len(greedy), "the tiny model repeats itself greedily"
    assert penalised != greedy
