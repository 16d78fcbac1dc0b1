"""The engine loop: threads, sinks, metering and conservation with a real engine and device."""

from __future__ import annotations

import time

import pytest

from tests.fakes import Collector
from tests.workers.engine_helpers import gen
from wattserve.devices import parse_device_spec
from wattserve.errors import EngineDead, InvalidRequest, QueueFull
from wattserve.specs import ExpertSpec
from wattserve.types import FinishReason
from workers.devices import open_device
from workers.engines.torch_engine import TorchEngine
from workers.loop import EngineLoop


@pytest.fixture(scope="module")
def engine(tiny_llama):
    spec = ExpertSpec(name="t", model={"kind": "local", "path": str(tiny_llama)}, engine={"kind": "torch", "threads": 1},
                      max_batch=4, max_model_len=128)
    return TorchEngine(tiny_llama, spec)


def make_loop(engine, device="cpu", max_queue=2):
    dev = open_device(parse_device_spec(device), model_params=engine.info.params)
    loop = EngineLoop(engine, dev, max_queue=max_queue)
    loop.start()
    return loop


@pytest.mark.parametrize("device", ["cpu", "simulated:h100"])
def test_concurrent_requests_conserve_energy(engine, device):
    loop = make_loop(engine, device)
    try:
        sinks = {f"c{i}": Collector() for i in range(5)}
        for rid, sink in sinks.items():
            loop.submit(gen(rid, n=10 + 3 * int(rid[1:])), sink)
        for sink in sinks.values():
            assert sink.done.wait(60)
        time.sleep(0.6)  # one idle tick
        snap = loop.snapshot()
        per_request = sum(s.usage.energy_j for s in sinks.values())
        assert all(s.usage.energy_j > 0 for s in sinks.values())
        assert all(s.usage.energy_source == loop.device.energy_source for s in sinks.values())
        assert snap.energy.requests_j == pytest.approx(per_request, rel=1e-9)
        assert snap.energy.requests_j + snap.energy.idle_j == pytest.approx(snap.energy.device_j, rel=1e-9)
        assert [s.usage.completion_tokens for s in sinks.values()] == [10, 13, 16, 19, 22]
        assert all(s.usage.finish_reason == FinishReason.LENGTH for s in sinks.values())
        assert all(0 < s.usage.ttft_ms <= s.usage.latency_ms for s in sinks.values())
        assert snap.running == 0 and snap.waiting == 0 and snap.requests_finished == 5
        assert loop.profile.decode_ms_per_token > 0 and loop.profile.prefill_ms_per_token > 0
    finally:
        loop.stop()


@pytest.mark.gpu
def test_cuda_engine_with_measured_energy_conserves(tiny_llama, real_nvml):  # noqa: F811 - a fixture
    """On a GPU host: the torch engine on CUDA, metered by the NVML counter; same accounting."""
    import torch

    if not torch.cuda.is_available():
        pytest.skip("no CUDA device")
    spec = ExpertSpec(name="t", model={"kind": "local", "path": str(tiny_llama)},
                      engine={"kind": "torch", "device": "cuda", "dtype": "float32"}, max_batch=4, max_model_len=128)
    loop = make_loop(TorchEngine(tiny_llama, spec), "nvml", max_queue=4)
    try:
        sinks = {f"g{i}": Collector() for i in range(3)}
        for i, (rid, sink) in enumerate(sinks.items()):
            loop.submit(gen(rid, n=20 + 5 * i), sink)
        assert all(sink.done.wait(120) for sink in sinks.values())
        assert [s.error for s in sinks.values()] == [None] * 3
        assert [s.usage.completion_tokens for s in sinks.values()] == [20, 25, 30]
        assert all(s.usage.energy_source.startswith("measured:nvml") and s.usage.energy_j > 0 for s in sinks.values())
        time.sleep(0.6)  # one idle tick
        snap = loop.snapshot()
        assert snap.energy.requests_j == pytest.approx(sum(s.usage.energy_j for s in sinks.values()), rel=1e-9)
        assert snap.energy.requests_j + snap.energy.idle_j == pytest.approx(snap.energy.device_j, rel=1e-9)
    finally:
        loop.stop()
        loop.device.close()


def test_queue_bound_and_duplicate_ids(engine):
    loop = make_loop(engine, max_queue=1)  # capacity 4 + 1
    try:
        sinks = [Collector() for _ in range(5)]
        for i, s in enumerate(sinks):
            loop.submit(gen(f"q{i}", n=60), s)
        with pytest.raises(InvalidRequest, match="already being served"):
            loop.submit(gen("q0"), Collector())
        with pytest.raises(QueueFull, match="max_batch \\+ max_queue = 5") as exc:
            loop.submit(gen("q5"), Collector())
        assert exc.value.details["retry_after_ms"] > 0
        for i in range(5):
            loop.abort(f"q{i}")
        for s in sinks:
            assert s.done.wait(30) and s.usage.finish_reason == FinishReason.ABORT
        loop.submit(gen("after", n=2), s2 := Collector())  # slots came back
        assert s2.done.wait(30) and s2.usage.completion_tokens == 2
    finally:
        loop.stop()


def test_engine_failure_fails_requests_and_marks_loop_dead(monkeypatch):
    from workers.engines.synthetic import SyntheticEngine

    engine = SyntheticEngine(ExpertSpec(name="n", engine="synthetic"))
    monkeypatch.setattr(engine, "step", lambda now: (_ for _ in ()).throw(RuntimeError("CUDA error: device lost")))
    loop = make_loop(engine)
    fatal = []
    loop.on_fatal = fatal.append
    try:
        sink = Collector()
        loop.submit(gen("boom"), sink)
        assert sink.done.wait(30)
        assert isinstance(sink.error, EngineDead) and "device lost" in str(sink.error)
        assert fatal and "device lost" in loop.snapshot().dead
        with pytest.raises(EngineDead):
            loop.submit(gen("later"), Collector())
    finally:
        loop.stop()
