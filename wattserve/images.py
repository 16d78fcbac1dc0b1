"""Message types of the image experts (StreamDiffusion-style streaming image-to-image and one-shot
text-to-image) that cross process boundaries: gateway <-> image expert actors.

Standard library only, like :mod:`wattserve.types`: slotted dataclasses pickled by Ray. Pixels
travel as raw bytes (row-major ``height x width x 3``, uint8 RGB) or as PNG/JPEG bytes; units are
in the field names.
"""

from __future__ import annotations

import enum
from dataclasses import dataclass, field

from .types import Priority


class CfgType(enum.StrEnum):
    """Classifier-free guidance variant; UNet evaluations per frame with n denoising steps."""

    NONE = "none"  # n: no guidance
    SELF = "self"  # n: residual CFG, the negative is the virtual residual noise towards the input
    INITIALIZE = "initialize"  # n + 1: residual CFG, one real negative evaluation at a frame's first step
    FULL = "full"  # 2n: conventional CFG, a negative evaluation at every step


def unet_evaluations_per_frame(cfg_type: CfgType | str, steps: int) -> int:
    """UNet evaluations (batch rows) one frame costs with ``steps`` denoising steps."""
    cfg = CfgType(cfg_type)
    if cfg is CfgType.FULL:
        return 2 * steps
    if cfg is CfgType.INITIALIZE:
        return steps + 1
    return steps


class ImageFormat(enum.StrEnum):
    PNG = "png"
    JPEG = "jpeg"
    RAW_RGB = "raw_rgb"  # height x width x 3 uint8, row-major; the shape travels beside the bytes


@dataclass(slots=True, frozen=True)
class ImageData:
    """An image as bytes. For PNG/JPEG ``width``/``height`` are optional checks (0: unchecked);
    for raw RGB they are required and ``channels`` must be 3."""

    data: bytes
    format: ImageFormat = ImageFormat.PNG
    width: int = 0
    height: int = 0
    channels: int = 3


@dataclass(slots=True, frozen=True)
class SimilarityFilterParams:
    """Stochastic similarity filter: skip a frame with probability
    ``max(0, (c - threshold) / (1 - threshold))`` where ``c`` is its cosine similarity to the last
    processed frame, but never more than ``max_skip_frames`` frames in a row."""

    enabled: bool = False
    threshold: float = 0.98
    max_skip_frames: int = 10


@dataclass(slots=True, frozen=True)
class ImageParams:
    """Generation parameters shared by streams and one-shot requests; ``None``/empty/0 fields take
    the expert's defaults (its ``engine`` config)."""

    prompt: str
    negative_prompt: str = ""
    t_index_list: tuple[int, ...] = ()  # indices into the LCM schedule, strictly increasing
    cfg_type: CfgType | None = None
    guidance_scale: float | None = None
    delta: float | None = None  # scales the virtual residual noise of self/initialize RCFG
    width: int = 0
    height: int = 0
    seed: int | None = None
    output_format: ImageFormat = ImageFormat.PNG
    jpeg_quality: int = 0  # 1..95; 0: 90


@dataclass(slots=True, frozen=True)
class ImageStreamCall:
    """Open a stream session on an image expert (already validated by the gateway)."""

    session_id: str
    params: ImageParams
    similarity: SimilarityFilterParams | None = None  # None: the expert's default
    frame_buffer_size: int = 0  # frames denoised together per step; 0: the expert's default
    priority: Priority = Priority.NORMAL
    tenant: str = "default"


@dataclass(slots=True, frozen=True)
class ImageJobCall:
    """One text-to-image request."""

    request_id: str
    params: ImageParams
    priority: Priority = Priority.NORMAL
    tenant: str = "default"
    deadline_unix_s: float | None = None


@dataclass(slots=True, frozen=True)
class StreamSettings:
    """What a stream session actually runs with (defaults resolved), sent back when it opens."""

    t_index_list: tuple[int, ...]
    timesteps: tuple[int, ...]  # the UNet timesteps the indices select
    cfg_type: CfgType
    guidance_scale: float
    delta: float
    frame_buffer_size: int
    width: int
    height: int
    seed: int
    similarity: SimilarityFilterParams
    output_format: ImageFormat
    unet_evaluations_per_frame: int
    output_lag_frames: int  # a frame's output leaves with the n-th UNet call that carries it
    energy_source: str
    setup_energy_j: float  # text encoding when the session opened


@dataclass(slots=True, frozen=True)
class FrameResult:
    """The answer to one input frame (or, when ``skipped``, the previous output repeated).

    ``dropped_frame_indices`` lists frames whose answer will never come (dropped from the full
    input queue, or from the full output queue) since the previous result of this stream.
    """

    frame_index: int
    source_frame_index: int  # the frame whose denoised image this is
    skipped: bool
    image: ImageData
    expert_latency_ms: float  # in the expert: frame queued -> image ready
    energy_j: float
    energy_source: str
    energy_saved_j: float = 0.0  # skipped: estimate of what processing it would have cost
    unet_evaluations: int = 0
    similarity: float | None = None  # to the last processed frame, when the filter is on
    input_frames_dropped: int = 0  # running totals for the stream
    output_frames_dropped: int = 0
    dropped_frame_indices: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class StreamSummary:
    """The last message of a stream whose input ended: totals over the whole session."""

    frames_received: int
    frames_processed: int
    frames_skipped: int
    input_frames_dropped: int
    output_frames_dropped: int
    unet_calls: int
    unet_evaluations: int
    energy_j: float  # frames + setup
    setup_energy_j: float
    energy_saved_j: float
    energy_source: str
    dropped_frame_indices: tuple[int, ...] = ()


@dataclass(slots=True, frozen=True)
class ImageResult:
    """The answer to an :class:`ImageJobCall`."""

    request_id: str
    image: ImageData
    latency_ms: float  # in the expert: arrival -> image ready
    energy_j: float
    energy_source: str
    unet_calls: int
    unet_evaluations: int
    settings: StreamSettings | None = None


@dataclass(slots=True, frozen=True)
class ImageExpertStats:
    """What an image expert replica publishes beside its :class:`~wattserve.types.ExpertProfile`."""

    sessions_open: int = 0
    max_sessions: int = 0
    frames_processed: int = 0
    frames_skipped: int = 0
    input_frames_dropped: int = 0
    output_frames_dropped: int = 0
    images_generated: int = 0
    unet_calls: int = 0
    unet_evaluations: int = 0
    ms_per_step: float | None = None  # EWMA of one Stream Batch step (encode + UNet + decode)
    j_per_frame: float | None = None  # EWMA of a processed frame's energy
    evaluations_by_cfg: dict[str, int] = field(default_factory=dict)
