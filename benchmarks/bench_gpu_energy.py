"""Measured (NVML) vs modeled energy per token for the torch engine on a GPU, batched and one at a time.

    python benchmarks/bench_gpu_energy.py --model-dir DIR [--random-weights] [--requests 16]
        [--max-tokens 128] [--profile h100] [--out results.json]

Needs a GPU host (CUDA and an NVIDIA driver). Each mode (sequential: the next request only when
the previous one finished; batched: all at once) runs through the real engine loop twice on the
same engine and requests: once metered by the GPU's NVML energy counter (``measured:nvml``), once
by the simulated device profile (``modeled:<profile>``). Prints tok/s, J/token of both sources and
the modeled/measured ratio, which is how far the profile is from this GPU.

``--random-weights`` builds the model from ``DIR``'s config and tokenizer with seeded random
weights, for hosts that cannot carry the weights: time and energy per step depend on the
architecture and the token counts (``ignore_eos`` fixes those), not on the weights' values; the
generated text is meaningless and is not printed.
"""

from __future__ import annotations

import argparse
import json
import shutil
import tempfile
from pathlib import Path

from bench_batching import PROMPTS, run

from wattserve.devices import DeviceSpecBase, NvmlDeviceSpec, parse_device_spec
from wattserve.specs import ExpertSpec
from wattserve.types import GenerateCall, SamplingParams
from workers.devices import open_device
from workers.engines.torch_engine import TorchEngine
from workers.loop import EngineLoop

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "chat_template.jinja", "generation_config.json",
                   "special_tokens_map.json")


def random_weights_copy(arch_dir: Path, out_dir: Path, dtype: str) -> Path:
    """An HF-format directory with ``arch_dir``'s config and tokenizer and seeded random weights."""
    import torch
    from transformers import AutoConfig, AutoModelForCausalLM

    torch.manual_seed(0)
    config = AutoConfig.from_pretrained(arch_dir)
    model = AutoModelForCausalLM.from_config(config, dtype=getattr(torch, dtype))
    model.save_pretrained(out_dir)
    for name in TOKENIZER_FILES:
        if (arch_dir / name).exists():
            shutil.copy(arch_dir / name, out_dir / name)
    return out_dir


def measure(engine: TorchEngine, device_spec: DeviceSpecBase, args) -> dict[str, dict[str, float]]:
    """Sequential then batched through one engine loop metered by ``device_spec``."""
    device = open_device(device_spec, model_params=engine.info.params)
    loop = EngineLoop(engine, device, max_queue=args.requests)
    loop.start()
    sampling = SamplingParams(ignore_eos=True)

    def calls(tag):
        return [GenerateCall(f"{tag}{i}", PROMPTS[i % len(PROMPTS)], args.max_tokens, sampling)
                for i in range(args.requests)]

    try:
        run(loop, calls("warm")[:2], concurrent=True)  # first-call allocations, kernel selection
        out = {}
        for mode, concurrent in (("sequential", False), ("batched", True)):
            if mode not in args.modes:
                continue
            elapsed, tokens, energy = run(loop, calls(f"{mode}-"), concurrent)
            out[mode] = {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                         "j_per_token": energy / tokens, "energy_source": device.energy_source}
        return out
    finally:
        loop.stop()
        close = getattr(device, "close", None)
        if close:
            close()


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", required=True, help="HF-format model dir (with --random-weights: config + tokenizer)")
    ap.add_argument("--random-weights", action="store_true", help="seeded random weights of DIR's architecture")
    ap.add_argument("--requests", type=int, default=16)
    ap.add_argument("--max-tokens", type=int, default=128)
    ap.add_argument("--dtype", default="bfloat16", choices=("bfloat16", "float16", "float32"))
    ap.add_argument("--profile", default="h100", help="simulated device profile to compare with")
    ap.add_argument("--gpu-index", type=int, default=0)
    ap.add_argument("--device", default="cuda", choices=("cuda", "cpu"), help="cpu: only to try the script")
    ap.add_argument("--modes", default="sequential,batched", help="which of sequential,batched to run")
    ap.add_argument("--sources", default="measured,modeled", help="which of measured,modeled to meter with")
    ap.add_argument("--out", help="write results as JSON here")
    args = ap.parse_args()

    model_dir = Path(args.model_dir)
    with tempfile.TemporaryDirectory() as tmp:
        if args.random_weights:
            model_dir = random_weights_copy(model_dir, Path(tmp) / model_dir.name, args.dtype)
        spec = ExpertSpec(name="bench", model={"kind": "local", "path": str(model_dir)},
                          engine={"kind": "torch", "device": args.device, "dtype": args.dtype},
                          max_batch=args.requests, max_model_len=args.max_tokens + 64)
        engine = TorchEngine(model_dir, spec)
        print(f"model {Path(args.model_dir).name}{' (random weights)' if args.random_weights else ''}: "
              f"{engine.info.params / 1e6:.1f}M params, {args.dtype} on {args.device}, "
              f"{args.requests} requests x {args.max_tokens} tokens")
        sources = {"measured": NvmlDeviceSpec(index=args.gpu_index),
                   "modeled": parse_device_spec(f"simulated:{args.profile}")}
        results = {name: measure(engine, spec_, args) for name, spec_ in sources.items() if name in args.sources}
    for name, by_mode in results.items():
        for mode, r in by_mode.items():
            print(f"  {name:<9} {mode:<10} {r['tokens_per_s']:8.1f} tok/s  {r['j_per_token']:.4f} J/token ({r['energy_source']})")
    if {"measured", "modeled"} <= results.keys():
        for mode, m in results["measured"].items():
            print(f"  {mode}: modeled/measured J/token {results['modeled'][mode]['j_per_token'] / m['j_per_token']:.2f}x")
    for name, by_mode in results.items():
        if {"sequential", "batched"} <= by_mode.keys():
            seq, bat = by_mode["sequential"], by_mode["batched"]
            print(f"  {name}: batched/sequential {bat['tokens_per_s'] / seq['tokens_per_s']:.2f}x tok/s, "
                  f"{seq['j_per_token'] / bat['j_per_token']:.2f}x less J/token")
    if args.out:
        Path(args.out).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
