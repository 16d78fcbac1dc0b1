"""Per-exit thresholds from a compute budget, the DeeR way, on calibration text.

1. **Record.** Each document of the text continues for ``new_tokens`` greedy tokens at full
   depth (the positions serving will decode), keeping every decode position's hidden state at
   each exit (and the reference probe) and the last layer's token.
2. **Shortlist.** The criterion's vocabulary: the tokens the last layer emitted most.
3. **Deltas.** Each exit's criterion on every position, by the same :class:`ExitHeads` the
   engine serves with (adapters included), so offline and online thresholds mean the same.
4. **Thresholds** (Yue et al. 2024, DeeR-VLA): target exit shares ``q_k ∝ lambda**k`` with
   ``lambda`` solved so ``sum q_k * depth_k`` is the budget; then, exit by exit, ``eta_k`` lets
   ``floor(n q_k)`` of the still-running positions (those with the smallest deltas) leave; the
   last threshold is infinite. Each operating point also records the depth, compute and
   agreement with the full model it achieves on the calibration positions.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path

import torch

from ..runner import DecoderRunner
from .decode import ALWAYS, NEVER, ExitHeads, ExitLayout
from .points import ExitProfile, ModelFingerprint, OperatingPoint, effective_fraction

Progress = Callable[[int], None]  # called with the number of positions just recorded


def read_documents(path: str | Path) -> list[str]:
    """Blocks of text separated by blank lines; each becomes one prompt."""
    text = Path(path).read_text(encoding="utf-8", errors="replace")
    blocks, current = [], []
    for line in text.splitlines():
        if line.strip():
            current.append(line)
        elif current:
            blocks.append("\n".join(current))
            current = []
    if current:
        blocks.append("\n".join(current))
    return blocks


@dataclass(slots=True)
class ProbeStates:
    """Hidden states at the probe depths for recorded decode positions (all on the CPU)."""

    hidden: dict[int, torch.Tensor]  # depth -> (N, hidden) float32
    final_ids: torch.Tensor  # (N,) the last layer's greedy token
    doc: torch.Tensor  # (N,) which document each position belongs to

    @property
    def size(self) -> int:
        return int(self.final_ids.numel())

    def subset(self, mask: torch.Tensor) -> ProbeStates:
        return ProbeStates({d: h[mask] for d, h in self.hidden.items()}, self.final_ids[mask], self.doc[mask])


@torch.no_grad()
def record_states(
    runner: DecoderRunner,
    tokenize: Callable[[str], list[int]],
    documents: Sequence[str],
    depths: Sequence[int],
    *,
    new_tokens: int = 32,
    max_prompt_tokens: int = 256,
    batch: int = 8,
    stop_ids: frozenset[int] = frozenset(),
    max_positions: int | None = None,
    progress: Progress | None = None,
) -> ProbeStates:
    """Greedy-continue each document at full depth and keep the states at ``depths``."""
    cache = runner.cache
    if cache.used:
        raise RuntimeError("calibration needs an idle engine (its KV cache is in use)")
    batch = min(batch, cache.max_slots)
    room = cache.max_len - new_tokens - 1
    keep = {d: [] for d in depths}
    finals, docs, recorded = [], [], 0
    for start in range(0, len(documents), batch):
        prompts = [tokenize(d)[: min(max_prompt_tokens, room)] for d in documents[start : start + batch]]
        prompts = [(start + i, p) for i, p in enumerate(prompts) if p]
        if not prompts:
            continue
        step = _record_batch(runner, prompts, depths, new_tokens, stop_ids)
        for d in depths:
            keep[d].append(step[0][d])
        finals.append(step[1])
        docs.append(step[2])
        recorded += int(step[1].numel())
        if progress:
            progress(int(step[1].numel()))
        if max_positions and recorded >= max_positions:
            break
    if not finals:
        raise ValueError("the calibration text produced no positions: give a non-empty text file")
    cut = max_positions or recorded
    return ProbeStates(
        {d: torch.cat(v)[:cut] for d, v in keep.items()}, torch.cat(finals)[:cut], torch.cat(docs)[:cut]
    )


def _record_batch(runner, prompts, depths, new_tokens, stop_ids):
    cache = runner.cache
    nxt = [int(runner.prefill(cache.allocate(), ids).argmax()) for _, ids in prompts]
    alive = [t not in stop_ids for t in nxt]
    wanted = set(depths)
    keep = {d: [] for d in depths}
    finals, docs = [], []
    try:
        for _ in range(new_tokens):
            if not any(alive):
                break
            seen: dict[int, torch.Tensor] = {}
            if 0 in wanted:
                seen[0] = runner.embed(torch.tensor(nxt, device=runner.device)).to(runner.dtype)
            logits = runner.decode(nxt, on_layer=_keeper(seen, wanted))
            rows = torch.tensor([i for i, a in enumerate(alive) if a])
            for d in depths:
                keep[d].append(seen[d].float().cpu()[rows])
            nxt = logits.argmax(-1).tolist()
            finals.append(torch.tensor(nxt)[rows])
            docs.append(torch.tensor([prompts[i][0] for i in rows.tolist()]))
            alive = [a and t not in stop_ids for a, t in zip(alive, nxt, strict=True)]
    finally:
        for slot in reversed(range(cache.used)):
            cache.free(slot)
    empty = torch.empty(0, dtype=torch.long)
    return (
        {d: torch.cat(v) if v else torch.empty(0, runner.config.hidden_size) for d, v in keep.items()},
        torch.cat(finals) if finals else empty,
        torch.cat(docs) if docs else empty,
    )


def _keeper(store: dict[int, torch.Tensor], wanted: set[int]) -> Callable[[int, torch.Tensor], None]:
    def keep(depth: int, h: torch.Tensor) -> None:
        if depth in wanted:
            store[depth] = h

    return keep


def build_shortlist(final_ids: torch.Tensor, size: int, vocab_size: int, always: Sequence[int] = ()) -> list[int]:
    """The ``size`` tokens the last layer emitted most (plus ``always``, e.g. EOS)."""
    counts = torch.bincount(final_ids, minlength=vocab_size)
    top = counts.argsort(descending=True)[:size]
    return sorted(set(top.tolist()) | {int(t) for t in always if 0 <= int(t) < vocab_size})


@torch.no_grad()
def criterion_deltas(heads: ExitHeads, states: ProbeStates, chunk: int = 2048) -> torch.Tensor:
    """``delta`` ``(num_exits, N)`` of every exit on every recorded position."""
    layout = heads.layout
    dev, dtype = heads.head.device, heads.head.dtype
    out = torch.empty(layout.num_exits, states.size)
    for lo in range(0, states.size, chunk):
        sl = slice(lo, lo + chunk)
        p_prev = None
        if layout.reference is not None:
            ref = states.hidden[layout.reference][sl].to(dev, dtype)
            p_prev = heads.probs(heads.adapt(layout.reference, ref))
        for j, depth in enumerate(layout.exits):
            p = heads.probs(heads.adapt(depth, states.hidden[depth][sl].to(dev, dtype)))
            out[j, sl] = heads.delta(p, p_prev).cpu()
            p_prev = p
    return out


def solve_lambda(exits: Sequence[int], target_layers: float) -> tuple[float, list[float]]:
    """DeeR's exit shares ``q_k ∝ lambda**k`` (k = 1..m) with mean depth ``target_layers``."""
    if not exits[0] <= target_layers <= exits[-1]:
        raise ValueError(
            f"a budget of {target_layers:g} layers is outside what the exits allow "
            f"({exits[0]}..{exits[-1]} layers per token)"
        )

    def shares(log_lam: float) -> list[float]:
        logs = [k * log_lam for k in range(1, len(exits) + 1)]
        top = max(logs)
        w = [math.exp(x - top) for x in logs]
        return [x / sum(w) for x in w]

    lo, hi = -60.0, 60.0  # log(lambda); the mean depth is monotone in it
    for _ in range(200):
        mid = (lo + hi) / 2
        mean = sum(q * d for q, d in zip(shares(mid), exits, strict=True))
        lo, hi = (mid, hi) if mean < target_layers else (lo, mid)
    log_lam = (lo + hi) / 2
    return math.exp(log_lam), shares(log_lam)


def deer_thresholds(deltas: torch.Tensor, shares: Sequence[float]) -> list[float]:
    """Per-exit thresholds so ``floor(n q_k)`` of the still-running positions leave at exit k
    (strict ``delta < eta``); the last exit's is infinite. ``deltas``: ``(num_exits, N)``."""
    n = deltas.shape[1]
    running = torch.ones(n, dtype=torch.bool)
    thresholds = []
    for k in range(deltas.shape[0] - 1):
        count = math.floor(n * shares[k])
        vals = deltas[k][running].sort().values
        if count <= 0 or not vals.numel():
            eta = NEVER
        else:
            # the next float32 above the count-th smallest delta: deltas and served thresholds are
            # float32, so a float64 step would round back onto the delta and miss it
            last = vals[min(count, vals.numel()) - 1 : min(count, vals.numel())].float()
            eta = float(torch.nextafter(last, torch.full_like(last, math.inf)))
        thresholds.append(eta)
        running &= ~(deltas[k] < eta)
    return thresholds + [ALWAYS]


def simulate(deltas: torch.Tensor, thresholds: Sequence[float]) -> torch.Tensor:
    """Exit index of every position under ``thresholds``."""
    n = deltas.shape[1]
    exit_at = torch.full((n,), deltas.shape[0] - 1, dtype=torch.long)
    running = torch.ones(n, dtype=torch.bool)
    for k, eta in enumerate(thresholds[:-1]):
        go = running & (deltas[k] < eta)
        exit_at[go] = k
        running &= ~go
    return exit_at


class ExitTokens:
    """Each exit's top token over the full vocabulary, computed lazily per position."""

    def __init__(self, heads: ExitHeads, states: ProbeStates) -> None:
        self.heads, self.states = heads, states
        self.known = {d: torch.full((states.size,), -1, dtype=torch.long) for d in heads.layout.exits}

    @torch.no_grad()
    def at(self, depth: int, idx: torch.Tensor) -> torch.Tensor:
        known = self.known[depth]
        pending = idx[known[idx] < 0]
        r = self.heads.runner
        for lo in range(0, pending.numel(), 1024):
            part = pending[lo : lo + 1024]
            h = self.states.hidden[depth][part].to(r.device, r.dtype)
            known[part] = r.logits(self.heads.adapt(depth, h)).argmax(-1).cpu()
        return known[idx]


def operating_point(
    name: str, target_layers: float, deltas: torch.Tensor, layout: ExitLayout, kv_share: float,
    tokens: ExitTokens | None,
) -> OperatingPoint:
    """Thresholds for ``target_layers`` and what they achieve on the recorded positions."""
    lam, shares = solve_lambda(layout.exits, target_layers)
    thresholds = deer_thresholds(deltas, shares)
    exit_at = simulate(deltas, thresholds)
    depth = torch.tensor(layout.exits, dtype=torch.float64)[exit_at]
    n = max(1, exit_at.numel())
    agreement = None
    if tokens is not None:
        agree = 0
        for j, d in enumerate(layout.exits):
            idx = (exit_at == j).nonzero().squeeze(1)
            if idx.numel():
                agree += int((tokens.at(d, idx) == tokens.states.final_ids[idx]).sum())
        agreement = agree / n
    fractions = torch.bincount(exit_at, minlength=layout.num_exits).double() / n
    compute = sum(effective_fraction(float(d), layout.num_layers, kv_share) for d in depth.tolist()) / n
    return OperatingPoint(
        name=name, thresholds=tuple(thresholds), target_layers=float(target_layers),
        avg_layers=float(depth.mean()), compute_fraction=compute, agreement=agreement,
        exit_fractions=tuple(round(x, 6) for x in fractions.tolist()), lam=lam,
    )


def calibrate(
    heads: ExitHeads,
    states: ProbeStates,
    targets_layers: Sequence[float],
    *,
    fingerprint: ModelFingerprint,
    exit_every: int,
    min_exit_layer: int | None,
    kv_share: float,
    adapters_sha256: str | None,
    measure_agreement: bool = True,
    source: dict | None = None,
) -> ExitProfile:
    """Operating points for each target average depth on ``states`` (see the module docstring)."""
    deltas = criterion_deltas(heads, states)
    tokens = ExitTokens(heads, states) if measure_agreement else None
    layout = heads.layout
    points = [
        operating_point(f"L{t:g}", t, deltas, layout, kv_share, tokens) for t in sorted(set(targets_layers))
    ]
    return ExitProfile(
        fingerprint=fingerprint,
        criterion=heads.criterion,
        exit_every=exit_every,
        min_exit_layer=min_exit_layer,
        exits=layout.exits,
        kv_share=kv_share,
        shortlist=tuple(heads.shortlist_ids or ()),
        adapters_sha256=adapters_sha256,
        points=points,
        calibration={**(source or {}), "positions": states.size, "created_unix_s": int(time.time())},
    )

