"""A latent diffusion model loaded from a local diffusers-format directory.

The directory is what ``StableDiffusionPipeline.save_pretrained`` writes: ``unet/``, ``vae/``,
``text_encoder/`` (a CLIP text model), ``tokenizer/`` and optionally ``scheduler/``. Whatever
scheduler the model ships, we denoise with an :class:`~diffusers.LCMScheduler` built from its
config (the beta schedule and prediction type carry over), because Stream Batch relies on
few-step consistency-model updates. Point it at an LCM-distilled model (an LCM checkpoint, or a
Stable Diffusion with an LCM-LoRA fused and saved) for images that look right in 1-4 steps.

:class:`DiffusionModel` is the only object that calls the networks; it counts UNet calls and
evaluations (batch rows) so tests and the benchmark can check Stream Batch's claims.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from wattserve.errors import InvalidRequest, ModelSourceError
from wattserve.specs import DiffusionEngineSpec

log = logging.getLogger(__name__)

REQUIRED_PARTS = ("unet", "vae", "text_encoder", "tokenizer")


@dataclass(slots=True)
class UNetCounters:
    """UNet forward calls and evaluations (batch rows) since load."""

    calls: int = 0
    evaluations: int = 0
    batch_sizes: list[int] = field(default_factory=list)  # last few calls, for tests and profiles

    def record(self, rows: int) -> None:
        self.calls += 1
        self.evaluations += rows
        self.batch_sizes.append(rows)
        del self.batch_sizes[:-256]


def check_diffusers_dir(path: Path) -> Path:
    """Raise :class:`ModelSourceError` unless ``path`` holds the parts a pipeline needs."""
    if not path.is_dir():
        raise ModelSourceError(f"diffusion model directory {path} does not exist", path=str(path))
    missing = [p for p in REQUIRED_PARTS if not (path / p).is_dir()]
    missing += [f"{p}/config.json" for p in ("unet", "vae", "text_encoder")
                if (path / p).is_dir() and not (path / p / "config.json").is_file()]
    if missing:
        raise ModelSourceError(
            f"{path} is not a diffusers-format model directory: missing {', '.join(missing)} "
            "(expected unet/, vae/, text_encoder/, tokenizer/ and optionally scheduler/, as "
            "StableDiffusionPipeline.save_pretrained writes them)",
            path=str(path),
        )
    return path


def _pick(engine: DiffusionEngineSpec) -> tuple[torch.device, torch.dtype]:
    use_cuda = engine.device == "cuda" or (engine.device == "auto" and torch.cuda.is_available())
    if use_cuda and not torch.cuda.is_available():
        raise ModelSourceError("engine.device is cuda but torch sees no CUDA device")
    device = torch.device("cuda" if use_cuda else "cpu")
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    dtype = names.get(engine.dtype, torch.float16 if use_cuda else torch.float32)
    return device, dtype


class DiffusionModel:
    """UNet + VAE + text encoder on one torch device, with the conversions the pipeline needs.

    Not thread-safe: only the diffusion loop thread calls the networks. ``tokenize`` (used to
    validate prompts) is safe from any thread.
    """

    def __init__(self, model_dir: Path | str, engine: DiffusionEngineSpec, label: str = "") -> None:
        from diffusers import AutoencoderKL, LCMScheduler, UNet2DConditionModel
        from transformers import AutoTokenizer, CLIPTextModel

        path = check_diffusers_dir(Path(model_dir).expanduser())
        if engine.threads:
            torch.set_num_threads(engine.threads)
        self.device, self.dtype = _pick(engine)
        self.label = label or str(path)
        try:
            self.unet_net = UNet2DConditionModel.from_pretrained(path / "unet", torch_dtype=self.dtype)
            self.vae = AutoencoderKL.from_pretrained(path / "vae", torch_dtype=self.dtype)
            self.text_encoder = CLIPTextModel.from_pretrained(path / "text_encoder", dtype=self.dtype)
            self.tokenizer = AutoTokenizer.from_pretrained(path / "tokenizer")
            sched_dir = path / "scheduler"
            self.scheduler = (
                LCMScheduler.from_pretrained(sched_dir) if (sched_dir / "scheduler_config.json").is_file()
                else LCMScheduler()
            )
        except (OSError, ValueError, KeyError) as exc:
            raise ModelSourceError(f"cannot load the diffusion model in {path}: {exc}", path=str(path)) from None
        for module in (self.unet_net, self.vae, self.text_encoder):
            module.to(self.device).eval().requires_grad_(False)
        self._tok_lock = threading.Lock()
        self.counters = UNetCounters()
        vae_cfg, unet_cfg = self.vae.config, self.unet_net.config
        self.vae_scale_factor = 2 ** (len(vae_cfg.block_out_channels) - 1)
        # The UNet halves the latent at every down block but the last: sizes must divide evenly.
        self.size_multiple = self.vae_scale_factor * 2 ** (len(unet_cfg.down_block_types) - 1)
        self.latent_channels = int(unet_cfg.in_channels)
        if int(vae_cfg.latent_channels) != self.latent_channels:
            raise ModelSourceError(
                f"{path}: the VAE makes {vae_cfg.latent_channels}-channel latents but the UNet takes {self.latent_channels}"
            )
        self.scaling_factor = float(vae_cfg.scaling_factor)
        self.shift_factor = float(getattr(vae_cfg, "shift_factor", None) or 0.0)
        self.prediction_type = str(self.scheduler.config.prediction_type)
        if self.prediction_type not in ("epsilon", "v_prediction", "sample"):
            raise ModelSourceError(f"{path}: unsupported prediction_type {self.prediction_type!r}")
        sample = unet_cfg.sample_size
        side = (sample if isinstance(sample, int) else sample[0]) * self.vae_scale_factor
        self.default_width = engine.width or side
        self.default_height = engine.height or engine.width or side
        self.max_prompt_tokens = int(min(self.tokenizer.model_max_length,
                                         self.text_encoder.config.max_position_embeddings))
        self.params = sum(p.numel() for m in (self.unet_net, self.vae, self.text_encoder) for p in m.parameters())
        self.unet_params = sum(p.numel() for p in self.unet_net.parameters())

    # -- prompts -------------------------------------------------------------------------------
    def tokenize(self, prompt: str) -> list[int]:
        """Token ids padded to the text encoder's length; InvalidRequest if the prompt is longer."""
        with self._tok_lock:  # fast tokenizers are not re-entrant across threads
            ids = self.tokenizer(prompt, truncation=False).input_ids
        if len(ids) > self.max_prompt_tokens:
            raise InvalidRequest(
                f"prompt is {len(ids)} tokens; this model's text encoder reads at most {self.max_prompt_tokens}"
            )
        pad = self.tokenizer.pad_token_id
        pad = self.tokenizer.eos_token_id if pad is None else pad
        return ids + [pad] * (self.max_prompt_tokens - len(ids))

    @torch.inference_mode()
    def encode_prompt(self, prompt: str) -> torch.Tensor:
        """Text embeddings ``[1, tokens, dim]`` for the UNet's cross-attention."""
        ids = torch.tensor([self.tokenize(prompt)], device=self.device)
        return self.text_encoder(ids)[0].to(self.dtype)

    # -- images <-> latents --------------------------------------------------------------------
    def to_tensor(self, images: Sequence[np.ndarray]) -> torch.Tensor:
        """uint8 ``H x W x 3`` arrays -> ``[B, 3, H, W]`` in [-1, 1] on the model's device."""
        batch = torch.from_numpy(np.stack(images)).to(self.device)
        return (batch.permute(0, 3, 1, 2).to(self.dtype) / 127.5) - 1.0

    @torch.inference_mode()
    def encode_images(self, pixels: torch.Tensor) -> torch.Tensor:
        """Latents ``[B, C, H/f, W/f]`` of ``pixels`` (the posterior mean: deterministic)."""
        dist = self.vae.encode(pixels).latent_dist
        return (dist.mean - self.shift_factor) * self.scaling_factor

    @torch.inference_mode()
    def decode_latents(self, latents: torch.Tensor) -> list[np.ndarray]:
        """uint8 ``H x W x 3`` images of ``latents``."""
        pixels = self.vae.decode(latents / self.scaling_factor + self.shift_factor).sample
        pixels = ((pixels.float().clamp(-1, 1) + 1.0) * 127.5).round().to(torch.uint8)
        return list(pixels.permute(0, 2, 3, 1).cpu().numpy())

    # -- the UNet ------------------------------------------------------------------------------
    @torch.inference_mode()
    def unet(self, latents: torch.Tensor, timesteps: torch.Tensor, embeddings: torch.Tensor) -> torch.Tensor:
        """One UNet call over a batch of latents, each at its own timestep (counted)."""
        self.counters.record(int(latents.shape[0]))
        return self.unet_net(latents, timesteps, encoder_hidden_states=embeddings, return_dict=False)[0]

    def synchronize(self) -> None:
        """Wait for queued GPU work, so an energy reading after it covers it."""
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)

    def latent_shape(self, width: int, height: int) -> tuple[int, int, int]:
        return (self.latent_channels, height // self.vae_scale_factor, width // self.vae_scale_factor)
