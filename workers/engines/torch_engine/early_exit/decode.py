"""DeeR-style early exit for decode steps, driven layer by layer over :class:`DecoderRunner`.

Exits sit after every ``k``-th decoder layer and after the last one. At exit ``j`` a sequence's
next-token distribution is the model's own final norm + LM head applied to that layer's hidden
state (optionally through a small per-exit adapter, ``adapters.py``). The criterion
``delta_j`` compares it with the previous exit (total variation or argmax disagreement, as in
DeeR) or measures its own top-1 margin (CALM's softmax response); the sequence stops at exit
``j`` when ``delta_j < eta_j`` or ``j`` is the last exit. Per-exit thresholds ``eta`` come from
calibration (``calibrate.py``); each row of a batch carries its own.

Three things keep exits cheap enough to pay off:

- **Shortlisted criterion.** The criterion's distributions are computed over a shortlist of
  the vocabulary (the tokens the model emits most on calibration text), not the whole LM head:
  on SmolLM2-135M the head is as large as eight decoder layers. The token a row emits still
  comes from the full head at its exit layer, once, as the plain model does at its last layer.
- **Shrinking active set.** Rows that exit leave the batch for the deeper layers of the step:
  queries, attention and MLPs run on the remaining rows only (their K/V rows gathered from
  the slot cache).
- **State propagation (CALM), ``kv_fill="propagate"``.** An exited row keeps its hidden state;
  every deeper layer still computes that row's K/V from it (input norm + K/V projections only)
  and writes them to the slot cache, so later tokens attend over complete caches at every layer.

``kv_fill="deferred"`` fills the skipped layers exactly instead (as FREE's synchronised parallel
decoding does, Bae et al. 2023): an exited token keeps its state and how deep it got
(:class:`Deferred`); when a later token of the same sequence runs a layer the exited token has
not, the exited token runs that layer too, in the same matmuls, its K/V written before anyone
attends. Every K/V in the cache is then the full model's, so a token's state at any layer it
runs equals the full model's, and what is read at a given depth matches what calibration saw.
Deferred work is paid in extra rows of layers the step runs anyway (cheap where decode is
memory-bound, as at small batches); tokens still waiting when their sequence ends never run.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass

import torch

from ..runner import DecoderRunner

CRITERIA = ("tv", "argmax", "margin")
KV_FILLS = ("propagate", "deferred")
NEVER = float("-inf")  # a threshold no delta is below: the exit never fires
ALWAYS = float("inf")  # a threshold every delta is below: the exit always fires


@dataclass(frozen=True, slots=True)
class ExitLayout:
    """Where exits are. Depths count decoder layers run (1 = after the first layer).

    ``exits`` ends with ``num_layers`` (the last exit always fires). ``reference`` is the
    depth whose distribution the first exit is compared with under the consecutive criteria
    (one exit interval before the first exit; 0 is the embedding output), None for margin.
    """

    num_layers: int
    exits: tuple[int, ...]
    reference: int | None

    @classmethod
    def build(cls, num_layers: int, exit_every: int, min_exit_layer: int | None, criterion: str) -> ExitLayout:
        if criterion not in CRITERIA:
            raise ValueError(f"unknown exit criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        if exit_every < 1:
            raise ValueError("exit_every must be >= 1")
        first = min_exit_layer or exit_every
        if not 1 <= first <= num_layers:
            raise ValueError(f"min_exit_layer {first} is outside 1..{num_layers}")
        exits = [d for d in range(exit_every, num_layers, exit_every) if d >= first] + [num_layers]
        reference = None if criterion == "margin" else max(0, exits[0] - exit_every)
        return cls(num_layers, tuple(exits), reference)

    @property
    def num_exits(self) -> int:
        return len(self.exits)


class ExitHeads:
    """Exit distributions and the criterion: shared by serving and calibration, so thresholds
    calibrated offline mean exactly what the runner computes online."""

    def __init__(
        self,
        runner: DecoderRunner,
        layout: ExitLayout,
        criterion: str,
        shortlist: list[int] | None = None,
        adapters: Mapping[int, torch.nn.Module] | None = None,
    ) -> None:
        if criterion not in CRITERIA:
            raise ValueError(f"unknown exit criterion {criterion!r}; choose one of {', '.join(CRITERIA)}")
        self.runner = runner
        self.layout = layout
        self.criterion = criterion
        weight = runner.lm_head.weight
        self.shortlist_ids = sorted(set(shortlist)) if shortlist else None  # None: whole vocabulary
        if self.shortlist_ids:
            weight = weight.index_select(0, torch.tensor(self.shortlist_ids, device=weight.device))
        self.shortlist_size = weight.shape[0]
        self.head = weight.detach().contiguous()  # (K, hidden): one small matmul per probe
        self.adapters = dict(adapters or {})

    def adapt(self, depth: int, h: torch.Tensor) -> torch.Tensor:
        """Hidden states ``(N, hidden)`` at ``depth`` as the exit's head sees them."""
        adapter = self.adapters.get(depth)
        return h if adapter is None else adapter(h)

    def probs(self, adapted: torch.Tensor) -> torch.Tensor:
        """Shortlist distribution ``(N, K)`` (float32) of adapted hidden states."""
        z = (self.runner.norm(adapted) @ self.head.T).float()
        cap = self.runner.final_softcap
        if cap:
            z = torch.tanh(z / cap) * cap
        return torch.softmax(z, dim=-1)

    def delta(self, p: torch.Tensor, p_prev: torch.Tensor | None) -> torch.Tensor:
        """The criterion ``(N,)``: small means "this exit's answer is settled"."""
        if self.criterion == "margin":
            top = p.topk(2, dim=-1).values
            return 1.0 - (top[:, 0] - top[:, 1])
        if self.criterion == "argmax":
            return (p.argmax(-1) != p_prev.argmax(-1)).float()
        return 0.5 * (p - p_prev).abs().sum(-1)


def probes_needed(layout: ExitLayout, criterion: str, thresholds: torch.Tensor) -> tuple[list[bool], list[bool]]:
    """Which exits this step must evaluate: ``(can_fire, needs_probs)`` per exit.

    An exit whose thresholds are all ``NEVER`` cannot fire; its distribution is still needed
    when the next exit compares against it (consecutive criteria). The reference probe is
    needed when the first exit can fire. ``thresholds``: ``(B, num_exits)``.
    """
    can_fire = (thresholds[:, :-1] > NEVER).any(0).tolist() + [False]
    if criterion == "margin":
        return can_fire, list(can_fire)
    needs = [fire or (j + 1 < len(can_fire) and can_fire[j + 1]) for j, fire in enumerate(can_fire)]
    return can_fire, needs


@dataclass(slots=True)
class Deferred:
    """One sequence's tokens whose deeper layers have not run yet (``kv_fill="deferred"``)."""

    positions: torch.Tensor  # (P,) long: where each token sits in the sequence
    progress: torch.Tensor  # (P,) long: decoder layers each has run
    hidden: torch.Tensor  # (P, hidden): its state after ``progress`` layers

    def __len__(self) -> int:
        return int(self.positions.shape[0])


@dataclass(slots=True)
class ExitStep:
    """One early-exit decode step: logits ``(B, vocab)`` and the depth each row ran to.

    ``work`` counts the layer-tokens each row ran (its token's depth, plus deferred layers it
    filled); ``deferred`` is each row's tokens still waiting for layers (kv_fill="deferred").
    """

    logits: torch.Tensor
    depths: list[int]
    exit_hidden: torch.Tensor | None = None  # (B, hidden) raw state each row exited with
    work: list[int] | None = None
    deferred: list[Deferred | None] | None = None


class EarlyExitRunner:
    """Decode with per-row early exits over a :class:`DecoderRunner` and its slot cache."""

    def __init__(self, runner: DecoderRunner, heads: ExitHeads, kv_fill: str = "propagate") -> None:
        if heads.layout.num_layers != len(runner.layers):
            raise ValueError(f"exit layout has {heads.layout.num_layers} layers, the model {len(runner.layers)}")
        if kv_fill not in KV_FILLS:
            raise ValueError(f"unknown kv_fill {kv_fill!r}; choose one of {', '.join(KV_FILLS)}")
        self.kv_fill = kv_fill
        self.runner = runner
        self.heads = heads
        self.layout = heads.layout
        self._exit_index = {d: j for j, d in enumerate(self.layout.exits)}

    @torch.no_grad()
    def decode(
        self, token_ids: list[int], thresholds: torch.Tensor, keep_hidden: bool = False,
        deferred: list[Deferred | None] | None = None,
    ) -> ExitStep:
        """One token for each sequence in slots ``0..B-1`` with per-row thresholds ``(B, num_exits)``.

        Row ``b`` stops at the first exit ``j`` with ``delta_j < thresholds[b, j]`` (the last
        exit always). ``deferred`` (kv_fill="deferred"): each row's waiting tokens, as the
        previous step returned them. When no exit can fire and nothing waits, this is exactly
        :meth:`DecoderRunner.decode`.
        """
        layout = self.layout
        can_fire, needs = probes_needed(layout, self.heads.criterion, thresholds)
        waiting = self.kv_fill == "deferred" and any(d is not None and len(d) for d in deferred or ())
        if not any(can_fire) and not waiting:
            logits = self.runner.decode(token_ids)
            n = layout.num_layers
            return ExitStep(logits, [n] * len(token_ids), work=[n] * len(token_ids),
                            deferred=[None] * len(token_ids) if self.kv_fill == "deferred" else None)
        return _ExitPass(self, token_ids, thresholds, can_fire, needs, deferred if waiting else None).run(keep_hidden)


class _ExitPass:
    """State of one early-exit decode step (the active set shrinks as rows exit).

    With ``kv_fill="deferred"`` the rows' waiting tokens (``w_*``, concatenated over rows) join
    a layer's batch while their row's token still runs and they have not run that layer yet.
    """

    def __init__(
        self, owner: EarlyExitRunner, token_ids: list[int], thresholds: torch.Tensor,
        can_fire: list[bool], needs: list[bool], deferred: list[Deferred | None] | None = None,
    ) -> None:
        r = owner.runner
        self.r, self.owner, self.heads = r, owner, owner.heads
        self.fill = owner.kv_fill == "deferred"
        self.can_fire, self.needs = can_fire, needs
        self.thresholds = thresholds
        b = self.b = len(token_ids)
        lengths = r.cache.lengths[:b]
        self.longest = max(lengths) + 1
        r.cache.ensure_capacity(self.longest)
        self.positions = torch.tensor(lengths, device=r.device)
        self.h = r.embed(torch.tensor(token_ids, device=r.device)).to(r.dtype)
        key_pos = torch.arange(self.longest, device=r.device)[None, :]
        self.key_pos = key_pos
        self.valid = key_pos <= self.positions[:, None]
        self.masks: dict[int | None, torch.Tensor] = {None: self.valid[:, None, None, :]}
        self.active: torch.Tensor | None = None  # None: every row (no gathers needed)
        self.sub_masks: dict[int | None, torch.Tensor] = {}
        self.live = torch.ones(b, dtype=torch.bool, device=r.device)  # rows whose token still runs
        self.exit_h = torch.empty_like(self.h)
        self.depths = [owner.layout.num_layers] * b
        self.p_prev: torch.Tensor | None = None
        self.w_rows: torch.Tensor | None = None
        if deferred:
            parts = [(row, d) for row, d in enumerate(deferred) if d is not None and len(d)]
            self.w_rows = torch.cat([torch.full((len(d),), row, device=r.device) for row, d in parts])
            self.w_pos = torch.cat([d.positions for _, d in parts])
            self.w_start = torch.cat([d.progress for _, d in parts])
            self.w_progress = self.w_start.clone()
            self.w_h = torch.cat([d.hidden for _, d in parts])

    def run(self, keep_hidden: bool) -> ExitStep:
        r, layout = self.r, self.owner.layout
        raw = self.h.clone() if keep_hidden else None
        if layout.reference == 0 and self.can_fire[0]:
            self.p_prev = self.heads.probs(self.heads.adapt(0, self.h))
        for i, layer in enumerate(r.layers):
            self._layer(i, layer)
            depth = i + 1
            if depth == layout.reference and self.can_fire[0]:
                rows_h = self.h if self.active is None else self.h[self.active]
                self.p_prev = self.heads.probs(self.heads.adapt(depth, rows_h))
            j = self.owner._exit_index.get(depth)
            if j is not None and (self.active is None or self.active.numel()):
                self._probe(j, depth, raw)
        for s in range(self.b):
            r.cache.lengths[s] += 1
        step = ExitStep(r.logits(self.exit_h), self.depths, raw, work=list(self.depths))
        if self.fill:
            self._leftovers(step)
        return step

    # -- one layer -------------------------------------------------------------------------------
    def _layer(self, i: int, layer) -> None:
        r = self.r
        active = self.active
        run = None
        if self.fill:  # only running tokens (and waiting ones catching up) get K/V
            if active is not None and not active.numel():
                return
            rows, pos, h, run = self._running(i)
            xn = layer.input_norm(h)
            k, v = r.project_kv(layer, xn, pos)
            r.cache.write_decode(i, pos, k, v, rows)
        else:  # K/V for every row: running rows' own, and exited rows' from their frozen state (CALM)
            xn = layer.input_norm(self.h)
            k, v = r.project_kv(layer, xn, self.positions)
            r.cache.write_decode(i, self.positions, k, v)
            if active is not None and not active.numel():
                return
            rows, pos, h = self._current()
            if rows is not None:
                xn = xn.index_select(0, rows)
        q = r.project_q(layer, xn, pos)
        keys, values, mask = self._keys(i, layer.sliding_window, rows, pos, fresh=run is not None)
        out = torch.nn.functional.scaled_dot_product_attention(
            q[:, :, None, :], keys, values, attn_mask=mask, scale=layer.scaling,
            enable_gqa=r.num_heads != r.kv_heads,
        )
        h = r._mlp_block(layer, h, layer.attn.o_proj(out.reshape(q.shape[0], -1)))
        n_cur = h.shape[0] - (0 if run is None else run.numel())
        if active is None:
            self.h = h[:n_cur]
        else:
            self.h.index_copy_(0, active, h[:n_cur])
        if run is not None:
            self.w_h.index_copy_(0, run, h[n_cur:])
            self.w_progress.index_fill_(0, run, i + 1)

    def _current(self) -> tuple[torch.Tensor | None, torch.Tensor, torch.Tensor]:
        """The rows whose token still runs (None: all B, in slot order), their positions and states."""
        if self.active is None:
            return None, self.positions, self.h
        return self.active, self.act_positions, self.h.index_select(0, self.active)

    def _running(self, i: int):
        """kv_fill="deferred": the rows, positions and states layer ``i`` runs, and which
        waiting tokens (indices into ``w_*``) run it with them (None: none)."""
        active = self.active
        rows, pos, h = self._current()
        if self.w_rows is None:
            return rows, pos, h, None
        due = self.w_progress <= i
        if active is not None:
            due &= self.live.index_select(0, self.w_rows)
        run = due.nonzero().squeeze(1)
        if not run.numel():
            return rows, pos, h, None
        rows = torch.arange(self.b, device=h.device) if rows is None else rows
        return (torch.cat([rows, self.w_rows.index_select(0, run)]), torch.cat([pos, self.w_pos.index_select(0, run)]),
                torch.cat([h, self.w_h.index_select(0, run)]), run)

    def _keys(self, i: int, window: int | None, rows: torch.Tensor | None, pos: torch.Tensor, fresh: bool):
        """Keys, values and mask for query rows ``rows`` (None: slots 0..B-1) at ``pos``."""
        keys, values = self.r.cache.view(i, slice(0, self.b), self.longest)
        if window not in self.masks:
            self.masks[window] = (self.valid & (self.key_pos > self.positions[:, None] - window))[:, None, None, :]
        if rows is None:
            return keys, values, self.masks[window]
        keys, values = keys.index_select(0, rows), values.index_select(0, rows)
        if fresh:  # waiting tokens among the queries: each sees its own sequence up to itself
            mask = self.key_pos <= pos[:, None]
            if window is not None:
                mask = mask & (self.key_pos > pos[:, None] - window)
            return keys, values, mask[:, None, None, :]
        if window not in self.sub_masks:
            self.sub_masks[window] = self.masks[window].index_select(0, rows)
        return keys, values, self.sub_masks[window]

    # -- exits -----------------------------------------------------------------------------------
    def _probe(self, j: int, depth: int, raw: torch.Tensor | None) -> None:
        rows = self.active if self.active is not None else torch.arange(self.b, device=self.h.device)
        h_rows = self.h if self.active is None else self.h.index_select(0, rows)
        last = j == self.owner.layout.num_exits - 1
        if last:
            self._exit(rows, h_rows, depth, raw)
            return
        if not self.needs[j]:
            return
        adapted = self.heads.adapt(depth, h_rows)
        p = self.heads.probs(adapted)
        if not self.can_fire[j]:
            self.p_prev = p  # only the next exit's comparison needs it
            return
        delta = self.heads.delta(p, self.p_prev)
        go = delta < self.thresholds.index_select(0, rows)[:, j]
        stay = ~go
        if bool(go.any()):
            self._exit(rows[go], adapted[go], depth, raw, h_rows[go])
            self.live[rows[go]] = False
            self.active = rows[stay]
            self.act_positions = self.positions.index_select(0, self.active)
            self.sub_masks = {}
            p = p[stay]
        self.p_prev = p

    def _exit(self, rows: torch.Tensor, adapted: torch.Tensor, depth: int, raw, h_raw=None) -> None:
        self.exit_h.index_copy_(0, rows, adapted)
        if raw is not None:
            raw.index_copy_(0, rows, adapted if h_raw is None else h_raw)
        for row in rows.tolist():
            self.depths[row] = depth

    def _leftovers(self, step: ExitStep) -> None:
        """kv_fill="deferred": the layers each row filled, and its tokens still waiting (a row's
        exited token keeps its raw state: exited rows' ``self.h`` is never written again)."""
        n, dev = self.owner.layout.num_layers, self.h.device
        waited = self.w_rows is not None
        if waited:
            filled = torch.zeros(self.b, dtype=torch.long, device=dev)
            filled.index_add_(0, self.w_rows, self.w_progress - self.w_start)
            step.work = [d + f for d, f in zip(self.depths, filled.tolist(), strict=True)]
        left: list[Deferred | None] = []
        for row, depth in enumerate(self.depths):
            parts = []
            if waited:
                keep = ((self.w_rows == row) & (self.w_progress < n)).nonzero().squeeze(1)
                if keep.numel():
                    parts.append((self.w_pos[keep], self.w_progress[keep], self.w_h[keep]))
            if depth < n:
                parts.append((self.positions[row : row + 1], torch.tensor([depth], device=dev), self.h[row : row + 1].clone()))
            left.append(Deferred(*(torch.cat(x) for x in zip(*parts, strict=True))) if parts else None)
        step.deferred = left


def kv_share(runner: DecoderRunner) -> float:
    """Share of a decoder layer's weights that state propagation still reads for a skipped
    layer: the input norm and the K/V projections (averaged over layers)."""
    kv, total = 0, 0
    for layer in runner.layers:
        m, attn = layer.module, layer.attn
        parts = [m.input_layernorm, attn.k_proj, attn.v_proj] + ([attn.k_norm] if hasattr(attn, "k_norm") else [])
        kv += sum(p.numel() for part in parts for p in part.parameters())
        total += sum(p.numel() for p in m.parameters())
    return kv / total


def head_layers(runner: DecoderRunner) -> float:
    """The LM head's weights in decoder-layer equivalents: what every decode token reads once
    whatever its depth (SmolLM2-135M: 8.0; the batch-1 CPU step time puts the whole fixed part,
    head and loop, at 6.4 layers, benchmarks.md)."""
    per_layer = sum(p.numel() for layer in runner.layers for p in layer.module.parameters()) / len(runner.layers)
    return runner.lm_head.weight.numel() / per_layer


def model_fingerprint(runner: DecoderRunner):
    """The identity a thresholds or adapters file is checked against."""
    from .points import ModelFingerprint

    cfg = runner.config
    head = runner.lm_head.weight
    return ModelFingerprint(
        model_type=str(cfg.model_type),
        num_layers=len(runner.layers),
        hidden_size=int(cfg.hidden_size),
        vocab_size=int(head.shape[0]),
        head_checksum=round(float(head[:64].detach().double().abs().sum()), 3),
    )
