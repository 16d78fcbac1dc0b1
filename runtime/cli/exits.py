"""``wattserve exits calibrate`` and ``wattserve exits fit``: early-exit thresholds and adapters
for a torch expert of a config, computed offline on a text file (see docs/early_exit.md)."""

from __future__ import annotations

import sys
from pathlib import Path

from wattserve.errors import ConfigError

from . import say

DEFAULT_CONFIG = "configs/local.yaml"


def _progress(label: str, total: int):
    from tqdm import tqdm

    bar = tqdm(total=total, desc=label, unit="it", file=sys.stderr, dynamic_ncols=True, leave=True)
    return bar.update, bar.close


def _expert_engine(args, drop_adapters: bool):
    """Load the expert's model on a torch engine with its early-exit settings (CLI overrides
    applied), without thresholds: the job computes those."""
    from wattserve.specs import EarlyExitSpec
    from workers.engines.torch_engine import TorchEngine
    from workers.models import default_cache_dir, prepare_model

    from ..config import load_config

    cfg = load_config(args.config)
    spec = cfg.expert(args.expert)
    if spec is None:
        known = ", ".join(e.name for e in cfg.experts)
        raise ConfigError(f"{args.config}: no expert {args.expert!r} (experts: {known})")
    if spec.engine.kind != "torch":
        raise ConfigError(f"expert {args.expert!r} runs the {spec.engine.kind} engine; early exit needs torch")
    configured = spec.engine.early_exit or EarlyExitSpec()
    exits = configured.model_copy()
    for key in ("exit_every", "min_exit_layer", "max_exit_layer", "criterion"):
        if getattr(args, key, None) is not None:
            setattr(exits, key, getattr(args, key))
    exits.thresholds_path, exits.thresholds = None, None
    if drop_adapters:
        exits.adapters_path = None
    elif getattr(args, "adapters", None):
        exits.adapters_path = args.adapters
    engine_spec = spec.engine.model_copy(update={"early_exit": exits, "threads": args.threads or spec.engine.threads})
    spec = spec.model_copy(update={"engine": engine_spec})
    cache = Path(cfg.model_cache_dir).expanduser() if cfg.model_cache_dir else default_cache_dir()
    model_dir = prepare_model(spec.model, cache, progress=say)
    say(f"loading {spec.model_label} for expert {spec.name} ({exits.criterion}, exits every {exits.exit_every} layers)")
    return TorchEngine(model_dir, spec, model_label=spec.model_label), cache, configured


def _documents(args):
    from workers.engines.torch_engine.early_exit.calibrate import read_documents

    docs = read_documents(args.data)
    if not docs:
        raise ConfigError(f"{args.data}: no text (documents are blocks separated by blank lines)")
    return docs[: args.max_documents] if args.max_documents else docs


def _record(engine, docs, args):
    from workers.engines.torch_engine.early_exit.jobs import record

    say(f"{len(docs)} documents from {args.data}; continuing each for {args.new_tokens} tokens at full depth")
    return record(
        engine, docs, new_tokens=args.new_tokens, max_prompt_tokens=args.max_prompt_tokens,
        max_positions=args.max_positions, stop_at_eos=args.stop_at_eos, progress=_progress,
    )


def cmd_calibrate(args) -> int:
    from workers.engines.torch_engine.early_exit.jobs import calibrate_engine

    docs = _documents(args)
    engine, cache, configured = _expert_engine(args, drop_adapters=False)
    layers = engine.info.num_layers
    if args.budget_layers:
        targets = list(args.budget_layers)
    else:
        targets = [f * layers for f in args.budget_fraction]
    states = _record(engine, docs, args)
    source = {"data": str(Path(args.data).resolve()), "new_tokens": args.new_tokens}
    profile = calibrate_engine(engine, states, targets, args.shortlist, source)
    out = Path(args.out or configured.thresholds_path or cache / "exits" / f"{args.expert}.json")
    profile.save(out)
    print(f"calibrated {len(profile.points)} operating points on {states.size} decode positions "
          f"({profile.criterion}, exits after layers {list(profile.exits)}, shortlist {len(profile.shortlist)} tokens)")
    print(f"  {'point':>8} {'target':>7} {'avg layers':>10} {'compute':>8} {'agreement':>9}")
    for p in sorted(profile.points, key=lambda p: p.avg_layers):
        agree = f"{p.agreement:.3f}" if p.agreement is not None else "-"
        print(f"  {p.name:>8} {p.target_layers:>7.2f} {p.avg_layers:>10.2f} {p.compute_fraction:>8.3f} {agree:>9}")
    print(f"wrote {out}\nserve with it: experts[{args.expert}].engine.early_exit.thresholds_path: {out}")
    return 0


def cmd_fit(args) -> int:
    from workers.engines.torch_engine.early_exit.adapters import FitSettings, save_adapters
    from workers.engines.torch_engine.early_exit.jobs import fit_adapters

    docs = _documents(args)
    engine, cache, configured = _expert_engine(args, drop_adapters=True)
    states = _record(engine, docs, args)
    settings = FitSettings(rank=args.rank or None, epochs=args.epochs, lr=args.lr, seed=args.seed)
    result = fit_adapters(engine, states, settings, args.heldout_fraction, progress=_progress)
    out = Path(args.out or configured.adapters_path or cache / "exits" / f"{args.expert}.adapters.safetensors")
    sha = save_adapters(out, result.adapters, engine.exits.fingerprint)
    print(f"fitted {len(result.adapters)} exit adapters on {result.fit_positions} positions; agreement with the "
          f"last layer on {result.heldout_positions} held-out positions:")
    print(f"  {'layer':>5} {'before':>7} {'after':>7}")
    for depth in sorted(result.adapters):
        after = result.after.get(depth, result.before[depth])
        print(f"  {depth:>5} {result.before[depth]:>7.3f} {after:>7.3f}")
    print(f"wrote {out} (sha256 {sha[:12]})\nnext: set experts[{args.expert}].engine.early_exit.adapters_path: {out} "
          f"and run `wattserve exits calibrate` again (thresholds depend on the adapters)")
    return 0


def _common(s) -> None:
    s.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    s.add_argument("--expert", required=True, help="a torch expert of the config")
    s.add_argument("--data", required=True, help="text file; blocks separated by blank lines are documents")
    s.add_argument("--new-tokens", type=int, default=32, help="greedy tokens recorded per document (default 32)")
    s.add_argument("--max-prompt-tokens", type=int, default=256)
    s.add_argument("--max-documents", type=int, help="use at most this many documents")
    s.add_argument("--max-positions", type=int, help="stop after recording this many decode positions")
    s.add_argument("--stop-at-eos", action="store_true", help="end a document's continuation at EOS (default: go on)")
    s.add_argument("--threads", type=int, help="torch CPU threads (default: the expert's)")
    s.add_argument("--out", help="output file (default: the expert's configured path, else the model cache)")
    s.add_argument("--exit-every", type=int, help="override the expert's early_exit.exit_every")
    s.add_argument("--min-exit-layer", type=int)
    s.add_argument("--max-exit-layer", type=int)
    s.add_argument("--criterion", choices=["tv", "argmax", "margin"])


def register(sub) -> None:
    p = sub.add_parser("exits", help="early exit: calibrate thresholds, fit exit adapters")
    ex = p.add_subparsers(dest="exits_command", required=True)
    s = ex.add_parser("calibrate", help="per-exit thresholds for compute budgets (DeeR)")
    _common(s)
    budget = s.add_mutually_exclusive_group(required=True)
    budget.add_argument("--budget-layers", type=float, nargs="+", help="target average layers per token (one point each)")
    budget.add_argument("--budget-fraction", type=float, nargs="+", help="target share of full depth (one point each)")
    s.add_argument("--adapters", help="adapters file to calibrate with (default: the expert's adapters_path)")
    s.add_argument("--shortlist", type=int, default=512, help="criterion vocabulary size (0: whole vocabulary)")
    s.set_defaults(func=cmd_calibrate)

    s = ex.add_parser("fit", help="train per-exit adapters by distillation from the last layer (base frozen)")
    _common(s)
    s.add_argument("--rank", type=int, default=0, help="adapter rank (0: full affine map, the default)")
    s.add_argument("--epochs", type=int, default=1, help="distillation passes after the closed-form start")
    s.add_argument("--lr", type=float, default=1e-4)
    s.add_argument("--heldout-fraction", type=float, default=0.1, help="documents kept out to report agreement")
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=cmd_fit)
