"""Fixtures shared by the end-to-end tests: a module's ``config`` fixture names what to serve."""

from __future__ import annotations

import grpc
import pytest

from runtime.api.server import WattserveServer


@pytest.fixture(scope="module")
async def server(ray_session, config):
    """A real server (Ray actors, gRPC on an ephemeral loopback port) for the module's ``config``."""
    srv = WattserveServer(config, progress=lambda msg: None)
    await srv.start()
    yield srv
    await srv.stop()


@pytest.fixture
async def channel(server):
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        yield ch
