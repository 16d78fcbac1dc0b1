"""Stream Batch and residual classifier-free guidance (StreamDiffusion, Kodaira et al. 2023).

**Stream Batch.** With n denoising steps, up to ``n * frame_buffer_size`` frames are in flight,
each in a *slot*: its step ``i`` (timestep ``t_i``) and its position ``p`` in the group of frames
that entered together. A :meth:`StreamBatch.step` runs ONE UNet call over every slot at its own
timestep; slots at the last step leave (denoised, to be decoded); the others move one step on,
re-noised with the fixed noise ``z[i+1, p]``. New frames enter at step 0, noised with
``z[0, p]``. A frame therefore leaves with the n-th call that carries it: after warm-up, every
call carries n latents per group and emits one group. Because every slot's arithmetic depends
only on its own latent, timestep and noise, a frame's output is the same as denoising it alone
with the same noise (sequential mode: admit one frame, step n times), which the tests check.

**Guidance** (per slot, in noise-prediction space; ``eps_c`` with the prompt, ``eps_u`` the
negative, ``gamma`` the guidance scale, ``delta`` the residual scale)::

    none        eps = eps_c                                       n UNet rows per frame
    full        eps = eps_u + gamma (eps_c - eps_u)                2n (a negative row every step)
    self        eps_u = delta * (x_i - a_i x0_in) / b_i            n
    initialize  step 0: eps_u = delta * UNet(x_0, negative);        n + 1
                later:  eps_u = delta * (x_i - a_i x0_neg) / b_i

Residual CFG replaces the negative UNet evaluation with a *virtual residual noise*: the noise
that would take a reference latent to the current one. "self" takes the frame's own input
latent ``x0_in`` as the reference, so guidance pushes the result away from the unchanged input;
"initialize" evaluates the real negative prompt once, at the frame's first step, and uses the
clean latent it implies, ``x0_neg = (x_0 - b_0 eps_u) / a_0``, as the reference afterwards.
Text-to-image frames have no input: their reference is the zero latent.
"""

from __future__ import annotations

from collections.abc import Callable, Hashable, Sequence
from dataclasses import dataclass

import torch

from wattserve.images import CfgType

#: (latents [R,C,h,w], timesteps [R], embeddings [R,T,D]) -> UNet output [R,C,h,w]
UNetFn = Callable[[torch.Tensor, torch.Tensor, torch.Tensor], torch.Tensor]


@dataclass(slots=True, frozen=True)
class Guidance:
    cfg_type: CfgType
    guidance_scale: float = 1.2
    delta: float = 1.0


@dataclass(slots=True)
class Slot:
    """One frame in flight."""

    key: Hashable
    position: int  # in the group it entered with: selects its noise
    step: int  # 0 .. n-1: the timestep it is at
    latent: torch.Tensor  # [C, h, w] at that timestep
    reference: torch.Tensor  # [C, h, w]: the clean latent its virtual residual noise points from
    evaluations: int = 0  # UNet rows spent on it so far


class StreamBatch:
    """The in-flight slots of one stream and the step that advances them all with one UNet call.

    ``noise`` is ``[n, frame_buffer_size, C, h, w]``, fixed for the stream's life; ``cond`` and
    ``uncond`` are ``[1, T, D]`` prompt and negative-prompt embeddings (``uncond`` may be None
    when the guidance never evaluates the negative).
    """

    def __init__(self, unet: UNetFn, schedule, guidance: Guidance, noise: torch.Tensor,
                 cond: torch.Tensor, uncond: torch.Tensor | None) -> None:
        needs_negative = guidance.cfg_type in (CfgType.FULL, CfgType.INITIALIZE)
        if needs_negative and uncond is None:
            raise ValueError(f"cfg_type {guidance.cfg_type} needs negative-prompt embeddings")
        if noise.shape[0] != schedule.steps:
            raise ValueError(f"noise has {noise.shape[0]} steps, the schedule {schedule.steps}")
        self.unet = unet
        self.schedule = schedule
        self.guidance = guidance
        self.noise = noise
        self.cond = cond
        self.uncond = uncond
        self.slots: list[Slot] = []
        self.calls = 0
        self.evaluations = 0

    @property
    def steps(self) -> int:
        return self.schedule.steps

    @property
    def group_size(self) -> int:
        return int(self.noise.shape[1])

    def in_flight(self) -> int:
        return len(self.slots)

    @torch.inference_mode()
    def admit(self, frames: Sequence[tuple[Hashable, torch.Tensor | None]]) -> None:
        """New frames enter at step 0: ``(key, input latent [C,h,w])``, or ``(key, None)`` for
        text-to-image, which starts from pure noise."""
        if len(frames) > self.group_size:
            raise ValueError(f"{len(frames)} frames admitted at once; frame_buffer_size is {self.group_size}")
        if any(s.step == 0 for s in self.slots):
            raise RuntimeError("admit() twice without a step() in between")
        for pos, (key, x0_in) in enumerate(frames):
            z = self.noise[0, pos]
            if x0_in is None:
                latent, reference = z.clone(), torch.zeros_like(z)
            else:
                steps = torch.zeros(1, dtype=torch.long, device=z.device)
                latent, reference = self.schedule.noise_to(x0_in[None], z[None], steps)[0], x0_in
            self.slots.append(Slot(key=key, position=pos, step=0, latent=latent, reference=reference))

    def rows_by_key(self) -> dict[Hashable, int]:
        """UNet rows each slot will cost in the next :meth:`step` (for energy attribution)."""
        return {s.key: 1 + self._negative_row(s) for s in self.slots}

    def _negative_row(self, slot: Slot) -> bool:
        cfg = self.guidance.cfg_type
        return cfg is CfgType.FULL or (cfg is CfgType.INITIALIZE and slot.step == 0)

    @torch.inference_mode()
    def step(self) -> list[tuple[Hashable, torch.Tensor, int]]:
        """One UNet call over every slot; returns ``(key, denoised latent, UNet rows)`` of the
        slots that finished their last step, in admission order."""
        if not self.slots:
            return []
        slots = self.slots
        dev = self.noise.device
        x = torch.stack([s.latent for s in slots])
        steps = torch.tensor([s.step for s in slots], dtype=torch.long, device=dev)
        neg = [i for i, s in enumerate(slots) if self._negative_row(s)]
        eps_c, eps_u_real = self._evaluate(x, steps, neg)
        eps = self._guide(slots, x, steps, eps_c, eps_u_real, neg)
        denoised = self.schedule.denoise(x, eps, steps)
        for i, s in enumerate(slots):
            s.evaluations += 1 + (i in neg)
        return self._advance(denoised)

    def _evaluate(self, x: torch.Tensor, steps: torch.Tensor, neg: list[int]):
        """The single UNet call: every slot with the prompt, plus negative rows where needed."""
        s_count = x.shape[0]
        t = self.schedule.timesteps_t[steps]
        rows_x, rows_t, emb = x, t, self.cond.expand(s_count, -1, -1)
        if neg:
            idx = torch.tensor(neg, dtype=torch.long, device=x.device)
            rows_x = torch.cat([x, x[idx]])
            rows_t = torch.cat([t, t[idx]])
            emb = torch.cat([emb, self.uncond.expand(len(neg), -1, -1)])
        out = self.unet(rows_x, rows_t, emb)
        self.calls += 1
        self.evaluations += int(rows_x.shape[0])
        eps_c = self.schedule.to_epsilon(out[:s_count], x, steps)
        if not neg:
            return eps_c, None
        return eps_c, self.schedule.to_epsilon(out[s_count:], x[idx], steps[idx])

    def _guide(self, slots, x, steps, eps_c, eps_u_real, neg) -> torch.Tensor:
        g = self.guidance
        if g.cfg_type is CfgType.NONE:
            return eps_c
        if g.cfg_type is CfgType.FULL:
            return eps_u_real + g.guidance_scale * (eps_c - eps_u_real)
        if g.cfg_type is CfgType.INITIALIZE and neg:
            # The one real negative evaluation fixes each new frame's negative reference latent.
            idx = torch.tensor(neg, dtype=torch.long, device=x.device)
            s0 = steps[idx]
            x0_neg = (x[idx] - self.schedule.coef("sqrt_beta", s0) * eps_u_real) / self.schedule.coef("sqrt_alpha", s0)
            for j, i in enumerate(neg):
                slots[i].reference = x0_neg[j]
        refs = torch.stack([s.reference for s in slots])
        eps_u = g.delta * self.schedule.residual_noise(x, refs, steps)
        if g.cfg_type is CfgType.INITIALIZE and neg:
            eps_u[idx] = g.delta * eps_u_real  # step 0 uses the real negative, not its residual
        return eps_u + g.guidance_scale * (eps_c - eps_u)

    def _advance(self, denoised: torch.Tensor) -> list[tuple[Hashable, torch.Tensor, int]]:
        last = self.steps - 1
        finished, staying = [], []
        for s, d in zip(self.slots, denoised, strict=True):
            if s.step == last:
                finished.append((s.key, d, s.evaluations))
            else:
                staying.append((s, d))
        if staying:
            dev = denoised.device
            nxt = torch.tensor([s.step + 1 for s, _ in staying], dtype=torch.long, device=dev)
            z = torch.stack([self.noise[s.step + 1, s.position] for s, _ in staying])
            moved = self.schedule.noise_to(torch.stack([d for _, d in staying]), z, nxt)
            for (s, _), latent in zip(staying, moved, strict=True):
                s.step += 1
                s.latent = latent
        self.slots = [s for s, _ in staying]
        return finished

    def clear(self) -> None:
        """Drop every slot (frees the latents)."""
        self.slots = []


def make_noise(steps: int, group: int, shape: tuple[int, int, int], seed: int,
               device: torch.device, dtype: torch.dtype) -> torch.Tensor:
    """The fixed per-slot noise ``[steps, group, C, h, w]``, drawn on the CPU so a seed gives the
    same noise on every device."""
    gen = torch.Generator().manual_seed(seed)
    return torch.randn((steps, group, *shape), generator=gen).to(device=device, dtype=dtype)
