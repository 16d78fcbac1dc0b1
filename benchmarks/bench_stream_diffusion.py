"""StreamDiffusion-style image expert, side by side on one model in one run:

1. Stream Batch vs sequential denoising (same n, same model, same frames): frames/s, UNet
   calls per frame, J/frame (paper: ~1.5x).
2. Guidance types (Stream Batch): UNet evaluations per frame and frames/s for none, self,
   initialize vs full CFG (paper: RCFG up to 2.05x over CFG).
3. Stochastic similarity filter on/off on a static clip (camera noise only) and on a changing
   clip (a panning textured scene): J/frame and skipped frames (paper: 2.39x / 1.99x less
   energy on a static scene, RTX 3060 / 4090).

    .venv/bin/python benchmarks/bench_stream_diffusion.py [--preset tiny|small|large] [--model-dir DIR]
        [--frames 30] [--repeats 3] [--threads 1] [--cfg-steps 2|4] [--device cpu|cuda]
        [--energy cpu|nvml|simulated:<profile>] [--json out.json]

Everything goes through the real stream session and energy meter in this process (no Ray, no
gRPC), metered by the CPU device model by default (``modeled:cpu``: process CPU time x 4.4
W/core; ``--energy nvml`` on a GPU host: the NVML counter, ``measured:nvml``), so the figures are
the pipeline's own. Models are random (``tests/tiny_diffusion.py``): ``tiny`` is the
test model at 16x16 pixels (per-call overhead dominates), ``small`` a wider UNet at 64x64.
Each figure is the median of ``--repeats`` runs; the modes are interleaved so that load from
other processes on a shared host hits them alike.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from tests.tiny_diffusion import build_diffusion_model  # noqa: E402
from wattserve.devices import CpuDeviceSpec, parse_device_spec  # noqa: E402
from wattserve.images import CfgType, ImageParams, ImageStreamCall, SimilarityFilterParams  # noqa: E402
from wattserve.specs import DiffusionEngineSpec  # noqa: E402
from workers.devices import open_device  # noqa: E402
from workers.diffusion.components import DiffusionModel  # noqa: E402
from workers.diffusion.loop import DiffusionLoop  # noqa: E402
from workers.diffusion.session import RawResult, StreamSession  # noqa: E402
from workers.diffusion.settings import resolve_settings  # noqa: E402

PRESETS = {
    "tiny": dict(unet_channels=(16, 32), vae_channels=(8, 16), sample_size=8),  # 16x16 images
    "small": dict(unet_channels=(32, 64), vae_channels=(16, 32), sample_size=32),  # 64x64 images
    "large": dict(unet_channels=(128, 256), vae_channels=(32, 64), sample_size=128),  # 256x256: for GPUs
}
T_INDEX = {2: (32, 45), 4: (0, 16, 32, 45)}


def scene(width: int, height: int, seed: int) -> np.ndarray:
    """A textured scene (smooth blobs over a gradient), wider than the frame so it can pan."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:height, 0:2 * width].astype(float)
    img = np.stack([xx / (2 * width), yy / height, 0.5 + 0 * xx], axis=-1) * 120
    for _ in range(40):
        cy, cx, r = rng.uniform(0, height), rng.uniform(0, 2 * width), rng.uniform(2, width / 4)
        img += np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / (2 * r * r))[..., None] * rng.uniform(-90, 90, 3)
    return np.clip(img, 0, 255)


def clip(kind: str, frames: int, width: int, height: int, seed: int = 0) -> list[np.ndarray]:
    """``static``: one view with camera noise (sigma 2 levels); ``changing``: the scene pans an
    eighth of the frame width per frame, with the same noise."""
    base, rng = scene(width, height, seed), np.random.default_rng(seed + 1)
    out = []
    for k in range(frames):
        x0 = 0 if kind == "static" else (max(2, width // 8) * k) % width
        view = base[:, x0:x0 + width] + rng.normal(0, 2, (height, width, 3))
        out.append(np.clip(view, 0, 255).astype(np.uint8))
    return out


class Run:
    device_spec = CpuDeviceSpec()  # main() sets --energy

    def __init__(self, model, engine, cfg, similarity=None, stream_batch=True) -> None:
        self.loop = DiffusionLoop(model, open_device(self.device_spec, model_params=model.params), engine)
        call = ImageStreamCall("bench", ImageParams("a cat", negative_prompt="blurry", cfg_type=cfg),
                               similarity=similarity)
        settings = resolve_settings(call.params, engine, model, similarity=similarity)
        self.session = StreamSession(call, settings, model, input_queue_frames=4, output_queue_frames=10_000,
                                     schedule_steps=50, stream_batch=stream_batch)
        self.session.setup(self.loop.meter)
        self.model = model

    def measure(self, frames: list[np.ndarray], warmup: int) -> dict:
        """Push and step the first ``warmup`` frames untimed (Stream Batch fills its slots), then
        time one step per frame for the rest: the steady state of a live stream."""
        s, meter = self.session, self.loop.meter
        for k, f in enumerate(frames[:warmup]):
            s.push(k, f)
            s.step(meter)
        s.output.take(10_000)
        calls0, rows0 = self.model.counters.calls, self.model.counters.evaluations
        start_j = self.loop.device.energy_j()
        start, start_cpu = time.perf_counter(), time.process_time()
        for k, f in enumerate(frames[warmup:], start=warmup):
            s.push(k, f)
            s.step(meter)
        elapsed, cpu_s = time.perf_counter() - start, time.process_time() - start_cpu
        device_j = self.loop.device.energy_j() - start_j
        timed = len(frames) - warmup
        results = [r for r in s.output.take(10_000) if isinstance(r, RawResult)]
        return {
            "fps": timed / elapsed,
            "fps_cpu": timed / cpu_s,  # frames per CPU second: what co-tenants on a shared host disturb least
            "unet_calls_per_frame": (self.model.counters.calls - calls0) / timed,
            "unet_evaluations_per_frame": (self.model.counters.evaluations - rows0) / timed,
            "j_per_frame": float(np.mean([r.energy_j for r in results])),
            "device_j_per_frame": device_j / timed,
            "skipped": sum(r.skipped for r in results),
            "answered": len(results),
            "mean_similarity": _mean([r.similarity for r in results if r.similarity is not None]),
        }


def _mean(xs):
    return float(np.mean(xs)) if xs else None


def median_runs(factories: dict, frames: list[np.ndarray], warmup: dict, repeats: int) -> dict:
    """Interleave the configurations ``repeats`` times; the median of each metric."""
    runs: dict[str, list[dict]] = {name: [] for name in factories}
    for _ in range(repeats):
        for name, make in factories.items():
            runs[name].append(make().measure(frames, warmup[name]))
    return {name: {k: (statistics.median(v[k] for v in rs) if rs[0][k] is not None else None) for k in rs[0]}
            for name, rs in runs.items()}


def bench(args) -> dict:
    with tempfile.TemporaryDirectory() as tmp:
        model_dir = Path(args.model_dir) if args.model_dir else build_diffusion_model(
            Path(tmp) / args.preset, **PRESETS[args.preset])
        engine = DiffusionEngineSpec(threads=args.threads, max_pixels=4096 * 4096, device=args.device,
                                     dtype="float16" if args.device == "cuda" else "auto")
        model = DiffusionModel(model_dir, engine)
    w, h = model.default_width, model.default_height
    changing = clip("changing", args.frames, w, h)
    out = {"preset": args.model_dir or args.preset, "size": f"{w}x{h}", "params": model.params,
           "threads": args.threads, "frames": args.frames, "device": args.device,
           "energy": Run(model, engine, CfgType.SELF).loop.device.energy_source}
    for n, t_index in T_INDEX.items():
        eng = engine.model_copy(update={"t_index_list": list(t_index)})
        out[f"batch_vs_sequential_n{n}"] = median_runs({
            "stream_batch": lambda e=eng: Run(model, e, CfgType.SELF),
            "sequential": lambda e=eng: Run(model, e, CfgType.SELF, stream_batch=False),
        }, changing, {"stream_batch": n - 1 + 2, "sequential": 2}, args.repeats)
    eng = engine.model_copy(update={"t_index_list": list(T_INDEX[args.cfg_steps])})
    out[f"cfg_types_n{args.cfg_steps}"] = median_runs(
        {cfg.value: (lambda c=cfg: Run(model, eng, c)) for cfg in CfgType},
        changing, {cfg.value: args.cfg_steps + 1 for cfg in CfgType}, args.repeats)
    eng = engine.model_copy(update={"t_index_list": list(T_INDEX[2])})
    on, off = SimilarityFilterParams(True, 0.98, 10), SimilarityFilterParams(False)
    for kind in ("static", "changing"):
        frames = clip(kind, args.frames * 2, w, h)
        out[f"filter_{kind}"] = median_runs({
            "filter_off": lambda: Run(model, eng, CfgType.SELF, off),
            "filter_on": lambda: Run(model, eng, CfgType.SELF, on),
        }, frames, {"filter_off": 3, "filter_on": 3}, args.repeats)
    return out


def report(r: dict) -> None:
    print(f"\nmodel {r['preset']} ({r['params']:,} params, {r['size']} px) on {r['device']}, {r['threads']} torch "
          f"thread(s), {r['frames']} timed frames, energy {r['energy']}\n")
    print("| comparison | mode | frames/s (wall) | frames per CPU-s | UNet calls/frame | UNet evals/frame | J/frame | skipped |")
    print("| --- | --- | --- | --- | --- | --- | --- | --- |")
    for key, modes in r.items():
        if not isinstance(modes, dict):
            continue
        for mode, m in modes.items():
            print(f"| {key} | {mode} | {m['fps']:.1f} | {m['fps_cpu']:.1f} | {m['unet_calls_per_frame']:.2f} | "
                  f"{m['unet_evaluations_per_frame']:.2f} | {m['j_per_frame']:.4f} | {m['skipped']:.0f}/{m['answered']:.0f} |")
    print()
    for n in T_INDEX:
        b = r[f"batch_vs_sequential_n{n}"]
        print(f"Stream Batch / sequential, n={n}: {_ratio(b['stream_batch'], b['sequential'])}, "
              f"{b['sequential']['j_per_frame'] / b['stream_batch']['j_per_frame']:.2f}x less J/frame")
    cfgs = next(v for k, v in r.items() if k.startswith("cfg_types"))
    for cfg in ("none", "self", "initialize"):
        print(f"{cfg} vs full CFG: {_ratio(cfgs[cfg], cfgs['full'])}, "
              f"{cfgs['full']['j_per_frame'] / cfgs[cfg]['j_per_frame']:.2f}x less J/frame")
    for kind in ("static", "changing"):
        f = r[f"filter_{kind}"]
        print(f"filter on a {kind} clip: {f['filter_off']['j_per_frame'] / f['filter_on']['j_per_frame']:.2f}x less "
              f"J/frame ({f['filter_on']['skipped']:.0f}/{f['filter_on']['answered']:.0f} skipped, "
              f"mean similarity {f['filter_on']['mean_similarity']:.4f})")


def _ratio(a: dict, b: dict) -> str:
    return f"{a['fps'] / b['fps']:.2f}x frames/s (wall), {a['fps_cpu'] / b['fps_cpu']:.2f}x per CPU-s"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="tiny")
    p.add_argument("--model-dir", help="a diffusers-format model directory instead of a random preset")
    p.add_argument("--frames", type=int, default=30,
                   help="frames per measurement (the first few fill the pipeline untimed); filter runs use twice as many")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--cfg-steps", type=int, choices=sorted(T_INDEX), default=2)
    p.add_argument("--device", choices=("cpu", "cuda"), default="cpu", help="cuda runs float16")
    p.add_argument("--energy", default="cpu", help="device backend metering it: cpu (modeled), nvml (measured), simulated:<profile>")
    p.add_argument("--json", help="also write the figures here")
    args = p.parse_args()
    Run.device_spec = parse_device_spec(args.energy)
    result = bench(args)
    report(result)
    if args.json:
        Path(args.json).write_text(json.dumps(result, indent=1))


if __name__ == "__main__":
    main()
