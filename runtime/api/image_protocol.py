"""Protobuf <-> domain objects for the image RPCs (StreamImages, GenerateImage); nothing else.

Enum values a client sends that this server does not know become INVALID_ARGUMENT here; every
other check (prompt, sizes, bytes) happens in the gateway and on the expert, once.
"""

from __future__ import annotations

from collections.abc import AsyncIterator

from wattserve.errors import InvalidRequest
from wattserve.images import CfgType, ImageData, ImageFormat, ImageParams, SimilarityFilterParams
from wattserve.types import Priority

from ..gateway.images import FrameOut, ImageAnswer, StreamEnded, StreamStarted
from ..gateway.request import Request
from .gen import wattserve_pb2 as pb

_FORMATS = {
    pb.IMAGE_FORMAT_UNSPECIFIED: ImageFormat.PNG,
    pb.IMAGE_FORMAT_PNG: ImageFormat.PNG,
    pb.IMAGE_FORMAT_JPEG: ImageFormat.JPEG,
    pb.IMAGE_FORMAT_RAW_RGB: ImageFormat.RAW_RGB,
}
_FORMATS_OUT = {ImageFormat.PNG: pb.IMAGE_FORMAT_PNG, ImageFormat.JPEG: pb.IMAGE_FORMAT_JPEG,
                ImageFormat.RAW_RGB: pb.IMAGE_FORMAT_RAW_RGB}
_CFG = {
    pb.CFG_TYPE_UNSPECIFIED: None,
    pb.CFG_TYPE_NONE: CfgType.NONE,
    pb.CFG_TYPE_SELF: CfgType.SELF,
    pb.CFG_TYPE_INITIALIZE: CfgType.INITIALIZE,
    pb.CFG_TYPE_FULL: CfgType.FULL,
}
_CFG_OUT = {v: k for k, v in _CFG.items() if v is not None}


def _enum(table: dict, value: int, what: str):
    if value not in table:
        raise InvalidRequest(f"{what} {value} is not one this server knows")
    return table[value]


def _priority(value: int) -> Priority:
    if value == pb.PRIORITY_UNSPECIFIED:
        return Priority.NORMAL
    return _enum(Priority._value2member_map_, value, "priority")


def image_from_proto(msg: pb.Image) -> ImageData:
    return ImageData(msg.data, _enum(_FORMATS, msg.format, "image format"), msg.width, msg.height, msg.channels or 3)


def image_to_proto(image: ImageData) -> pb.Image:
    return pb.Image(data=image.data, format=_FORMATS_OUT[image.format], width=image.width, height=image.height,
                    channels=image.channels)


def params_from_proto(msg: pb.ImageParams) -> ImageParams:
    return ImageParams(
        prompt=msg.prompt,
        negative_prompt=msg.negative_prompt,
        t_index_list=tuple(msg.t_index_list),
        cfg_type=_enum(_CFG, msg.cfg_type, "cfg_type"),
        guidance_scale=msg.guidance_scale if msg.HasField("guidance_scale") else None,
        delta=msg.delta if msg.HasField("delta") else None,
        width=msg.width,
        height=msg.height,
        seed=msg.seed if msg.HasField("seed") else None,
        output_format=_enum(_FORMATS, msg.output_format, "output_format"),
        jpeg_quality=msg.jpeg_quality,
    )


def stream_request_from_proto(msg: pb.ImageStreamConfig) -> Request:
    similarity = None
    if msg.HasField("similarity_filter"):
        f = msg.similarity_filter
        similarity = SimilarityFilterParams(
            enabled=f.enabled,
            threshold=f.threshold if f.HasField("threshold") else 0.98,
            max_skip_frames=f.max_skip_frames if f.HasField("max_skip_frames") else 10,
        )
    return Request(
        kind="image_stream", image=params_from_proto(msg.params), similarity=similarity,
        frame_buffer_size=msg.frame_buffer_size,
        expert=msg.expert, priority=_priority(msg.priority), tenant=msg.tenant, request_id=msg.request_id,
    )


async def frames_from_proto(messages: AsyncIterator[pb.StreamImagesRequest]) -> AsyncIterator[ImageData]:
    """The frames after the config message; a second config or an empty message is an error."""
    async for msg in messages:
        kind = msg.WhichOneof("kind")
        if kind == "frame":
            yield image_from_proto(msg.frame)
        elif kind == "config":
            raise InvalidRequest("send the config once, as the first message; every later message is a frame")
        else:
            raise InvalidRequest("empty StreamImages message: set `frame`")


def image_request_from_proto(msg: pb.GenerateImageRequest, time_remaining_s: float | None) -> Request:
    return Request(
        kind="image", image=params_from_proto(msg.params), expert=msg.expert, priority=_priority(msg.priority),
        tenant=msg.tenant, request_id=msg.request_id, timeout_s=time_remaining_s,
    )


def stream_event_to_proto(event: StreamStarted | FrameOut | StreamEnded) -> pb.StreamImagesResponse:
    if isinstance(event, FrameOut):
        r = event.result
        frame = pb.ImageFrameResult(
            frame_index=r.frame_index, source_frame_index=r.source_frame_index, skipped=r.skipped,
            image=image_to_proto(r.image), latency_ms=event.latency_ms, expert_latency_ms=r.expert_latency_ms,
            energy_j=r.energy_j, energy_source=r.energy_source, energy_saved_j=r.energy_saved_j,
            unet_evaluations=r.unet_evaluations, input_frames_dropped=r.input_frames_dropped,
            output_frames_dropped=r.output_frames_dropped, dropped_frame_indices=r.dropped_frame_indices,
        )
        if r.similarity is not None:
            frame.similarity = r.similarity
        return pb.StreamImagesResponse(frame=frame)
    if isinstance(event, StreamEnded):
        s = event.summary
        return pb.StreamImagesResponse(summary=pb.ImageStreamSummary(
            frames_received=s.frames_received, frames_processed=s.frames_processed, frames_skipped=s.frames_skipped,
            input_frames_dropped=s.input_frames_dropped, output_frames_dropped=s.output_frames_dropped,
            unet_calls=s.unet_calls, unet_evaluations=s.unet_evaluations, energy_j=s.energy_j,
            setup_energy_j=s.setup_energy_j, energy_saved_j=s.energy_saved_j, energy_source=s.energy_source,
            total_latency_ms=event.total_latency_ms, dropped_frame_indices=s.dropped_frame_indices,
        ))
    s = event.settings
    return pb.StreamImagesResponse(started=pb.StreamStarted(
        request_id=event.request_id, expert=event.expert, replica=event.replica, t_index_list=s.t_index_list,
        timesteps=s.timesteps, cfg_type=_CFG_OUT[s.cfg_type], guidance_scale=s.guidance_scale, delta=s.delta,
        frame_buffer_size=s.frame_buffer_size, width=s.width, height=s.height, seed=s.seed,
        similarity_filter=pb.SimilarityFilter(enabled=s.similarity.enabled, threshold=s.similarity.threshold,
                                              max_skip_frames=s.similarity.max_skip_frames),
        output_format=_FORMATS_OUT[s.output_format], unet_evaluations_per_frame=s.unet_evaluations_per_frame,
        output_lag_frames=s.output_lag_frames, energy_source=s.energy_source, setup_energy_j=s.setup_energy_j,
        routing_policy=event.plan.policy, routing_reason=event.plan.reason,
    ))


def image_answer_to_proto(answer: ImageAnswer) -> pb.GenerateImageResponse:
    r = answer.result
    settings = r.settings
    return pb.GenerateImageResponse(
        image=image_to_proto(r.image), expert=answer.expert, replica=answer.replica, request_id=answer.request_id,
        latency_ms=answer.latency_ms, expert_latency_ms=r.latency_ms, energy_j=r.energy_j,
        energy_source=r.energy_source, unet_calls=r.unet_calls, unet_evaluations=r.unet_evaluations,
        timesteps=settings.timesteps if settings else (),
        cfg_type=_CFG_OUT[settings.cfg_type] if settings else pb.CFG_TYPE_UNSPECIFIED,
        routing_policy=answer.plan.policy, routing_reason=answer.plan.reason,
    )
