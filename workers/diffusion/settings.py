"""Resolve a client's stream or text-to-image parameters against the expert's defaults and the
model's limits. Pure and thread-safe: every problem is an InvalidRequest saying what to fix,
raised before any state is created."""

from __future__ import annotations

import math

from wattserve.errors import InvalidRequest
from wattserve.images import (
    CfgType,
    ImageFormat,
    ImageParams,
    SimilarityFilterParams,
    StreamSettings,
    unet_evaluations_per_frame,
)
from wattserve.specs import DiffusionEngineSpec

MAX_PROMPT_CHARS = 4096
MAX_SEED = 2**63 - 1


def _finite_in(name: str, value: float, low: float, high: float) -> float:
    if not math.isfinite(value) or not low <= value <= high:
        raise InvalidRequest(f"{name} must be in [{low:g}, {high:g}] (got {value})")
    return float(value)


def resolve_size(params: ImageParams, engine: DiffusionEngineSpec, model) -> tuple[int, int]:
    """``(width, height)`` in pixels, checked against the model's size multiple and max_pixels."""
    width = params.width or model.default_width
    height = params.height or model.default_height
    m = model.size_multiple
    for name, value in (("width", width), ("height", height)):
        if value <= 0 or value % m:
            raise InvalidRequest(f"{name} {value} must be a positive multiple of {m} for this model")
    if width * height > engine.max_pixels:
        raise InvalidRequest(f"{width}x{height} is {width * height} pixels; this expert allows at most {engine.max_pixels}")
    return width, height


def resolve_similarity(params: SimilarityFilterParams | None, engine: DiffusionEngineSpec) -> SimilarityFilterParams:
    if params is None:
        return SimilarityFilterParams(engine.similarity_filter, engine.similarity_threshold, engine.max_skip_frames)
    _finite_in("similarity_filter.threshold", params.threshold, 0.0, 1.0)
    if not 0 <= params.max_skip_frames <= 10_000:
        raise InvalidRequest(f"similarity_filter.max_skip_frames must be in [0, 10000] (got {params.max_skip_frames})")
    return params


def check_prompts(params: ImageParams, model) -> None:
    if not params.prompt.strip():
        raise InvalidRequest("prompt is empty: describe the image to generate")
    for name, text in (("prompt", params.prompt), ("negative_prompt", params.negative_prompt)):
        if len(text) > MAX_PROMPT_CHARS:
            raise InvalidRequest(f"{name} is {len(text)} characters; at most {MAX_PROMPT_CHARS}")
        model.tokenize(text)  # raises if over the text encoder's length


def resolve_settings(
    params: ImageParams,
    engine: DiffusionEngineSpec,
    model,
    *,
    similarity: SimilarityFilterParams | None = None,
    frame_buffer_size: int = 0,
    energy_source: str = "",
) -> StreamSettings:
    """Settings a session or job runs with; ``model`` is a loaded DiffusionModel (sizes, tokenizer)."""
    check_prompts(params, model)
    t_index = tuple(params.t_index_list) or tuple(engine.t_index_list)
    if any(b <= a for a, b in zip(t_index, t_index[1:], strict=False)) or t_index[0] < 0 or t_index[-1] >= engine.schedule_steps:
        raise InvalidRequest(
            f"t_index_list {list(t_index)} must be strictly increasing indices in [0, {engine.schedule_steps})"
        )
    cfg = CfgType(params.cfg_type or engine.cfg_type)
    gamma = _finite_in("guidance_scale", engine.guidance_scale if params.guidance_scale is None else params.guidance_scale, 1.0, 50.0)
    delta = _finite_in("delta", engine.delta if params.delta is None else params.delta, 0.0, 10.0)
    if gamma == 1.0:
        cfg = CfgType.NONE  # eps_u + 1 * (eps_c - eps_u) == eps_c: no negative is worth computing
    fbs = frame_buffer_size or engine.frame_buffer_size
    if not 1 <= fbs <= engine.max_frame_buffer_size:
        raise InvalidRequest(f"frame_buffer_size must be in [1, {engine.max_frame_buffer_size}] (got {fbs})")
    width, height = resolve_size(params, engine, model)
    seed = engine.seed if params.seed is None else params.seed
    if not 0 <= seed <= MAX_SEED:
        raise InvalidRequest(f"seed must be in [0, 2^63 - 1] (got {seed})")
    if params.jpeg_quality and not 1 <= params.jpeg_quality <= 95:
        raise InvalidRequest(f"jpeg_quality must be in [1, 95] (got {params.jpeg_quality}); 0 means 90")
    steps = len(t_index)
    return StreamSettings(
        t_index_list=t_index,
        timesteps=(),  # filled in by the session from its schedule
        cfg_type=cfg,
        guidance_scale=gamma,
        delta=delta,
        frame_buffer_size=fbs,
        width=width,
        height=height,
        seed=seed,
        similarity=resolve_similarity(similarity, engine),
        output_format=ImageFormat(params.output_format),
        unet_evaluations_per_frame=unet_evaluations_per_frame(cfg, steps),
        output_lag_frames=steps - 1 if engine.stream_batch else 0,
        energy_source=energy_source,
        setup_energy_j=0.0,
    )
