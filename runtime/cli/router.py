"""Routing commands: ``wattserve gate fit``, ``wattserve route eval``, ``wattserve budget set|price|show``."""

from __future__ import annotations

import getpass
import json
import os
import socket
import sys
from pathlib import Path

from . import say
from .connect import add_connection_args, admin_call


def _embedding_cache() -> Path:
    from workers.models import default_cache_dir

    return Path(os.environ.get("WATTSERVE_CACHE_DIR") or default_cache_dir()) / "embeddings"


def _embed(prompts, cache: Path | None):
    from tqdm import tqdm

    from router.gate_fit import embed_cached

    with tqdm(total=len(prompts), desc="embedding prompts (MiniLM)", unit="prompt", file=sys.stderr) as bar:
        emb = embed_cached(prompts, cache, progress=bar.update)
        bar.update(bar.total - bar.n)  # a cache hit fills the bar at once
    return emb


# -- gate fit -----------------------------------------------------------------------------------
def cmd_gate_fit(args) -> int:
    from tqdm import tqdm

    from router.gate_fit import count_truncated, embed_cached, fit_gate, read_labelled
    from wattserve.errors import InvalidRequest

    if args.knn_weight is not None and not 0 <= args.knn_weight <= 1:
        raise InvalidRequest(f"--knn-weight must be in [0, 1], got {args.knn_weight}")
    if args.inner_folds == 1 or args.inner_folds < 0:
        raise InvalidRequest(f"--inner-folds must be 0 (fixed knobs) or >= 2, got {args.inner_folds}")
    # Knobs given on the command line are fixed; the others are chosen by the inner folds (or take
    # the fixed defaults with --inner-folds 0).
    given = {"epochs": args.epochs, "weight_decay": args.weight_decay, "knn_k": args.knn_k, "knn_weight": args.knn_weight}
    fixed = {"epochs": 30, "weight_decay": 1e-3, "knn_k": 40, "knn_weight": 0.5}
    knobs = {k: v if v is not None else fixed[k] for k, v in given.items()}
    grid = {k: [v] for k, v in given.items() if v is not None}
    cols = [c.strip() for c in args.columns.split(",")] if args.columns else None
    data = read_labelled(args.data, cols, limit=args.limit, sample=args.sample, seed=args.seed)
    say(f"{len(data.prompts)} prompts, experts (quality columns): {', '.join(data.experts)}")
    truncated = count_truncated(data.prompts)
    say(f"{truncated} of {len(data.prompts)} prompts are longer than MiniLM's 256 word pieces; "
        f"the {args.window} window embeds them" + (f" (first {args.head_tokens} pieces + the end)" if args.window == "head_tail" else ""))
    with tqdm(total=len(data.prompts), desc="embedding prompts (MiniLM)", unit="prompt", file=sys.stderr) as bar:
        emb = embed_cached(data.prompts, None if args.no_cache else _embedding_cache(), progress=bar.update,
                           window=args.window, head_tokens=args.head_tokens)
        bar.update(bar.total - bar.n)
    if args.inner_folds:
        say(f"choosing {', '.join(k for k in given if k not in grid) or 'nothing'} by {args.inner_folds}-fold "
            "cross-validation inside the training rows (the held-out rows are not read)")
    with tqdm(total=args.inner_folds or None, desc="inner folds", unit="fold", file=sys.stderr,
              disable=not args.inner_folds) as folds_bar, \
         tqdm(desc="training gate", unit="epoch", file=sys.stderr) as bar:
        def on_epoch(epoch: int, loss: float) -> None:
            bar.set_postfix(loss=f"{loss:.4f}")
            bar.update(1)

        rep = fit_gate(data, emb, args.out, holdout=args.holdout, seed=args.seed, hidden=args.hidden,
                       epochs=knobs["epochs"], weight_decay=knobs["weight_decay"], dropout=args.dropout,
                       on_epoch=on_epoch, window=args.window, head_tokens=args.head_tokens,
                       truncated=truncated, knn_weight=knobs["knn_weight"], knn_k=knobs["knn_k"],
                       inner_folds=args.inner_folds, grid=grid,
                       calibrate={"auto": None, "on": True, "off": False}[args.calibration],
                       on_fold=lambda f: folds_bar.update(1))
    meta = json.loads((Path(args.out) / "gate.json").read_text())
    cv = meta.get("inner_cv")
    if cv:
        print(f"inner {cv['folds']}-fold cross-validation on {cv['rows']} training prompts chose: {meta['epochs']} epochs, "
              f"weight decay {meta['weight_decay']:g}, {meta['knn_k']} nearest at weight {meta['knn_weight']:g}, "
              f"calibration {'per expert' if meta['calibration'] else 'none'}; out-of-fold log-loss {cv['cv_logloss']:.4f} "
              f"(MLP alone {cv['cv_logloss_mlp_alone']:.4f}, neighbours alone {cv['cv_logloss_knn_alone']:.4f})")
    print(f"held-out report ({rep['rows']} prompts):")
    print(f"  quality of the gate's top choice   {rep['top_choice_quality']:.4f}  (oracle {rep['oracle_quality']:.4f})")
    for e, q in rep["expert_quality"].items():
        print(f"  always {e:<40} {q:.4f}  (gate picks it for {rep['top_choice_share'][e]:.1%}; predicted mean {rep['predicted_mean_quality'][e]:.4f})")
    acc = rep["top_choice_accuracy_where_experts_disagree"]
    if acc is not None:
        print(f"  top choice is a best expert on {acc:.1%} of the {rep['disagreeing_rows']} prompts where experts disagree")
    print(f"  calibration: Brier {rep['brier']:.4f}, ECE {rep['ece']:.4f}")
    auc, within = rep["auc"], rep["within_task_auc"]
    print("  ranking: AUC " + (f"{auc:.4f}" if auc is not None else "n/a") + ", within-task AUC "
          + (f"{within:.4f} over {rep['tasks_ranked']} (task, expert) groups" if within is not None
             else "n/a (no task column, or no task with both right and wrong answers)"))
    for e, a in rep["within_task_auc_by_expert"].items():
        print(f"    within-task AUC for {e:<30} " + (f"{a:.4f}" if a is not None else "n/a"))
    print(f"  prompts cut to MiniLM's 256 word pieces: {truncated} of {len(data.prompts)} ({args.window} window)")
    print(f"gate saved to {args.out} (use it with router.gate_path)")
    return 0


# -- route eval ---------------------------------------------------------------------------------
def _shared_data_dir() -> Path | None:
    env = os.environ.get("WATTSERVE_SHARED_DATA")
    if env:
        return Path(env)
    here = Path(__file__).resolve()
    for parent in here.parents:
        if (parent / "shared" / "data").is_dir():
            return parent / "shared" / "data"
    return None


def _choose(args, x, y):
    """MoE²'s on-the-fly predictor for ``route eval``: with ``--inner-folds`` >= 2 its knobs are
    chosen by cross-validation inside the training rows ``x``, ``y`` (router/gate_cv.py; a knob
    given on the command line is fixed); with 0, the fixed rule (training length on a validation
    fifth, the 40 nearest at weight 0.5 or ``--gate-knn-weight``)."""
    from router.eval_baselines import one_thread
    from router.gate_cv import KNN_WEIGHTS, BlendChoice, choose_blend

    pinned_w = args.gate_knn_weight
    if args.inner_folds >= 2:
        return choose_blend(x, y, folds=args.inner_folds, seed=args.seed,
                            knn_weight=KNN_WEIGHTS if pinned_w is None else (pinned_w,),
                            calibrate={"auto": None, "on": True, "off": False}[args.calibration])
    with one_thread():
        epochs = _gate_epochs(x, y, args.seed)
    w = 0.5 if pinned_w is None else pinned_w
    nan = float("nan")
    return BlendChoice(epochs=epochs, weight_decay=1e-3, knn_k=args.knn_k, knn_weight=w, knn_tau=0.0, calibration=None,
                       cv_logloss=nan, cv_logloss_uncalibrated=nan, cv_logloss_mlp_alone=nan,
                       cv_logloss_knn_alone=nan, folds=0, rows=len(x))


def _eval_gates(args, train_emb, train_q, test_emb, test_q, experts, names):
    """Gate outputs for the evaluated rows (a fitted gate from --gate, or MoE²'s predictor fitted
    on the training rows, its knobs chosen on them alone), the in-sample ceiling's predictions (the
    same knobs fitted on the training *and* evaluated rows; None with --gate), and the choice."""
    import numpy as np

    from router.gate import FittedGate, quality_output
    from router.gate_cv import fit_blend

    if args.gate:
        gate = FittedGate(args.gate, names)
        q, outputs, source = gate.quality(test_emb), gate.outputs, gate.source
        return [quality_output(row, outputs, names, source) for row in q], None, None
    choice = _choose(args, train_emb, train_q)
    how = (f"chosen by {choice.folds}-fold cross-validation inside the training rows" if choice.folds
           else "fixed (--inner-folds 0)")
    say(f"fitting a gate on {len(train_emb)} prompts, knobs {how}: {choice.epochs} epochs, weight decay "
        f"{choice.weight_decay:g}, its {choice.knn_k} nearest training prompts at weight {choice.knn_weight:g}, "
        f"calibration {'per expert' if choice.calibration else 'none'} (evaluated: {len(test_emb)})")
    q = fit_blend(train_emb, train_q, choice, seed=args.seed).predict(test_emb)
    gates = [quality_output(row, experts, names, "fitted:on-the-fly") for row in q]
    both_x, both_y = np.concatenate([train_emb, test_emb]), np.concatenate([train_q, test_q])
    ceiling = fit_blend(both_x, both_y, choice, seed=args.seed).predict(test_emb)
    return gates, ceiling, choice


def _gate_epochs(x, y, seed: int, choices=(10, 20, 40, 80)) -> int:
    """Training length of the on-the-fly gate, chosen on a validation fifth of the *training* rows
    (held-out BCE), so the evaluated rows never tune it."""
    import numpy as np
    import torch

    from router.gate_fit import split, train_mlp

    if len(x) < 50:
        return 30
    fit, val = split(len(x), 0.2, seed + 1)
    xv, yv = torch.as_tensor(x[val]), torch.as_tensor(y[val])
    losses = {}
    for epochs in choices:
        mlp = train_mlp(x[fit], y[fit], seed=seed, epochs=epochs)
        with torch.inference_mode():
            losses[epochs] = float(torch.nn.functional.binary_cross_entropy_with_logits(mlp(xv), yv))
    return int(min(losses, key=lambda e: (round(losses[e], 4), e))) if np.isfinite(list(losses.values())).all() else 30


def _trained_hashes(gate_dir: Path, seed_default: int) -> tuple[set[str] | None, str]:
    """sha1 prefixes of the prompts a gate trained on: from gate.json, else re-derived from the
    split it records; (None, why) when neither works."""
    from router.eval_data import prompt_sha1
    from router.gate_fit import split

    try:
        meta = json.loads((gate_dir / "gate.json").read_text())
    except (OSError, ValueError) as exc:
        return None, f"cannot read {gate_dir / 'gate.json'}: {exc}"
    if meta.get("train_prompt_sha1"):
        return set(meta["train_prompt_sha1"]), "gate.json lists the prompts it trained on"
    data, holdout, train_rows = meta.get("data"), meta.get("holdout"), meta.get("train_rows")
    if not data or holdout is None or not Path(data).exists():
        return None, f"gate.json names no readable training data ({data!r})"
    from router.eval_data import read_eval_data

    try:
        rows = read_eval_data(data, meta.get("experts"), skip_blank=True)
    except Exception as exc:  # noqa: BLE001 - any failure means: cannot tell
        return None, f"cannot re-read its training data {data}: {exc}"
    tr, _ = split(len(rows.prompts), float(holdout), int(meta.get("seed", seed_default)))
    if train_rows is not None and len(tr) != int(train_rows):
        return None, (f"re-splitting {data} gives {len(tr)} training rows, the gate recorded {train_rows} "
                      "(it was fitted on a sample or a limit)")
    return {prompt_sha1(rows.prompts[i]) for i in tr}, f"re-derived from its recorded split of {data} (seed, holdout)"


def _drop_leaked(args, test, gate_dir: Path):
    """Evaluation rows the gate trained on are dropped (and said); none left is an error."""
    import numpy as np

    from router.eval_data import prompt_sha1
    from wattserve.errors import InvalidRequest

    trained, how = _trained_hashes(gate_dir, args.seed)
    if trained is None:
        say(f"WARNING: cannot tell which prompts the gate {gate_dir} trained on ({how}); "
            "if it saw these rows the figures below are optimistic")
        return test, None
    leaked = np.asarray([prompt_sha1(p) in trained for p in test.prompts])
    if not leaked.any():
        say(f"leakage check: none of the {len(test.prompts)} evaluated prompts is in the gate's training set ({how})")
        return test, 0
    if leaked.all():
        raise InvalidRequest(f"all {len(test.prompts)} evaluated prompts were in the training set of gate {gate_dir} "
                             f"({how}); evaluate on rows it never saw (--test FILE, or a gate fitted on other data)")
    say(f"WARNING: {int(leaked.sum())} of {len(test.prompts)} evaluated prompts were in the gate's training set ({how}); "
        f"they are left out: evaluating on the other {int((~leaked).sum())}")
    return test.subset(np.flatnonzero(~leaked)), int(leaked.sum())


def _gate_calibration(gates, quality, names, tasks) -> dict:
    import numpy as np

    from router import calibration

    p = np.array([[g.quality[n] for n in names] for g in gates])
    out = {"brier": calibration.brier(p, quality), "ece": calibration.ece(p, quality), "auc": calibration.auc(p, quality)}
    if tasks is not None and len(set(tasks)) > 1:
        groups = [t for t in tasks for _ in names]
        out["within_task_auc"], out["tasks_used"] = calibration.within_group_auc(p, quality, groups)
    else:
        out["within_task_auc"], out["tasks_used"] = None, 0
    return out


def cmd_route_eval(args) -> int:
    import numpy as np
    import yaml

    from router.eval_data import read_eval_data
    from router.evaluate import energy_ties, evaluate, load_experts, metrics, pair
    from router.gate_fit import split
    from wattserve.errors import InvalidRequest

    if not 0 < args.holdout <= 1:
        raise InvalidRequest(f"--holdout must be in (0, 1], got {args.holdout}")
    if args.gate_knn_weight is not None and not 0 <= args.gate_knn_weight <= 1:
        raise InvalidRequest(f"--gate-knn-weight must be in [0, 1], got {args.gate_knn_weight}")
    if args.inner_folds == 1 or args.inner_folds < 0:
        raise InvalidRequest(f"--inner-folds must be 0 (fixed knobs) or >= 2, got {args.inner_folds}")
    spec_path = Path(args.experts)
    spec = yaml.safe_load(spec_path.read_text())
    experts = load_experts(spec, spec_path.parent, _shared_data_dir())
    tokens = args.output_tokens or int(spec.get("output_tokens", 128))
    for e in experts:
        say(f"{e.name}: {e.j_per_token:.3f} J/token [{e.energy_source}], {e.tpot_ms:.1f} ms/token ({e.source})"
            + (f" - {e.note}" if e.note else ""))
    ties = energy_ties(experts)
    cols = [e.column for e in experts]
    sample_seed = args.seed if args.sample_seed is None else args.sample_seed
    data = read_eval_data(args.data, cols, limit=args.limit, sample=args.sample, seed=sample_seed, skip_blank=args.skip_blank)
    if args.test:
        test = read_eval_data(args.test, cols, limit=args.limit, sample=args.sample, seed=sample_seed, skip_blank=args.skip_blank)
        train = data
    else:
        tr, te = split(len(data.prompts), args.holdout, args.seed)
        if args.holdout >= 1:
            tr = np.asarray([], dtype=int)
        train, test = data.subset(tr), data.subset(te)
    skipped = data.skipped_blank + (test.skipped_blank if args.test else 0)
    if skipped:
        say(f"skipped {skipped} rows with a blank quality cell (--skip-blank)")
    leaked = None
    if args.gate:
        test, leaked = _drop_leaked(args, test, Path(args.gate))
    if not args.gate and len(train.prompts) < 10:
        raise InvalidRequest(f"{len(train.prompts)} training rows are too few to fit a gate; lower --holdout, "
                             "give --gate, or give a separate --test file")
    # Embed whole files in file order: the cache then serves every split and seed.
    vectors = dict(zip(data.prompts, _embed(data.prompts, _embedding_cache()), strict=True))
    if args.test:
        vectors.update(zip(test.prompts, _embed(test.prompts, _embedding_cache()), strict=True))
    test_emb = np.stack([vectors[p] for p in test.prompts])
    train_emb = np.stack([vectors[p] for p in train.prompts]) if train.prompts else test_emb[:0]
    names = {e.name: e.column for e in experts}
    q_idx = [data.experts.index(c) for c in cols]
    train_q, test_q = train.quality[:, q_idx], test.quality[:, q_idx]
    gates, ceiling_insample, choice = _eval_gates(args, train_emb, train_q, test_emb, test_q, cols, names)
    if len(train.prompts):
        # The static baselines' "strongest" is the expert with the best mean quality on the training rows.
        prior = {e.name: float(train_q[:, k].mean()) for k, e in enumerate(experts)}
    else:
        say("no training rows (--holdout 1.0): the strongest expert is the one the gate predicts best on average")
        prior = {e.name: float(np.mean([g.quality[e.name] for g in gates])) for e in experts}
    predictions = {}
    if len(train.prompts) >= 10:
        from router.eval_baselines import knn_predict, mlp_predict

        predictions["knn"] = knn_predict(train_emb, train_q, test_emb, k=min(args.knn_k, len(train.prompts)))
        predictions["mlp"] = mlp_predict(train_emb, train_q, test_emb, seed=args.seed)
    else:
        say("kNN and MLP routers skipped: they need training rows")
    # What a router that knew each prompt's expected quality could reach (router/eval_ceiling.py).
    if len(experts) < 3:
        say("noise ceiling: the label-only estimate needs 3 or more experts (with 2 there is no structure "
            "shared across experts to denoise by)")
    elif len(test.prompts) >= 10:
        from router.eval_ceiling import denoise

        den = denoise(test_q, seed=args.seed)
        predictions["ceiling_denoised"] = den.quality
        say(f"noise ceiling: labels denoised at rank {den.rank} (cell cross-validation over ranks 0-{max(den.cv_mse)})")
    if ceiling_insample is not None:
        predictions["ceiling_insample"] = ceiling_insample
    curves = evaluate(experts, gates, test_q, prior, tokens, steps=args.steps, seed=args.seed,
                      progress=lambda name: say(f"replayed {name}"), predictions=predictions)
    strong, cheap = pair(experts, prior)
    m = metrics(curves, experts, test_q, strong, tokens)
    m["cheapest"] = cheap
    m["gate"] = _gate_calibration(gates, test_q, [e.name for e in experts], test.tasks)
    m["energy_ties"] = ties
    m["skipped_blank_rows"] = skipped
    m["leaked_rows_dropped"] = leaked
    m["gate_choice"] = choice.record() if choice is not None else None
    _report(args, experts, curves, m, tokens, len(test.prompts), len(train.prompts))
    return 0


def _report(args, experts, curves, m, tokens, rows, train_rows) -> None:
    from router.evaluate import plot, summary

    name = Path(args.test or args.data).name
    print(f"\n{name}: {rows} evaluated prompts ({train_rows} training), {tokens} output tokens per request; "
          f"strongest expert {m['strong']}: quality {m['strong_quality']:.4f} at {m['strong_energy_j']:.1f} J/request; "
          f"cheapest {m['cheapest']}")
    for a, b in m["energy_ties"]:
        print(f"  WARNING: {a} and {b} cost the same energy per request: curves between them collapse onto one energy")
    if m["strong"] == m["cheapest"]:
        print("  WARNING: the strongest expert is also the cheapest: there is no trade-off to route")
    g = m["gate"]
    fmt = lambda v: f"{v:.4f}" if v is not None else "-"  # noqa: E731
    print(f"  gate ({'given' if args.gate else 'fitted on the training rows'}): Brier {fmt(g['brier'])}, ECE {fmt(g['ece'])}, "
          f"AUC {fmt(g['auc'])}, within-task AUC {fmt(g['within_task_auc'])} ({g['tasks_used']} tasks)")
    for line in summary(curves, m):
        print("  " + line)
    if args.png:
        png = Path(args.png)
        plot(curves, png, f"{name}: quality vs energy ({rows} evaluated prompts)")
        print(f"plot: {png}")
    if args.json:
        Path(args.json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.json).write_text(json.dumps({
            "data": str(args.data), "test": str(args.test) if args.test else None, "rows": rows, "train_rows": train_rows,
            "output_tokens": tokens, **m,
            "experts": [{"name": e.name, "column": e.column, "j_per_token": e.j_per_token, "tpot_ms": e.tpot_ms,
                         "energy_j_per_request": e.j_per_token * tokens, "energy_source": e.energy_source, "source": e.source}
                        for e in experts],
            "curves": {c.policy: [{"energy_j": e, "quality": q, "knob": k, "shares": c.shares[i] if i < len(c.shares) else {}}
                                  for i, (e, q, k) in enumerate(c.points)] for c in curves},
        }, indent=1))


# -- budget set|show ----------------------------------------------------------------------------
def _actor(args) -> str:
    return args.actor or f"{getpass.getuser()}@{socket.gethostname()}"


def _print_budget(b) -> None:
    if b.unlimited:
        print(f"  {b.scope:<24} unlimited            used {b.used_j:10.2f} J  ({b.state})")
    else:
        print(f"  {b.scope:<24} {b.energy_budget_j:10.2f} J / {b.window_s:g} s ({b.average_power_w:.2f} W avg)  "
              f"used {b.used_j:10.2f} J, left {b.remaining_j:.2f} J  [{b.state}"
              + (f", retry in {b.retry_after_s:.0f} s" if b.state == "exhausted" else "")
              + f"; throttle at {b.throttle_fraction:.0%}]")
    if b.price:
        print(f"  {'':<24} price of energy {b.quality_per_j:.4g} quality/J ({b.price})")


def cmd_budget_set(args) -> int:
    from ..api.gen import wattserve_pb2 as pb

    req = pb.SetEnergyBudgetRequest(scope=args.scope, window_s=args.window_s or 0.0, unlimited=args.unlimited,
                                    throttle_fraction=args.throttle_fraction or 0.0, reason=args.reason or "",
                                    actor=_actor(args))
    if args.energy_j is not None:
        req.energy_budget_j = args.energy_j
    if args.average_power_w is not None:
        req.average_power_w = args.average_power_w
    resp = admin_call(args, "SetEnergyBudget", req)
    if resp is None:
        return 1
    c = resp.change
    print(f"{c.scope}: {c.old_budget} -> {c.new_budget} (by {c.actor} from {c.peer})")
    _print_budget(resp.budget)
    return 0


def cmd_budget_price(args) -> int:
    from ..api.gen import wattserve_pb2 as pb

    req = pb.SetEnergyPriceRequest(scope=args.scope, auto=args.auto, inherit=args.inherit, reason=args.reason or "",
                                   actor=_actor(args))
    if args.quality_per_j is not None:
        req.quality_per_j = args.quality_per_j
    resp = admin_call(args, "SetEnergyPrice", req)
    if resp is None:
        return 1
    print(f"{resp.budget.scope}: price of energy was {resp.old_price}, now {resp.budget.price}")
    return 0


def cmd_budget_show(args) -> int:
    import datetime

    from ..api.gen import wattserve_pb2 as pb

    resp = admin_call(args, "GetEnergyBudget",
                       pb.GetEnergyBudgetRequest(scopes=args.scope, recent_changes=args.changes))
    if resp is None:
        return 1
    print("energy budgets:")
    for b in resp.budgets:
        _print_budget(b)
    if resp.changes:
        print("recent changes:")
        for c in resp.changes:
            when = datetime.datetime.fromtimestamp(c.unix_s).strftime("%Y-%m-%d %H:%M:%S")
            print(f"  {when} {c.scope}: {c.old_budget} -> {c.new_budget} by {c.actor or 'anonymous'} from {c.peer or '?'}"
                  + (f" ({c.reason})" if c.reason else ""))
    return 0


def add_eval_gate_args(s) -> None:
    """How `route eval` fits its on-the-fly gate (also offered by benchmarks/bench_routing.py,
    which passes them on)."""
    s.add_argument("--gate-knn-weight", type=float, default=None,
                   help="fix the weight of the nearest training prompts' quality in the on-the-fly gate's "
                        "prediction (0: the MLP alone; default: chosen by the inner folds, or 0.5 with --inner-folds 0)")
    s.add_argument("--inner-folds", type=int, default=5,
                   help="choose the on-the-fly gate's knobs (training length, weight decay, neighbours, their "
                        "weight, calibration) by this many folds inside the training rows (0: fixed knobs; default 5)")
    s.add_argument("--calibration", choices=("off", "auto", "on"), default="off",
                   help="per-expert Platt calibration of the on-the-fly gate (auto: kept when the inner folds say "
                        "it lowers the log-loss; default off)")


def register(sub) -> None:
    gate = sub.add_parser("gate", help="train the MoE² gate").add_subparsers(dest="gate_command", required=True)
    s = gate.add_parser("fit", help="fit the gate on a CSV of (prompt, per-expert quality) rows")
    s.add_argument("--data", required=True, help="CSV with a prompt column, one quality column per expert and "
                   "optionally a task column (within-task AUC), e.g. from `wattserve quality measure`")
    s.add_argument("--out", required=True, help="directory to write the fitted gate to")
    s.add_argument("--columns", help="comma-separated quality columns (default: every numeric/boolean column)")
    s.add_argument("--limit", type=int, help="use only the first N rows")
    s.add_argument("--sample", type=int, help="use a seeded random sample of N rows")
    s.add_argument("--holdout", type=float, default=0.2, help="share of rows held out for the report (default 0.2)")
    s.add_argument("--inner-folds", type=int, default=5,
                   help="choose epochs, weight decay, neighbours and their weight by this many folds inside the "
                        "training rows; a knob given below is fixed instead (0: fixed knobs 30 epochs, weight decay "
                        "0.001, 40 neighbours at weight 0.5; default 5)")
    s.add_argument("--calibration", choices=("off", "auto", "on"), default="off",
                   help="per-expert Platt calibration of the gate's qualities (auto: kept when the inner folds "
                        "say it lowers the log-loss; default off, docs/routing.md §1)")
    s.add_argument("--epochs", type=int, default=None, help="fix the training length (default: chosen)")
    s.add_argument("--hidden", type=int, default=64, help="MLP hidden units")
    s.add_argument("--weight-decay", type=float, default=None, help="fix AdamW's weight decay (default: chosen)")
    s.add_argument("--dropout", type=float, default=0.1, help="dropout between the MLP's layers while training (default 0.1)")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--no-cache", action="store_true", help="do not cache prompt embeddings on disk")
    s.add_argument("--window", choices=("head", "head_tail"), default="head_tail",
                   help="what MiniLM reads of a prompt over 256 word pieces: the head, or the head and the "
                        "end where the question is (default head_tail; docs/routing.md)")
    s.add_argument("--head-tokens", type=int, default=32, help="head_tail: word pieces kept from the start (default 32)")
    s.add_argument("--knn-weight", type=float, default=None,
                   help="fix the weight at which the training prompts' mean quality (nearest neighbours) is "
                        "averaged into the gate's prediction (0: the MLP alone; default: chosen)")
    s.add_argument("--knn-k", type=int, default=None, help="fix the number of neighbours averaged (default: chosen)")
    s.set_defaults(func=cmd_gate_fit)

    route = sub.add_parser("route", help="offline routing evaluation").add_subparsers(dest="route_command", required=True)
    s = route.add_parser("eval", help="replay labelled prompts through every policy: quality vs energy")
    s.add_argument("--data", required=True, help="labelled CSV or RouterBench pickle (e.g. shared/data/routing/routellm/*.csv)")
    s.add_argument("--test", help="a separate labelled file to evaluate on (then all of --data trains the gate and baselines)")
    s.add_argument("--skip-blank", action="store_true", help="skip rows with a blank quality cell (and count them)")
    s.add_argument("--knn-k", type=int, default=40,
                   help="neighbours of the kNN router (default 40; the gate's are chosen by the inner folds)")
    add_eval_gate_args(s)
    s.add_argument("--experts", required=True, help="expert profiles YAML (e.g. configs/eval/routellm_mixtral_gpt4.yaml)")
    s.add_argument("--gate", help="a fitted gate directory (default: fit one on the training split)")
    s.add_argument("--holdout", type=float, default=0.5,
                   help="share of rows evaluated, in (0, 1] (the rest trains the gate and baselines; 1.0 needs --gate)")
    s.add_argument("--limit", type=int, help="use only the first N rows")
    s.add_argument("--sample", type=int, help="use a seeded random sample of N rows (MMLU is sorted by subject)")
    s.add_argument("--sample-seed", type=int, help="seed of --sample (default: --seed)")
    s.add_argument("--output-tokens", type=int, help="output tokens per request (default from the profile file)")
    s.add_argument("--steps", type=int, default=21, help="knob values per swept policy")
    s.add_argument("--seed", type=int, default=0)
    s.add_argument("--png", help="write the quality-vs-energy plot here (default: no plot)")
    s.add_argument("--json", help="also write every point to this JSON file")
    s.set_defaults(func=cmd_route_eval)

    budget = sub.add_parser("budget", help="energy budgets of a running server").add_subparsers(dest="budget_command", required=True)
    s = budget.add_parser("set", help="set the cluster's or a tenant's energy budget")
    s.add_argument("scope", help="'cluster' or a tenant name")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--energy-j", type=float, help="joules per window")
    g.add_argument("--average-power-w", type=float, help="average watts over the window")
    g.add_argument("--unlimited", action="store_true", help="remove the limit")
    s.add_argument("--window-s", type=float, help="window length in seconds (default 3600)")
    s.add_argument("--throttle-fraction", type=float, help="throttle to the cheapest expert past this share")
    s.add_argument("--actor", help="who makes the change (default user@host)")
    s.add_argument("--reason", help="why (recorded in the change log)")
    add_connection_args(s, operator=True)
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_budget_set)
    s = budget.add_parser("price", help="set the price of energy (quality per J) of the cluster or a tenant, live")
    s.add_argument("scope", help="'cluster' or a tenant name")
    g = s.add_mutually_exclusive_group(required=True)
    g.add_argument("--quality-per-j", type=float, help="a fixed price in quality units per joule")
    g.add_argument("--auto", action="store_true", help="derive it from the energy budget's burn rate")
    g.add_argument("--inherit", action="store_true", help="a tenant: use the cluster's price")
    s.add_argument("--actor", help="who makes the change (default user@host)")
    s.add_argument("--reason", help="why (logged)")
    add_connection_args(s, operator=True)
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_budget_price)
    s = budget.add_parser("show", help="show budgets, use and recent changes")
    s.add_argument("scope", nargs="*", help="scopes (default: cluster and every tenant)")
    s.add_argument("--changes", type=int, default=10, help="recent changes to list")
    add_connection_args(s, operator=True)
    s.add_argument("--timeout", type=float, default=10.0)
    s.set_defaults(func=cmd_budget_show)
