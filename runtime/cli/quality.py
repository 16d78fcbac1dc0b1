"""``wattserve quality measure``: per-prompt quality labels measured on a config's experts.

Each expert of the config is loaded on its own engine, in this process, exactly as its Ray actor
loads it (``prepare_for_engine`` + ``build_engine`` with the config's expert spec: same weights,
tokenizer, BOS rule, dtype and threads), and answers every item of a labelled JSONL set
(``router/quality.py``): multiple-choice items through the engine's Score path, short answers by
greedy generation through the engine's step loop. The labels (1 right, 0 wrong) go to a CSV with
one column per expert, the shape ``wattserve gate fit`` reads. Experts run one after another, so
only one model is in memory; the CSV is rewritten after every chunk, and a rerun measures only
the cells still missing (resume after an interruption, or add an expert).

With ``--logprobs FILE.jsonl`` every multiple-choice item's per-choice log-likelihoods are kept
too (one line per item and expert): what an ensemble of experts would have answered is then a
computation, not another run (``wattserve quality ensemble``). Items whose label exists but whose
log-likelihoods do not are scored again (and their label checked against the new score).

Why in-process rather than through a served gateway: labels must not depend on routing, budgets
or admission (a pinned request may still be refused for its budget), and a label run should not
need a cluster or ports; the engine code and model files are the ones the server runs.
"""

from __future__ import annotations

import csv
import json
import os
import sys
import time
from pathlib import Path

from wattserve.errors import ConfigError

from . import say

DEFAULT_CONFIG = "configs/local.yaml"
KEY_COLUMNS = ("id", "task", "prompt")
# Engines with the add/step/score surface that this command drives without an actor.
STEPPED_ENGINES = ("torch", "llamacpp")


class EngineAnswers:
    """Greedy answers and choice log-likelihoods from one real engine, driven step by step."""

    def __init__(self, engine, max_batch: int) -> None:
        self.engine = engine
        self.max_batch = max(1, max_batch)
        self._n = 0

    def _call_id(self) -> str:
        self._n += 1
        return f"quality-{self._n}"

    def generate(self, prompts: list[str], max_tokens: int, stop: tuple[str, ...]) -> list[str]:
        """Greedy completions of ``prompts`` (batched like served requests)."""
        from wattserve.types import GenerateCall, SamplingParams

        out: list[str] = []
        for i in range(0, len(prompts), self.max_batch):
            ids, texts = [], {}
            for p in prompts[i : i + self.max_batch]:
                call = GenerateCall(request_id=self._call_id(), prompt=p, max_tokens=max_tokens,
                                    sampling=SamplingParams(temperature=0.0, stop=stop))
                self.engine.add(self.engine.validate(call, time.monotonic()))
                ids.append(call.request_id)
                texts[call.request_id] = []
            done: set[str] = set()
            while len(done) < len(ids):
                for o in self.engine.step(time.monotonic()).outputs:
                    texts[o.request_id].append(o.text)
                    if o.finish_reason is not None:
                        if o.error:
                            raise RuntimeError(f"engine error on a quality prompt: {o.error}")
                        done.add(o.request_id)
            out.extend("".join(texts[r]) for r in ids)
        return out

    def score(self, prompt: str, choices: tuple[str, ...]) -> list[float]:
        """Summed log p(choice | prompt) per choice, in nats (the Score path)."""
        from wattserve.types import ScoreCall

        call = ScoreCall(request_id=self._call_id(), prompt=prompt, choices=choices)
        return list(self.engine.score(self.engine.validate_score(call, time.monotonic())).logprobs)


def _read_labels(path: Path) -> dict[str, dict]:
    if not path.exists():
        return {}
    with path.open(newline="", encoding="utf-8") as f:
        return {r["id"]: r for r in csv.DictReader(f)}


def _write_labels(path: Path, items, rows: dict[str, dict], experts: list[str]) -> None:
    """Rewrite ``path``: ``items`` in order, then every other row the file already held (a run
    limited by ``--tasks`` or ``--limit`` must not drop the labels it did not measure)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    written = set()
    with tmp.open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow([*KEY_COLUMNS, *experts])
        for it in items:
            r = rows.get(it.id, {})
            w.writerow([it.id, it.task, it.prompt, *(r.get(e, "") for e in experts)])
            written.add(it.id)
        for rid, r in rows.items():
            if rid not in written and "task" in r:  # read from the file, not measured this run
                w.writerow([rid, r["task"], r.get("prompt", ""), *(r.get(e) or "" for e in experts)])
    tmp.replace(path)


def _load_engine(cfg, spec, cache: Path, threads: int | None):
    from workers.engines import build_engine
    from workers.models import prepare_for_engine

    if spec.engine.kind not in STEPPED_ENGINES:
        raise ConfigError(f"expert {spec.name!r} runs the {spec.engine.kind} engine; quality measure drives "
                          f"stepped engines ({', '.join(STEPPED_ENGINES)}) in-process")
    if threads:
        spec = spec.model_copy(update={"engine": spec.engine.model_copy(update={"threads": threads})})
    # The file the expert's actor loads: the GGUF itself for llamacpp, the HF directory for torch.
    model_dir = prepare_for_engine(spec.model, spec.engine.kind, cache, progress=say)
    say(f"loading {spec.model_label} for expert {spec.name}")
    return build_engine(spec, model_dir)


def unlabelled(items, rows: dict[str, dict], name: str) -> list:
    """The items whose label for expert ``name`` is still missing (a resumed run fills only these)."""
    return [it for it in items if rows.get(it.id, {}).get(name, "") == ""]


def read_logprobs(path: Path) -> dict[tuple[str, str], list[float]]:
    """``{(item id, expert): per-choice log-likelihoods}`` from a ``--logprobs`` JSONL file."""
    if not path.exists():
        return {}
    out = {}
    for n, line in enumerate(path.read_text(encoding="utf-8").splitlines(), start=1):
        if not line.strip():
            continue
        try:
            raw = json.loads(line)
            out[(str(raw["id"]), str(raw["expert"]))] = [float(v) for v in raw["logprobs"]]
        except (ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"{path}:{n}: not a log-likelihood line ({exc})") from None
    return out


def write_logprobs(path: Path, logprobs: dict[tuple[str, str], list[float]]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{os.getpid()}.tmp")
    with tmp.open("w", encoding="utf-8") as f:
        for (item, expert), lps in sorted(logprobs.items()):
            f.write(json.dumps({"id": item, "expert": expert, "logprobs": [round(v, 5) for v in lps]}) + "\n")
    tmp.replace(path)


def to_measure(items, rows: dict[str, dict], name: str,
               logprobs: dict[tuple[str, str], list[float]] | None = None) -> tuple[list, list]:
    """What expert ``name`` still has to answer: the short-answer items it has no label for, and
    the multiple-choice items it has no label for or (with ``logprobs``) no log-likelihoods for."""
    missing = {it.id for it in unlabelled(items, rows, name)}
    exact = [it for it in items if it.kind == "exact" and it.id in missing]
    mc = [it for it in items if it.kind == "mc"
          and (it.id in missing or (logprobs is not None and (it.id, name) not in logprobs))]
    return exact, mc


def measure_expert(answers: EngineAnswers, items, name: str, rows: dict[str, dict], *, max_tokens: int,
                   mc_norm: str, save, chunk: int = 16, save_every_s: float = 30.0, progress=None,
                   logprobs: dict[tuple[str, str], list[float]] | None = None) -> int:
    """Fill ``rows[item.id][name]`` with "1"/"0" for every item that lacks it; ``save()`` after
    each chunk so an interrupted run loses at most one chunk. With ``logprobs`` (a dict to fill),
    multiple-choice items also keep their per-choice log-likelihoods, and labelled items that lack
    them are scored again. Returns how many existing labels a new score contradicted."""
    from router.quality import exact_match, mc_correct

    exact, mc = to_measure(items, rows, name, logprobs)
    changed = 0
    for i in range(0, len(exact), chunk):
        part = exact[i : i + chunk]
        for it, text in zip(part, answers.generate([it.prompt for it in part], max_tokens, ("\n",)), strict=True):
            rows.setdefault(it.id, {})[name] = "1" if exact_match(text, it.answers, it.match) else "0"
        save()
        if progress:
            progress(len(part))
    last_save = time.monotonic()
    for i, it in enumerate(mc, start=1):
        lps = answers.score(it.prompt, it.choices)
        if logprobs is not None:
            logprobs[(it.id, name)] = list(lps)
        label = "1" if mc_correct(lps, it, mc_norm) else "0"
        row = rows.setdefault(it.id, {})
        changed += row.get(name, "") not in ("", label)
        row[name] = label
        # Long few-shot prompts take tens of seconds each on a busy CPU: save by time too.
        if i % chunk == 0 or i == len(mc) or time.monotonic() - last_save > save_every_s:
            save()
            last_save = time.monotonic()
        if progress:
            progress(1)
    return changed


def cmd_measure(args) -> int:
    from tqdm import tqdm

    from router.quality import read_items, summarise
    from workers.models import default_cache_dir

    from ..config import load_config

    cfg = load_config(args.config)
    names = [e.strip() for e in args.experts.split(",")] if args.experts else [e.name for e in cfg.experts]
    specs = []
    for n in names:
        spec = cfg.expert(n)
        if spec is None:
            raise ConfigError(f"{args.config}: no expert {n!r} (experts: {', '.join(e.name for e in cfg.experts)})")
        specs.append(spec)
    items = read_items(args.data)
    if args.tasks:
        keep = {t.strip() for t in args.tasks.split(",")}
        items = [it for it in items if it.task in keep]
    if args.limit:
        items = items[: args.limit]
    out = Path(args.out)
    rows = _read_labels(out)
    experts = list(dict.fromkeys([*(k for r in rows.values() for k in r if k not in KEY_COLUMNS), *names]))
    cache = Path(args.cache_dir or os.environ.get("WATTSERVE_CACHE_DIR") or cfg.model_cache_dir or default_cache_dir())
    say(f"{len(items)} items from {args.data}; experts {', '.join(names)}; labels -> {out}")

    lp_path = Path(args.logprobs) if args.logprobs else None
    logprobs = read_logprobs(lp_path) if lp_path else None

    def save() -> None:
        _write_labels(out, items, rows, experts)
        if lp_path is not None:
            write_logprobs(lp_path, logprobs)

    for spec in specs:
        exact, mc = to_measure(items, rows, spec.name, logprobs)
        missing = len(exact) + len(mc)
        if not missing:
            say(f"{spec.name}: every item already labelled in {out}")
            continue
        engine = _load_engine(cfg, spec, cache, args.threads)
        try:
            t0 = time.monotonic()
            with tqdm(total=missing, desc=f"{spec.name}", unit="item", file=sys.stderr) as bar:
                changed = measure_expert(EngineAnswers(engine, spec.max_batch), items, spec.name, rows,
                                         max_tokens=args.max_tokens, mc_norm=args.mc_norm, save=save,
                                         progress=bar.update, logprobs=logprobs)
            say(f"{spec.name}: {missing} items in {time.monotonic() - t0:.0f} s"
                + (f"; {changed} existing label(s) changed when scored again" if logprobs is not None else ""))
        finally:
            engine.close()
    save()
    done = [{"task": it.task, **rows[it.id]} for it in items if all(rows.get(it.id, {}).get(e, "") != "" for e in names)]
    print(f"labels: {out} ({len(done)} of {len(items)} items labelled by {', '.join(names)})")
    for task, s in summarise(done, names).items():
        acc = ", ".join(f"{e} {a:.2f}" for e, a in s["accuracy"].items())
        print(f"  {task:<20} {s['rows']:4d} items  accuracy {acc}  experts disagree on {s['disagree_share']:.0%}")
    return 0


def cmd_ensemble(args) -> int:
    """Measure what mixing experts adds over the best of them from kept log-likelihoods."""
    from router.ensemble import ENSEMBLE_FILE, measure
    from router.quality import read_items

    items = read_items(args.data)
    logprobs: dict[tuple[str, str], list[float]] = {}
    for path in args.logprobs:
        logprobs.update(read_logprobs(Path(path)))
    if not logprobs:
        raise ConfigError(f"no log-likelihoods in {', '.join(args.logprobs)}: run `wattserve quality measure --logprobs FILE` first")
    experts = sorted({e for _, e in logprobs})
    if args.experts:
        experts = [e.strip() for e in args.experts.split(",")]
    by_id = {it.id: it for it in items}
    for (item, expert), lps in logprobs.items():
        it = by_id.get(item)
        if it is not None and it.kind == "mc" and len(lps) != len(it.choices):
            raise ConfigError(f"{item}: {len(lps)} log-likelihoods from {expert} for {len(it.choices)} choices")
    weights = None
    if args.gate:
        weights = _gate_weights(args.gate, [it for it in items if it.kind == "mc"], experts)
    gains = measure(items, logprobs, experts, norm=args.mc_norm, max_size=args.max_size, weights=weights)
    if not gains:
        raise ConfigError(f"no multiple-choice item of {args.data} was scored by two or more of {', '.join(experts)}")
    out = Path(args.out)
    if out.is_dir():
        out = out / ENSEMBLE_FILE
    gains.save(out, data=str(args.data), logprobs=[str(p) for p in args.logprobs], mc_norm=args.mc_norm,
               weights=f"gate {args.gate} (renormalised per set)" if args.gate else "equal")
    for m in gains.measures.values():
        print(f"{'+'.join(m.experts)}: mix right on {m.accuracy:.3f} of {m.n} items; best alone {m.best} "
              f"{m.best_accuracy:.3f}; mix right where {m.best} was wrong on {m.wins}, wrong where it was right on "
              f"{m.losses}: lift {m.lift:+.3f} (+- {m.lift_se:.3f})")
    print(f"wrote {out}")
    return 0


def _gate_weights(gate_dir: str, items, experts: list[str]) -> dict[str, dict[str, float]]:
    """The gate's weights per item (the served mix uses them, renormalised over the set)."""
    from router.gate import load_gate

    gate = load_gate(gate_dir, {e: 0.5 for e in experts})
    say(f"gate weights for {len(items)} prompts from {gate_dir}")
    return {it.id: dict(gate(it.prompt).weights) for it in items}


def register(sub) -> None:
    q = sub.add_parser("quality", help="measure the experts' answer quality").add_subparsers(
        dest="quality_command", required=True)
    s = q.add_parser("measure", help="label a prompt set with each expert's right/wrong answers (gate fit's input)")
    s.add_argument("--config", default=DEFAULT_CONFIG, help=f"config whose experts answer (default {DEFAULT_CONFIG})")
    s.add_argument("--data", required=True, help="labelled JSONL (e.g. data/quality/prompts.jsonl)")
    s.add_argument("--out", required=True, help="labels CSV to write; an existing one is resumed")
    s.add_argument("--experts", help="comma-separated expert names (default: every expert of the config)")
    s.add_argument("--tasks", help="comma-separated task names to keep")
    s.add_argument("--limit", type=int, help="only the first N items")
    s.add_argument("--max-tokens", type=int, default=8, help="generated tokens per short answer (default 8)")
    s.add_argument("--mc-norm", choices=("per_char", "sum"), default="per_char",
                   help="multiple choice: log-likelihood per character of the choice (default) or summed")
    s.add_argument("--threads", type=int, help="engine threads (default: the config's)")
    s.add_argument("--logprobs", help="also keep each multiple-choice item's per-choice log-likelihoods in this "
                   "JSONL file (resumed like the labels; input of `quality ensemble`)")
    s.add_argument("--cache-dir", help="model cache (default $WATTSERVE_CACHE_DIR, else the config's)")
    s.set_defaults(func=cmd_measure)
    e = q.add_parser("ensemble", help="measure what mixing experts' multiple-choice answers adds over the best of them")
    e.add_argument("--data", required=True, help="labelled JSONL the log-likelihoods were measured on")
    e.add_argument("--logprobs", required=True, nargs="+", help="JSONL file(s) written by `quality measure --logprobs`")
    e.add_argument("--out", required=True, help="where to write ensemble.json (a directory: the gate's, where the router reads it)")
    e.add_argument("--experts", help="comma-separated experts (default: every expert in the files)")
    e.add_argument("--gate", help="weigh the mix with this fitted gate's weights, as served (default: equal weights)")
    e.add_argument("--mc-norm", choices=("per_char", "sum"), default="per_char",
                   help="how choices are scored, as in `quality measure` (default per_char)")
    e.add_argument("--max-size", type=int, default=3, help="largest set of experts to measure (default 3)")
    e.set_defaults(func=cmd_ensemble)
