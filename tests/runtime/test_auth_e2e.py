"""Authentication end to end on loopback: the auth matrix over gRPC and HTTP (no key, wrong key,
client key, operator key), tenants bound to keys, operator names in the budget log, metadata
limits, TLS and mutual TLS round trips, and no secret in any log line."""

from __future__ import annotations

import logging
import os
import ssl

import aiohttp
import grpc
import pytest
from grpc_health.v1 import health_pb2, health_pb2_grpc

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.api.server import WattserveServer
from runtime.cli.connect import open_aio_channel
from runtime.config import parse_config
from runtime.security.keys import key_line
from runtime.security.tls import ClientTls
from tests.tls_certs import make_pki

pytestmark = pytest.mark.timeout(300)

ENV = "WATTSERVE_TEST_AUTH_KEYS"
KEYS = {
    "acme": "ws-acme-client-key-0123456789abcdef",  # in the keys file as a digest
    "beta": "ws-beta-client-key-fedcba9876543210",  # in the environment, raw
    "ops": "ws-operator-key-00112233445566778899",  # in the keys file as a digest
}
WRONG = "ws-not-a-key-of-this-server-000000000"


class _Collect(logging.Handler):
    """Every log record of the process, formatted with its arguments and traceback."""

    def __init__(self) -> None:
        super().__init__(level=logging.DEBUG)
        self.lines: list[str] = []
        self.setFormatter(logging.Formatter("%(name)s %(message)s"))

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(self.format(record))


@pytest.fixture(scope="module")
def logs():
    handler, root = _Collect(), logging.getLogger()
    old = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)  # DEBUG adds only grpc event-loop chatter
    yield handler
    root.removeHandler(handler)
    root.setLevel(old)


def _expert(name: str) -> dict:
    # a simulated H100 so every request has (modeled) energy to charge
    return {"name": name, "engine": {"kind": "synthetic", "step_ms": 2, "model_params": 135_000_000},
            "device": "simulated:h100", "max_batch": 4}


@pytest.fixture(scope="module")
async def server(ray_session, tmp_path_factory, logs):
    folder = tmp_path_factory.mktemp("auth")
    (folder / "keys.txt").write_text(f"# test keys\n{key_line('client', 'acme', KEYS['acme'])}\n"
                                     f"{key_line('operator', 'ops', KEYS['ops'])}\n")
    os.environ[ENV] = f"client beta {KEYS['beta']}"
    cfg = parse_config({
        "gateway": {"port": 0, "health_interval_s": 0.2, "max_metadata_bytes": 4096},
        "http": {"port": 0},
        "auth": {"keys_file": str(folder / "keys.txt"), "keys_env": ENV},
        "experts": [_expert("guarded")],
        "tenants": [{"name": "default"}, {"name": "acme"}, {"name": "beta"}],
    })
    srv = WattserveServer(cfg, progress=lambda m: None)
    try:
        await srv.start()
        yield srv
    finally:
        await srv.stop()
        os.environ.pop(ENV, None)


def _channel(server, key: str | None = None, header: str | None = None):
    if header is not None:  # a raw authorization header, malformed on purpose
        return grpc.aio.insecure_channel(f"127.0.0.1:{server.port}"), (("authorization", header),)
    return open_aio_channel(f"127.0.0.1:{server.port}", key), ()


async def _grpc_call(server, method: str, key: str | None = None, header: str | None = None, **fields):
    """The status code of one call (OK or the error), and the error's details."""
    ch, meta = _channel(server, key, header)
    async with ch:
        inf, admin = pb_grpc.InferenceStub(ch), pb_grpc.AdminStub(ch)
        try:
            if method == "Generate":
                req = pb.GenerateRequest(prompt="a b c", max_tokens=3, **fields)
                async for _ in inf.Generate(req, metadata=meta, timeout=30):
                    pass
            elif method == "Score":
                await inf.Score(pb.ScoreRequest(prompt="q", choices=["x", "y"], **fields), metadata=meta, timeout=30)
            elif method == "GetStatus":
                await admin.GetStatus(pb.GetStatusRequest(), metadata=meta, timeout=30)
            elif method == "SetEnergyBudget":
                await admin.SetEnergyBudget(pb.SetEnergyBudgetRequest(scope="beta", energy_budget_j=1e9, **fields),
                                            metadata=meta, timeout=30)
            elif method == "Health":
                await health_pb2_grpc.HealthStub(ch).Check(health_pb2.HealthCheckRequest(), metadata=meta, timeout=30)
        except grpc.aio.AioRpcError as exc:
            return exc.code(), exc.details()
    return grpc.StatusCode.OK, ""


U, D, OK = grpc.StatusCode.UNAUTHENTICATED, grpc.StatusCode.PERMISSION_DENIED, grpc.StatusCode.OK
GRPC_MATRIX = {  # method: (no key, wrong key, client key, operator key)
    "Generate": (U, U, OK, OK),
    "Score": (U, U, OK, OK),
    "GetStatus": (U, U, D, OK),
    "SetEnergyBudget": (U, U, D, OK),
    "Health": (OK, OK, OK, OK),
}


@pytest.mark.parametrize("method", sorted(GRPC_MATRIX))
async def test_grpc_auth_matrix(server, method):
    got = [await _grpc_call(server, method, key) for key in (None, WRONG, KEYS["acme"], KEYS["ops"])]
    assert tuple(code for code, _ in got) == GRPC_MATRIX[method]
    unauthenticated = {details for code, details in got if code == U}
    assert len(unauthenticated) <= 1, "every authentication failure says the same thing"
    assert all(KEYS["acme"] not in d and WRONG not in d for _, d in got)


@pytest.mark.parametrize("header", ["Basic " + KEYS["ops"], "Bearer", "Bearer  ", KEYS["ops"], "Bearer a b"])
async def test_malformed_authorization_headers_are_unauthenticated(server, header):
    assert (await _grpc_call(server, "GetStatus", header=header))[0] == U


async def test_bearer_scheme_is_case_insensitive(server):
    assert (await _grpc_call(server, "GetStatus", header="bearer " + KEYS["ops"]))[0] == OK


async def test_the_key_decides_the_tenant(server):
    # a client key may leave tenant empty (its own is used) or name its own; never another one
    assert (await _grpc_call(server, "Generate", KEYS["acme"], tenant="beta")) == (
        D, "this API key may not act for another tenant: leave `tenant` empty or send your own")
    assert (await _grpc_call(server, "Score", KEYS["beta"], tenant="acme"))[0] == D
    before = await _used(server)
    assert (await _grpc_call(server, "Generate", KEYS["acme"]))[0] == OK
    assert (await _grpc_call(server, "Generate", KEYS["acme"], tenant="acme"))[0] == OK
    assert (await _grpc_call(server, "Generate", KEYS["ops"], tenant="beta"))[0] == OK  # operators name it
    after = await _used(server)
    assert after["tenant:acme"] > before["tenant:acme"] and after["tenant:beta"] > before["tenant:beta"]
    assert after["tenant:default"] == before["tenant:default"]


async def _used(server) -> dict[str, float]:
    async with open_aio_channel(f"127.0.0.1:{server.port}", KEYS["ops"]) as ch:
        resp = await pb_grpc.AdminStub(ch).GetEnergyBudget(pb.GetEnergyBudgetRequest(), timeout=30)
    return {b.scope: b.used_j for b in resp.budgets}


async def test_budget_changes_record_the_operator_key(server):
    assert (await _grpc_call(server, "SetEnergyBudget", KEYS["ops"], actor="alice"))[0] == OK
    assert (await _grpc_call(server, "SetEnergyBudget", KEYS["ops"]))[0] == OK
    actors = [c.actor for c in server.gateway.routing.ledger.changes][-2:]
    assert actors == ["ops (alice)", "ops"]


async def test_oversized_metadata_is_invalid_argument(server):
    ch, _ = _channel(server, KEYS["acme"])
    async with ch:
        with pytest.raises(grpc.aio.AioRpcError) as err:
            async for _ in pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(prompt="a", max_tokens=1),
                                                              metadata=(("x-padding", "p" * 5000),), timeout=30):
                pass
    assert err.value.code() == grpc.StatusCode.INVALID_ARGUMENT
    assert "request metadata is" in err.value.details() and "at most 4096" in err.value.details()


HTTP_MATRIX = {  # (method, path): (no key, wrong key, client key, operator key)
    ("POST", "/v1/completions"): (401, 401, 200, 200),
    ("GET", "/v1/models"): (401, 401, 200, 200),
    ("GET", "/metrics"): (401, 401, 403, 200),
    ("GET", "/health"): (200, 200, 200, 200),
    ("GET", "/no/such/route"): (401, 401, 404, 404),
}


async def _http(server, method: str, path: str, key: str | None, **kw) -> tuple[int, dict | str]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    headers.update(kw.pop("headers", {}))
    async with aiohttp.ClientSession() as session:
        async with session.request(method, f"http://127.0.0.1:{server.http_port}{path}", headers=headers, **kw) as r:
            body = await r.json() if r.content_type == "application/json" else await r.text()
            return r.status, body


@pytest.mark.parametrize("route", sorted(HTTP_MATRIX))
async def test_http_auth_matrix(server, route):
    method, path = route
    body = {"json": {"model": "guarded", "prompt": "a b", "max_tokens": 2}} if method == "POST" else {}
    got = [await _http(server, method, path, key, **body) for key in (None, WRONG, KEYS["acme"], KEYS["ops"])]
    assert tuple(status for status, _ in got) == HTTP_MATRIX[route]
    for status, resp in got:
        if status in (401, 403):
            assert resp["error"]["type"] in ("authentication_error", "permission_error")
            assert WRONG not in str(resp) and KEYS["acme"] not in str(resp)


async def test_http_tenant_is_bound_to_the_key(server):
    body = {"model": "guarded", "prompt": "a b", "max_tokens": 2}
    status, resp = await _http(server, "POST", "/v1/completions", KEYS["acme"], json={**body, "tenant": "beta"})
    assert status == 403 and "another tenant" in resp["error"]["message"]
    status, _ = await _http(server, "POST", "/v1/completions", KEYS["acme"], json=body, headers={"x-tenant": "beta"})
    assert status == 403
    status, _ = await _http(server, "POST", "/v1/completions", KEYS["acme"], json=body, headers={"x-tenant": "acme"})
    assert status == 200


async def test_http_oversized_headers_are_400(server):
    pad = {f"x-pad-{i}": "p" * 1500 for i in range(4)}  # each under the parser's limit, together over ours
    status, resp = await _http(server, "GET", "/v1/models", KEYS["acme"], headers=pad)
    assert status == 400 and "request metadata is" in resp["error"]["message"]


# -- TLS -------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def pki(tmp_path_factory):
    return make_pki(tmp_path_factory.mktemp("pki"))


async def _tls_server(pki, expert: str, *, mutual: bool):
    tls = {"cert_file": str(pki.server_cert), "key_file": str(pki.server_key)}
    if mutual:
        tls |= {"client_ca_file": str(pki.ca), "require_client_cert": True}
    cfg = parse_config({"gateway": {"port": 0, "health_interval_s": 0.2}, "http": {"port": 0},
                        "auth": {"enabled": False}, "tls": tls, "experts": [_expert(expert)]})
    srv = WattserveServer(cfg, progress=lambda m: None)
    await srv.start()
    return srv


async def _generate(target: str, tls: ClientTls | None) -> grpc.StatusCode:
    async with open_aio_channel(target, None, tls) as ch:
        try:
            async for _ in pb_grpc.InferenceStub(ch).Generate(pb.GenerateRequest(prompt="a b", max_tokens=2), timeout=15):
                pass
        except grpc.aio.AioRpcError as exc:
            return exc.code()
    return grpc.StatusCode.OK


async def _https_status(url: str, ctx: ssl.SSLContext) -> int | str:
    try:
        async with aiohttp.ClientSession() as session, session.get(url, ssl=ctx) as r:
            return r.status
    except aiohttp.ClientError as exc:
        return type(exc).__name__


async def test_tls_round_trip_grpc_and_http(ray_session, pki):
    srv = await _tls_server(pki, "tlsx", mutual=False)
    try:
        target = f"127.0.0.1:{srv.port}"
        assert await _generate(target, ClientTls(ca_file=str(pki.ca))) == OK
        assert await _generate(target, ClientTls(ca_file=str(pki.other_ca))) == grpc.StatusCode.UNAVAILABLE
        assert await _generate(target, None) == grpc.StatusCode.UNAVAILABLE  # plaintext to a TLS port
        url = f"https://127.0.0.1:{srv.http_port}/health"
        assert await _https_status(url, ClientTls(ca_file=str(pki.ca)).ssl_context()) == 200
        assert await _https_status(url, ClientTls(ca_file=str(pki.other_ca)).ssl_context()) == "ClientConnectorCertificateError"
    finally:
        await srv.stop()


async def test_mutual_tls_needs_a_client_certificate(ray_session, pki):
    srv = await _tls_server(pki, "mtlsx", mutual=True)
    try:
        target = f"127.0.0.1:{srv.port}"
        with_cert = ClientTls(ca_file=str(pki.ca), cert_file=str(pki.client_cert), key_file=str(pki.client_key))
        assert await _generate(target, with_cert) == OK
        assert await _generate(target, ClientTls(ca_file=str(pki.ca))) == grpc.StatusCode.UNAVAILABLE
        url = f"https://127.0.0.1:{srv.http_port}/health"
        assert await _https_status(url, with_cert.ssl_context()) == 200
        assert await _https_status(url, ClientTls(ca_file=str(pki.ca)).ssl_context()) != 200
    finally:
        await srv.stop()


# -- no secret in any log line: this test's own calls, and whatever ran before it in the module ----------
async def test_no_secret_in_any_log_line(server, logs):
    every_key = (None, WRONG, KEYS["acme"], KEYS["beta"], KEYS["ops"])
    for method in GRPC_MATRIX:  # SetEnergyBudget with the operator key logs the budget change
        for key in every_key:
            await _grpc_call(server, method, key)
    for header in ("Basic " + KEYS["ops"], "Bearer a b", KEYS["ops"], "bearer " + KEYS["acme"]):
        await _grpc_call(server, "GetStatus", header=header)
    await _grpc_call(server, "Generate", KEYS["acme"], tenant="beta")  # another tenant: refused
    body = {"model": "guarded", "prompt": "a b", "max_tokens": 2}
    for method, path in HTTP_MATRIX:
        for key in every_key:
            await _http(server, method, path, key, **({"json": body} if method == "POST" else {}))
    text = "\n".join(logs.lines)
    assert "energy budget of tenant:beta" in text and "by ops" in text, "the capture sees the server's own logs"
    for secret in (*KEYS.values(), WRONG):
        assert secret not in text
