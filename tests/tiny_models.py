"""Tiny randomly initialised models (and a tokenizer) that tests build and save themselves.

Nothing is downloaded: the tokenizer is a byte-level BPE trained here on a few sentences, and the
models are transformers classes built from small configs with a fixed seed.
"""

from __future__ import annotations

from pathlib import Path

import torch

CORPUS = [
    "The capital of France is Paris.",
    "Energy is measured in joules and power in watts.",
    "A small model answers quickly; a large model answers well.",
    "wattserve routes each request to the expert that buys the most quality per joule.",
    "Hello world! How are you today? 0123456789",
] * 20

FAMILIES = ("llama", "gemma3_text", "qwen2", "qwen3")


def build_tokenizer(out_dir: Path, vocab_size: int = 384):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=["<pad>", "<s>", "</s>"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )
    tok.train_from_iterator(CORPUS, trainer)
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    fast = PreTrainedTokenizerFast(
        tokenizer_object=tok, pad_token="<pad>", bos_token="<s>", eos_token="</s>"
    )
    fast.save_pretrained(out_dir)
    return fast


def _config(family: str, vocab: int, layers: int, max_pos: int):
    common = dict(
        vocab_size=vocab,
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=16,
        max_position_embeddings=max_pos,
        pad_token_id=0,
        bos_token_id=1,
        eos_token_id=2,
        tie_word_embeddings=True,
    )
    if family == "llama":
        from transformers import LlamaConfig

        return LlamaConfig(**common)
    if family == "qwen2":
        from transformers import Qwen2Config

        return Qwen2Config(**common)
    if family == "qwen3":
        from transformers import Qwen3Config

        return Qwen3Config(**common)
    if family == "gemma3_text":
        from transformers import Gemma3TextConfig

        # A small sliding window so tests cross it; every 2nd layer is global.
        return Gemma3TextConfig(**common, sliding_window=8, sliding_window_pattern=2, query_pre_attn_scalar=16)
    raise ValueError(family)


def build_model(
    out_dir: Path, family: str = "llama", layers: int = 4, max_pos: int = 512, seed: int = 0, layer_gain: float = 1.0
) -> Path:
    """Save a tiny random ``family`` model plus tokenizer into ``out_dir``; returns it.

    ``layer_gain`` scales every layer's output projections (and the LM head by ``gain ** 0.6``):
    at the default init each layer barely moves the residual stream, so every depth predicts the
    same token; early-exit tests need depths that disagree.
    """
    from transformers import AutoModelForCausalLM

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    tok = build_tokenizer(out_dir)
    torch.manual_seed(seed)
    cfg = _config(family, len(tok), layers, max_pos)
    model = AutoModelForCausalLM.from_config(cfg)
    # Random init of norms is all-ones/zeros; perturb so norm weights matter in the equivalence test.
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.add_(0.1 * torch.randn_like(p))
            elif layer_gain != 1.0 and name.endswith(("o_proj.weight", "down_proj.weight")):
                p.mul_(layer_gain)
        if layer_gain != 1.0:
            model.get_output_embeddings().weight.mul_(layer_gain**0.6)
    model.save_pretrained(out_dir)
    return out_dir
