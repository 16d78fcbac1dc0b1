"""An expert process that dies is restarted by Ray; its in-flight stream ends with UNAVAILABLE
(never a hang), the new process probes itself, and the gateway routes to it again once it is healthy."""

from __future__ import annotations

import os
import signal

import grpc
import pytest

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.api.server import WattserveServer
from runtime.config import parse_config
from tests.runtime.grpc_helpers import collect, wait_for

pytestmark = pytest.mark.timeout(180)


@pytest.fixture(scope="module")
async def server(ray_session):
    cfg = parse_config(
        {
            "auth": {"enabled": False},  # loopback test server: no keys
            "gateway": {"port": 0, "health_interval_s": 0.2},
            "experts": [{"name": "crashy", "engine": {"kind": "synthetic", "step_ms": 10}, "max_restarts": 2}],
        }
    )
    srv = WattserveServer(cfg, progress=lambda m: None)
    await srv.start()
    yield srv
    await srv.stop()


async def _replica(admin):
    experts = await admin.ListExperts(pb.ListExpertsRequest())
    return experts.experts[0].replicas[0]


async def test_killed_expert_fails_the_stream_then_comes_back(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        stub, admin = pb_grpc.InferenceStub(ch), pb_grpc.AdminStub(ch)
        first_pid = (await _replica(admin)).pid
        call = stub.Generate(pb.GenerateRequest(prompt="a b c", max_tokens=1000), timeout=60)
        got = 0
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _msg in call:
                got += 1
                if got == 5:
                    os.kill(first_pid, signal.SIGKILL)
        assert err.value.code() == grpc.StatusCode.UNAVAILABLE
        assert "died while serving this request" in err.value.details()

        async def healthy_again():
            r = await _replica(admin)
            return r.healthy and r.pid not in (0, first_pid)

        assert await wait_for(healthy_again, timeout_s=60), "the replica did not come back"

        async def probed_again():  # the new process starts at 0 probe joules; its own probe adds some
            return (await _replica(admin)).probe_energy_j > 0

        assert await wait_for(probed_again, timeout_s=30), "the restarted replica was not probed"
        _, _, usage = await collect(stub, pb.GenerateRequest(prompt="a b c", max_tokens=3))
        assert usage.completion_tokens == 3 and usage.expert == "crashy"
        status = await admin.GetStatus(pb.GetStatusRequest())
        assert status.requests_failed >= 1
