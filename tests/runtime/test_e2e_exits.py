"""Early exit through the whole stack: compute budgets in, exit figures and histograms out, and
a modeled device charging less for tokens that ran fewer layers."""

from __future__ import annotations

import math

import aiohttp
import grpc
import pytest
from prometheus_client.parser import text_string_to_metric_families

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.api.server import WattserveServer
from runtime.config import parse_config
from tests.runtime.grpc_helpers import collect, request

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
async def server(ray_session, tmp_path_factory):
    from tests.tiny_models import build_model

    model = build_model(tmp_path_factory.mktemp("e2e-exits") / "llama", "llama", layers=8, seed=1, layer_gain=10.0)
    config = parse_config(
        {
            "gateway": {"port": 0, "health_interval_s": 0.2},
            "http": {"port": 0},
            "auth": {"enabled": False},  # loopback test server: no keys
            "model_cache_dir": str(tmp_path_factory.mktemp("cache")),
            "experts": [
                {
                    "name": "deep",
                    "model": {"kind": "local", "path": str(model)},
                    # every request without a budget leaves at the first exit (layer 2 of 8)
                    "engine": {"kind": "torch", "threads": 1, "early_exit": {"thresholds": [math.inf] * 3}},
                    "device": "simulated:h100",
                    "max_batch": 4,
                    "max_model_len": 256,
                }
            ],
        },
        "exits-config",
    )
    srv = WattserveServer(config, progress=lambda msg: None)
    await srv.start()
    yield srv
    await srv.stop()


async def _histogram(ch) -> dict[int, int]:
    experts = await pb_grpc.AdminStub(ch).ListExperts(pb.ListExpertsRequest())
    return dict(experts.experts[0].replicas[0].exit_histogram)


async def test_budgets_reach_the_expert_and_exit_figures_come_back(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub = pb_grpc.InferenceStub(ch)
        before = await _histogram(ch)  # other tests of this module may have run first
        _, full_ids, full = await collect(stub, request(max_tokens=12, compute_budget=1.0))
        _, ids, early = await collect(stub, request(max_tokens=12))
        assert len(ids) == len(full_ids) == 12
        assert full.exit_operating_point == "full" and full.avg_exit_layer == 8 and full.layers_skipped == 0
        assert early.exit_operating_point == "inline" and early.num_layers == 8
        assert early.avg_exit_layer == pytest.approx((8 + 11 * 2) / 12)
        assert early.layers_skipped == 11 * 6 and early.compute_fraction < 0.5
        assert early.energy_saved_j > 0  # J per layer-token was measured by the first request's steps
        # Whole-request joules are not compared: a modeled device also books idle power for the
        # host's time between steps, which on this tiny model outweighs the modeled steps and
        # follows the host's load (it failed under load). That the modeled H100 charges a step's
        # layer fraction is checked in tests/workers (test_devices, test_exit_saving).
        assert early.energy_source == full.energy_source == "modeled:h100"
        assert early.energy_j > 0 and full.energy_j > 0

        experts = await pb_grpc.AdminStub(ch).ListExperts(pb.ListExpertsRequest())
        replica = experts.experts[0].replicas[0]
        assert replica.num_layers == 8 and replica.j_per_layer_token > 0
        after = dict(replica.exit_histogram)
        assert {k: after[k] - before.get(k, 0) for k in after} == {8: 11, 2: 11}

        with pytest.raises(grpc.aio.AioRpcError) as err:
            await collect(stub, request(max_tokens=4, compute_budget=1.5))
        assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT and "compute_budget" in err.value.details()


async def test_the_http_api_takes_a_compute_budget_and_reports_exits(server):
    url = f"http://127.0.0.1:{server.http_port}/v1/completions"
    body = {"model": "deep", "prompt": "hello there", "max_tokens": 6, "temperature": 0, "ignore_eos": True}
    async with aiohttp.ClientSession() as s:
        async with s.post(url, json={**body, "compute_budget": 1.0}) as r:
            assert r.status == 200
            full = await r.json()
        async with s.post(url, json=body) as r:  # no budget: the inline thresholds, first exit
            early = await r.json()
        async with s.post(url, json=body, headers={"x-compute-budget": "1"}) as r:  # the header works too
            header = await r.json()
        async with s.post(url, json={**body, "compute_budget": 0}) as r:
            assert r.status == 400 and "compute_budget" in (await r.json())["error"]["message"]
    assert full["wattserve"]["early_exit"]["operating_point"] == "full"
    assert full["wattserve"]["early_exit"]["avg_exit_layer"] == 8
    assert header["wattserve"]["early_exit"]["operating_point"] == "full"
    exits = early["wattserve"]["early_exit"]
    assert exits["operating_point"] == "inline" and exits["num_layers"] == 8
    assert exits["avg_exit_layer"] == pytest.approx((8 + 5 * 2) / 6) and exits["layers_skipped"] == 5 * 6
    assert early["usage"]["energy_source"] == "modeled:h100"
    assert early["usage"]["energy_joules"] > 0 and full["usage"]["energy_joules"] > 0  # not compared: see above


async def test_metrics_export_the_exit_histogram(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        await collect(pb_grpc.InferenceStub(ch), request(max_tokens=4))  # this test's own exits
        replica = (await pb_grpc.AdminStub(ch).ListExperts(pb.ListExpertsRequest())).experts[0].replicas[0]
    async with aiohttp.ClientSession() as s, s.get(f"http://127.0.0.1:{server.http_port}/metrics") as r:
        text = await r.text()
    exported = {int(sample.labels["exit_layer"]): sample.value
                for family in text_string_to_metric_families(text) if family.name == "wattserve_early_exit_tokens"
                for sample in family.samples if sample.name.endswith("_total")}
    assert exported and exported == {layer: float(n) for layer, n in replica.exit_histogram.items()}
    assert set(exported) <= {2, 8}  # the inline thresholds' first exit and full depth
