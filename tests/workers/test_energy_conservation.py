"""Conservation against the device's own counter, not as an identity of the ledger.

``EnergyLedger`` books every reading it is given into requests or idle, so ``requests_j +
idle_j == device_j`` holds whatever the readings were. These tests compare what the engine
loop booked (and what the requests were told) with the counter's delta over a whole run as the
test itself reads it: a fake NVML counter the test and the engine move, two replicas splitting
one fake GPU, the simulated device on an injected clock, and the CPU model on real CPU time.
"""

from __future__ import annotations

import threading
import time

import pytest

from tests.fakes import Collector, FakeClock, FakePynvml
from tests.workers.engine_helpers import gen
from wattserve.devices import parse_device_spec
from wattserve.specs import ExpertSpec
from workers.devices import nvml as nvml_module
from workers.devices import open_device
from workers.devices.nvml import NvmlDevice
from workers.engines.torch_engine import TorchEngine
from workers.loop import EngineLoop

STEP_MJ_PER_TOKEN = 1_500  # what the fake GPU draws per token an engine step processes
IDLE_MJ = 40_000  # a pause between requests


class FakeGpu(FakePynvml):
    """An NVML whose energy counter (mJ since driver load) moves only when told to."""

    def __init__(self) -> None:
        super().__init__(energy_mj=(7_000_000,))
        self._lock = threading.Lock()
        self.mj = 7_000_000

    def draw(self, mj: int) -> None:
        with self._lock:
            self.mj += mj

    def nvmlDeviceGetTotalEnergyConsumption(self, handle):
        with self._lock:
            return self.mj


class DrawingEngine:
    """A real engine whose steps make the fake GPU's counter rise with the tokens they process."""

    def __init__(self, engine, gpu: FakeGpu) -> None:
        self._engine, self._gpu = engine, gpu

    def step(self, now):
        result = self._engine.step(now)
        self._gpu.draw(STEP_MJ_PER_TOKEN * result.work.tokens)
        return result

    def __getattr__(self, name):
        return getattr(self._engine, name)


def torch_engine(tiny_llama):
    spec = ExpertSpec(name="t", model={"kind": "local", "path": str(tiny_llama)}, engine={"kind": "torch", "threads": 1},
                      max_batch=4, max_model_len=128)
    return TorchEngine(tiny_llama, spec)


@pytest.fixture(scope="module")
def engines(tiny_llama):
    return torch_engine(tiny_llama), torch_engine(tiny_llama)


@pytest.fixture(autouse=True)
def _gpu_share_dir(tmp_path, monkeypatch):
    monkeypatch.setenv("WATTSERVE_GPU_SHARE_DIR", str(tmp_path))


def serve(loop: EngineLoop, prefix: str, lengths) -> list[Collector]:
    sinks = []
    for i, n in enumerate(lengths):
        sink = Collector()
        loop.submit(gen(f"{prefix}{i}", n=n), sink)
        sinks.append(sink)
    for sink in sinks:
        assert sink.done.wait(60) and sink.error is None
    return sinks


def booked(loop: EngineLoop, sinks) -> tuple[float, float]:
    """(requests + idle the loop booked, what the requests were told plus idle)."""
    totals = loop.ledger.totals()
    told = sum(s.usage.energy_j for s in sinks)
    return totals.requests_j + totals.idle_j, told + totals.idle_j


def test_fake_nvml_counter_delta_is_what_requests_and_idle_got(engines, monkeypatch):
    gpu = FakeGpu()
    monkeypatch.setattr(nvml_module, "pynvml", gpu)
    device = NvmlDevice(0, clock=FakeClock(), sample_interval_s=0.01)  # a frozen clock: no extrapolation
    loop = EngineLoop(DrawingEngine(engines[0], gpu), device, max_queue=4)
    start_mj = gpu.mj
    loop.start()
    try:
        sinks = serve(loop, "a", [12, 7, 20])
        gpu.draw(IDLE_MJ)  # idle between bursts
        time.sleep(0.05)
        sinks += serve(loop, "b", [9])
        gpu.draw(IDLE_MJ)  # drawn just before the expert stops, after the last background read
    finally:
        loop.stop()
        device.close()
    counter_j = (gpu.mj - start_mj) / 1000.0
    assert counter_j > 2 * IDLE_MJ / 1000.0
    loop_j, told_j = booked(loop, sinks)
    assert loop_j == pytest.approx(counter_j, rel=1e-9)
    assert told_j == pytest.approx(counter_j, rel=1e-9)
    # Each request's share is whatever the counter moved during its steps, read by the background
    # sampler: with this frozen clock (no extrapolation between samples) a short request whose steps
    # all fall between two samples books 0 J and the next step's requests carry it (it failed once
    # in a full run). Every joule is still booked once (above); per request only its source holds.
    assert all(s.usage.energy_j >= 0 and s.usage.energy_source == "measured:nvml" for s in sinks)
    assert sum(s.usage.energy_j for s in sinks) > 0


def test_replicas_sharing_one_gpu_add_up_to_its_counter(engines, monkeypatch):
    gpu = FakeGpu()
    monkeypatch.setattr(nvml_module, "pynvml", gpu)
    devices = [NvmlDevice(0, clock=FakeClock(), sample_interval_s=0.01) for _ in range(2)]
    loops = [EngineLoop(DrawingEngine(e, gpu), d, max_queue=4) for e, d in zip(engines, devices, strict=True)]
    start_mj = gpu.mj
    for loop in loops:
        loop.start()
    sinks: dict[int, list[Collector]] = {}
    try:
        gpu.draw(IDLE_MJ)  # both idle
        workers = [threading.Thread(target=lambda k=k, n=n: sinks.__setitem__(k, serve(loops[k], f"r{k}-", n)))
                   for k, n in ((0, [15, 10, 18]), (1, [6, 25]))]
        for w in workers:
            w.start()
        for w in workers:
            w.join(120)
        gpu.draw(IDLE_MJ)
    finally:
        for loop in loops:
            loop.stop()
        for device in devices:
            device.close()
    counter_j = (gpu.mj - start_mj) / 1000.0
    per_replica = [booked(loop, sinks[k]) for k, loop in enumerate(loops)]
    assert all(loop_j > 0 for loop_j, _ in per_replica)
    assert sum(loop_j for loop_j, _ in per_replica) == pytest.approx(counter_j, rel=1e-9)  # every joule once
    assert sum(told_j for _, told_j in per_replica) == pytest.approx(counter_j, rel=1e-9)


def test_simulated_device_counter_over_a_run_stopped_mid_request(engines):
    clock = FakeClock()
    device = open_device(parse_device_spec("simulated:h100"), model_params=engines[0].info.params, clock=clock)
    start_j = device.energy_j()
    loop = EngineLoop(engines[0], device, max_queue=4)
    loop.start()
    clock.advance(3.0)
    sinks = serve(loop, "s", [10, 14])
    clock.advance(2.0)
    cut = Collector()
    loop.submit(gen("cut", n=100), cut)
    deadline = time.monotonic() + 30
    while not cut.events and time.monotonic() < deadline:
        time.sleep(0.005)
    loop.stop()  # mid-request: the loop leaves between two steps
    assert not loop._thread.is_alive()
    engines[0].abort("cut")  # the module's engine serves the next test's loop
    clock.advance(1.0)  # the device idles after the loop left: not this run's
    counter_j = device.energy_j() - start_j - device.profile.idle_w * 1.0
    totals = loop.ledger.totals()
    assert totals.idle_j >= device.profile.idle_w * 5.0 * (1 - 1e-9)
    assert totals.requests_j + totals.idle_j == pytest.approx(counter_j, rel=1e-9)
    told = sum(s.usage.energy_j for s in sinks) + loop.ledger.charged("cut")
    assert told + totals.idle_j == pytest.approx(counter_j, rel=1e-9)


def test_cpu_device_counter_over_a_run(engines):
    device = open_device(parse_device_spec("cpu"))
    start_j = device.energy_j()
    loop = EngineLoop(engines[0], device, max_queue=4)
    loop.start()
    sinks = serve(loop, "c", [16, 8, 12])
    loop.stop()
    counter_j = device.energy_j() - start_j
    loop_j, told_j = booked(loop, sinks)
    # Only the CPU time between the test's readings and the loop's own (a few statements) is
    # outside the run; real CPU time moves in between, so this one is not exact.
    assert loop_j == pytest.approx(counter_j, rel=1e-3, abs=5e-3)
    assert told_j == pytest.approx(counter_j, rel=1e-3, abs=5e-3)
    assert loop.ledger.totals().requests_j > 0.5 * loop_j  # the requests, not idle, took the CPU
