"""The governor and node agent in-process (no Ray): fake actor handles around real agents and
expert-like objects owning real simulated/NVML-faked devices, an injected clock."""

from __future__ import annotations

import dataclasses

import pytest

from runtime.power.agent import ExpertTarget, NodeAgent
from runtime.power.config import PowerConfig
from runtime.power.governor import PowerGovernor
from tests.fakes import ControlFakePynvml, FakeActor, FakeClock
from wattserve.errors import InvalidRequest
from wattserve.power import CapLevel, EventKind, PowerCap
from workers.devices import nvml as nvml_module
from workers.devices.control import apply_cap, sample_device
from workers.devices.cpu import CpuDevice
from workers.devices.simulated import SimulatedDevice


class FakeExpert:
    """An expert replica's power door over a real device, with power set by the test."""

    def __init__(self, device, priority_class="high", power_w=100.0) -> None:
        self.device, self.priority_class, self.power_w = device, priority_class, power_w
        self.low, self.other = 0, 0
        self.fail = False

    async def power_sample(self, window_s):
        if self.fail:
            raise TimeoutError("expert busy")
        sample = sample_device(self.device, priority_class=self.priority_class, low_requests=self.low,
                               other_requests=self.other)
        return dataclasses.replace(sample, power_w=self.power_w)

    async def apply_power_cap(self, cap, gpu=""):
        return apply_cap(self.device, cap, gpu)


def build(experts: dict[str, FakeExpert], clock, **power) -> tuple[PowerGovernor, NodeAgent]:
    cfg = PowerConfig(enabled=True, provisioned_power_w=power.pop("budget", 1000.0), interval_s=1.0,
                      telemetry_timeout_s=power.pop("timeout", 3.0), resend_after_s=power.pop("resend", 5.0),
                      policy={"dwell_s": 4.0, "settle_s": 0.0, **power.pop("policy", {})}, **power)
    agent = NodeAgent("node-1", "10.0.0.1", nvml=False)
    agent.experts = {}
    for gpu, expert in experts.items():
        name, _, replica = gpu.partition("/")
        agent.experts[gpu] = ExpertTarget(name, int(replica), FakeActor(expert))
    gov = PowerGovernor(cfg, {"node-1": (FakeActor(agent), "10.0.0.1")}, clock=clock, wall_clock=clock)
    return gov, agent


async def ticks(gov, clock, n, step=1.0):
    for _ in range(n):
        await gov.tick()
        clock.advance(step)


def a100(clock=None):
    return SimulatedDevice("a100", 8_000_000_000, clock=clock or FakeClock())


async def test_low_priority_capped_first_then_released_with_events():
    clock = FakeClock()
    lp, hp = FakeExpert(a100(), "low", 420.0), FakeExpert(a100(), "high", 420.0)
    gov, _ = build({"lp/0": lp, "hp/0": hp}, clock)
    await ticks(gov, clock, 1)  # 840 W >= T1 (800 W)
    assert gov.policies["cluster"].level == CapLevel.T1
    assert lp.device.locked_sm_clock_mhz() == 1275.0 and hp.device.locked_sm_clock_mhz() is None
    [cap] = [e for e in gov.events if e.kind == EventKind.CAP]
    assert cap.gpu == "lp/0" and cap.to_sm_clock_mhz == 1275.0 and "low-priority" in cap.reason
    await ticks(gov, clock, 3)
    assert [e.kind for e in gov.events].count(EventKind.CAP) == 1  # no re-sends while nothing changes
    hp.power_w = 480.0  # 900 W >= T2: high priority capped moderately, low lower
    await ticks(gov, clock, 1)
    assert lp.device.locked_sm_clock_mhz() == 1110.0 and hp.device.locked_sm_clock_mhz() == 1305.0
    lp.power_w = hp.power_w = 100.0
    await ticks(gov, clock, 12)
    assert gov.policies["cluster"].level == CapLevel.NONE
    assert lp.device.locked_sm_clock_mhz() is None and hp.device.locked_sm_clock_mhz() is None
    status = await gov.status()
    kinds = [e.kind for e in status.events]
    assert kinds.count(EventKind.UNCAP) >= 2 and status.counters["cap_events"] == 3
    [row] = status.rows
    assert row.level == CapLevel.NONE and row.power_w == 200.0 and row.t1_w == 800.0 and row.capped_s > 0
    assert {g.gpu: g.priority for g in status.gpus} == {"hp/0": "high", "lp/0": "low"}


async def test_a_gpu_serving_only_low_priority_requests_is_low_priority():
    clock = FakeClock()
    busy, only_low = FakeExpert(a100(), "high", 420.0), FakeExpert(a100(), "high", 420.0)
    busy.low, busy.other = 3, 2
    only_low.low = 5
    gov, _ = build({"a/0": busy, "b/0": only_low}, clock)
    await ticks(gov, clock, 1)
    assert only_low.device.locked_sm_clock_mhz() == 1275.0 and busy.device.locked_sm_clock_mhz() is None


async def test_lost_telemetry_holds_caps_and_raises_an_alert():
    clock = FakeClock()
    lp, hp = FakeExpert(a100(), "low", 420.0), FakeExpert(a100(), "high", 420.0)
    gov, _ = build({"lp/0": lp, "hp/0": hp}, clock)
    await ticks(gov, clock, 1)
    lp.power_w, hp.power_w, hp.fail = 50.0, 50.0, True
    await ticks(gov, clock, 30)  # far past dwell: the missing GPU keeps the row capped
    assert gov.policies["cluster"].level == CapLevel.T1 and lp.device.locked_sm_clock_mhz() == 1275.0
    status = await gov.status()
    assert any("telemetry incomplete" in a for a in status.alerts)
    assert not status.rows[0].telemetry_ok
    assert [g.error for g in status.gpus if g.gpu == "hp/0"][0].startswith("no reading")
    hp.fail = False
    await ticks(gov, clock, 8)
    assert gov.policies["cluster"].level == CapLevel.NONE and lp.device.locked_sm_clock_mhz() is None
    assert EventKind.RECOVERED in [e.kind for e in gov.events] and not (await gov.status()).alerts


async def test_a_device_that_cannot_be_capped_is_reported_not_fatal():
    clock = FakeClock()
    cpu = FakeExpert(CpuDevice(), "low", 450.0)
    lp = FakeExpert(a100(), "low", 400.0)
    gov, _ = build({"cpu/0": cpu, "lp/0": lp}, clock)
    await ticks(gov, clock, 2)
    assert lp.device.locked_sm_clock_mhz() == 1275.0  # the rest of the row is still governed
    status = await gov.status()
    [g] = [g for g in status.gpus if g.gpu == "cpu/0"]
    assert not g.can_actuate and "cannot be capped" in g.control_reason
    # a cpu device has no clocks: it is monitored (its power counts) but never sent a cap
    assert status.rows[0].power_w == 850.0 and gov.counters["actuation_failures"] == 0


async def test_refused_caps_become_alerts_and_a_drifted_device_is_reconciled():
    clock = FakeClock()
    lp = FakeExpert(a100(), "low", 900.0)
    gov, _ = build({"lp/0": lp}, clock, resend=3.0)
    original = lp.apply_power_cap

    async def refuse(cap, gpu=""):
        return dataclasses.replace(await original(PowerCap(sm_clock_mhz=1.0), gpu))  # out of range
    lp.apply_power_cap = refuse
    await ticks(gov, clock, 2)
    assert gov.counters["actuation_failures"] == 2 and any("cap not applied" in a for a in gov.alerts.values())
    lp.apply_power_cap = original
    await ticks(gov, clock, 1)
    assert lp.device.locked_sm_clock_mhz() == 1110.0 and not gov.alerts  # 900 W >= T2
    lp.device.unlock_sm_clock()  # e.g. the expert restarted with a fresh device
    await ticks(gov, clock, 2)
    assert lp.device.locked_sm_clock_mhz() is None  # not yet: resend_after_s has not passed
    await ticks(gov, clock, 2)
    assert lp.device.locked_sm_clock_mhz() == 1110.0


async def test_operator_budget_changes_and_release_all():
    clock = FakeClock()
    lp = FakeExpert(a100(), "low", 850.0)
    gov, _ = build({"lp/0": lp}, clock)
    await ticks(gov, clock, 1)
    assert lp.device.locked_sm_clock_mhz() == 1275.0
    await gov.set_budget("", 100_000.0)
    assert gov.events[-1].kind == EventKind.BUDGET and "100000 W (was 1000 W)" in gov.events[-1].reason
    await ticks(gov, clock, 6)
    assert lp.device.locked_sm_clock_mhz() is None
    await gov.set_budget("cluster", 800.0)  # 850 W >= P: brake, lowest clock and power limit
    await ticks(gov, clock, 1)
    assert lp.device.locked_sm_clock_mhz() == 210.0 and lp.device.power_limit_w() == 100.0
    assert gov.counters["brake_events"] == 1
    with pytest.raises(InvalidRequest, match="unknown power row 'row9'"):
        await gov.set_budget("row9", 1.0)
    with pytest.raises(InvalidRequest, match="> 0"):
        await gov.set_budget("", -5.0)
    await gov.release_all()
    assert lp.device.locked_sm_clock_mhz() is None and lp.device.power_limit_w() == 400.0


async def test_unreachable_agent_is_an_alert_and_the_loop_keeps_running():
    clock = FakeClock()
    gov, agent = build({"lp/0": FakeExpert(a100(), "low", 850.0)}, clock, timeout=2.0)

    async def broken():
        raise ConnectionError("agent died")
    agent.sample = broken
    await ticks(gov, clock, 2)
    assert any("unreachable" in a for a in gov.alerts.values())
    assert await gov.start() is True and await gov.start() is False  # idempotent: one loop
    await gov.stop()


async def test_agent_reads_and_caps_nvml_gpus_itself_and_lends_them_the_expert(monkeypatch):
    fake = ControlFakePynvml(count=2)
    monkeypatch.setattr(nvml_module, "pynvml", fake)
    agent = NodeAgent("node-1", "10.0.0.1", nvml=True)
    assert sorted(agent.nvml) == ["10.0.0.1/nvml:0", "10.0.0.1/nvml:1"]
    owner = FakeExpert(a100(), "low", 123.0)  # pretend it runs on the GPU with UUID GPU-1234

    async def sample_with_uuid(window_s):
        return dataclasses.replace(await FakeExpert.power_sample(owner, window_s), uuid="GPU-1234")
    owner.power_sample = sample_with_uuid
    sim = FakeExpert(a100(), "high", 77.0)
    await agent.set_experts([("gpuexpert", 0, FakeActor(owner)), ("simexpert", 0, FakeActor(sim))])
    samples = {s.gpu: s for s in await agent.sample()}
    # the expert's device has GPU 0's UUID: GPU 0 is listed once, with the expert's name and class
    assert set(samples) == {"10.0.0.1/nvml:0", "10.0.0.1/nvml:1", "simexpert/0"}
    nv0 = samples["10.0.0.1/nvml:0"]
    assert nv0.expert == "gpuexpert" and nv0.sample.priority_class == "low" and nv0.sample.power_w == 250.0
    assert samples["simexpert/0"].sample.power_w == 77.0
    results = await agent.apply({"10.0.0.1/nvml:0": PowerCap(sm_clock_mhz=1559.0),
                                 "simexpert/0": PowerCap(sm_clock_mhz=1305.0), "nope": PowerCap()})
    assert [r.applied for r in results] == [True, True, False]
    assert ("nvmlDeviceSetGpuLockedClocks", ("handle", 0), 345, 1559) in fake.calls
    assert sim.device.locked_sm_clock_mhz() == 1305.0 and owner.device.locked_sm_clock_mhz() is None
    agent.shutdown()


@pytest.mark.gpu
async def test_agent_reads_real_gpus(real_nvml):  # noqa: F811 - the fixture imported above
    agent = NodeAgent("node-1", "127.0.0.1", nvml=True)
    try:
        samples = await agent.sample()
        assert samples and all(s.sample.power_w > 0 and s.gpu.startswith("127.0.0.1/nvml:") for s in samples)
        assert all(s.sample.priority_class == "low" for s in samples)  # no expert: nothing to protect
    finally:
        agent.shutdown()


async def test_forecast_preset_runs_in_the_live_governor():
    clock = FakeClock()
    lp, hp = FakeExpert(a100(), "low", 300.0), FakeExpert(a100(), "high", 300.0)
    gov, _ = build({"lp/0": lp, "hp/0": hp}, clock, policy={"preset": "forecast", "forecast_min_samples": 10})
    await ticks(gov, clock, 15)  # 600 W: learn the row's (flat) rises
    for _ in range(28):  # a slow climb to 880 W = 0.88 P, past POLCA's T1
        lp.power_w += 5.0
        hp.power_w += 5.0
        await ticks(gov, clock, 1)
    await ticks(gov, clock, 10)
    policy = gov.policies["cluster"]
    assert policy.level == CapLevel.NONE and lp.device.locked_sm_clock_mhz() is None
    [row] = (await gov.status()).rows
    assert row.power_w == 880.0 and row.t1_w > 880.0  # the line moved up with the small learned rise
    lp.power_w = 520.0  # a jump to 960 W: past the 930 W guard, low priority capped, high left alone
    await ticks(gov, clock, 1)
    assert policy.level == CapLevel.T1
    assert lp.device.locked_sm_clock_mhz() == 1275.0 and hp.device.locked_sm_clock_mhz() is None
    [cap] = [e for e in gov.events if e.kind == EventKind.CAP]
    assert cap.gpu == "lp/0"
