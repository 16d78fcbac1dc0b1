"""Device control for the power governor: NVML commands (faked pynvml: arguments and units),
the simulated device's response to clocks and limits, the cpu device's refusal, and the engine
loop waiting out a modeled cap so measured costs move."""

from __future__ import annotations

import contextlib
import os
import threading
import time

import pynvml
import pytest

from tests.fakes import ControlFakePynvml, FakeClock
from wattserve.devices import parse_device_spec
from wattserve.errors import ActuationUnavailable, DeviceError, InvalidRequest
from wattserve.power import PowerCap
from wattserve.specs import ExpertSpec
from wattserve.types import GenerateCall, Priority, SamplingParams, StepWork
from workers.devices import nvml as nvml_module
from workers.devices import open_device
from workers.devices.control import apply_cap, sample_device
from workers.devices.cpu import CpuDevice
from workers.devices.nvml import NvmlDevice
from workers.devices.simulated import SimulatedDevice, load_profile
from workers.engines.synthetic import SyntheticEngine
from workers.loop import EngineLoop

PARAMS = 8_000_000_000
PREFILL = StepWork(prefill_tokens=2048, batch_size=1)
DECODE = StepWork(decode_tokens=16, batch_size=16)


@pytest.fixture
def fake_nvml(monkeypatch):
    fake = ControlFakePynvml()
    monkeypatch.setattr(nvml_module, "pynvml", fake)
    return fake


# --- NVML ----------------------------------------------------------------------------------------


def test_nvml_commands_have_the_right_arguments_and_units(fake_nvml):
    dev = NvmlDevice(0)
    assert dev.control().can_actuate and dev.uuid() == "GPU-1234"
    assert dev.min_sm_clock_mhz() == 345.0 and dev.power_limit_range_w() == (200.0, 700.0)
    dev.lock_sm_clock_mhz(1559.6)
    dev.set_power_limit_w(350.5)
    dev.unlock_sm_clock()
    dev.reset_power_limit()
    handle = ("handle", 0)
    assert fake_nvml.calls == [
        ("nvmlDeviceSetGpuLockedClocks", handle, 345, 1560),  # [floor, ceiling]: idle may clock down
        ("nvmlDeviceSetPowerManagementLimit", handle, 350_500),  # milliwatts
        ("nvmlDeviceResetGpuLockedClocks", handle),
        ("nvmlDeviceSetPowerManagementLimit", handle, 700_000),  # back to the default
    ]
    assert dev.locked_sm_clock_mhz() is None
    dev.close()


def test_nvml_rejects_out_of_range_requests(fake_nvml):
    dev = NvmlDevice(0)
    with pytest.raises(InvalidRequest, match=r"power limit 100 W outside \[200, 700\] W"):
        dev.set_power_limit_w(100.0)
    with pytest.raises(InvalidRequest, match="SM clock 3000 MHz outside"):
        dev.lock_sm_clock_mhz(3000)
    assert fake_nvml.calls == []
    dev.close()


def test_nvml_permission_denied_means_cannot_actuate(monkeypatch):
    fake = ControlFakePynvml(deny={"nvmlDeviceSetGpuLockedClocks"})
    monkeypatch.setattr(nvml_module, "pynvml", fake)
    dev = NvmlDevice(0)
    with pytest.raises(ActuationUnavailable, match="need root") as info:
        dev.lock_sm_clock_mhz(1500)
    assert info.value.details["nvml_code"] == pynvml.NVML_ERROR_NO_PERMISSION
    control = dev.control()
    assert not control.can_lock_sm_clock and control.can_set_power_limit and "need root" in control.reason
    with pytest.raises(ActuationUnavailable):  # remembered: NVML is not asked again
        dev.lock_sm_clock_mhz(1500)
    result = apply_cap(dev, PowerCap(sm_clock_mhz=1500.0), "n/nvml:0")
    assert not result.applied and result.permanent and "need root" in result.error
    assert apply_cap(dev, PowerCap(), "n/nvml:0").applied  # nothing to undo on a device never capped
    sample = sample_device(dev)
    assert sample.power_w == 250.0 and not sample.control.can_actuate and sample.uuid == "GPU-1234"
    dev.close()


@pytest.mark.gpu
def test_real_nvml_control(real_nvml):  # noqa: F811 - the fixture imported above
    """On a GPU host: read everything the governor needs; then, only where the operator opts in
    with WATTSERVE_TEST_GPU_ACTUATE=1 (a shared GPU's clocks are not a test's to change), lock and
    unlock the SM clock, or get the clear 'cannot actuate' answer where the process lacks permission."""
    dev = NvmlDevice(0)
    actuate = os.environ.get("WATTSERVE_TEST_GPU_ACTUATE") == "1"
    try:
        s = sample_device(dev)
        assert s.power_w > 0 and s.max_sm_clock_mhz > s.min_sm_clock_mhz > 0 and s.uuid.startswith("GPU-")
        assert s.min_power_limit_w < s.default_power_limit_w
        if not actuate:
            return
        target = round((s.max_sm_clock_mhz + s.min_sm_clock_mhz) / 2)
        try:
            dev.lock_sm_clock_mhz(target)
        except ActuationUnavailable as exc:
            assert "root" in str(exc) or "does not support" in str(exc)
            assert not dev.control().can_lock_sm_clock
            return
        assert dev.locked_sm_clock_mhz() == target
        assert dev.sm_clock_mhz() <= target + 15  # the driver rounds to a supported step
    finally:
        if actuate:
            with contextlib.suppress(DeviceError):
                dev.unlock_sm_clock()
        dev.close()


# --- simulated -----------------------------------------------------------------------------------


def test_simulated_clock_lock_slows_prefill_not_decode_and_lowers_power():
    dev = SimulatedDevice("a100", PARAMS)
    free = {w: (dev.step_latency_s(w), dev.step_power_w(w)) for w in (PREFILL, DECODE)}
    dev.lock_sm_clock_mhz(1110.0)
    assert dev.locked_sm_clock_mhz() == 1110.0 and dev.sm_clock_mhz() == 1110.0
    lat_p, pw_p = dev.step_latency_s(PREFILL), dev.step_power_w(PREFILL)
    lat_d, pw_d = dev.step_latency_s(DECODE), dev.step_power_w(DECODE)
    # prefill is compute-bound: its compute time scales ~1/f
    assert lat_p / free[PREFILL][0] == pytest.approx(1410 / 1110, rel=0.05)
    assert lat_d == pytest.approx(free[DECODE][0], rel=0.02)  # decode is memory-bound: flat
    assert pw_p < free[PREFILL][1] and pw_d <= free[DECODE][1]
    pre_s, dec_s = dev.cap_slowdown_s(StepWork(prefill_tokens=2048, decode_tokens=16, batch_size=16))
    assert pre_s == pytest.approx(lat_p - free[PREFILL][0]) and 0 <= dec_s < 0.02 * free[DECODE][0]
    dev.unlock_sm_clock()
    assert dev.locked_sm_clock_mhz() is None and dev.cap_slowdown_s(PREFILL) == (0.0, 0.0)
    with pytest.raises(InvalidRequest, match="outside"):
        dev.lock_sm_clock_mhz(100.0)


def test_simulated_power_limit_lowers_the_clock_until_the_step_fits():
    dev = SimulatedDevice("a100", PARAMS)
    assert dev.power_limit_range_w() == (100.0, 400.0) and dev.default_power_limit_w() == 400.0
    full_w = dev.step_power_w(PREFILL)
    dev.set_power_limit_w(0.8 * full_w)
    assert dev.power_limit_w() == pytest.approx(0.8 * full_w)
    assert dev.step_power_w(PREFILL) == pytest.approx(0.8 * full_w, rel=1e-3)
    assert dev.step_clock_mhz(PREFILL) < 1410.0
    dev.end_step(PREFILL)
    assert dev.sm_clock_mhz() == pytest.approx(dev.step_clock_mhz(PREFILL))
    dev.set_power_limit_w(100.0)  # the limiter goes far down the clock range
    assert dev.step_power_w(PREFILL) == pytest.approx(100.0, rel=1e-3) and dev.step_clock_mhz(PREFILL) < 0.5 * 1410
    big = SimulatedDevice("a100", 70_000_000_000)
    big.set_power_limit_w(100.0)  # decode of a big model reads memory hard even at the lowest clock
    heavy = StepWork(decode_tokens=64, batch_size=64)
    assert big.step_clock_mhz(heavy) == 210.0 and big.step_power_w(heavy) == 100.0
    dev.reset_power_limit()
    assert dev.step_power_w(PREFILL) == pytest.approx(full_w)
    with pytest.raises(InvalidRequest, match="outside"):
        dev.set_power_limit_w(50.0)


def test_simulated_actuation_delay_orders_commands():
    clock = FakeClock()
    dev = SimulatedDevice("h100", PARAMS, clock=clock, actuation_delay_s=2.0)
    dev.lock_sm_clock_mhz(1500.0)
    clock.advance(1.0)
    dev.lock_sm_clock_mhz(1000.0)
    assert dev.locked_sm_clock_mhz() is None and dev.sm_clock_mhz() == 1980.0
    clock.advance(1.0)
    assert dev.locked_sm_clock_mhz() == 1500.0
    clock.advance(1.0)
    assert dev.locked_sm_clock_mhz() == 1000.0
    dev.unlock_sm_clock()
    clock.advance(2.0)
    assert dev.locked_sm_clock_mhz() is None


def test_simulated_energy_stays_conserved_under_caps():
    clock = FakeClock()
    dev = SimulatedDevice("a100", PARAMS, clock=clock)
    dev.lock_sm_clock_mhz(900.0)
    dev.begin_step()
    dev.end_step(PREFILL)
    assert dev.energy_j() == pytest.approx(dev.step_power_w(PREFILL) * dev.step_latency_s(PREFILL))


def test_cpu_device_cannot_be_capped_and_says_so():
    dev = CpuDevice()
    control = dev.control()
    assert not control.can_actuate and "cannot be capped" in control.reason
    with pytest.raises(ActuationUnavailable, match="cannot be capped"):
        dev.lock_sm_clock_mhz(1000)
    with pytest.raises(ActuationUnavailable):
        dev.set_power_limit_w(100)
    result = apply_cap(dev, PowerCap(sm_clock_mhz=1000.0), "cpu")
    assert not result.applied and result.permanent
    sample = sample_device(dev, priority_class="low", low_requests=2)
    assert sample.max_sm_clock_mhz is None and sample.priority_class == "low" and sample.low_requests == 2


def test_apply_cap_on_a_simulated_device():
    dev = SimulatedDevice("a100", PARAMS)
    brake = PowerCap(sm_clock_mhz=210.0, power_limit_w=100.0)
    assert apply_cap(dev, brake, "x").applied
    assert dev.locked_sm_clock_mhz() == 210.0 and dev.power_limit_w() == 100.0
    assert apply_cap(dev, PowerCap(sm_clock_mhz=1275.0, reset_power_limit=True), "x").applied
    assert dev.locked_sm_clock_mhz() == 1275.0 and dev.power_limit_w() == 400.0
    bad = apply_cap(dev, PowerCap(sm_clock_mhz=5.0), "x")
    assert not bad.applied and not bad.permanent and "outside" in bad.error
    s = sample_device(dev)
    assert s.min_power_limit_w == 100.0 and s.locked_sm_clock_mhz == 1275.0 and s.max_sm_clock_mhz == 1410.0


# --- the engine loop follows a modeled cap --------------------------------------------------------


class _Sink:
    def __init__(self):
        self.done = threading.Event()

    def __call__(self, item):
        if isinstance(item, BaseException) or item[-1].usage is not None:
            self.done.set()


def _run_requests(loop: EngineLoop, n: int, tag: str) -> None:
    for i in range(n):  # one at a time: every prefill step is one 400-token prompt
        sink = _Sink()
        call = GenerateCall(request_id=f"{tag}{i}", prompt=" ".join(["w"] * 400), max_tokens=4,
                            sampling=SamplingParams(ignore_eos=True), priority=Priority.LOW)
        loop.submit(call, sink)
        assert sink.done.wait(30)


def test_loop_waits_out_a_modeled_cap_so_measured_costs_move():
    spec = ExpertSpec(name="s", engine={"kind": "synthetic", "model_params": 70_000_000_000}, max_batch=4)
    engine = SyntheticEngine(spec)
    dev = open_device(parse_device_spec("simulated:a100"), model_params=engine.info.params)
    slept: list[float] = []
    loop = EngineLoop(engine, dev, max_queue=8, sleep=lambda s: (slept.append(s), time.sleep(0))[1])
    loop.start()
    try:
        _run_requests(loop, 3, "a")
        assert slept == []  # uncapped: nothing to wait out
        free_prefill, free_j = loop.profile.prefill_ms_per_token, loop.profile.j_per_token
        dev.lock_sm_clock_mhz(705.0)  # half clock
        loop.profile.prefill_ms_per_token = None
        _run_requests(loop, 3, "b")
        extra = sum(dev.cap_slowdown_s(StepWork(prefill_tokens=400, decode_tokens=1, batch_size=1)))
        assert extra > 0 and sum(1 for s in slept if s == pytest.approx(extra, rel=1e-6)) == 3
        # prefill ms/token now carries the modeled ~1/f slowdown; the energy per token moves too
        assert loop.profile.prefill_ms_per_token >= 1000.0 * extra / 400 * 0.99
        assert loop.profile.prefill_ms_per_token > (free_prefill or 0.0)
        assert loop.profile.j_per_token != pytest.approx(free_j)
    finally:
        loop.stop()
    expected_low = load_profile("a100").max_sm_clock_mhz / 2
    assert dev.sm_clock_mhz() == expected_low
