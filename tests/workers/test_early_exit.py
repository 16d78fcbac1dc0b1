"""Early exit in the layer loop: what it computes, checked against the plain runner and against
a naive per-token reference that recomputes every layer without a cache or batching."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from tests.workers.engine_helpers import TV_MEDIANS
from workers.engines.torch_engine.early_exit.decode import (
    ALWAYS,
    NEVER,
    EarlyExitRunner,
    ExitHeads,
    ExitLayout,
    probes_needed,
)
from workers.engines.torch_engine.engine import load_causal_lm
from workers.engines.torch_engine.kv_cache import SlotKVCache
from workers.engines.torch_engine.runner import DecoderRunner

LAYERS = 8
@pytest.fixture(scope="module")
def deep_models(tmp_path_factory):
    """Tiny models with 8 layers (exits after 2, 4, 6 and 8) whose layers change the prediction."""
    from tests.tiny_models import build_model

    base = tmp_path_factory.mktemp("deep-tiny")
    return {
        fam: build_model(base / fam, fam, layers=LAYERS, seed=1, layer_gain=10.0)
        for fam in ("llama", "gemma3_text", "qwen3")
    }


def _runner(model_dir, slots=4, max_layers=None):
    model = load_causal_lm(model_dir, torch.float32, max_layers).eval()
    cfg = model.config
    cache = SlotKVCache(
        cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.head_dim, 128, torch.float32,
        torch.device("cpu"), initial_capacity=16,
    )
    return DecoderRunner(model, cache)


def _exit_runner(model_dir, criterion="tv", slots=4, exit_every=2, kv_fill="propagate"):
    runner = _runner(model_dir, slots)
    layout = ExitLayout.build(len(runner.layers), exit_every, None, criterion)
    return runner, EarlyExitRunner(runner, ExitHeads(runner, layout, criterion), kv_fill)


def _rows(values, batch):
    """Per-row thresholds ``(batch, num_exits)`` from one row of per-exit values (last: ALWAYS)."""
    return torch.tensor([list(values) + [ALWAYS]] * batch, dtype=torch.float32)


PROMPTS = [[5, 6, 7, 8, 9], [10, 11, 12], [40, 41, 42, 43, 44, 45, 46], [100, 3, 200]]


def _generate(runner, step, prompts, steps):
    """Greedy decode ``steps`` tokens for ``prompts`` together; ``step(tokens) -> (logits, depths)``."""
    runner.cache.used = 0
    nxt = [int(runner.prefill(runner.cache.allocate(), ids).argmax()) for ids in prompts]
    out, depths = [[t] for t in nxt], [[] for _ in prompts]
    for _ in range(steps):
        logits, d = step(nxt)
        nxt = logits.argmax(-1).tolist()
        for i, t in enumerate(nxt):
            out[i].append(t)
            depths[i].append(d[i])
    return out, depths


def test_layout_places_exits_every_k_layers_and_at_the_end():
    assert ExitLayout.build(30, 2, None, "tv").exits == tuple(range(2, 31, 2))
    assert ExitLayout.build(30, 2, None, "tv").reference == 0
    lay = ExitLayout.build(7, 3, 4, "argmax")
    assert lay.exits == (6, 7) and lay.reference == 3
    assert ExitLayout.build(8, 2, None, "margin").reference is None
    with pytest.raises(ValueError, match="criterion"):
        ExitLayout.build(8, 2, None, "kl")


def test_only_exits_that_can_fire_or_feed_one_are_evaluated():
    lay = ExitLayout.build(8, 2, None, "tv")
    thr = torch.tensor([[NEVER, NEVER, 0.3, ALWAYS], [NEVER, NEVER, NEVER, ALWAYS]])
    assert probes_needed(lay, "tv", thr) == ([False, False, True, False], [False, True, True, False])
    assert probes_needed(lay, "margin", thr) == ([False, False, True, False], [False, False, True, False])


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen3"])
def test_zero_thresholds_run_full_depth_bit_for_bit(deep_models, family):
    plain = _runner(deep_models[family])
    runner, ee = _exit_runner(deep_models[family])
    steps = 12  # lengths pass gemma's sliding window (8)

    def ee_step(tokens):
        res = ee.decode(tokens, _rows([0.0, 0.0, 0.0], len(tokens)))
        return res.logits, res.depths

    ref, _ = _generate(plain, lambda t: (plain.decode(t), [LAYERS] * len(t)), PROMPTS, steps)
    got, depths = _generate(runner, ee_step, PROMPTS, steps)
    assert got == ref
    assert all(d == LAYERS for row in depths for d in row)
    # and the logits themselves are identical (same ops on the same rows)
    torch.testing.assert_close(ee_step([3, 4, 5, 6])[0], plain.decode([3, 4, 5, 6]), rtol=0, atol=0)


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_infinite_thresholds_always_leave_at_the_first_exit(deep_models, family):
    # Nothing deeper than the first exit ever feeds a decode token's output, so each decode step
    # equals a model loaded with only the first exit's layers, fed the same tokens (prefill
    # differs: it runs at full depth, but only its layers up to 2 matter here).
    truncated = _runner(deep_models[family], max_layers=2)
    runner, ee = _exit_runner(deep_models[family])
    for r in (truncated, runner):
        r.cache.used = 0
        for ids in PROMPTS:
            r.prefill(r.cache.allocate(), ids)
    tokens = [3, 4, 5, 6]
    for _ in range(10):
        res = ee.decode(tokens, _rows([math.inf] * 3, len(tokens)))
        assert res.depths == [2] * len(tokens)
        torch.testing.assert_close(res.logits, truncated.decode(tokens), atol=1e-5, rtol=1e-5)
        tokens = res.logits.argmax(-1).tolist()


def _naive_logits(runner, tokens, depths):
    """Recompute every position from scratch: position t runs ``depths[t]`` layers and, for the
    layers after that, contributes K/V computed from its exit hidden state (CALM)."""
    keys = [[] for _ in runner.layers]
    values = [[] for _ in runner.layers]
    outs = []
    for t, (tok, depth) in enumerate(zip(tokens, depths, strict=True)):
        pos = torch.tensor([t])
        h = runner.embed(torch.tensor([tok])).float()
        for i, layer in enumerate(runner.layers):
            xn = layer.module.input_layernorm(h)
            k, v = runner.project_kv(layer, xn, pos)
            keys[i].append(k[0])
            values[i].append(v[0])
            if i >= depth:
                continue  # exited: K/V only, from the frozen state
            q = runner.project_q(layer, xn, pos)
            lo = max(0, t + 1 - layer.sliding_window) if layer.sliding_window else 0
            kk = torch.stack(keys[i][lo:], dim=1)  # (KVH, T, d)
            vv = torch.stack(values[i][lo:], dim=1)
            rep = runner.num_heads // runner.kv_heads
            att = F.scaled_dot_product_attention(
                q[0][:, None, :], kk.repeat_interleave(rep, 0), vv.repeat_interleave(rep, 0), scale=layer.scaling
            )
            h = runner._mlp_block(layer, h, layer.attn.o_proj(att.reshape(1, -1)))
        outs.append(runner.logits(h)[0])
    return outs


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_mixed_exits_match_a_naive_recompute_and_propagate_kv(deep_models, family):
    runner, ee = _exit_runner(deep_models[family])
    thresholds = TV_MEDIANS  # about half the rows still running leave at each exit
    runner.cache.used = 0
    prompts = [list(p) for p in PROMPTS]
    nxt = [int(runner.prefill(runner.cache.allocate(), ids).argmax()) for ids in prompts]
    seqs = [p + [t] for p, t in zip(prompts, nxt, strict=True)]
    depths = [[LAYERS] * len(p) for p in prompts]
    seen, logits, exit_hidden = set(), [[] for _ in seqs], [[] for _ in seqs]
    with torch.no_grad():
        for _ in range(12):
            res = ee.decode(nxt, _rows(thresholds, len(nxt)), keep_hidden=True)
            for b in range(len(seqs)):
                depths[b].append(res.depths[b])
                seen.add(res.depths[b])
                logits[b].append(res.logits[b])
                exit_hidden[b].append(res.exit_hidden[b : b + 1])
            nxt = res.logits.argmax(-1).tolist()
            for seq, t in zip(seqs, nxt, strict=True):
                seq.append(t)
        for b, seq in enumerate(seqs):
            ref = _naive_logits(runner, seq[:-1], depths[b])[len(PROMPTS[b]) :]
            torch.testing.assert_close(torch.stack(logits[b]), torch.stack(ref), atol=2e-4, rtol=1e-4)
            # skipped layers hold the K/V of the state each token exited with (CALM propagation)
            for step, h_exit in enumerate(exit_hidden[b]):
                pos = torch.tensor([len(PROMPTS[b]) + step])
                for i in range(depths[b][int(pos)], LAYERS):
                    layer = runner.layers[i]
                    k, v = runner.project_kv(layer, layer.module.input_layernorm(h_exit), pos)
                    torch.testing.assert_close(runner.cache.k[i][b, :, int(pos)], k[0], atol=1e-5, rtol=1e-5)
                    torch.testing.assert_close(runner.cache.v[i][b, :, int(pos)], v[0], atol=1e-5, rtol=1e-5)
    assert len(seen) >= 3, f"thresholds must produce varied exits to test anything (saw {seen})"


@pytest.mark.parametrize("family", ["llama", "gemma3_text"])
def test_deferred_fill_reads_every_exit_from_the_full_models_state(deep_models, family):
    # kv_fill="deferred": a token's skipped layers run later, with the next token that goes that
    # deep, so every state a token computes is the full model's at that depth; its logits are
    # the exit head on the full model's hidden state at its exit layer (one plain forward).
    runner, ee = _exit_runner(deep_models[family], kv_fill="deferred")
    runner.cache.used = 0
    prompts = [list(p) for p in PROMPTS]
    nxt = [int(runner.prefill(runner.cache.allocate(), ids).argmax()) for ids in prompts]
    seqs = [p + [t] for p, t in zip(prompts, nxt, strict=True)]
    waiting = [None] * len(seqs)
    steps, filled_late = [], 0
    with torch.no_grad():
        for _ in range(12):
            res = ee.decode(nxt, _rows(TV_MEDIANS, len(nxt)), deferred=waiting)
            steps.append((res.logits, res.depths))
            filled_late += sum(w - d for w, d in zip(res.work, res.depths, strict=True))
            waiting = res.deferred
            nxt = res.logits.argmax(-1).tolist()
            for seq, t in zip(seqs, nxt, strict=True):
                seq.append(t)
        for b, seq in enumerate(seqs):
            full = runner.model(torch.tensor([seq[:-1]]), output_hidden_states=True)
            for step, (logits, depths) in enumerate(steps):
                pos, depth = len(PROMPTS[b]) + step, depths[b]
                want = full.logits[0, pos] if depth == LAYERS else runner.logits(full.hidden_states[depth][0, pos : pos + 1])[0]
                torch.testing.assert_close(logits[b], want, atol=2e-4, rtol=1e-4)
    depths = {d for _, ds in steps for d in ds}
    assert len(depths) >= 3, f"thresholds must produce varied exits to test anything (saw {depths})"
    assert filled_late > 0, "some skipped layers must have been filled by a later token"


@pytest.mark.parametrize("kv_fill", ["propagate", "deferred"])
@pytest.mark.parametrize("criterion", ["tv", "argmax", "margin"])
def test_batched_exits_equal_each_sequence_alone(deep_models, criterion, kv_fill):
    thresholds = {"tv": TV_MEDIANS, "argmax": [0.5, 0.5, 0.5], "margin": [0.995, 0.997, 0.996]}[criterion]
    runner, ee = _exit_runner(deep_models["llama"], criterion, kv_fill=kv_fill)
    waiting = [None]  # kv_fill="deferred": each row's tokens still owed layers (one generation)

    def step(tokens):
        res = ee.decode(tokens, _rows(thresholds, len(tokens)), deferred=waiting[0])
        waiting[0] = res.deferred
        return res.logits, res.depths

    together, depths = _generate(runner, step, PROMPTS, 12)
    for i, prompt in enumerate(PROMPTS):
        waiting[0] = None
        alone, alone_depths = _generate(runner, step, [prompt], 12)
        assert alone[0] == together[i]
        assert alone_depths[0] == depths[i]
    per_step = [{row[s] for row in depths} for s in range(12)]
    assert any(len(s) > 1 for s in per_step), "rows of one step must leave at different exits"
