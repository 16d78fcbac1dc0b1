"""Our layer loop must compute exactly what the transformers forward computes."""

from __future__ import annotations

import pytest
import torch
from transformers import AutoModelForCausalLM

from workers.engines.torch_engine.kv_cache import SlotKVCache
from workers.engines.torch_engine.runner import DecoderRunner


def _runner(model_dir, slots=4, max_len=128):
    model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32).eval()
    cfg = model.config
    cache = SlotKVCache(
        cfg.num_hidden_layers, slots, cfg.num_key_value_heads, cfg.head_dim, max_len, torch.float32, torch.device("cpu"),
        initial_capacity=16,  # small, so the tests also cross a capacity doubling
    )
    return model, cache, DecoderRunner(model, cache)


def _reference(model, ids):
    with torch.no_grad():
        return model(torch.tensor([ids])).logits[0, -1]


@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2", "qwen3"])
def test_ragged_batch_matches_transformers(tiny_model_dirs, family):
    model, cache, runner = _runner(tiny_model_dirs[family])
    gen = torch.Generator().manual_seed(7)
    seqs = [torch.randint(3, 300, (n,), generator=gen).tolist() for n in (5, 13, 21)]
    nxt = []
    for ids in seqs:
        slot = cache.allocate()
        logits = runner.prefill(slot, ids)
        torch.testing.assert_close(logits, _reference(model, ids), atol=2e-4, rtol=1e-4)
        nxt.append(int(logits.argmax()))
    # 20 decode steps: lengths reach 41, past gemma's sliding window (8) and the initial capacity
    for _ in range(20):
        for ids, tok in zip(seqs, nxt, strict=False):
            ids.append(tok)
        logits = runner.decode(nxt)
        for i, ids in enumerate(seqs):
            torch.testing.assert_close(logits[i], _reference(model, ids), atol=2e-4, rtol=1e-4)
        nxt = logits.argmax(-1).tolist()


def test_freeing_a_middle_slot_keeps_the_others_exact(tiny_llama):
    model, cache, runner = _runner(tiny_llama)
    seqs = [[5, 6, 7, 8], [9, 10, 11], [12, 13, 14, 15, 16]]
    nxt = [int(runner.prefill(cache.allocate(), ids).argmax()) for ids in seqs]
    for ids, tok in zip(seqs, nxt, strict=False):
        ids.append(tok)
    runner.decode(nxt)
    # slot 0 leaves; the last slot's rows move into it
    assert cache.free(0) == 2
    seqs = [seqs[2], seqs[1]]
    assert cache.used == 2 and cache.lengths[:2] == [len(s) for s in seqs]
    toks = [3, 4]
    for ids, tok in zip(seqs, toks, strict=False):
        ids.append(tok)
    logits = runner.decode(toks)
    for i, ids in enumerate(seqs):
        torch.testing.assert_close(logits[i], _reference(model, ids), atol=2e-4, rtol=1e-4)


def test_unsupported_architecture_is_a_clear_error(tiny_llama):
    from wattserve.errors import ModelSourceError

    model, cache, _ = _runner(tiny_llama)
    model.config.model_type = "gpt2"
    with pytest.raises(ModelSourceError, match="gpt2"):
        DecoderRunner(model, cache)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("family", ["llama", "gemma3_text", "qwen2", "qwen3"])
def test_fused_norms_compute_what_the_models_norms_compute(tiny_model_dirs, family, dtype):
    from workers.engines.torch_engine.runner import fused_norm

    model = AutoModelForCausalLM.from_pretrained(tiny_model_dirs[family], dtype=dtype).eval()
    norms = [m for m in model.modules() if type(m).__name__.endswith("RMSNorm")]
    assert norms
    gen = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for norm in norms:
            torch.nn.init.normal_(norm.weight, std=0.5, generator=gen)  # not the identity init
            fast = fused_norm(norm)
            assert fast is not norm, f"{type(norm).__name__} has no fused form"
            x = (torch.randn(5, 3, norm.weight.shape[0], generator=gen) * 4).to(dtype)
            # float32: the same arithmetic; bfloat16: the same roundings, one ulp at most
            tol = {"atol": 1e-6, "rtol": 1e-6} if dtype == torch.float32 else {"atol": 1e-2, "rtol": 8e-3}
            torch.testing.assert_close(fast(x), norm(x), **tol)
