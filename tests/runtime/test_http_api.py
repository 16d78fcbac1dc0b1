"""The OpenAI-compatible HTTP API and /metrics, end to end on loopback: real Ray actors, the real
server (gRPC and HTTP on free ports), the official ``openai`` client and raw HTTP."""

from __future__ import annotations

import asyncio
import json
import re
import shutil
from pathlib import Path

import aiohttp
import grpc
import openai
import pytest
from prometheus_client.parser import text_string_to_metric_families
from transformers import AutoTokenizer

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.config import parse_config
from tests.runtime.grpc_helpers import collect
from wattserve.types import ChatMessage
from workers.engines.chat import render_plain

pytestmark = pytest.mark.timeout(300)

# A ChatML-style template like SmolLM2's, set on a copy of the tiny model's tokenizer.
CHAT_TEMPLATE = (
    "{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
    "{% if add_generation_prompt %}<s>assistant\n{% endif %}"
)


@pytest.fixture(scope="module")
def chat_model_dir(tiny_llama, tmp_path_factory):
    out = tmp_path_factory.mktemp("chat-llama")
    shutil.copytree(tiny_llama, out, dirs_exist_ok=True)
    tok = AutoTokenizer.from_pretrained(out)
    tok.chat_template = CHAT_TEMPLATE
    tok.save_pretrained(out)
    return out


@pytest.fixture(scope="module")
def config(chat_model_dir, tmp_path_factory):
    config = parse_config(
        {
            "auth": {"enabled": False},  # loopback test server: no keys
            "gateway": {"port": 0, "max_inflight": 16, "max_tokens_limit": 1000, "health_interval_s": 0.2},
            "http": {"port": 0},
            "model_cache_dir": str(tmp_path_factory.mktemp("cache")),
            "experts": [
                {
                    "name": "chat",
                    "model": {"kind": "local", "path": str(chat_model_dir)},
                    "engine": {"kind": "torch", "threads": 1},
                    "device": "simulated:h100",
                    "max_batch": 4,
                    "max_model_len": 256,
                },
                {"name": "slow", "engine": {"kind": "synthetic", "step_ms": 20}, "max_batch": 2, "max_queue": 1},
            ],
            "tenants": [{"name": "default"}, {"name": "acme", "energy_budget_j": 1000.0}],
        },
        "test-http",
    )
    return config


@pytest.fixture
def base_url(server):
    return f"http://127.0.0.1:{server.http_port}"


@pytest.fixture
def client(base_url):
    return openai.AsyncOpenAI(base_url=base_url + "/v1", api_key="unused", max_retries=0, timeout=60)


async def test_completion_with_the_openai_client(client):
    resp = await client.completions.create(
        model="chat", prompt="The capital of France is", max_tokens=8, temperature=0,
        extra_body={"ignore_eos": True}, extra_headers={"x-energy-budget-j": "100"},
    )
    assert resp.object == "text_completion" and resp.model == "chat"
    assert resp.choices[0].finish_reason == "length" and resp.choices[0].text
    assert resp.usage.completion_tokens == 8 and resp.usage.prompt_tokens > 0
    assert resp.usage.total_tokens == resp.usage.prompt_tokens + 8
    extra = resp.usage.model_extra
    assert extra["energy_joules"] > 0 and extra["energy_source"] == "modeled:h100"
    assert resp.model_extra["wattserve"]["expert"] == "chat"


async def test_streamed_completion_matches_the_unstreamed_one(client):
    kwargs = dict(model="chat", prompt="Energy is measured in", max_tokens=10, temperature=0, extra_body={"ignore_eos": True})
    whole = await client.completions.create(**kwargs)
    stream = await client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True})
    texts, usage, finish = [], None, None
    async for chunk in stream:
        if chunk.choices:
            texts.append(chunk.choices[0].text)
            finish = chunk.choices[0].finish_reason or finish
        if chunk.usage is not None:
            usage = chunk.usage
    assert "".join(texts) == whole.choices[0].text
    assert finish == "length"
    assert usage.completion_tokens == 10 and usage.model_extra["energy_source"] == "modeled:h100"
    assert usage.model_extra["energy_joules"] > 0


async def test_chat_applies_the_experts_chat_template(client, chat_model_dir):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    resp = await client.chat.completions.create(model="chat", messages=messages, max_tokens=5, temperature=0,
                                                extra_body={"ignore_eos": True})
    tok = AutoTokenizer.from_pretrained(chat_model_dir)
    rendered = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered.endswith("<s>assistant\n")
    assert resp.usage.prompt_tokens == len(tok(rendered, add_special_tokens=False).input_ids)
    assert resp.object == "chat.completion" and resp.choices[0].message.role == "assistant"
    assert resp.usage.completion_tokens == 5

    stream = await client.chat.completions.create(model="chat", messages=messages, max_tokens=5, temperature=0,
                                                  extra_body={"ignore_eos": True}, stream=True)
    parts, roles = [], set()
    async for chunk in stream:
        delta = chunk.choices[0].delta
        roles.add(delta.role)
        parts.append(delta.content or "")
    assert "".join(parts) == resp.choices[0].message.content
    assert "assistant" in roles


async def test_grpc_chat_is_the_http_chat(client, channel):
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hello world!"}]
    http = await client.chat.completions.create(model="chat", messages=messages, max_tokens=6, temperature=0,
                                                extra_body={"ignore_eos": True})
    req = pb.GenerateRequest(messages=[pb.ChatMessage(**m) for m in messages], max_tokens=6, expert="chat",
                             sampling=pb.SamplingParams(ignore_eos=True))
    stub = pb_grpc.InferenceStub(channel)
    text, _, usage = await collect(stub, req)
    assert text == http.choices[0].message.content
    assert usage.prompt_tokens == http.usage.prompt_tokens and usage.completion_tokens == 6
    # the same words as a plain prompt are a different (untemplated) prompt
    _, _, plain = await collect(stub, pb.GenerateRequest(prompt="Hello world!", max_tokens=1, expert="chat"))
    assert plain.prompt_tokens < usage.prompt_tokens


@pytest.mark.parametrize(("req", "complaint"), [
    (pb.GenerateRequest(messages=[pb.ChatMessage(role="robot", content="hi")], expert="chat"), "messages[0].role 'robot'"),
    (pb.GenerateRequest(prompt="hi", messages=[pb.ChatMessage(role="user", content="hi")]), "either a prompt or chat messages"),
])
async def test_grpc_chat_refuses_bad_messages_before_any_replica(channel, req, complaint):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(pb_grpc.InferenceStub(channel), req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert complaint in err.value.details()


async def test_chat_without_a_template_uses_the_plain_format(client):
    """The synthetic expert has no tokenizer: it counts the words of the documented format."""
    messages = [{"role": "user", "content": "one two three"}]
    resp = await client.chat.completions.create(model="slow", messages=messages, max_tokens=2)
    expected = render_plain([ChatMessage("user", "one two three")])
    assert expected == "User: one two three\n\nAssistant:"
    assert resp.usage.prompt_tokens == len(expected.split())


async def test_models_lists_auto_and_every_expert(client):
    models = await client.models.list()
    assert [m.id for m in models.data] == ["auto", "chat", "slow"]
    card = await client.models.retrieve("slow")
    assert card.model_extra["wattserve"]["engine"] == "synthetic"


async def test_auto_routes_to_some_expert(client):
    resp = await client.completions.create(model="auto", prompt="a b c", max_tokens=3, temperature=0)
    assert resp.model in {"chat", "slow"}


async def test_openai_client_errors_carry_the_status(client):
    with pytest.raises(openai.NotFoundError) as err:
        await client.completions.create(model="nope", prompt="x", max_tokens=2)
    assert "unknown expert 'nope'" in err.value.message
    with pytest.raises(openai.BadRequestError) as err:
        await client.completions.create(model="chat", prompt="x", max_tokens=2, temperature=-1)
    assert "temperature must be >= 0" in err.value.message


async def _post(base_url, path, data, headers=None):
    async with aiohttp.ClientSession() as s:
        async with s.post(base_url + path, data=data, headers=headers or {"Content-Type": "application/json"}) as r:
            return r.status, await r.json(), dict(r.headers)


@pytest.mark.parametrize(
    "body, headers, status, fragment",
    [
        (b"{not json", None, 400, "not valid JSON"),
        (b"[1, 2]", None, 400, "must be a JSON object"),
        (json.dumps({"model": "ghost", "prompt": "hi"}).encode(), None, 404, "unknown expert 'ghost'"),
        (json.dumps({"model": "slow", "prompt": "hi", "bogus": 1}).encode(), None, 400, "bogus: unknown field"),
        (json.dumps({"model": "slow", "prompt": "hi", "n": 2}).encode(), None, 400, "n=2 is not supported"),
        (json.dumps({"model": "slow"}).encode(), None, 400, "prompt: required field is missing"),
        (json.dumps({"model": "slow", "prompt": ""}).encode(), None, 400, "prompt is empty"),
        (json.dumps({"model": "slow", "prompt": "hi", "max_tokens": "many"}).encode(), None, 400, "max_tokens"),
        (json.dumps({"model": "slow", "prompt": "hi"}).encode(), {"x-energy-budget-j": "lots"}, 400, "x-energy-budget-j: 'lots' is not a number"),
        (json.dumps({"model": "slow", "prompt": "hi"}).encode(), {"x-latency-budget-ms": "-5"}, 400, "latency_budget_ms must be a positive number"),
        (json.dumps({"model": "slow", "prompt": "hi"}).encode(), {"x-priority": "urgent"}, 400, "x-priority: 'urgent' is not one of"),
        (json.dumps({"model": "slow", "prompt": "hi"}).encode(), {"x-deadline-ms": "0"}, 400, "deadline_ms must be a positive number"),
        (json.dumps({"model": "slow", "prompt": "hi", "deadline_ms": "soon"}).encode(), None, 400, "deadline_ms"),
    ],
)
async def test_bad_requests_get_openai_error_bodies(base_url, body, headers, status, fragment):
    got_status, got, _ = await _post(base_url, "/v1/completions", body, {"Content-Type": "application/json", **(headers or {})})
    assert got_status == status
    err = got["error"]
    assert fragment in err["message"]
    assert set(err) == {"message", "type", "param", "code"}
    assert err["type"] == ("not_found_error" if status == 404 else "invalid_request_error")


async def test_a_deadline_stops_the_answer_and_frees_the_slot(base_url, client):
    # the synthetic expert takes 20 ms a token: 200 tokens would take 4 s
    body = {"model": "slow", "prompt": "one two", "max_tokens": 200, "ignore_eos": True}
    for _ in range(3):  # more than the expert's 2 batch slots: each must be freed
        t0 = asyncio.get_running_loop().time()
        status, got, _ = await _post(base_url, "/v1/completions", json.dumps(body).encode(),
                                     {"Content-Type": "application/json", "x-deadline-ms": "300"})
        elapsed = asyncio.get_running_loop().time() - t0
        assert status == 200 and got["choices"][0]["finish_reason"] == "deadline"
        assert 0 < got["usage"]["completion_tokens"] < 100 and elapsed < 2.0
    stream = await client.completions.create(model="slow", prompt="one two", max_tokens=200, stream=True,
                                             extra_body={"ignore_eos": True, "deadline_ms": 300})
    reasons = [c.choices[0].finish_reason async for c in stream if c.choices]
    assert reasons[-1] == "deadline"
    whole = await client.completions.create(model="slow", prompt="one two", max_tokens=3)
    assert whole.choices[0].finish_reason == "length"


async def test_unknown_path_and_method_are_openai_shaped(base_url):
    async with aiohttp.ClientSession() as s:
        async with s.get(base_url + "/v1/nothing") as r:
            assert r.status == 404 and "this server answers POST /v1/completions" in (await r.json())["error"]["message"]
        async with s.post(base_url + "/v1/embeddings", json={"input": "a"}) as r:
            assert r.status == 404 and "POST /v1/chat/completions" in (await r.json())["error"]["message"]
    # an OpenAI client whose base_url lacks /v1 is told so
    bare = openai.AsyncOpenAI(base_url=base_url, api_key="unused", max_retries=0)
    with pytest.raises(openai.NotFoundError, match=r"did you mean /v1/chat/completions\?"):
        await bare.chat.completions.create(model="slow", messages=[{"role": "user", "content": "a"}], max_tokens=2)
    async with aiohttp.ClientSession() as s:
        async with s.get(base_url + "/v1/completions") as r:
            assert r.status == 405 and "error" in await r.json()


async def test_full_queue_is_429_with_retry_after(base_url, server):
    # "slow" holds max_batch 2 + max_queue 1; the 4th concurrent request is refused
    async with aiohttp.ClientSession() as s:
        body = {"model": "slow", "prompt": "a b", "max_tokens": 400, "stream": True}
        held = [asyncio.create_task(s.post(base_url + "/v1/completions", json=body)) for _ in range(3)]
        assert await _wait(lambda: _load(server, "slow") == 3)  # two running, one queued
        status, got, headers = await _post(base_url, "/v1/completions", json.dumps({**body, "stream": False}).encode())
        assert status == 429 and got["error"]["type"] == "rate_limit_error"
        assert "is full" in got["error"]["message"]
        assert int(headers["Retry-After"]) >= 1 and int(headers["retry-after-ms"]) > 0
        for task in held:
            task.cancel()
    assert await _wait_idle(server, "slow"), "closed streams kept their slots"


async def test_client_disconnect_mid_stream_frees_the_slot(base_url, server):
    async with aiohttp.ClientSession() as s:
        r = await s.post(base_url + "/v1/completions", json={"model": "slow", "prompt": "a", "max_tokens": 500, "stream": True})
        for _ in range(3):
            line = await r.content.readline()
            while line == b"\n":
                line = await r.content.readline()
            assert line.startswith(b"data: {")
        assert _load(server, "slow") > 0 or await _wait(lambda: _load(server, "slow") > 0)
        r.close()
    assert await _wait_idle(server, "slow")


def _load(server, expert):
    return sum(r.inflight for r in server.gateway.admin.replicas() if r.expert == expert)


async def _wait(pred, timeout_s=20.0):
    for _ in range(int(timeout_s / 0.1)):
        if pred():
            return True
        await asyncio.sleep(0.1)
    return False


async def _wait_idle(server, expert):
    async def idle():
        await server.gateway.admin.refresh()
        return all(r.profile.queue_depth == 0 for r in server.gateway.admin.replicas() if r.expert == expert)

    for _ in range(200):
        if _load(server, expert) == 0 and await idle():
            return True
        await asyncio.sleep(0.1)
    return False


async def _scrape(base_url) -> dict:
    async with aiohttp.ClientSession() as s:
        async with s.get(base_url + "/metrics") as r:
            assert r.status == 200 and r.headers["Content-Type"].startswith("text/plain")
            text = await r.text()
    samples = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return samples


def _sum(samples, name, **labels):
    return sum(v for (n, ls), v in samples.items() if n == name and all(dict(ls).get(k) == x for k, x in labels.items()))


async def test_metrics_parse_and_move_as_requests_complete(base_url, server, client):
    before = await _scrape(base_url)
    failed_before = server.gateway.counters.failed
    await client.completions.create(model="chat", prompt="Hello", max_tokens=4, temperature=0,
                                    extra_body={"ignore_eos": True, "energy_budget_j": 1e-9, "tenant": "acme"})
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        async for _ in pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(prompt="a b", max_tokens=3, expert="slow")):
            pass
    with pytest.raises(openai.NotFoundError):
        await client.completions.create(model="ghost", prompt="x")
    await server.gateway.admin.refresh()  # replica telemetry as of now, not the last background poll
    after = await _scrape(base_url)

    def delta(name, **labels):
        return _sum(after, name, **labels) - _sum(before, name, **labels)

    assert delta("wattserve_requests_total", api="http", expert="chat", status="ok") == 1
    assert delta("wattserve_requests_total", api="grpc", expert="slow", status="ok") == 1
    assert delta("wattserve_requests_total", api="http", status="invalid_argument") == 1
    # the unknown model is a failure (refused); closing a stream after its end is none
    assert server.gateway.counters.failed == failed_before + 1
    assert delta("wattserve_time_to_first_token_seconds_count", expert="chat") == 1
    assert delta("wattserve_e2e_request_latency_seconds_count", expert="slow") == 1
    # ITL is observed between chunks: the tiny model's 4 tokens may come as one coalesced chunk,
    # the slow expert's 20 ms steps never do
    assert delta("wattserve_inter_token_latency_seconds_count", expert="slow") >= 1
    assert delta("wattserve_generation_tokens_total", expert="chat") == 4
    assert delta("wattserve_request_energy_joules_total", expert="chat", tenant="acme", energy_source="modeled:h100") > 0
    assert delta("wattserve_budget_violations_total", kind="energy", expert="chat") == 1
    assert delta("wattserve_energy_budget_use_ratio_count", expert="chat") == 1
    # telemetry series from the last poll
    assert _sum(after, "wattserve_gpu_power_watts", expert="chat", energy_source="modeled:h100") >= 0
    assert _sum(after, "wattserve_gpu_power_limit_watts", expert="chat") > 0
    assert _sum(after, "wattserve_replica_healthy") == 2
    assert ("wattserve_gateway_max_inflight_requests", ()) in after
    assert _sum(after, "wattserve_replica_energy_joules_total", expert="chat", part="requests") > 0


async def test_power_state_is_exported_when_the_governor_fills_it(base_url, server, client):
    await client.completions.create(model="chat", prompt="Hello", max_tokens=2, temperature=0, extra_body={
        "energy_budget_j": 1e-9, "latency_budget_ms": 1e6, "tenant": "acme"})  # every per-request series has data
    await server.gateway.admin.refresh()
    server.gateway.admin.power.budget_w = 1200.0
    server.gateway.admin.power.record_cap_event("t1", 2)
    server.gateway.admin.power.caps[("chat", 0)] = "sm_clock:1275"
    try:
        samples = await _scrape(base_url)
    finally:
        server.gateway.admin.power.budget_w = None
        server.gateway.admin.power.caps.clear()
    # every series the Grafana dashboard queries exists (requests ran in earlier tests)
    dashboard = (Path(__file__).resolve().parents[2] / "docs" / "grafana" / "wattserve.json").read_text()
    queried = set(re.findall(r"wattserve_[a-z0-9_]+", dashboard))
    exported = {name for name, _ in samples}
    assert queried <= exported, f"dashboard queries unknown series: {sorted(queried - exported)}"
    assert samples[("wattserve_power_budget_watts", ())] == 1200.0
    assert samples[("wattserve_power_cap_events_total", (("kind", "t1"),))] == 2
    assert samples[("wattserve_replica_power_cap", (("cap", "sm_clock:1275"), ("expert", "chat"), ("replica", "0")))] == 1


async def test_health(base_url):
    async with aiohttp.ClientSession() as s:
        async with s.get(base_url + "/health") as r:
            assert r.status == 200
            assert (await r.json()) == {"status": "ok", "healthy_replicas": 2, "total_replicas": 2}


async def test_oversized_body_is_413(base_url):
    body = json.dumps({"model": "slow", "prompt": "x " * 600_000}).encode()  # over the 1 MiB default
    status, got, _ = await _post(base_url, "/v1/completions", body)
    assert status == 413 and "larger than this server's limit of 1048576 bytes" in got["error"]["message"]
