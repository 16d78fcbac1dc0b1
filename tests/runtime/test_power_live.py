"""The governor live on Ray: real expert actors (synthetic engines on simulated A100s), a node
agent, the named governor actor, load pushed through the real gRPC API, operator RPCs and CLI.

Power figures (from the fitted a100 profile, 70B parameters): a replica decoding draws ~240 W,
an idle one 40 W. With P = 600 W, T1 = 0.5 P = 300 W and T2 = 0.95 P = 570 W, both experts busy
(~480 W) sit between T1 and T2: only the low-priority expert may be capped. Idle (80 W) is well
below the release point T1 - 5% P = 270 W.
"""

from __future__ import annotations

import asyncio
import contextlib
import io
import time

import grpc
import pytest

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from runtime.api.servicer import AdminServicer
from runtime.cli import main as cli_main
from runtime.config import parse_config
from wattserve.errors import FeatureDisabled

pytestmark = pytest.mark.timeout(300)

BUDGET_W = 600.0
LP_T1_MHZ = 1275.0  # the A100 numbers apply unscaled to the a100 profile (max 1410 MHz)


def expert(name: str, priority_class: str) -> dict:
    return {"name": name, "engine": {"kind": "synthetic", "step_ms": 20, "model_params": 70_000_000_000},
            "device": {"backend": "simulated", "profile": "a100"}, "priority_class": priority_class,
            "max_batch": 4, "max_queue": 8}


@pytest.fixture(scope="module")
def config(tmp_path_factory):
    config = parse_config({
        "auth": {"enabled": False},  # loopback test server: no keys
        "gateway": {"port": 0, "health_interval_s": 0.2},
        "model_cache_dir": str(tmp_path_factory.mktemp("cache")),
        "experts": [expert("lp", "low"), expert("hp", "high")],
        "power": {
            "enabled": True, "provisioned_power_w": BUDGET_W, "interval_s": 0.25, "telemetry_timeout_s": 2.0,
            "resend_after_s": 2.0, "nvml": False,
            "policy": {"t1_fraction": 0.5, "t2_fraction": 0.95, "dwell_s": 1.0, "settle_s": 0.5},
        },
    }, "power-test")
    return config


@pytest.fixture
async def stubs(server):
    """The server's stubs once the governor is at rest: both GPUs reporting, the budget as
    configured, no level, no lock and idle power, whatever a test before this one left."""
    async with grpc.aio.insecure_channel(f"127.0.0.1:{server.port}") as ch:
        admin = pb_grpc.AdminStub(ch)
        await admin.SetPowerBudget(pb.SetPowerBudgetRequest(provisioned_power_w=BUDGET_W), timeout=10)
        await wait_for(admin, at_rest, "the governor at rest", timeout_s=60.0)
        yield pb_grpc.InferenceStub(ch), admin


def at_rest(st: pb.PowerStatus) -> bool:
    row = st.rows[0]
    return (len(st.gpus) == 2 and row.telemetry_ok and row.level == "NONE" and row.power_w < 0.5 * row.t1_w
            and all(not g.HasField("locked_sm_clock_mhz") for g in st.gpus))


async def status(admin) -> pb.PowerStatus:
    return await admin.GetPowerStatus(pb.GetPowerStatusRequest(max_events=200), timeout=10)


def gpu(st: pb.PowerStatus, name: str) -> pb.GpuPower:
    return next(g for g in st.gpus if g.gpu == name)


def locked(st: pb.PowerStatus, name: str) -> float | None:
    g = gpu(st, name)
    return g.locked_sm_clock_mhz if g.HasField("locked_sm_clock_mhz") else None


async def wait_for(admin, predicate, what: str, timeout_s: float = 30.0) -> pb.PowerStatus:
    deadline = time.monotonic() + timeout_s
    while True:
        st = await status(admin)
        if predicate(st):
            return st
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}; status: {st}")
        await asyncio.sleep(0.2)


@contextlib.asynccontextmanager
async def load(inference, per_expert: int = 2):
    """Keep ``per_expert`` streams busy on each expert until the block exits."""
    stop = asyncio.Event()

    async def worker(name: str, priority: int):
        while not stop.is_set():
            req = pb.GenerateRequest(prompt="power test prompt", max_tokens=60, expert=name, priority=priority,
                                     sampling=pb.SamplingParams(ignore_eos=True))
            async for _ in inference.Generate(req, timeout=60):
                pass

    tasks = [asyncio.create_task(worker("lp", pb.PRIORITY_LOW)) for _ in range(per_expert)]
    tasks += [asyncio.create_task(worker("hp", pb.PRIORITY_NORMAL)) for _ in range(per_expert)]
    try:
        yield
    finally:
        stop.set()
        await asyncio.gather(*tasks)


async def test_status_before_load(stubs):
    _, admin = stubs
    st = await status(admin)
    assert st.enabled and st.policy == "polca" and st.interval_s == 0.25
    [row] = st.rows
    assert row.name == "cluster" and row.provisioned_power_w == BUDGET_W and row.level == "NONE"
    assert row.t1_w == pytest.approx(300.0) and row.t2_w == pytest.approx(570.0)
    assert {g.gpu: g.priority for g in st.gpus} == {"lp/0": "low", "hp/0": "high"}
    assert all(g.can_actuate and g.max_sm_clock_mhz == 1410.0 for g in st.gpus)
    assert row.power_w < 0.5 * row.t1_w  # idle


async def test_load_caps_low_priority_only_then_releases(server, stubs):
    inference, admin = stubs
    async with load(inference):
        st = await wait_for(admin, lambda s: locked(s, "lp/0") == LP_T1_MHZ, "the low-priority cap")
        assert st.rows[0].level == "T1" and st.rows[0].power_w >= st.rows[0].t1_w
        assert locked(st, "hp/0") is None and not gpu(st, "hp/0").HasField("target_sm_clock_mhz")
        cap = next(e for e in reversed(st.events) if e.kind == "cap")  # this load's, not an earlier test's
        assert cap.gpu == "lp/0" and cap.to_sm_clock_mhz == LP_T1_MHZ and "low-priority" in cap.reason
        # the router sees the cap through the expert's profile
        await server.gateway.admin.refresh()
        profiles = {r.expert: r.profile for r in server.gateway.admin.replicas()}
        assert profiles["lp"].sm_clock_cap_mhz == LP_T1_MHZ and profiles["lp"].sm_clock_mhz == LP_T1_MHZ
        assert profiles["hp"].sm_clock_cap_mhz is None and profiles["hp"].sm_clock_mhz == 1410.0
        await asyncio.sleep(1.5)  # several dwell periods under load: the cap holds (no flapping)
        assert locked(await status(admin), "lp/0") == LP_T1_MHZ
        # what /metrics exports mirrors the governor (budget, caps in force, event counters)
        power = server.gateway.admin.power
        assert power.budget_w == pytest.approx(st.rows[0].provisioned_power_w)
        assert power.caps == {("lp", 0): f"sm_clock:{LP_T1_MHZ:g}"} and power.cap_events["cap_events"] >= 1
    st = await wait_for(admin, lambda s: locked(s, "lp/0") is None and s.rows[0].level == "NONE", "the release")
    assert any(e.kind == "uncap" and e.gpu == "lp/0" for e in st.events)
    assert st.counters["cap_events"] >= 1 and st.counters["uncap_events"] >= 1


async def test_operator_budget_changes_apply_at_run_time(stubs):
    inference, admin = stubs
    async with load(inference):
        await wait_for(admin, lambda s: locked(s, "lp/0") == LP_T1_MHZ, "the low-priority cap")
        reply = await admin.SetPowerBudget(pb.SetPowerBudgetRequest(provisioned_power_w=100_000.0), timeout=10)
        assert reply.row.name == "cluster" and reply.row.provisioned_power_w == 100_000.0
        await wait_for(admin, lambda s: locked(s, "lp/0") is None, "release under a large budget")
        await admin.SetPowerBudget(pb.SetPowerBudgetRequest(row="cluster", provisioned_power_w=300.0), timeout=10)
        st = await wait_for(admin, lambda s: s.rows[0].level == "BRAKE" and locked(s, "hp/0") == 210.0, "brake")
        assert locked(st, "lp/0") == 210.0 and gpu(st, "lp/0").power_limit_w == 100.0
        assert st.counters["brake_events"] >= 1 and any(e.kind == "budget" for e in st.events)
        await admin.SetPowerBudget(pb.SetPowerBudgetRequest(provisioned_power_w=BUDGET_W), timeout=10)
        st = await wait_for(admin, lambda s: s.rows[0].level == "T1" and locked(s, "hp/0") is None, "back to T1")
        assert locked(st, "lp/0") == LP_T1_MHZ and gpu(st, "lp/0").power_limit_w == 400.0
    await wait_for(admin, lambda s: locked(s, "lp/0") is None, "the release")
    for bad, code in (({"row": "nope", "provisioned_power_w": 5.0}, grpc.StatusCode.INVALID_ARGUMENT),
                      ({"provisioned_power_w": 0.0}, grpc.StatusCode.INVALID_ARGUMENT)):
        with pytest.raises(grpc.aio.AioRpcError) as info:
            await admin.SetPowerBudget(pb.SetPowerBudgetRequest(**bad), timeout=10)
        assert info.value.code() == code


async def test_cli_power_show_and_set(server):
    target = f"127.0.0.1:{server.port}"

    def run(*argv) -> tuple[int, str]:
        out = io.StringIO()
        with contextlib.redirect_stdout(out):
            rc = cli_main(list(argv))
        return rc, out.getvalue()

    rc, text = await asyncio.to_thread(run, "power", "set", "--budget-w", "650", "--target", target)
    assert rc == 0 and "row cluster: P = 650 W" in text
    rc, text = await asyncio.to_thread(run, "power", "show", "--target", target)
    assert rc == 0 and "policy polca" in text and "row cluster" in text and "lp/0" in text and "budget" in text
    rc, _ = await asyncio.to_thread(run, "power", "set", "--budget-w", "600", "--target", target)
    assert rc == 0


async def test_without_a_governor():
    servicer = AdminServicer(gateway=None, ray_address="", power=None)
    st = await servicer.GetPowerStatus(pb.GetPowerStatusRequest(), None)
    assert not st.enabled
    with pytest.raises(FeatureDisabled, match="power.enabled"):
        await servicer.SetPowerBudget(pb.SetPowerBudgetRequest(provisioned_power_w=1.0), None)


async def test_replicas_added_and_released_at_run_time_are_followed_by_the_governor(server, stubs):
    """What the capacity controller does when it scales: the new replica's GPU is read (and may be
    capped) from then on, the released one is forgotten."""
    _, admin = stubs
    replica = server.pool.add("lp")
    try:
        await replica.actor.ready.remote()
        await server.power.update_replicas(server.pool.all())
        st = await wait_for(admin, lambda st: any(g.gpu == "lp/1" for g in st.gpus), "the added replica's GPU")
        assert len(st.gpus) == 3 and gpu(st, "lp/1").priority == "low"
    finally:
        server.pool.remove("lp", replica.index)
        await server.power.update_replicas(server.pool.all())
    st = await wait_for(admin, lambda st: len(st.gpus) == 2, "the released replica forgotten")
    assert {g.gpu for g in st.gpus} == {"lp/0", "hp/0"}
