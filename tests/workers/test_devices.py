"""Device backends: CPU model, simulated GPU profiles, NVML (faked, and real where a GPU is)."""

from __future__ import annotations

import json
import math
import random
import subprocess
import sys
import time
from importlib import resources
from pathlib import Path

import pynvml
import pytest

from tests.fakes import FakeClock, FakePynvml
from wattserve.devices import DEVICE_SPECS, parse_device_spec
from wattserve.errors import DeviceError
from wattserve.types import StepWork
from workers.devices import BACKENDS, open_device
from workers.devices import nvml as nvml_module
from workers.devices.cpu import CpuDevice
from workers.devices.nvml import NvmlDevice
from workers.devices.simulated import (
    DeviceProfile,
    SimulatedDevice,
    available_profiles,
    load_profile,
    step_latency_s,
    step_power_w,
)

DATA_DIR = Path(__file__).resolve().parents[3] / "shared" / "data" / "energy"
if not DATA_DIR.exists():
    DATA_DIR = Path("/work/shared/data/energy")
needs_data = pytest.mark.skipif(not DATA_DIR.exists(), reason="shared/data/energy is not present")


# --- CPU ---------------------------------------------------------------------------------------


def test_cpu_energy_is_core_seconds_times_watts_plus_idle():
    clock, cpu = FakeClock(), FakeClock(5.0)
    dev = CpuDevice(watts_per_core=10.0, idle_power_w=2.0, clock=clock, cpu_seconds=cpu)
    assert dev.energy_source == "modeled:cpu"
    assert dev.energy_j() == 0.0
    clock.advance(4.0)
    cpu.advance(6.0)  # 1.5 cores busy on average
    assert dev.energy_j() == pytest.approx(10.0 * 6.0 + 2.0 * 4.0)
    # power_w is the average since the previous call (here: since open)
    assert dev.power_w() == pytest.approx(68.0 / 4.0)
    clock.advance(2.0)
    assert dev.power_w() == pytest.approx(2.0)  # idle only: no CPU time in this interval
    assert dev.energy_j() == pytest.approx(72.0)


def test_cpu_counter_is_monotone_with_real_cpu_time():
    dev = CpuDevice(watts_per_core=4.4)
    readings = [dev.energy_j()]
    for _ in range(5):
        sum(i * i for i in range(20_000))  # burn a little CPU
        readings.append(dev.energy_j())
    assert all(b >= a for a, b in zip(readings, readings[1:], strict=False))
    assert readings[-1] > 0.0


# --- simulated ---------------------------------------------------------------------------------


def round_profile(**overrides) -> DeviceProfile:
    """A profile with round numbers, so expected values can be worked out by hand."""
    values = dict(
        name="round", description="round numbers", tdp_w=500.0, idle_w=100.0,
        peak_bf16_tflops=1000.0, mem_bandwidth_gbps=2000.0, max_sm_clock_mhz=2000.0,
        min_sm_clock_mhz=500.0, eta_compute=0.5, eta_mem=0.5, seq_bytes=0.0,
        seq_bytes_exponent=0.0, step_overhead_s=0.001, power_k_mem=1.0, power_k_compute=0.0,
    )
    values.update(overrides)
    return DeviceProfile(**values)


def test_step_latency_matches_hand_roofline():
    profile = round_profile()
    params = 1_000_000_000  # 2 GB of bf16 weights
    # decode, batch 4: memory time = 2e9 / (2e12 * 0.5) = 2 ms; compute = 8e9*... tiny
    decode = StepWork(decode_tokens=4, batch_size=4)
    assert step_latency_s(profile, decode, params) == pytest.approx(0.001 + 0.002)
    # prefill 1000 tokens: compute = 2 * 1e9 * 1000 / (1e15 * 0.5) = 4 ms > 2 ms memory
    prefill = StepWork(prefill_tokens=1000, batch_size=1)
    assert step_latency_s(profile, prefill, params) == pytest.approx(0.001 + 0.004)
    # half the layers: half of everything except the fixed overhead
    early_exit = StepWork(prefill_tokens=1000, batch_size=1, layer_fraction=0.5)
    assert step_latency_s(profile, early_exit, params) == pytest.approx(0.001 + 0.002)
    # early exit in a memory-bound decode batch: a layer's weights are read if any row runs it
    shallow = StepWork(decode_tokens=4, batch_size=4, layer_fraction=0.3, weight_fraction=0.75)
    assert step_latency_s(profile, shallow, params) == pytest.approx(0.001 + 0.002 * 0.75, rel=1e-3)
    # decode power: u_mem = 2e9 / (3e-3 * 2e12) = 1/3 -> 100 + 400 * (1 - e^-1/3)
    assert step_power_w(profile, decode, params) == pytest.approx(100 + 400 * (1 - math.exp(-1 / 3)))


def test_simulated_energy_is_idle_plus_modeled_steps():
    profile = round_profile()
    clock = FakeClock()
    dev = SimulatedDevice(profile, 1_000_000_000, clock=clock)
    assert dev.energy_source == "modeled:round"
    clock.advance(2.0)  # idle between open and the first step
    assert dev.energy_j() == pytest.approx(200.0)
    work = StepWork(decode_tokens=4, batch_size=4)
    dev.begin_step()
    clock.advance(0.5)  # host wall time inside a step is not charged as idle
    assert dev.power_w() == pytest.approx(profile.idle_w)  # no step finished yet
    dev.end_step(work)
    step_j = step_power_w(profile, work, 1_000_000_000) * 0.003
    assert dev.energy_j() == pytest.approx(200.0 + step_j)
    assert dev.last_step_latency_s == pytest.approx(0.003)
    clock.advance(1.0)
    assert dev.energy_j() == pytest.approx(300.0 + step_j)
    assert dev.power_w() == pytest.approx(profile.idle_w)
    dev.begin_step()
    assert dev.power_w() == pytest.approx(step_power_w(profile, work, 1_000_000_000))


def test_simulated_counter_is_monotone_under_random_use():
    rng = random.Random(7)
    clock = FakeClock()
    dev = SimulatedDevice(load_profile("h100"), 8_000_000_000, clock=clock)
    last = dev.energy_j()
    for _ in range(300):
        action = rng.choice(["begin", "end", "read", "wait"])
        if action == "begin":
            dev.begin_step()
        elif action == "end":
            dev.end_step(StepWork(prefill_tokens=rng.choice([0, 128]),
                                  decode_tokens=rng.randint(0, 64), batch_size=rng.randint(0, 64)))
        elif action == "wait":
            clock.advance(rng.random() * 0.05)
        now = dev.energy_j()
        assert now >= last
        last = now
    assert last > 0


def test_prefill_scales_with_clock_and_decode_does_not():
    h100 = load_profile("h100")
    params = 8_000_000_000
    prefill = StepWork(prefill_tokens=4096, batch_size=1)
    decode = StepWork(decode_tokens=8, batch_size=8)
    half = h100.max_sm_clock_mhz / 2
    prefill_ratio = step_latency_s(h100, prefill, params, half) / step_latency_s(h100, prefill, params)
    decode_ratio = step_latency_s(h100, decode, params, half) / step_latency_s(h100, decode, params)
    assert 1.7 < prefill_ratio <= 2.0  # compute-bound: ~1/clock (less the fixed overhead)
    assert decode_ratio < 1.02  # memory-bound: flat
    # ...but the lower clock still saves power on the memory-bound step (POLCA's lever)
    assert step_power_w(h100, decode, params, half) < step_power_w(h100, decode, params)
    with pytest.raises(ValueError, match="outside"):
        step_latency_s(h100, decode, params, h100.max_sm_clock_mhz * 2)


@pytest.mark.parametrize("name", ["a100", "h100", "b200", "orin"])
def test_profile_power_rises_with_batch_between_idle_and_tdp(name):
    profile = load_profile(name)
    params = 1_000_000_000 if name == "orin" else 8_000_000_000
    powers = [step_power_w(profile, StepWork(decode_tokens=b, batch_size=b), params)
              for b in (1, 8, 64, 256)]
    assert all(profile.idle_w < p < profile.tdp_w for p in powers)
    assert powers == sorted(powers) and powers[-1] > powers[0]


def test_profiles_are_cited_and_unknown_names_list_the_known_ones():
    assert available_profiles() == ["a100", "b200", "h100", "orin"]
    for name in available_profiles():
        entry = load_profile(name).provenance
        assert entry["datasheet"]["sources"], name
        assert entry["evaluation"]["fit"]["n_rows"] == len(entry["evaluation"]["fit"]["rows"]) > 0
        assert "median" in entry["evaluation"]["fit"]["errors"]["itl_s"]
    assert "THIN DATA" in load_profile("orin").provenance["notes"]
    with pytest.raises(DeviceError, match="available: a100, b200, h100, orin"):
        load_profile("tpu-v9")


def test_orin_says_its_power_is_borrowed_from_the_a100_fit_and_unvalidated():
    orin = SimulatedDevice("orin", 10**9, clock=FakeClock())
    assert orin.energy_source == "modeled:orin-unvalidated-power-from-a100-fit"
    assert "power unvalidated" in orin.name and "borrowed from the A100 fit" in orin.name
    assert load_profile("orin").provenance["power"]["validated"] is False
    for name in ("a100", "b200", "h100"):  # fitted to measured power: the plain label
        assert SimulatedDevice(name, 10**9, clock=FakeClock()).energy_source == f"modeled:{name}"
        assert load_profile(name).provenance["power"]["validated"] is True
    from workers.devices.fit_profiles import POWER

    assert {n: load_profile(n).provenance["power"] for n in available_profiles()} == POWER  # regenerated alike


@needs_data
def test_profiles_reproduce_held_out_rows_within_stated_tolerance():
    from workers.devices.fit_profiles import error_summary, load_rows

    doc = json.loads(resources.files("workers.devices").joinpath("profiles/profiles.json").read_text())
    tolerance = doc["holdout_tolerance"]
    rows = load_rows(DATA_DIR)
    checked = 0
    for name in ("a100", "b200", "h100"):
        held = [r for r in rows if r.gpu == name and r.role == "holdout"]
        assert held, name
        stored = doc["profiles"][name]["evaluation"]["holdout"]
        assert [r.row_id for r in held] == stored["rows"]
        errors = error_summary(load_profile(name), held)
        for metric, summary in errors.items():
            assert summary == pytest.approx(stored["errors"][metric], rel=1e-3), (name, metric)
            assert summary["median"] <= tolerance["median"], (name, metric, summary)
            assert summary["p90"] <= tolerance["p90"], (name, metric, summary)
            checked += 1
    assert checked >= 7


@needs_data
def test_refit_reproduces_committed_parameters():
    from workers.devices.fit_profiles import build_document

    doc = build_document(DATA_DIR)
    for name in available_profiles():
        fitted = load_profile(name).provenance["fitted"]
        assert doc["profiles"][name]["fitted"] == pytest.approx(fitted, rel=1e-3), name


# --- NVML --------------------------------------------------------------------------------------


@pytest.fixture(autouse=True)
def _gpu_share_dir(tmp_path, monkeypatch):
    """Each test's GPUs get their own energy-share ledgers (workers/devices/gpu_share.py)."""
    monkeypatch.setenv("WATTSERVE_GPU_SHARE_DIR", str(tmp_path))


def test_two_replicas_on_one_gpu_split_its_counter(monkeypatch):
    fake = FakePynvml(energy_mj=[2_000_000])
    monkeypatch.setattr(nvml_module, "pynvml", fake)
    clock = FakeClock()  # never advanced: energy moves only with counter readings
    a, b = (NvmlDevice(0, clock=clock, sample_interval_s=3600) for _ in range(2))

    def counter(mj):
        fake.energy_mj = [mj]
        a._sampler.sample()
        b._sampler.sample()

    a.begin_step()
    counter(2_300_000)  # a steps alone: 300 J
    a.end_step(None)
    assert (a.energy_j(), b.energy_j()) == pytest.approx((300.0, 0.0))
    a.begin_step()
    b.begin_step()
    counter(2_500_000)  # both step: 100 J each
    a.end_step(None)
    b.end_step(None)
    counter(2_540_000)  # both idle: 20 J each
    assert (a.energy_j(), b.energy_j()) == pytest.approx((420.0, 120.0))  # 540 J drawn, 540 booked
    b.close()
    counter(2_600_000)  # alone again: the whole counter
    assert a.energy_j() == pytest.approx(480.0)
    a.close()


def test_a_device_that_only_reads_power_takes_no_share(monkeypatch):
    # the power governor's node agent opens every GPU to read power and cap it, never to meter
    fake = FakePynvml(energy_mj=[1_000_000])
    monkeypatch.setattr(nvml_module, "pynvml", fake)
    meter, agent = (NvmlDevice(0, clock=FakeClock(), sample_interval_s=3600) for _ in range(2))
    assert meter.energy_j() == 0.0 and agent.power_w() == pytest.approx(250.0)
    fake.energy_mj = [1_100_000]
    meter._sampler.sample()
    assert meter.energy_j() == pytest.approx(100.0)
    agent.close()
    meter.close()


def test_nvml_energy_counter_is_relative_to_open(monkeypatch):
    fake = FakePynvml(energy_mj=[5_000_000, 5_250_000, 5_900_000])
    monkeypatch.setattr(nvml_module, "pynvml", fake)
    clock = FakeClock()
    dev = NvmlDevice(0, clock=clock, sample_interval_s=3600)  # samples only when asked to
    assert dev.name == "NVIDIA H100 80GB HBM3 #0"
    assert dev.energy_source == "measured:nvml"
    assert dev.energy_j() == 0.0
    dev._sampler.sample()
    assert dev.energy_j() == pytest.approx(250.0)
    clock.advance(0.4)  # between reads the last reading is extended by the board power (250 W)
    assert dev.energy_j() == pytest.approx(350.0)
    dev._sampler.sample()  # the counter replaces the extension
    assert dev.energy_j() == pytest.approx(900.0)
    clock.advance(2.0)
    assert dev.energy_j() == pytest.approx(1400.0)
    dev._sampler.sample()  # the counter stayed at 900 J: never below an earlier answer
    assert dev.energy_j() == pytest.approx(1400.0)
    assert dev.power_w() == pytest.approx(250.0)
    assert dev.power_limit_w() == pytest.approx(700.0)
    assert dev.sm_clock_mhz() == pytest.approx(1755.0)
    dev.close()
    dev.close()
    assert fake.shutdowns == 1
    assert not dev._sampler._thread.is_alive()


@pytest.mark.parametrize(
    ("function", "code", "message"),
    [
        ("nvmlInit", pynvml.NVML_ERROR_LIBRARY_NOT_FOUND, "NVML is not available on this host"),
        ("nvmlInit", pynvml.NVML_ERROR_DRIVER_NOT_LOADED, "use device: cpu or simulated"),
        ("nvmlDeviceGetTotalEnergyConsumption", pynvml.NVML_ERROR_NO_PERMISSION, "denied permission"),
        ("nvmlDeviceGetTotalEnergyConsumption", pynvml.NVML_ERROR_GPU_IS_LOST, "fallen off the bus"),
    ],
)
def test_nvml_errors_become_device_errors(monkeypatch, function, code, message):
    fake = FakePynvml(fail={function: code})
    monkeypatch.setattr(nvml_module, "pynvml", fake)
    with pytest.raises(DeviceError, match=message) as info:
        NvmlDevice(0)
    assert info.value.details["nvml_code"] == code
    # a failure after nvmlInit must not leak the NVML reference
    assert fake.shutdowns == (0 if function == "nvmlInit" else 1)


def test_nvml_missing_gpu_index(monkeypatch):
    monkeypatch.setattr(nvml_module, "pynvml", FakePynvml(count=2))
    with pytest.raises(DeviceError, match="no GPU with index 3: NVML sees 2"):
        NvmlDevice(3)


def test_nvml_falls_back_to_integrating_power(monkeypatch):
    fake = FakePynvml(fail={"nvmlDeviceGetTotalEnergyConsumption": pynvml.NVML_ERROR_NOT_SUPPORTED},
                      power_mw=200_000)
    monkeypatch.setattr(nvml_module, "pynvml", fake)
    clock = FakeClock()
    dev = NvmlDevice(0, clock=clock, sample_interval_s=3600)  # samples only when asked to
    try:
        assert dev.energy_source == "measured:nvml-power"
        clock.advance(2.0)
        dev._sampler.sample()
        assert dev.energy_j() == pytest.approx(400.0)
        fake.power_mw = 100_000
        clock.advance(1.0)
        dev._sampler.sample()  # trapezoid: (200 + 100) / 2 W for 1 s
        assert dev.energy_j() == pytest.approx(550.0)
        clock.advance(1.0)  # between samples the last reading is extended to now
        assert dev.energy_j() == pytest.approx(650.0)
    finally:
        dev.close()


def test_nvml_sampler_thread_runs(monkeypatch):
    fake = FakePynvml(fail={"nvmlDeviceGetTotalEnergyConsumption": pynvml.NVML_ERROR_NOT_SUPPORTED})
    monkeypatch.setattr(nvml_module, "pynvml", fake)
    clock = FakeClock()
    dev = NvmlDevice(0, clock=clock, sample_interval_s=0.001)
    try:
        clock.advance(1.0)
        for _ in range(200):  # wait for the thread to take a sample at the new time
            if dev._sampler._t == clock.t:
                break
            time.sleep(0.005)
        assert dev._sampler._t == clock.t
        assert dev.energy_j() == pytest.approx(250.0)
    finally:
        dev.close()
    assert not dev._sampler._thread.is_alive()





@pytest.mark.gpu
def test_real_nvml_device(real_nvml):
    dev = NvmlDevice(0)
    try:
        assert dev.energy_source in ("measured:nvml", "measured:nvml-power")
        first = dev.energy_j()
        assert dev.power_w() > 0
        assert dev.power_limit_w() > 0
        assert dev.sm_clock_mhz() >= 0
        time.sleep(0.3)  # an idle GPU still draws tens of watts; the counter updates ~every 100 ms
        assert dev.energy_j() > first >= 0.0
    finally:
        dev.close()


def test_every_nvml_function_the_backends_call_exists_in_pynvml():
    """The fakes implement what the code calls; this pins those names to the real binding, where a
    misspelt one would otherwise surface only on a GPU host (as one once did)."""
    import re

    from workers.devices import control

    called = set()
    for module in (nvml_module, control):
        called |= set(re.findall(r'"(nvml[A-Z]\w+)"', Path(module.__file__).read_text()))
    assert "nvmlDeviceGetTotalEnergyConsumption" in called
    assert sorted(name for name in called if not hasattr(pynvml, name)) == []


def test_real_pynvml_without_driver_gives_readable_error():
    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError:
        with pytest.raises(DeviceError, match="NVML is not available on this host"):
            NvmlDevice(0)
    else:
        pynvml.nvmlShutdown()
        pytest.skip("this host has an NVIDIA driver")


# --- factory -----------------------------------------------------------------------------------


def test_open_device_builds_each_backend(monkeypatch):
    clock = FakeClock()
    cpu = open_device(parse_device_spec({"backend": "cpu", "watts_per_core": 3.0}), clock=clock)
    assert isinstance(cpu, CpuDevice) and cpu.watts_per_core == 3.0
    sim = open_device(parse_device_spec("simulated:h100"), model_params=135_000_000, clock=clock)
    assert isinstance(sim, SimulatedDevice) and sim.energy_source == "modeled:h100"
    clock.advance(1.0)
    assert sim.energy_j() == pytest.approx(load_profile("h100").idle_w)
    with pytest.raises(DeviceError, match="parameter count"):
        open_device(parse_device_spec("simulated:h100"))
    with pytest.raises(DeviceError, match="available"):
        open_device(parse_device_spec("simulated:v100"), model_params=1)
    monkeypatch.setattr(nvml_module, "pynvml",
                        FakePynvml(fail={"nvmlInit": pynvml.NVML_ERROR_LIBRARY_NOT_FOUND}))
    with pytest.raises(DeviceError, match="NVML is not available"):
        open_device(parse_device_spec("nvml:0"))


def test_every_device_spec_has_a_backend_whose_module_opens_it():
    assert {b.spec for b in BACKENDS.values()} == set(DEVICE_SPECS)
    for name, backend in BACKENDS.items():
        assert backend.spec.model_fields["backend"].default == name
        assert callable(backend.factory())


def test_factory_imports_pynvml_only_for_nvml():
    code = (
        "import sys\n"
        "from wattserve.devices import parse_device_spec\n"
        "from workers.devices import open_device\n"
        "open_device(parse_device_spec('cpu'))\n"
        "open_device(parse_device_spec('simulated:orin'), model_params=10**9)\n"
        "assert 'pynvml' not in sys.modules, 'pynvml imported'\n"
        "assert 'workers.devices.nvml' not in sys.modules\n"
    )
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
