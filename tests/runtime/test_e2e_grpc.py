"""End to end on loopback: real Ray actors, the real gRPC server on a free port, a real channel."""

from __future__ import annotations

import asyncio

import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.config import parse_config
from tests.runtime.grpc_helpers import collect, request, wait_for

pytestmark = pytest.mark.timeout(300)


@pytest.fixture(scope="module")
def config(tiny_model_dirs, tmp_path_factory):
    return parse_config(
        {
            "auth": {"enabled": False},  # loopback test server: no keys
            "gateway": {"port": 0, "max_inflight": 16, "max_tokens_limit": 1000, "health_interval_s": 0.2},
            "model_cache_dir": str(tmp_path_factory.mktemp("cache")),
            "experts": [
                {
                    "name": "edge",
                    "model": {"kind": "local", "path": str(tiny_model_dirs["llama"])},
                    "engine": {"kind": "torch", "threads": 1},
                    "device": "cpu",
                    "max_batch": 4,
                    "max_queue": 2,
                    "max_model_len": 512,
                },
                {
                    "name": "cloud",
                    "model": {"kind": "local", "path": str(tiny_model_dirs["gemma3_text"])},
                    "engine": {"kind": "torch", "threads": 1},
                    "device": "simulated:h100",
                    "max_batch": 4,
                    "max_model_len": 256,
                },
                # no model: 20 ms per step, so queue tests control timing exactly
                {"name": "slow", "engine": {"kind": "synthetic", "step_ms": 20}, "max_batch": 2, "max_queue": 1},
            ],
            "tenants": [{"name": "default"}, {"name": "acme", "max_priority": "normal"}],
        },
        "test-config",
    )


async def replica_load(channel, expert):
    experts = await pb_grpc.AdminStub(channel).ListExperts(pb.ListExpertsRequest())
    info = next(e for e in experts.experts if e.name == expert)
    return sum(r.running + r.waiting for r in info.replicas)


async def test_concurrent_generate_streams_text_usage_and_energy(channel):
    stub = pb_grpc.InferenceStub(channel)
    reqs = [request(expert="edge", max_tokens=12 + i) for i in range(4)] + [
        request(expert="cloud", max_tokens=10 + i) for i in range(3)
    ]
    results = await asyncio.gather(*(collect(stub, r) for r in reqs))
    for req, (text, ids, usage) in zip(reqs, results, strict=False):
        assert usage is not None and usage.expert == req.expert
        assert usage.completion_tokens == req.max_tokens == len(ids)
        assert usage.finish_reason == "length"
        assert usage.prompt_tokens > 0 and text
        assert usage.energy_j > 0
        assert usage.energy_source == ("modeled:cpu" if req.expert == "edge" else "modeled:h100")
        assert 0 < usage.ttft_ms <= usage.total_latency_ms
        assert usage.request_id and usage.routing_policy == "least_loaded"


async def test_energy_is_conserved_end_to_end(channel):
    """Per replica: requests + idle + probe == device delta; and what the responses reported is exactly
    what the replica attributed to requests during the test."""
    stub = pb_grpc.InferenceStub(channel)
    admin = pb_grpc.AdminStub(channel)
    assert await wait_for(lambda: _idle(channel, "edge"))
    before = await _replicas(admin)
    results = await asyncio.gather(*(collect(stub, request(expert=e, max_tokens=8 + i)) for i, e in enumerate(["edge", "cloud"] * 3)))
    assert await wait_for(lambda: _idle(channel, "edge")) and await wait_for(lambda: _idle(channel, "cloud"))
    await asyncio.sleep(0.5)  # one more telemetry poll
    after = await _replicas(admin)
    for expert in ("edge", "cloud"):
        r0, r1 = before[expert], after[expert]
        reported = sum(u.energy_j for _, _, u in results if u.expert == expert)
        assert r1.requests_energy_j - r0.requests_energy_j == pytest.approx(reported, rel=1e-6)
        # the replica's start-up probe (before the test's first request) is booked apart, no tenant's
        assert r0.probe_energy_j > 0 and r1.probe_energy_j == r0.probe_energy_j
        assert r1.requests_energy_j + r1.idle_energy_j + r1.probe_energy_j == pytest.approx(r1.device_energy_j, rel=1e-9)
        assert r1.prefill_ms_per_token > 0 and r1.decode_ms_per_token > 0 and r1.j_per_token > 0
        assert r1.requests_finished - r0.requests_finished == 3


async def _replicas(admin):
    experts = await admin.ListExperts(pb.ListExpertsRequest())
    return {e.name: e.replicas[0] for e in experts.experts}


async def _idle(channel, expert):
    return await replica_load(channel, expert) == 0


async def _busy(channel, expert):
    return await replica_load(channel, expert) > 0


async def test_unpinned_requests_avoid_the_loaded_expert(channel):
    stub = pb_grpc.InferenceStub(channel)
    busy = [stub.Generate(request(prompt="a b", expert="slow", max_tokens=500), timeout=60) for _ in range(2)]
    assert await wait_for(lambda: _load_is(channel, "slow", 2))  # its whole batch
    for _ in range(4):
        _, _, usage = await collect(stub, request(max_tokens=4))
        assert usage.expert in {"edge", "cloud"}
        assert usage.routing_reason.startswith(f"least loaded: {usage.expert}/0")
    for c in busy:
        c.cancel()
    assert await wait_for(lambda: _idle(channel, "slow"))


async def test_cancel_mid_stream_shrinks_the_batch(channel):
    stub = pb_grpc.InferenceStub(channel)
    call = stub.Generate(request(prompt="a b", expert="slow", max_tokens=500), timeout=60)
    got = 0
    async for msg in call:
        got += msg.HasField("chunk")
        if got == 3:
            break
    assert await wait_for(lambda: _busy(channel, "slow"))  # telemetry shows it running
    call.cancel()
    assert await wait_for(lambda: _idle(channel, "slow")), "the cancelled request kept its slot"


async def test_deadline_expiry_aborts_work_on_the_expert(channel):
    stub = pb_grpc.InferenceStub(channel)
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, request(prompt="a b", expert="slow", max_tokens=500), timeout=0.5)
    assert err.value.code() == grpc.StatusCode.DEADLINE_EXCEEDED
    assert await wait_for(lambda: _idle(channel, "slow")), "the expired request kept its slot"


@pytest.mark.parametrize(
    "req, fragment",
    [
        (request(prompt=""), "prompt is empty"),
        (request(max_tokens=-1), "max_tokens must be positive"),
        (request(max_tokens=1001), "above this server's limit of 1000"),
        (request(expert="edge", max_tokens=600), "allows at most 512 tokens"),
        (request(expert="nope"), "unknown expert 'nope'; known experts: edge, cloud, slow"),
        (request(tenant="mallory"), "unknown tenant 'mallory'"),
        (request(energy_budget_j=-1.0), "energy_budget_j must be a positive number"),
        (request(latency_budget_ms=0.0), "latency_budget_ms must be a positive number"),
        (request(priority=7), "priority 7"),
        (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(temperature=-1)), "temperature must be >= 0"),
        (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_p=1.5)), "top_p must be in"),
        (pb.GenerateRequest(prompt="x", sampling=pb.SamplingParams(top_k=-2)), "top_k must be >= 0"),
    ],
)
async def test_bad_input_is_invalid_argument_and_loses_nothing(channel, req, fragment):
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(pb_grpc.InferenceStub(channel), req)
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert fragment in err.value.details()
    assert await replica_load(channel, "edge") == 0


async def test_full_queues_answer_resource_exhausted_with_retry_hint(channel):
    stub = pb_grpc.InferenceStub(channel)
    # "slow" holds max_batch 2 + max_queue 1; the 4th concurrent request is refused
    calls = [stub.Generate(request(prompt="a b c", expert="slow", max_tokens=500), timeout=60) for _ in range(3)]
    assert await wait_for(lambda: _load_is(channel, "slow", 3))
    with pytest.raises(grpc.aio.AioRpcError) as err:
        await collect(stub, request(prompt="a b c", expert="slow", max_tokens=5))
    assert err.value.code() == grpc.StatusCode.RESOURCE_EXHAUSTED
    assert "is full" in err.value.details()
    assert int(dict(err.value.trailing_metadata())["retry-after-ms"]) > 0
    for c in calls:
        c.cancel()
    assert await wait_for(lambda: _idle(channel, "slow"))
    _, _, usage = await collect(stub, request(prompt="a b c", expert="slow", max_tokens=3))
    assert usage.completion_tokens == 3  # every slot came back


async def _load_is(channel, expert, n):
    return await replica_load(channel, expert) == n


async def test_admin_status_and_health(channel, server):
    await collect(pb_grpc.InferenceStub(channel), request(expert="slow", max_tokens=2))  # alone, it needs one request
    status = await pb_grpc.AdminStub(channel).GetStatus(pb.GetStatusRequest())
    assert status.healthy_replicas == status.total_replicas == 3
    assert set(status.energy_sources) == {"modeled:cpu", "modeled:h100"}
    assert status.requests_total > 0
    health = await health_pb2_grpc.HealthStub(channel).Check(health_pb2.HealthCheckRequest(service="wattserve.v1.Inference"))
    assert health.status == health_pb2.HealthCheckResponse.SERVING
    experts = await pb_grpc.AdminStub(channel).ListExperts(pb.ListExpertsRequest())
    assert [e.name for e in experts.experts] == ["edge", "cloud", "slow"]
    assert experts.experts[0].params > 0 and experts.experts[0].energy_source == "modeled:cpu"


async def test_reflection_lists_our_services(channel):
    from grpc_reflection.v1alpha import reflection_pb2, reflection_pb2_grpc

    stub = reflection_pb2_grpc.ServerReflectionStub(channel)

    async def one():
        yield reflection_pb2.ServerReflectionRequest(list_services="")

    async for resp in stub.ServerReflectionInfo(one()):
        names = {s.name for s in resp.list_services_response.service}
        assert {"wattserve.v1.Inference", "wattserve.v1.Admin", "grpc.health.v1.Health"} <= names
        break


async def test_a_replica_added_at_run_time_serves_and_a_removed_one_drains(channel, server):
    """The seam capacity scaling uses: a new Ray replica joins the router's candidates; a removed
    one takes no new calls, finishes the stream it holds, and leaves."""
    from runtime.cluster import RayReplicaClient

    stub = pb_grpc.InferenceStub(channel)
    replica = server.pool.add("slow")
    await replica.actor.ready.remote()
    server.gateway.replicas.add(RayReplicaClient(replica))
    await server.gateway.admin.refresh()
    experts = {e.name: e for e in (await pb_grpc.AdminStub(channel).ListExperts(pb.ListExpertsRequest())).experts}
    assert [(r.replica, r.healthy) for r in experts["slow"].replicas] == [(0, True), (1, True)]
    # four at once need both replicas (each holds a batch of 2): the new one serves
    results = await asyncio.gather(*(collect(stub, request(prompt="a b", expert="slow", max_tokens=5)) for _ in range(4)))
    assert {usage.replica for _, _, usage in results} == {0, 1}
    # remove it while it streams: the stream finishes there, then the replica is gone
    call = stub.Generate(request(prompt="a b", expert="slow", max_tokens=40), timeout=60)
    assert await wait_for(lambda: _load_is(channel, "slow", 1))
    holder = next(r for r in server.gateway.admin.replicas() if r.expert == "slow" and r.inflight)
    removal = asyncio.create_task(server.gateway.replicas.remove(("slow", holder.index)))
    usage = [m.usage async for m in call if m.HasField("usage")][0]
    assert usage.completion_tokens == 40 and usage.replica == holder.index
    await removal
    server.pool.remove("slow", holder.index)
    if holder.index == 0:  # keep the module's replica numbering for the tests after this one
        await server.gateway.replicas.remove(("slow", 1))
        server.gateway.replicas.add(RayReplicaClient(server.pool.replicas["slow"][0]))
    await server.gateway.admin.refresh()
    experts = {e.name: e for e in (await pb_grpc.AdminStub(channel).ListExperts(pb.ListExpertsRequest())).experts}
    assert len(experts["slow"].replicas) == 1 and experts["slow"].replicas[0].healthy
    _, _, usage = await collect(stub, request(prompt="a b", expert="slow", max_tokens=3))
    assert usage.completion_tokens == 3
