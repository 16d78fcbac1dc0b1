"""The offline jobs behind ``wattserve exits calibrate`` and ``wattserve exits fit``, run on a
loaded (idle) :class:`TorchEngine` whose ``early_exit`` settings are the ones to serve with."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from .adapters import ExitAdapter, FitSettings, closed_form, distill
from .calibrate import ProbeStates, build_shortlist, calibrate, record_states
from .decode import ExitHeads
from .points import ExitProfile

#: makes a progress callback for ``total`` units with a label; returns (tick(n), close())
ProgressFactory = Callable[[str, int], tuple[Callable[[int], None], Callable[[], None]]]


def _no_progress(label: str, total: int):
    return (lambda n: None), (lambda: None)


def probe_depths(engine) -> list[int]:
    layout = engine.exits.layout
    return ([layout.reference] if layout.reference is not None else []) + list(layout.exits)


def record(
    engine,
    documents: Sequence[str],
    *,
    new_tokens: int = 32,
    max_prompt_tokens: int = 256,
    max_positions: int | None = None,
    stop_at_eos: bool = False,
    progress: ProgressFactory = _no_progress,
) -> ProbeStates:
    """Continue ``documents`` greedily at full depth, keeping states at every probe depth.

    By default a document continues past EOS, as ``ignore_eos`` load tests do: an instruct
    model fed raw text often ends its turn at once, which would leave nothing to calibrate on.
    """
    total = max_positions or len(documents) * new_tokens
    tick, close = progress("recording decode positions", total)
    try:
        return record_states(
            engine.runner, lambda text: engine.tokenizer(text).input_ids, documents, probe_depths(engine),
            new_tokens=new_tokens, max_prompt_tokens=max_prompt_tokens, batch=engine.info.max_batch,
            stop_ids=engine.eos_ids if stop_at_eos else frozenset(), max_positions=max_positions, progress=tick,
        )
    finally:
        close()


def split_documents(states: ProbeStates, heldout_fraction: float, seed: int = 0) -> tuple[ProbeStates, ProbeStates]:
    """(fit, held-out) by whole documents, so held-out text is text the fit never saw."""
    docs = torch.unique(states.doc)
    order = docs[torch.randperm(docs.numel(), generator=torch.Generator().manual_seed(seed))]
    n_held = max(1, round(heldout_fraction * docs.numel())) if docs.numel() > 1 else 0
    held = torch.isin(states.doc, order[:n_held])
    return states.subset(~held), states.subset(held)


@torch.no_grad()
def exit_agreement(engine, states: ProbeStates, adapters: dict[int, torch.nn.Module] | None = None) -> dict[int, float]:
    """Per probe depth: share of positions where its full-vocabulary top token (through its
    adapter, if any) equals the last layer's."""
    r = engine.runner
    out = {}
    for depth, h in states.hidden.items():
        hits = 0
        for lo in range(0, states.size, 1024):
            x = h[lo : lo + 1024].to(r.device, r.dtype)
            if adapters and depth in adapters:
                x = adapters[depth](x)
            hits += int((r.logits(x).argmax(-1).cpu() == states.final_ids[lo : lo + 1024]).sum())
        out[depth] = hits / max(1, states.size)
    return out


def calibrate_engine(
    engine, states: ProbeStates, targets_layers: Sequence[float], shortlist_size: int, source: dict | None = None
) -> ExitProfile:
    """Operating points for ``targets_layers`` with the engine's exit layout and adapters."""
    control = engine.exits
    shortlist = None
    if shortlist_size:
        vocab = int(engine.runner.lm_head.weight.shape[0])
        shortlist = build_shortlist(states.final_ids, shortlist_size, vocab, sorted(engine.eos_ids))
    heads = ExitHeads(engine.runner, control.layout, control.spec.criterion, shortlist, control.heads.adapters)
    return calibrate(
        heads, states, targets_layers, fingerprint=control.fingerprint, exit_every=control.spec.exit_every,
        min_exit_layer=control.spec.min_exit_layer, kv_share=control.kv_share,
        adapters_sha256=control.adapters_sha256, source=source,
    )


@dataclass(slots=True)
class FitResult:
    adapters: dict[int, ExitAdapter]
    before: dict[int, float]  # held-out agreement per depth without adapters
    after: dict[int, float]  # ... with them
    heldout_positions: int
    fit_positions: int


def fit_adapters(
    engine, states: ProbeStates, settings: FitSettings, heldout_fraction: float = 0.1,
    progress: ProgressFactory = _no_progress,
) -> FitResult:
    """Closed-form start, then KL distillation, one adapter per probe depth but the last."""
    r = engine.runner
    last = engine.exits.layout.num_layers
    fit, held = split_documents(states, heldout_fraction, settings.seed)
    depths = [d for d in states.hidden if d != last]
    before = exit_agreement(engine, held)
    h_last = fit.hidden[last].to(r.device, r.dtype)
    teacher_top = _teacher_top(r, h_last, settings.teacher_top)
    steps = len(depths) * settings.epochs * -(-fit.size // settings.batch_tokens)
    tick, close = progress("distilling exit adapters", steps)
    adapters = {}
    try:
        for depth in depths:
            h_exit = fit.hidden[depth].to(r.device, r.dtype)
            adapter = ExitAdapter(h_exit.shape[1], settings.rank).to(r.device, r.dtype)
            adapter.set_affine(*closed_form(fit.hidden[depth], fit.hidden[last], settings.ridge))
            with torch.enable_grad():
                distill(
                    adapter, h_exit, h_last, teacher_top, lambda h, ids: _logits_on(r, h, ids),
                    int(r.lm_head.weight.shape[0]), settings, on_step=lambda _loss: tick(1),
                )
            adapters[depth] = adapter.eval().requires_grad_(False)
    finally:
        close()
    after = exit_agreement(engine, held, adapters)
    return FitResult(adapters, before, after, held.size, fit.size)


@torch.no_grad()
def _teacher_top(runner, h_last: torch.Tensor, k: int) -> torch.Tensor:
    return torch.cat([runner.logits(h_last[lo : lo + 1024]).topk(k, -1).indices for lo in range(0, h_last.shape[0], 1024)])


def _logits_on(runner, h: torch.Tensor, ids: torch.Tensor) -> torch.Tensor:
    """The shared head's logits over ``ids`` only (final norm and soft-capping included)."""
    z = (runner.norm(h) @ runner.lm_head.weight[ids].T).float()
    cap = runner.final_softcap
    return torch.tanh(z / cap) * cap if cap else z
