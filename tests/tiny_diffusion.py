"""A tiny randomly initialised latent diffusion model in diffusers format, built and saved here.

UNet2DConditionModel + AutoencoderKL + CLIPTextModel + a CLIP tokenizer whose vocabulary is the
byte-level alphabet plus a few merges (nothing downloaded), and an LCM scheduler config. The VAE
halves the image once (scale factor 2) and the UNet works at two resolutions, so image sides
must be multiples of 4 pixels: 16x16 images give 8x8 latents, small enough for fast tests.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch

TEXT_DIM = 32
PROMPT_TOKENS = 16


def build_tokenizer(out_dir: Path):
    from tokenizers import pre_tokenizers
    from transformers import CLIPTokenizer

    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for ch in alphabet:
        vocab.setdefault(ch, len(vocab))
    for ch in alphabet:
        vocab.setdefault(ch + "</w>", len(vocab))
    merges = [("t", "h"), ("th", "e</w>"), ("a", "n"), ("an", "d</w>"), ("c", "a"), ("ca", "t</w>")]
    for a, b in merges:
        vocab.setdefault(a + b, len(vocab))
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    tok = CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=PROMPT_TOKENS)
    tok.save_pretrained(out_dir)
    return tok


def build_diffusion_model(out_dir: Path, seed: int = 0, prediction_type: str = "epsilon",
                          unet_channels: tuple[int, int] = (16, 32), vae_channels: tuple[int, int] = (8, 16),
                          sample_size: int = 8) -> Path:
    """Save a tiny random diffusers-format model into ``out_dir``; returns it. The defaults make
    the test model (16x16 images); benchmarks pass wider channels and larger samples."""
    from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
    from transformers import CLIPTextConfig, CLIPTextModel

    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    torch.manual_seed(seed)
    tok = build_tokenizer(out_dir / "tokenizer")
    unet = UNet2DConditionModel(
        sample_size=sample_size, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=unet_channels,
        down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"), up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=TEXT_DIM, attention_head_dim=8, norm_num_groups=8,
    )
    vae = AutoencoderKL(
        in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
        up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=vae_channels, latent_channels=4,
        layers_per_block=1, norm_num_groups=4, sample_size=2 * sample_size,
    )
    text = CLIPTextModel(CLIPTextConfig(
        vocab_size=len(tok), hidden_size=TEXT_DIM, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
        max_position_embeddings=PROMPT_TOKENS, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
        pad_token_id=tok.pad_token_id,
    ))
    # Perturb every weight (norms start at exactly 1/0) so that a wrong row, timestep or
    # embedding in a batched call changes the output and the equivalence tests notice.
    with torch.no_grad():
        for p in unet.parameters():
            p.add_(0.02 * torch.randn_like(p))
    unet.save_pretrained(out_dir / "unet")
    vae.save_pretrained(out_dir / "vae")
    text.save_pretrained(out_dir / "text_encoder")
    LCMScheduler(prediction_type=prediction_type).save_pretrained(out_dir / "scheduler")
    (out_dir / "model_index.json").write_text(json.dumps({
        "_class_name": "StableDiffusionPipeline", "unet": ["diffusers", "UNet2DConditionModel"],
        "vae": ["diffusers", "AutoencoderKL"], "text_encoder": ["transformers", "CLIPTextModel"],
        "tokenizer": ["transformers", "CLIPTokenizer"], "scheduler": ["diffusers", "LCMScheduler"],
    }, indent=1))
    return out_dir
