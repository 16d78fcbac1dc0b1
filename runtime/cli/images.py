"""Client commands for image experts: ``wattserve image`` (text-to-image, GenerateImage) and
``wattserve stream-images`` (a folder of frames through StreamImages, results written back)."""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

from .connect import add_connection_args, channel

_FORMATS = {"png": "IMAGE_FORMAT_PNG", "jpeg": "IMAGE_FORMAT_JPEG"}
_SUFFIX = {"png": ".png", "jpeg": ".jpg"}


def _params(pb, args):
    params = pb.ImageParams(
        prompt=args.prompt, negative_prompt=args.negative_prompt or "", t_index_list=args.t_index or [],
        cfg_type=pb.CfgType.Value(f"CFG_TYPE_{args.cfg_type.upper()}") if args.cfg_type else 0,
        width=args.width or 0, height=args.height or 0,
        output_format=pb.ImageFormat.Value(_FORMATS[args.format]),
    )
    if args.guidance_scale is not None:
        params.guidance_scale = args.guidance_scale
    if args.delta is not None:
        params.delta = args.delta
    if args.seed is not None:
        params.seed = args.seed
    return params


def cmd_image(args) -> int:
    import grpc

    from ..api.gen import wattserve_pb2 as pb
    from ..api.gen import wattserve_pb2_grpc as pb_grpc

    req = pb.GenerateImageRequest(params=_params(pb, args), expert=args.expert or "", tenant=args.tenant or "")
    with channel(args) as ch:
        try:
            resp = pb_grpc.InferenceStub(ch).GenerateImage(req, timeout=args.timeout)
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    Path(args.out).write_bytes(resp.image.data)
    print(f"-- wrote {args.out} ({resp.image.width}x{resp.image.height}) | expert {resp.expert}/{resp.replica} | "
          f"{resp.unet_calls} UNet calls, {resp.unet_evaluations} evaluations | {resp.latency_ms:.0f} ms | "
          f"energy {resp.energy_j:.3f} J ({resp.energy_source})", file=sys.stderr)
    return 0


def _frames(pb, folder: Path, fps: float, stop: threading.Event):
    files = sorted(p for p in folder.iterdir() if p.suffix.lower() in (".png", ".jpg", ".jpeg"))
    for path in files:
        if stop.is_set():
            return
        fmt = pb.IMAGE_FORMAT_PNG if path.suffix.lower() == ".png" else pb.IMAGE_FORMAT_JPEG
        yield pb.StreamImagesRequest(frame=pb.Image(data=path.read_bytes(), format=fmt))
        if fps > 0:
            time.sleep(1.0 / fps)  # pace like a camera: the server's queues drop what it cannot keep up with


def cmd_stream_images(args) -> int:
    import grpc

    from ..api.gen import wattserve_pb2 as pb
    from ..api.gen import wattserve_pb2_grpc as pb_grpc

    folder, out = Path(args.frames), Path(args.out)
    if not folder.is_dir():
        print(f"error: {folder} is not a folder of PNG/JPEG frames", file=sys.stderr)
        return 2
    out.mkdir(parents=True, exist_ok=True)
    config = pb.ImageStreamConfig(params=_params(pb, args), expert=args.expert or "", tenant=args.tenant or "",
                                  frame_buffer_size=args.frame_buffer_size)
    if args.similarity_filter is not None:  # unset: the expert's default
        config.similarity_filter.CopyFrom(pb.SimilarityFilter(
            enabled=args.similarity_filter, threshold=args.similarity_threshold, max_skip_frames=args.max_skip_frames))
    stop = threading.Event()

    def requests():
        yield pb.StreamImagesRequest(config=config)
        yield from _frames(pb, folder, args.fps, stop)

    with channel(args) as ch:
        try:
            for msg in pb_grpc.InferenceStub(ch).StreamImages(requests(), timeout=args.timeout):
                _show(msg, out, args.format)
        except KeyboardInterrupt:
            stop.set()
            print("\n[cancelled]", file=sys.stderr)
            return 130
        except grpc.RpcError as exc:
            print(f"error: {exc.code().name}: {exc.details()}", file=sys.stderr)
            return 1
    return 0


def _show(msg, out: Path, fmt: str) -> None:
    kind = msg.WhichOneof("kind")
    if kind == "started":
        s = msg.started
        print(f"-- stream on {s.expert}/{s.replica}: {s.width}x{s.height}, timesteps {list(s.timesteps)}, "
              f"cfg {s.cfg_type}, {s.unet_evaluations_per_frame} UNet evaluations/frame, "
              f"lag {s.output_lag_frames} frames, filter {'on' if s.similarity_filter.enabled else 'off'}",
              file=sys.stderr)
    elif kind == "frame":
        f = msg.frame
        (out / f"{f.frame_index:06d}{_SUFFIX[fmt]}").write_bytes(f.image.data)
        note = f" skipped (repeats frame {f.source_frame_index})" if f.skipped else ""
        print(f"frame {f.frame_index}: {f.latency_ms:.0f} ms, {f.energy_j:.4f} J ({f.energy_source}){note}")
    else:
        s = msg.summary
        print(f"-- {s.frames_processed} processed, {s.frames_skipped} skipped, {s.input_frames_dropped} + "
              f"{s.output_frames_dropped} dropped | {s.unet_calls} UNet calls, {s.unet_evaluations} evaluations | "
              f"energy {s.energy_j:.3f} J, saved ~{s.energy_saved_j:.3f} J ({s.energy_source})", file=sys.stderr)


def _add_params(s) -> None:
    add_connection_args(s)
    s.add_argument("--expert", help="pin an image expert by name (default: the least loaded)")
    s.add_argument("--negative-prompt")
    s.add_argument("--t-index", type=int, action="append", help="index into the 50-step LCM schedule (repeatable)")
    s.add_argument("--cfg-type", choices=["none", "self", "initialize", "full"])
    s.add_argument("--guidance-scale", type=float)
    s.add_argument("--delta", type=float)
    s.add_argument("--width", type=int)
    s.add_argument("--height", type=int)
    s.add_argument("--seed", type=int)
    s.add_argument("--format", choices=sorted(_FORMATS), default="png", help="format of the images written")
    s.add_argument("--tenant")


def register(sub) -> None:
    s = sub.add_parser("image", help="text-to-image on an image expert")
    s.add_argument("prompt")
    s.add_argument("--out", required=True, help="file to write the image to")
    s.add_argument("--timeout", type=float, default=300.0)
    _add_params(s)
    s.set_defaults(func=cmd_image)

    s = sub.add_parser("stream-images", help="stream a folder of frames through an image expert (image-to-image)")
    s.add_argument("prompt")
    s.add_argument("--frames", required=True, help="folder of PNG/JPEG frames, sent in name order")
    s.add_argument("--out", required=True, help="folder for the results (<frame index>.png)")
    s.add_argument("--fps", type=float, default=0.0, help="send at this rate (0: as fast as possible; servers refuse streams faster than their gateway.max_stream_fps)")
    s.add_argument("--frame-buffer-size", type=int, default=0)
    s.add_argument("--similarity-filter", action=argparse.BooleanOptionalAction, default=None,
                   help="skip frames similar to the last processed one (default: the expert's setting)")
    s.add_argument("--similarity-threshold", type=float, default=0.98)
    s.add_argument("--max-skip-frames", type=int, default=10)
    s.add_argument("--timeout", type=float, default=3600.0)
    _add_params(s)
    s.set_defaults(func=cmd_stream_images)
