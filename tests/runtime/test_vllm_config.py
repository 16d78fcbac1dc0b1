"""The runtime's side of the vLLM engine, without vLLM: presets, engine metrics on /metrics, the
reason an unhealthy replica gives, and a server that starts without a replica that failed."""

from __future__ import annotations

from pathlib import Path

import pytest

from router.base import Candidate, RequestFeatures
from router.policies.least_loaded import LeastLoaded
from runtime.config import load_config, parse_config
from runtime.engine_metrics import merge_metrics
from tests.fakes import FakeActor
from wattserve.errors import ConfigError, NoHealthyExpert
from wattserve.types import ExpertProfile

CONFIGS = Path(__file__).resolve().parents[2] / "configs"

VLLM_TEXT = """# HELP vllm:num_requests_running Number of requests in model execution batches.
# TYPE vllm:num_requests_running gauge
vllm:num_requests_running{engine="0",model_name="cloud"} 3.0
# HELP vllm:generation_tokens_total Number of generation tokens processed.
# TYPE vllm:generation_tokens_total counter
vllm:generation_tokens_total{engine="0",model_name="cloud"} 120.0
# HELP vllm:time_to_first_token_seconds Histogram of time to first token in seconds.
# TYPE vllm:time_to_first_token_seconds histogram
vllm:time_to_first_token_seconds_bucket{engine="0",le="0.5",model_name="cloud"} 2.0
vllm:time_to_first_token_seconds_bucket{engine="0",le="+Inf",model_name="cloud"} 3.0
vllm:time_to_first_token_seconds_count{engine="0",model_name="cloud"} 3.0
vllm:time_to_first_token_seconds_sum{engine="0",model_name="cloud"} 1.25
"""


def test_gpu_preset_runs_both_experts_on_vllm_with_measured_energy():
    cfg = load_config(CONFIGS / "gpu.yaml")
    assert [(e.name, e.engine.kind, e.device.backend) for e in cfg.experts] == [
        ("edge", "vllm", "nvml"), ("cloud", "vllm", "nvml")]
    assert all(e.resources.num_gpus > 0 for e in cfg.experts)
    assert sum(e.engine.gpu_memory_utilization for e in cfg.experts) < 1.0  # they share one GPU


def test_local_vllm_preset_keeps_the_edge_expert_on_torch():
    cfg = load_config(CONFIGS / "local-vllm.yaml")
    assert {e.name: e.engine.kind for e in cfg.experts} == {"edge": "torch", "cloud": "vllm"}
    assert cfg.expert("cloud").engine.enforce_eager and cfg.expert("cloud").engine.cpu_kvcache_space_gib == 1


def test_unknown_vllm_keys_name_the_file_and_the_key():
    with pytest.raises(ConfigError, match=r"experts\.0\.engine\.vllm\.gpu_mem: unknown key \(allowed: .*gpu_memory_utilization"):
        parse_config({"experts": [{"name": "x", "model": {"kind": "local", "path": "/m"},
                                   "engine": {"kind": "vllm", "gpu_mem": 0.5}}]}, "x.yaml")


def test_engine_metrics_are_merged_with_expert_and_replica_labels():
    text = merge_metrics({("cloud", "0"): VLLM_TEXT, ("cloud", "1"): VLLM_TEXT.replace(" 3.0\n", " 5.0\n", 1)}).decode()
    assert text.count("# TYPE vllm:num_requests_running gauge") == 1
    assert 'vllm:num_requests_running{engine="0",expert="cloud",model_name="cloud",replica="0"} 3.0' in text
    assert 'vllm:num_requests_running{engine="0",expert="cloud",model_name="cloud",replica="1"} 5.0' in text
    assert 'vllm:generation_tokens_total{engine="0",expert="cloud",model_name="cloud",replica="1"} 120.0' in text
    assert 'vllm:time_to_first_token_seconds_bucket{engine="0",expert="cloud",le="+Inf",model_name="cloud",replica="0"} 3.0' in text
    assert merge_metrics({}) == b""


def _profile(expert: str, error: str) -> ExpertProfile:
    return ExpertProfile(expert=expert, replica=0, model="m", engine="vllm", device="cpu", energy_source="modeled:cpu",
                         priority_class="high", max_batch=8, max_queue=8, max_model_len=512, params=1,
                         healthy=not error, running=0, waiting=0, error=error)


def test_no_healthy_replica_error_carries_what_the_replicas_say():
    broken = Candidate("cloud", 0, False, 0, _profile("cloud", "vLLM engine failed to start: ValueError: no GPU"))
    with pytest.raises(NoHealthyExpert, match=r"expert 'cloud' .*: cloud/0: vLLM engine failed to start: ValueError: no GPU"):
        LeastLoaded().plan(RequestFeatures(prompt_chars=1, max_tokens=1, expert="cloud"), [broken])


class _Replica:
    """A replica's readiness answer: True, or the error its start-up died with."""

    def __init__(self, fail: str | None = None) -> None:
        self.fail = fail

    async def ready(self) -> bool:
        if self.fail:
            raise ConfigError(self.fail)
        return True


def _actor(fail: str | None = None) -> FakeActor:
    return FakeActor(_Replica(fail))


async def test_pool_can_start_without_replicas_that_failed():
    from runtime.cluster import ExpertPool, Replica

    pool = ExpertPool([], "/tmp")
    pool.replicas = {"ok": [Replica("ok", 0, _actor())], "bad": [Replica("bad", 0, _actor("engine exploded"))]}
    lines: list[str] = []
    failures = await pool.wait_ready(30, lines.append, require_all=False)
    assert failures == ["wattserve:bad:0: engine exploded"]
    assert any(line.startswith("serving without wattserve:bad:0") for line in lines)
    with pytest.raises(ConfigError, match="experts failed to start: wattserve:bad:0: engine exploded"):
        await pool.wait_ready(30, lines.append)
    pool.replicas = {"bad": [Replica("bad", 0, _actor("engine exploded"))]}
    with pytest.raises(ConfigError, match="experts failed to start"):  # nothing at all came up
        await pool.wait_ready(30, lines.append, require_all=False)
