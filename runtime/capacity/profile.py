"""What the capacity planner knows about one replica of an expert: milliseconds and joules per
token against batch size and SM clock, prefill and decode separately, plus idle power.

The tables are plain arrays so that a profile measured on live replicas (per-step latency and
energy, binned by batch and clock) can fill them exactly as :func:`replica_profile_from_device`
fills them from the calibrated roofline model of ``workers/devices/simulated.py``. Every joule a
modeled table yields is labelled ``modeled:<profile>`` (see :attr:`ReplicaProfile.energy_source`).
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import numpy as np

from workers.devices.simulated import DeviceProfile, load_profile, power_from_utilisation, step_terms

#: prompt tokens of the reference prefill step the per-token prefill cost is read from
PREFILL_REFERENCE_TOKENS = 2048


@dataclass(frozen=True, slots=True)
class ReplicaProfile:
    """One replica (``gpus`` GPUs holding one model instance). Clocks ascend; row ``c`` of each
    table is clock ``clocks_mhz[c]``; column ``b`` of a decode table is a batch of ``b`` sequences
    (column 0 repeats batch 1). Powers are for the whole replica (all its GPUs), in watts."""

    energy_source: str
    gpus: int
    max_batch: int
    clocks_mhz: np.ndarray  # (C,)
    decode_step_s: np.ndarray  # (C, max_batch + 1): one decode step of b sequences
    decode_power_w: np.ndarray  # (C, max_batch + 1)
    prefill_s_per_token: np.ndarray  # (C,): compute-bound slope of prefill time
    prefill_overhead_s: float  # per prefill step
    prefill_power_w: np.ndarray  # (C,)
    idle_power_w: float
    prefill_chunk_tokens: int = 512  # chunked prefill: decoders get one token per chunk step

    @property
    def max_clock_index(self) -> int:
        return len(self.clocks_mhz) - 1

    def decode_step(self, batch, clock_index):
        """Seconds of one decode step at a (possibly fractional, array) batch; below 1: batch 1."""
        return _interp(self.decode_step_s, batch, clock_index)

    def decode_power(self, batch, clock_index):
        """Replica watts while decoding a batch of ``batch`` sequences."""
        return _interp(self.decode_power_w, batch, clock_index)

    def chunk_step_s(self, clock_index):
        """Seconds of one chunked-prefill step (``prefill_chunk_tokens`` prompt tokens; the running
        decoders ride along and each get one token, as in vLLM's chunked prefill)."""
        return self.prefill_s(self.prefill_chunk_tokens, clock_index)

    def prefill_s(self, tokens, clock_index):
        """Seconds to prefill ``tokens`` prompt tokens in one step."""
        return self.prefill_overhead_s + np.asarray(tokens, dtype=float) * self.prefill_s_per_token[clock_index]


def _interp(table: np.ndarray, batch, clock_index):
    b = np.clip(np.asarray(batch, dtype=float), 1.0, table.shape[1] - 1)
    lo = np.minimum(np.floor(b).astype(int), table.shape[1] - 2)
    frac = b - lo
    row = table[clock_index]
    if row.ndim == 1:
        return row[lo] * (1 - frac) + row[lo + 1] * frac
    idx = np.arange(row.shape[0])  # one clock per batch entry
    return row[idx, lo] * (1 - frac) + row[idx, lo + 1] * frac


def clock_grid(profile: DeviceProfile, levels: int, floor_fraction: float) -> np.ndarray:
    """``levels`` clocks evenly spaced from ``floor_fraction`` x max up to the max (MHz)."""
    lo = max(profile.min_sm_clock_mhz, floor_fraction * profile.max_sm_clock_mhz)
    return np.unique(np.round(np.linspace(lo, profile.max_sm_clock_mhz, levels)))


def replica_profile_from_device(
    profile: DeviceProfile | str,
    *,
    gpus: int,
    model_params: float,
    max_batch: int,
    clock_levels: int = 12,
    clock_floor_fraction: float = 0.4,
    clock_power_exponent: float | None = None,
    mem_clock_power_exponent: float = 0.0,
) -> ReplicaProfile:
    """Tabulate the simulated device model for a model of ``model_params`` parameters split over
    ``gpus`` GPUs (tensor parallel). ``clock_power_exponent`` overrides the profile's assumed value
    (the sensitivity study); clocks below ``clock_floor_fraction`` x max are not offered.

    ``mem_clock_power_exponent`` (default 0: the device model as fitted) also scales the
    memory-traffic term of power by ``r**exponent``. The device model holds memory-bound power
    independent of the SM clock; measured DVFS studies of LLM decode (e.g. arXiv 2501.08219: ~42%
    less energy at 1-6% more latency from the SM clock alone) say otherwise, so this is the
    sensitivity knob for what the data here cannot settle."""
    p = load_profile(profile) if isinstance(profile, str) else profile
    if clock_power_exponent is not None:
        p = dataclasses.replace(p, clock_power_exponent=float(clock_power_exponent))
    if gpus < 1 or max_batch < 1 or model_params <= 0:
        raise ValueError("gpus and max_batch must be >= 1 and model_params > 0")
    params = model_params / gpus
    clocks = clock_grid(p, clock_levels, clock_floor_fraction)
    r = (clocks / p.max_sm_clock_mhz)[:, None]
    batch = np.maximum(np.arange(max_batch + 1, dtype=float), 1.0)[None, :]
    lat_d, um_d, uc_d = step_terms(p, 0.0, batch, batch, 1.0, params, 2.0, ratio=r)
    mem = r**mem_clock_power_exponent
    pw_d = power_from_utilisation(p, um_d * mem, uc_d, ratio=r) * gpus
    ref = float(PREFILL_REFERENCE_TOKENS)
    lat_p, um_p, uc_p = step_terms(p, ref, 0.0, 1.0, 1.0, params, 2.0, ratio=r[:, 0])
    pw_p = power_from_utilisation(p, um_p * mem[:, 0], uc_p, ratio=r[:, 0]) * gpus
    label = p.power_label if not mem_clock_power_exponent else f"{p.power_label}-memclock{mem_clock_power_exponent:g}"
    return ReplicaProfile(
        energy_source=f"modeled:{label}",
        gpus=gpus,
        max_batch=max_batch,
        clocks_mhz=clocks,
        decode_step_s=np.broadcast_to(lat_d, (len(clocks), max_batch + 1)).copy(),
        decode_power_w=np.broadcast_to(pw_d, (len(clocks), max_batch + 1)).copy(),
        prefill_s_per_token=(lat_p - p.step_overhead_s) / ref,
        prefill_overhead_s=p.step_overhead_s,
        prefill_power_w=pw_p,
        idle_power_w=p.idle_w * gpus,
    )
