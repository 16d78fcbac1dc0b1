"""The n denoising steps of a stream and the consistency-model update, as batched tensor math.

A ``t_index_list`` picks n entries of an LCM schedule (50 steps by default: timesteps 999, 979,
..., 19); slot ``i`` of a Stream Batch sits at timestep ``t_i``. With ``a_i = sqrt(alphā(t_i))``
and ``b_i = sqrt(1 - alphā(t_i))``, one step of slot ``i`` is the LCM update::

    x0_pred = (x - b_i * eps) / a_i                    # what the noise prediction implies
    d       = c_out(t_i) * x0_pred + c_skip(t_i) * x   # consistency boundary condition
    x'      = a_{i+1} * d + b_{i+1} * z_{i+1}           # re-noised to the next slot's timestep

with ``z`` the slot's fixed noise. Every quantity is indexed per row, so one call computes slots
at different timesteps together. All coefficients are computed in float64 from the scheduler's
``alphas_cumprod`` and cast to the latents' dtype.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from wattserve.errors import InvalidRequest


class LcmSchedule:
    """Per-step coefficients of ``t_index_list`` on ``scheduler``'s ``schedule_steps``-step LCM schedule."""

    def __init__(self, scheduler, t_index_list: Sequence[int], schedule_steps: int,
                 prediction_type: str, device: torch.device, dtype: torch.dtype) -> None:
        from diffusers import LCMScheduler

        idx = list(t_index_list)
        if not idx or any(b <= a for a, b in zip(idx, idx[1:], strict=False)) or idx[0] < 0 or idx[-1] >= schedule_steps:
            raise InvalidRequest(
                f"t_index_list {idx} must be non-empty, strictly increasing, with indices in [0, {schedule_steps})"
            )
        sched = LCMScheduler.from_config(scheduler.config)  # our own copy: set_timesteps mutates it
        original = min(max(schedule_steps, sched.config.original_inference_steps), sched.config.num_train_timesteps)
        sched.set_timesteps(schedule_steps, original_inference_steps=original)
        self.all_timesteps = [int(t) for t in sched.timesteps]
        self.t_index_list = tuple(idx)
        self.timesteps = tuple(self.all_timesteps[i] for i in idx)
        self.steps = len(idx)
        self.prediction_type = prediction_type
        ac = sched.alphas_cumprod.to(torch.float64)
        ts = torch.tensor(self.timesteps)
        scalings = [sched.get_scalings_for_boundary_condition_discrete(t) for t in self.timesteps]

        def col(values) -> torch.Tensor:
            return torch.as_tensor(values, dtype=torch.float64).to(device=device, dtype=dtype)

        self.sqrt_alpha = col(ac[ts].sqrt())
        self.sqrt_beta = col((1 - ac[ts]).sqrt())
        self.c_skip = col([float(s[0]) for s in scalings])
        self.c_out = col([float(s[1]) for s in scalings])
        self.timesteps_t = torch.tensor(self.timesteps, dtype=torch.long, device=device)

    def coef(self, name: str, steps: torch.Tensor) -> torch.Tensor:
        """Coefficient ``name`` for each row's step, shaped ``[rows, 1, 1, 1]`` to broadcast."""
        return getattr(self, name)[steps].view(-1, 1, 1, 1)

    def to_epsilon(self, output: torch.Tensor, x: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """Turn the UNet's output into a noise prediction, whatever the model was trained to predict."""
        if self.prediction_type == "epsilon":
            return output
        a, b = self.coef("sqrt_alpha", steps), self.coef("sqrt_beta", steps)
        if self.prediction_type == "v_prediction":
            return a * output + b * x
        return (x - a * output) / b  # "sample": the output is x0

    def denoise(self, x: torch.Tensor, eps: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The consistency model's denoised latent ``d`` for each row."""
        a, b = self.coef("sqrt_alpha", steps), self.coef("sqrt_beta", steps)
        x0_pred = (x - b * eps) / a
        return self.coef("c_out", steps) * x0_pred + self.coef("c_skip", steps) * x

    def noise_to(self, x0: torch.Tensor, noise: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """``a * x0 + b * noise`` at each row's step (the forward process)."""
        return self.coef("sqrt_alpha", steps) * x0 + self.coef("sqrt_beta", steps) * noise

    def residual_noise(self, x: torch.Tensor, x0_ref: torch.Tensor, steps: torch.Tensor) -> torch.Tensor:
        """The noise that takes ``x0_ref`` to ``x`` at each row's step: ``(x - a x0_ref) / b``."""
        return (x - self.coef("sqrt_alpha", steps) * x0_ref) / self.coef("sqrt_beta", steps)
