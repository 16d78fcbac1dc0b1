"""Training the MoE² gate from labelled prompts (``wattserve gate fit``).

Data: a CSV with a ``prompt`` column and one column per expert holding that expert's quality on
the prompt (``True``/``False`` correctness, or a number: scores above 1 are divided by the
column maximum, e.g. MT-Bench's 1-10). The RouteLLM files in ``shared/data/routing/routellm``
are of this shape. The gate (``router/gate.py``) gets one logit per expert, trained with binary
cross-entropy against those qualities on a seeded train split; the held-out split is reported:

- ``top_choice_quality``: mean quality of the expert the gate ranks first, beside every single
  expert's mean and the oracle (best expert per prompt);
- ``top_choice_accuracy``: on prompts where the experts disagree, how often the gate's top
  expert is one of the best;
- calibration: Brier score and expected calibration error (10 bins) of the predicted qualities;
- ranking: AUC of the predicted qualities pooled, and **within-task AUC** (per group column, e.g.
  ``task``): a gate that only tells tasks apart scores 0.5 there;
- truncation: how many prompts were longer than MiniLM's 256 word pieces (cut by the window).

``gate.json`` also records which prompts trained the gate and which were held out
(``train_prompt_sha1`` / ``heldout_prompt_sha1``: the first 16 hex digits of the SHA-1 of each
prompt's UTF-8 bytes), so an evaluation can refuse rows the gate has seen.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wattserve.errors import InvalidRequest

from . import calibration
from .eval_data import prompt_sha1, read_eval_data
from .gate import (
    DEFAULT_HEAD_TOKENS,
    DEFAULT_KNN_K,
    EMBEDDING_MODEL,
    GATE_FILE,
    NEIGHBOURS_FILE,
    WEIGHTS_FILE,
    MiniLMEncoder,
    Neighbours,
    blend,
    build_mlp,
    embed_windows,
    load_minilm_tokenizer,
)


@dataclass(slots=True)
class LabelledPrompts:
    prompts: list[str]
    experts: list[str]  # quality column names
    quality: np.ndarray  # (N, experts) in [0, 1]
    source: str
    groups: list[str] | None = None  # task of each row (eval_data.TASK_COLUMNS), for within-task AUC


def read_labelled(path: str | Path, columns: Sequence[str] | None = None, limit: int | None = None,
                  sample: int | None = None, seed: int = 0) -> LabelledPrompts:
    """Read (prompt, per-expert quality) rows with the one reader ``route eval`` uses too
    (``router/eval_data.py``: CSV or RouterBench's table; a task/subject/category column groups
    rows). ``columns`` names the quality columns; ``limit`` keeps the first rows, ``sample`` a
    seeded random subset. A blank cell is an error here. Raises InvalidRequest naming what is
    wrong with the file."""
    d = read_eval_data(path, columns, limit=limit, sample=sample, seed=seed)
    return LabelledPrompts(d.prompts, d.experts, d.quality, d.source, d.tasks)


def count_truncated(prompts: Sequence[str], tokenizer=None) -> int:
    """How many prompts are longer than MiniLM reads (256 word pieces with [CLS]/[SEP])."""
    tok = tokenizer or load_minilm_tokenizer()
    return int(sum(embed_windows(tok, prompts)[1]))


def embed_cached(prompts: Sequence[str], cache_dir: Path | None, encoder_factory: Callable[..., object] = MiniLMEncoder,
                 progress: Callable[[int], None] | None = None, batch_size: int = 32, window: str = "head",
                 head_tokens: int = DEFAULT_HEAD_TOKENS) -> np.ndarray:
    """MiniLM embeddings of ``prompts`` read through ``window`` (``router/gate.py``), cached on
    disk by content hash (embedding is the slow part)."""
    digest = hashlib.sha256("\x1e".join(prompts).encode("utf-8", "surrogatepass")).hexdigest()[:24]
    tag = "" if window == "head" else f"-{window}{head_tokens}"
    cached = cache_dir / f"minilm-{digest}{tag}.npy" if cache_dir else None
    if cached is not None and cached.exists():
        return np.load(cached)
    encoder = encoder_factory() if window == "head" else encoder_factory(window=window, head_tokens=head_tokens)
    # Chunks of similar length (the encoder pads each batch to its longest prompt).
    order = sorted(range(len(prompts)), key=lambda i: len(prompts[i]))
    emb = np.zeros((len(prompts), encoder.dim), dtype=np.float32)
    chunk = batch_size * 8
    for i in range(0, len(order), chunk):
        idx = order[i : i + chunk]
        emb[idx] = encoder.encode([prompts[j] for j in idx], batch_size=batch_size)
        if progress:
            progress(len(idx))
    if cached is not None:
        cached.parent.mkdir(parents=True, exist_ok=True)
        tmp = cached.with_suffix(f".{os.getpid()}.tmp.npy")
        np.save(tmp, emb)
        tmp.replace(cached)
    return emb


def split(n: int, holdout: float, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Seeded shuffle into (train, held-out) index arrays."""
    idx = list(range(n))
    random.Random(seed).shuffle(idx)
    k = max(1, int(round(n * holdout)))
    return np.asarray(sorted(idx[k:])), np.asarray(sorted(idx[:k]))


def train_mlp(x: np.ndarray, y: np.ndarray, *, hidden: int = 64, epochs: int = 30, lr: float = 2e-3,
              weight_decay: float = 1e-3, dropout: float = 0.1, batch_size: int = 256, seed: int = 0,
              on_epoch: Callable[[int, float], None] | None = None):
    """Fit logits to qualities with BCE (AdamW: ``weight_decay``; ``dropout`` between the layers
    while training only); returns the torch module (eval mode)."""
    if epochs < 1:
        raise InvalidRequest(f"epochs must be >= 1, got {epochs}")
    mlp = None
    for epoch, mlp in train_mlp_epochs(x, y, hidden=hidden, epochs=epochs, lr=lr, weight_decay=weight_decay,
                                       dropout=dropout, batch_size=batch_size, seed=seed):
        if on_epoch:
            on_epoch(epoch - 1, mlp.last_loss)
    return mlp.eval()


def train_mlp_epochs(x: np.ndarray, y: np.ndarray, *, hidden: int = 64, epochs: int = 30, lr: float = 2e-3,
                     weight_decay: float = 1e-3, dropout: float = 0.1, batch_size: int = 256, seed: int = 0):
    """:func:`train_mlp` one epoch at a time: yields (epochs done, the module) after each epoch, so
    a caller can read the predictions of every training length from one run (``router/gate_cv.py``).
    The module is in train mode when the next epoch starts; ``mlp.last_loss`` is that epoch's
    mean loss."""
    import torch

    torch.manual_seed(seed)
    mlp = build_mlp(x.shape[1], hidden, y.shape[1], dropout=dropout)
    opt = torch.optim.AdamW(mlp.parameters(), lr=lr, weight_decay=weight_decay)
    xt, yt = torch.as_tensor(x, dtype=torch.float32), torch.as_tensor(y, dtype=torch.float32)
    gen = torch.Generator().manual_seed(seed)
    loss_fn = torch.nn.BCEWithLogitsLoss()
    for epoch in range(epochs):
        mlp.train()
        total = 0.0
        for batch in torch.randperm(len(xt), generator=gen).split(batch_size):
            opt.zero_grad()
            loss = loss_fn(mlp(xt[batch]), yt[batch])
            loss.backward()
            opt.step()
            total += float(loss.detach()) * len(batch)
        mlp.last_loss = total / len(xt)
        yield epoch + 1, mlp


def report(logits: np.ndarray, y: np.ndarray, experts: Sequence[str], groups: Sequence[str] | None = None) -> dict:
    """Held-out metrics of a gate (see the module docstring). ``groups`` (a task per row) adds
    within-task AUC, per expert and pooled over experts (each expert's rows keep their task)."""
    p = 1.0 / (1.0 + np.exp(-logits))
    top = logits.argmax(axis=1)
    rows = np.arange(len(y))
    chosen = y[rows, top]
    best = y.max(axis=1)
    disagree = y.max(axis=1) != y.min(axis=1)
    return {
        "rows": int(len(y)),
        "top_choice_quality": float(chosen.mean()),
        "oracle_quality": float(best.mean()),
        "expert_quality": {e: float(y[:, i].mean()) for i, e in enumerate(experts)},
        "top_choice_accuracy_where_experts_disagree": float((chosen[disagree] == best[disagree]).mean()) if disagree.any() else None,
        "disagreeing_rows": int(disagree.sum()),
        "top_choice_share": {e: float((top == i).mean()) for i, e in enumerate(experts)},
        "brier": calibration.brier(p, y),
        "ece": calibration.ece(p, y),
        "auc": calibration.auc(p, y),
        "predicted_mean_quality": {e: float(p[:, i].mean()) for i, e in enumerate(experts)},
        **_within_task(p, y, experts, groups),
    }


def _within_task(p: np.ndarray, y: np.ndarray, experts: Sequence[str], groups: Sequence[str] | None) -> dict:
    if groups is None:
        return {"within_task_auc": None, "within_task_auc_by_expert": {}, "tasks_ranked": 0}
    g = list(groups)
    by_expert = {e: calibration.within_group_auc(p[:, i], y[:, i], g)[0] for i, e in enumerate(experts)}
    # Pooled: a (task, expert) pair is one group, so neither tasks nor experts' base rates count.
    pooled_groups = [f"{t}\x1f{e}" for e in experts for t in g]
    pooled, used = calibration.within_group_auc(p.T.ravel(), y.T.ravel(), pooled_groups)
    return {"within_task_auc": pooled, "within_task_auc_by_expert": by_expert, "tasks_ranked": used}


def fit_gate(data: LabelledPrompts, emb: np.ndarray, out_dir: str | Path, *, holdout: float = 0.2, seed: int = 0,
             hidden: int = 64, epochs: int = 30, weight_decay: float = 1e-3, dropout: float = 0.1,
             on_epoch: Callable[[int, float], None] | None = None, window: str = "head",
             head_tokens: int = DEFAULT_HEAD_TOKENS, truncated: int | None = None,
             knn_weight: float = 0.0, knn_k: int = DEFAULT_KNN_K, knn_tau: float = 0.0, inner_folds: int = 0,
             grid: Mapping[str, Sequence] | None = None, calibrate: bool | None = False,
             on_fold: Callable[[int], None] | None = None) -> dict:
    """Train on the train split, report on the held-out split, save to ``out_dir``; returns the
    report. ``knn_weight`` > 0 keeps the training rows as neighbours and averages their mean
    quality into the prediction with that weight (``router/gate.py``). ``window``/``head_tokens``
    record how ``emb`` was computed (the serving gate embeds the same way); ``truncated`` is how
    many of the prompts were longer than MiniLM reads.

    ``inner_folds`` >= 2 chooses ``epochs``, ``weight_decay``, ``knn_k`` and ``knn_weight`` by
    cross-validation inside the train split (``router/gate_cv.py``; ``grid`` maps a knob to the
    values tried, a knob missing from it takes the module's default grid, a one-value list fixes
    it; ``calibrate`` None lets the folds decide on per-expert calibration). The held-out rows
    never enter the choice; gate.json records it under ``inner_cv``."""
    from safetensors.torch import save_file

    if not 0 < holdout < 1:
        raise InvalidRequest(f"holdout must be in (0, 1), got {holdout}")
    if len(data.prompts) < 10:
        raise InvalidRequest(f"{data.source}: {len(data.prompts)} rows are too few to fit and hold out (need >= 10)")
    tr, ho = split(len(data.prompts), holdout, seed)
    t0 = time.monotonic()
    choice = None
    if inner_folds:
        from .gate_cv import choose_blend

        choice = choose_blend(emb[tr], data.quality[tr], folds=inner_folds, seed=seed, calibrate=calibrate,
                              hidden=hidden, dropout=dropout, on_fold=on_fold, **dict(grid or {}))
        epochs, weight_decay, knn_k, knn_weight = choice.epochs, choice.weight_decay, choice.knn_k, choice.knn_weight
        knn_tau = choice.knn_tau
    calibration = choice.calibration if choice is not None else None
    mlp = train_mlp(emb[tr], data.quality[tr], hidden=hidden, epochs=epochs, weight_decay=weight_decay,
                    dropout=dropout, seed=seed, on_epoch=on_epoch)
    import torch

    with torch.inference_mode():
        held = mlp(torch.as_tensor(emb[ho])).numpy()
    neighbours = Neighbours(emb[tr], data.quality[tr], knn_k, knn_tau) if knn_weight > 0 else None
    if neighbours is not None or calibration is not None:
        from .gate_cv import apply_calibration

        p = 1.0 / (1.0 + np.exp(-held.astype(np.float64)))
        if neighbours is not None:
            p = blend(p, neighbours.predict(emb[ho]), knn_weight)
        p = np.clip(apply_calibration(p, calibration), 1e-6, 1 - 1e-6)
        held = np.log(p / (1 - p))  # the report reads logits
    rep = report(held, data.quality[ho], data.experts, [data.groups[i] for i in ho] if data.groups else None)
    rep["prompts_truncated"] = truncated
    rep["prompts"] = len(data.prompts)
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    save_file({k: v.contiguous() for k, v in mlp.state_dict().items()}, str(out / WEIGHTS_FILE))
    if neighbours is not None:
        neighbours.save(out / NEIGHBOURS_FILE)
    elif (out / NEIGHBOURS_FILE).exists():
        (out / NEIGHBOURS_FILE).unlink()  # a refit without neighbours must not leave stale ones
    meta = {
        "experts": data.experts,
        "embedding": EMBEDDING_MODEL,
        "embedding_dim": int(emb.shape[1]),
        "window": window,
        "head_tokens": head_tokens,
        "hidden": hidden,
        "epochs": epochs,
        "weight_decay": weight_decay,
        "dropout": dropout,
        "knn_weight": knn_weight,
        "knn_k": int(neighbours.k) if neighbours is not None else knn_k,
        "knn_tau": knn_tau,
        "calibration": calibration,
        "inner_cv": choice.record() if choice is not None else None,
        "seed": seed,
        "holdout": holdout,
        "train_rows": int(len(tr)),
        "data": data.source,
        "train_s": round(time.monotonic() - t0, 2),
        "heldout_report": rep,
        # Leakage record: which prompts the gate saw (an evaluation must not score them).
        "train_prompt_sha1": [prompt_sha1(data.prompts[i]) for i in tr],
        "heldout_prompt_sha1": [prompt_sha1(data.prompts[i]) for i in ho],
    }
    (out / GATE_FILE).write_text(json.dumps(meta, indent=2) + "\n")
    return rep
