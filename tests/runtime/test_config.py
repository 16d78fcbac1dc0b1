"""Config files: every preset validates; mistakes name the file and the key."""

from __future__ import annotations

from pathlib import Path

import pytest

from runtime.config import load_config, parse_config
from wattserve.devices import CpuDeviceSpec, NvmlDeviceSpec, SimulatedDeviceSpec, parse_device_spec
from wattserve.errors import ConfigError

CONFIGS = sorted((Path(__file__).resolve().parents[2] / "configs").glob("*.yaml"))


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: p.name)
def test_presets_validate(path):
    cfg = load_config(path)
    assert cfg.experts
    if cfg.model_cache_dir:
        assert Path(cfg.model_cache_dir).is_absolute()


def test_local_preset_runs_two_models_of_different_size():
    cfg = load_config(next(p for p in CONFIGS if p.name == "local.yaml"))
    assert [e.name for e in cfg.experts] == ["edge", "cloud"]
    assert cfg.ray.address is None and cfg.gateway.host == "127.0.0.1"
    assert {e.engine.kind for e in cfg.experts} == {"llamacpp"}  # GGUF experts on llama.cpp (docs/llamacpp.md)


def _write(tmp_path, text):
    p = tmp_path / "bad.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize(
    "text, expected",
    [
        ("experts:\n  - name: a\n    engine: synthetic\n    devcie: cpu\n", "bad.yaml: experts.0.devcie: unknown key (allowed: "),
        ("gateway: {prot: 1}\nexperts: [{name: a, engine: synthetic}]\n", "gateway.prot: unknown key (allowed: default_max_tokens"),
        ("experts:\n  - name: a\n    model: {kind: local, pth: /x}\n", "experts.0.model.local.pth: unknown key (allowed: kind, path)"),
        ("experts:\n  - name: a\n    engine: torch\n", "needs a `model`"),
        ("experts: [{name: a, engine: synthetic}, {name: a, engine: synthetic}]\n", "duplicate expert names: a"),
        ("experts: [{name: a, engine: synthetic, device: 'simulated:'}]\n", "need a profile"),
        ("experts: [{name: a, engine: synthetic, device: {backend: cpu, index: 1}}]\n",
         "experts.0.device: Value error, 'index' is a field of device backend nvml, not cpu (which takes: watts_per_core, idle_power_w)"),
        ("experts: [{name: a, engine: synthetic, device: {backend: simulated, profile: h100, watts_per_core: 2}}]\n",
         "'watts_per_core' is a field of device backend cpu, not simulated"),
        ("experts: [{name: a, engine: synthetic, device: {backend: nvml, indx: 1}}]\n",
         "experts.0.device.nvml.indx: unknown key (allowed: backend, index)"),
        ("experts: [{name: a, engine: synthetic, device: tpu}]\n", "expected tags: 'cpu', 'nvml', 'simulated'"),
        ("experts: [{name: a, engine: synthetic, device: 'cpu:2'}]\n", "device 'cpu' takes no ':<argument>'"),
        ("gateway: {routing_policy: oracle}\nexperts: [{name: a, engine: synthetic}]\n",
         "gateway.routing_policy: Value error, unknown routing policy 'oracle'; known: cheapest, least_loaded, moe2, "),
        ("gateway: {replica_order: fullest}\nexperts: [{name: a, engine: synthetic}]\n",
         "gateway.replica_order: Input should be 'least_loaded' or 'packed'"),
        ("experts: [{name: a, engine: synthetic, max_batch: 0}]\n", "experts.0.max_batch"),
        ("experts: [\n", "not valid YAML"),
        ("- just a list\n", "expected a mapping"),
        ("ray: {}\n", "experts: required key is missing"),
        ("experts: [{name: a, engine: synthetic}]\nrouter: {cost_priors: {a: {prefill_ms_per_token: 1, "
         "decode_ms_per_token: 9}}}\n", "router.cost_priors.a: Value error, a cost prior needs busy_power_w"),
    ],
)
def test_mistakes_name_file_and_key(tmp_path, text, expected):
    with pytest.raises(ConfigError) as err:
        load_config(_write(tmp_path, text))
    assert expected in str(err.value)
    assert str(err.value).startswith(str(tmp_path / "bad.yaml"))


def test_missing_file_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="cannot read config file"):
        load_config(tmp_path / "nope.yaml")


def test_shorthands_and_relative_cache_dir(tmp_path):
    p = _write(tmp_path, "model_cache_dir: cache\nexperts:\n  - {name: a, engine: synthetic, device: 'nvml:1'}\n  - {name: b, engine: synthetic, device: 'simulated:a100'}\n")
    cfg = load_config(p)
    assert cfg.experts[0].device.backend == "nvml" and cfg.experts[0].device.index == 1
    assert cfg.experts[1].device.label == "simulated:a100"
    assert cfg.model_cache_dir == str((tmp_path / "cache").resolve())


@pytest.mark.parametrize(
    "device, spec, label, is_gpu",
    [
        (None, CpuDeviceSpec, "cpu", False),
        ("cpu", CpuDeviceSpec, "cpu", False),
        ({"watts_per_core": 3.0}, CpuDeviceSpec, "cpu", False),  # the mapping form defaults to cpu
        ("nvml", NvmlDeviceSpec, "nvml:0", True),
        ("nvml:1", NvmlDeviceSpec, "nvml:1", True),
        ({"backend": "nvml", "index": 2}, NvmlDeviceSpec, "nvml:2", True),
        ("simulated:h100", SimulatedDeviceSpec, "simulated:h100", True),
        ({"backend": "simulated", "profile": "a100", "actuation_delay_s": 2.0}, SimulatedDeviceSpec, "simulated:a100", True),
    ],
)
def test_each_device_form_parses_to_its_backends_spec(device, spec, label, is_gpu):
    expert = {"name": "a", "engine": "synthetic"} | ({"device": device} if device is not None else {})
    parsed = parse_config({"experts": [expert]}).experts[0].device
    assert type(parsed) is spec and parsed.label == label and parsed.is_gpu is is_gpu
    again = parse_device_spec(parsed.label)  # a label is the shorthand that names the device again
    assert type(again) is spec and again.label == label


def test_config_reference_doc_is_current():
    from runtime.config import config_reference

    doc = Path(__file__).resolve().parents[2] / "docs" / "config.md"
    assert doc.read_text().strip() == config_reference().strip(), "run: python -m runtime.config > docs/config.md"
