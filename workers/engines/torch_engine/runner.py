"""Layer-by-layer forward of Hugging Face decoder-only models over a :class:`SlotKVCache`.

We own the layer loop instead of calling ``model(...)``/``generate()``: the batch is ragged (every
sequence has its own length), sequences join and leave between steps, and early exit needs to
stop a sequence after any layer and still give deeper layers its K/V. The weights and the small
modules (norms, projections, MLP, rotary tables) are the transformers model's own; only the
attention plumbing and the residual wiring are ours, and ``tests/workers/test_runner.py`` checks
the logits against the transformers forward for every supported architecture.

Residual wiring comes in two shapes:
- pre-norm (Llama, Qwen2/3, Mistral): h += attn(norm1(h)); h += mlp(norm2(h))
- sandwich (Gemma 3): h += norm2(attn(norm1(h))); h += norm4(mlp(norm3(h)))
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from wattserve.errors import ModelSourceError

from .kv_cache import SlotKVCache

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2", "qwen3", "gemma3_text")


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def _apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    return x * cos + _rotate_half(x) * sin


Norm = Callable[[torch.Tensor], torch.Tensor]


def fused_norm(module: torch.nn.Module) -> Norm:
    """One fused ``F.rms_norm`` computing what a supported transformers RMSNorm computes: one
    kernel instead of about six, and no module call (18 us against ~70 us per call at decode size
    on the dev CPU; end to end within that machine's noise, see benchmarks.md); any other norm is
    returned as is.

    Llama/Mistral/Qwen normalise in float32, cast back, then scale by the weight in its dtype;
    Gemma 3 scales by ``1 + weight`` in float32 before casting back.
    """
    kind = type(module).__name__
    weight = getattr(module, "weight", None)
    if weight is None:
        return module
    weight = weight.detach()
    if kind in ("LlamaRMSNorm", "MistralRMSNorm", "Qwen2RMSNorm", "Qwen3RMSNorm"):
        eps = float(module.variance_epsilon)
        if weight.dtype == torch.float32:
            return lambda x: F.rms_norm(x, weight.shape, weight, eps)
        return lambda x: weight * F.rms_norm(x.float(), weight.shape, None, eps).to(x.dtype)
    if kind == "Gemma3RMSNorm":
        eps, scale = float(module.eps), 1.0 + weight.float()
        return lambda x: F.rms_norm(x.float(), scale.shape, scale, eps).type_as(x)
    return module


@dataclass(slots=True)
class _Layer:
    """Handles to one decoder layer's modules plus the facts its attention needs."""

    module: torch.nn.Module
    attn: torch.nn.Module
    rope_key: str  # which cos/sin table: "default" or a Gemma layer type
    sliding_window: int | None
    scaling: float
    sandwich: bool  # Gemma-style extra norms around attention and MLP
    input_norm: Norm  # the layer's norms, fused where possible (fused_norm)
    post_attn_norm: Norm
    pre_ff_norm: Norm | None  # sandwich only
    post_ff_norm: Norm | None
    q_norm: Norm | None  # Qwen 3 / Gemma 3 per-head norms
    k_norm: Norm | None


class DecoderRunner:
    """Runs one loaded ``*ForCausalLM`` model over ragged batches. Not thread-safe."""

    def __init__(self, model: torch.nn.Module, cache: SlotKVCache) -> None:
        cfg = model.config
        if cfg.model_type not in SUPPORTED_MODEL_TYPES:
            raise ModelSourceError(
                f"the torch engine runs {', '.join(SUPPORTED_MODEL_TYPES)} models; this one is "
                f"{cfg.model_type!r}"
            )
        if getattr(cfg, "attn_logit_softcapping", None):
            raise ModelSourceError("attention logit soft-capping (Gemma 2) is not supported")
        self.model = model
        self.config = cfg
        self.cache = cache
        self.device = cache.device
        self.dtype = cache.dtype
        base = model.model
        self.embed = base.embed_tokens
        self.norm = fused_norm(base.norm)
        self.lm_head = model.lm_head
        self.final_softcap = getattr(cfg, "final_logit_softcapping", None)
        self.num_heads = cfg.num_attention_heads
        self.kv_heads = cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        self.layers = [self._describe(layer) for layer in base.layers]
        self._rope = self._rope_tables(base.rotary_emb, cache.max_len)

    # -- setup ---------------------------------------------------------------------------------
    def _describe(self, layer: torch.nn.Module) -> _Layer:
        attn = layer.self_attn
        layer_type = getattr(attn, "layer_type", None) or "default"
        window = getattr(attn, "sliding_window", None)
        sandwich = hasattr(layer, "pre_feedforward_layernorm")

        def norm(owner, name):
            return fused_norm(getattr(owner, name)) if hasattr(owner, name) else None

        return _Layer(
            module=layer,
            attn=attn,
            rope_key=layer_type if self.config.model_type == "gemma3_text" else "default",
            sliding_window=int(window) if window else None,
            scaling=float(attn.scaling),
            sandwich=sandwich,
            input_norm=fused_norm(layer.input_layernorm),
            post_attn_norm=fused_norm(layer.post_attention_layernorm),
            pre_ff_norm=norm(layer, "pre_feedforward_layernorm"),
            post_ff_norm=norm(layer, "post_feedforward_layernorm"),
            q_norm=norm(attn, "q_norm"),
            k_norm=norm(attn, "k_norm"),
        )

    @torch.no_grad()
    def _rope_tables(self, rotary: torch.nn.Module, max_len: int) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
        """cos/sin for every position up to ``max_len``, per rope flavour, computed once."""
        positions = torch.arange(max_len, device=self.device)[None, :]
        probe = torch.zeros(1, dtype=self.dtype, device=self.device)
        keys = sorted({layer.rope_key for layer in self.layers})
        takes_type = "layer_type" in inspect.signature(rotary.forward).parameters
        tables = {}
        for key in keys:
            cos, sin = rotary(probe, positions, key) if takes_type else rotary(probe, positions)
            tables[key] = (cos[0].to(self.dtype), sin[0].to(self.dtype))  # (max_len, head_dim)
        return tables

    # -- per-layer pieces (public so early exit can drive them one layer at a time) -------------
    def project_qkv(
        self, layer: _Layer, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Normed input ``x (N, hidden)`` at ``positions (N,)`` -> q ``(N, H, d)``, k, v ``(N, KVH, d)``."""
        k, v = self.project_kv(layer, x, positions)
        return self.project_q(layer, x, positions), k, v

    def project_q(self, layer: _Layer, x: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Queries ``(N, H, d)`` for normed input ``x (N, hidden)`` at ``positions (N,)``."""
        q = layer.attn.q_proj(x).view(x.shape[0], self.num_heads, self.head_dim)
        if layer.q_norm is not None:
            q = layer.q_norm(q)
        cos, sin = self._rope[layer.rope_key]
        return _apply_rope(q, cos[positions][:, None, :], sin[positions][:, None, :])

    def project_kv(
        self, layer: _Layer, x: torch.Tensor, positions: torch.Tensor
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Keys and values ``(N, KVH, d)`` for normed input ``x (N, hidden)`` at ``positions (N,)``.

        Early exit calls this alone for rows that left the active set (CALM state propagation).
        """
        n = x.shape[0]
        attn = layer.attn
        k = attn.k_proj(x).view(n, self.kv_heads, self.head_dim)
        v = attn.v_proj(x).view(n, self.kv_heads, self.head_dim)
        if layer.k_norm is not None:
            k = layer.k_norm(k)
        cos, sin = self._rope[layer.rope_key]
        return _apply_rope(k, cos[positions][:, None, :], sin[positions][:, None, :]), v

    def _mlp_block(self, layer: _Layer, h: torch.Tensor, attn_out: torch.Tensor) -> torch.Tensor:
        m = layer.module
        if layer.sandwich:
            h = h + layer.post_attn_norm(attn_out)
            return h + layer.post_ff_norm(m.mlp(layer.pre_ff_norm(h)))
        h = h + attn_out
        return h + m.mlp(layer.post_attn_norm(h))

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on hidden states ``(N, hidden)`` -> float32 logits ``(N, vocab)``."""
        out = self.lm_head(self.norm(h)).float()
        if self.final_softcap:
            out = torch.tanh(out / self.final_softcap) * self.final_softcap
        return out

    # -- prefill -------------------------------------------------------------------------------
    @torch.no_grad()
    def prefill(self, slot: int, token_ids: list[int]) -> torch.Tensor:
        """Run a whole prompt for one sequence into ``slot``; returns the last position's logits."""
        t = len(token_ids)
        self.cache.ensure_capacity(t + 1)
        ids = torch.tensor(token_ids, device=self.device)
        positions = torch.arange(t, device=self.device)
        h = self.embed(ids).to(self.dtype)
        masks: dict[int | None, torch.Tensor | None] = {}
        for i, layer in enumerate(self.layers):
            q, k, v = self.project_qkv(layer, layer.input_norm(h), positions)
            self.cache.write_prefill(i, slot, 0, k.transpose(0, 1), v.transpose(0, 1))
            window = layer.sliding_window if layer.sliding_window and layer.sliding_window < t else None
            if window not in masks:
                masks[window] = None if window is None else self._prefill_mask(t, window)
            out = F.scaled_dot_product_attention(
                q.transpose(0, 1)[None],
                k.transpose(0, 1)[None],
                v.transpose(0, 1)[None],
                attn_mask=masks[window],
                is_causal=masks[window] is None,
                scale=layer.scaling,
                enable_gqa=self.num_heads != self.kv_heads,
            )
            out = layer.attn.o_proj(out[0].transpose(0, 1).reshape(t, -1))
            h = self._mlp_block(layer, h, out)
        self.cache.lengths[slot] = t
        return self.logits(h[-1:])[0]

    def _prefill_mask(self, t: int, window: int) -> torch.Tensor:
        q = torch.arange(t, device=self.device)[:, None]
        k = torch.arange(t, device=self.device)[None, :]
        return (k <= q) & (k > q - window)

    # -- decode --------------------------------------------------------------------------------
    @torch.no_grad()
    def decode(
        self, token_ids: list[int], on_layer: Callable[[int, torch.Tensor], None] | None = None
    ) -> torch.Tensor:
        """One token for each sequence in slots ``0..B-1`` (B = len(token_ids)); returns logits ``(B, vocab)``.

        Each token is written at its slot's current length, which then grows by one.
        ``on_layer(depth, h)`` (calibration only) sees the hidden states ``(B, hidden)`` after
        every layer, ``depth`` counting from 1.
        """
        b = len(token_ids)
        lengths = self.cache.lengths[:b]
        longest = max(lengths) + 1
        self.cache.ensure_capacity(longest)
        positions = torch.tensor(lengths, device=self.device)
        ids = torch.tensor(token_ids, device=self.device)
        h = self.embed(ids).to(self.dtype)
        key_pos = torch.arange(longest, device=self.device)[None, :]
        valid = key_pos <= positions[:, None]  # (B, L): own tokens up to and including this one
        masks: dict[int | None, torch.Tensor] = {None: valid[:, None, None, :]}
        for i, layer in enumerate(self.layers):
            q, k, v = self.project_qkv(layer, layer.input_norm(h), positions)
            self.cache.write_decode(i, positions, k, v)
            window = layer.sliding_window
            if window not in masks:
                masks[window] = (valid & (key_pos > positions[:, None] - window))[:, None, None, :]
            keys, values = self.cache.view(i, slice(0, b), longest)
            out = F.scaled_dot_product_attention(
                q[:, :, None, :],
                keys,
                values,
                attn_mask=masks[window],
                scale=layer.scaling,
                enable_gqa=self.num_heads != self.kv_heads,
            )
            out = layer.attn.o_proj(out.reshape(b, -1))
            h = self._mlp_block(layer, h, out)
            if on_layer is not None:
                on_layer(i + 1, h)
        for s in range(b):
            self.cache.lengths[s] += 1
        return self.logits(h)
