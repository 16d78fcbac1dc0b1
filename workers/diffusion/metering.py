"""Energy per frame: each phase of the pipeline (preprocess + filter, VAE encode, one UNet call,
VAE decode) is bracketed with device energy readings and its delta is split over the frames
it worked for, in proportion to their share of the work (UNet rows for the UNet call, one each
for the others), in the same :class:`~workers.energy.EnergyLedger` the LLM experts use. Energy
between phases is idle. Requests (frames, session setup, jobs) + idle == the device counter's
delta, exactly.

Measured devices (nvml) ignore the work description. A simulated GPU (``simulated:<profile>``)
turns each phase into modeled joules from its FLOPs, counted once per shape with torch's
``FlopCounterMode`` and expressed as the token count its roofline model expects
(``flops = 2 * params * tokens``).
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Mapping
from typing import Any

import torch

from wattserve.types import StepWork
from workers.devices.base import Device
from workers.energy import EnergyLedger


class FlopEstimator:
    """FLOPs of one item of each phase at a given latent shape, counted once and cached."""

    def __init__(self, model) -> None:
        self.model = model
        self._cache: dict[tuple, float] = {}

    def _count(self, key: tuple, fn: Callable[[], Any]) -> float:
        if key not in self._cache:
            from torch.utils.flop_counter import FlopCounterMode

            counter = FlopCounterMode(display=False)
            with counter, torch.inference_mode():
                fn()
            self._cache[key] = float(counter.get_total_flops())
        return self._cache[key]

    def unet_row(self, latent_shape: tuple[int, int, int]) -> float:
        m = self.model
        x = torch.zeros((1, *latent_shape), device=m.device, dtype=m.dtype)
        t = torch.zeros(1, dtype=torch.long, device=m.device)
        emb = torch.zeros((1, m.max_prompt_tokens, m.text_encoder.config.hidden_size), device=m.device, dtype=m.dtype)
        return self._count(("unet", latent_shape), lambda: m.unet_net(x, t, encoder_hidden_states=emb))

    def encode(self, width: int, height: int) -> float:
        m = self.model
        px = torch.zeros((1, 3, height, width), device=m.device, dtype=m.dtype)
        return self._count(("encode", width, height), lambda: m.vae.encode(px))

    def decode(self, latent_shape: tuple[int, int, int]) -> float:
        m = self.model
        z = torch.zeros((1, *latent_shape), device=m.device, dtype=m.dtype)
        return self._count(("decode", latent_shape), lambda: m.vae.decode(z))

    def text(self) -> float:
        m = self.model
        ids = torch.zeros((1, m.max_prompt_tokens), dtype=torch.long, device=m.device)
        return self._count(("text",), lambda: m.text_encoder(ids))


class Meter:
    """Runs phases between device readings and books their energy (thread-safe ledger access)."""

    def __init__(self, device: Device, ledger: EnergyLedger, lock: threading.Lock,
                 synchronize: Callable[[], None], model_params: int, flops: FlopEstimator | None = None) -> None:
        self.device = device
        self.ledger = ledger
        self.lock = lock
        self.synchronize = synchronize
        self.model_params = max(1, model_params)
        self.flops = flops  # only for modeled devices that need the work described
        self._last_j = device.energy_j()

    def idle(self) -> None:
        """Book the energy since the last reading as idle."""
        now = self.device.energy_j()
        with self.lock:
            self.ledger.add_idle(now - self._last_j)
        self._last_j = now

    def run(self, weights: Mapping[str, float], fn: Callable[[], Any],
            flops: Callable[[FlopEstimator], float] | None = None, items: int = 1) -> tuple[Any, float]:
        """Run ``fn`` as one metered phase; returns ``(its result, joules)``. ``weights`` split
        the joules over ledger keys; ``flops`` describes the work for modeled devices."""
        start = self.device.energy_j()
        self.device.begin_step()
        out = fn()
        self.synchronize()  # GPU kernels are asynchronous: the reading must follow their end
        work = StepWork()
        if self.flops is not None and flops is not None:
            tokens = max(1, round(flops(self.flops) / (2.0 * self.model_params)))
            work = StepWork(prefill_tokens=tokens, batch_size=max(1, items))
        self.device.end_step(work)
        end = self.device.energy_j()
        with self.lock:
            self.ledger.add_idle(start - self._last_j)
            self.ledger.add_step(end - start, weights)
        self._last_j = end
        return out, end - start

    def close(self, key: str) -> float:
        """A frame or job is done: its total joules, and stop tracking it."""
        with self.lock:
            return self.ledger.close(key)
