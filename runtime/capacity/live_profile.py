"""The :class:`ReplicaProfile` the live controller plans a running expert with.

- ``device: simulated:<p>``: the device model tabulated as the day simulator does
  (:func:`replica_profile_from_device`, one GPU per replica, the replica's reported parameters),
  clocks included; energy ``modeled:<p>``.
- Any other device (CPU experts, and GPUs measured through NVML): one row built from what the
  replica measured and reports in its telemetry (decode step ms per batch size, prefill ms per
  token, busy power or J/token); energy ``measured:<its source>``, or ``assumed`` before the
  replica has measured anything (then ``capacity.assumed_decode_ms_per_token`` stands in). It has
  a single clock (``CLOCK_NOT_CONTROLLED``): the controller plans replica counts only there.
"""

from __future__ import annotations

import numpy as np

from wattserve.specs import ExpertSpec
from wattserve.types import ExpertProfile

from .config import CapacityConfig
from .profile import ReplicaProfile, replica_profile_from_device

#: the clock of a profile without clock control (reported as no target clock)
CLOCK_NOT_CONTROLLED = 0.0


def live_profile(spec: ExpertSpec, telemetry: ExpertProfile | None, config: CapacityConfig) -> ReplicaProfile:
    """The profile to plan ``spec`` with, from its latest ``telemetry`` (None: nothing polled yet)."""
    params = (telemetry.params if telemetry else 0) or getattr(spec.engine, "model_params", 0)
    if spec.device.backend == "simulated" and spec.device.profile and params:
        return replica_profile_from_device(spec.device.profile, gpus=1, model_params=float(params),
                                           max_batch=spec.max_batch)
    return measured_profile(spec, telemetry, config)


def measured_profile(spec: ExpertSpec, telemetry: ExpertProfile | None, config: CapacityConfig) -> ReplicaProfile:
    """One clock row from the replica's own measurements (see the module docstring)."""
    t = telemetry
    measured = t is not None and t.decode_ms_per_token is not None
    base_ms = t.decode_ms_per_token if measured else config.assumed_decode_ms_per_token
    batches = np.arange(spec.max_batch + 1, dtype=float)
    by_batch = dict(t.decode_ms_per_step_by_batch) if t is not None else {}
    if by_batch:
        keys = sorted(by_batch)
        step_ms = np.interp(np.maximum(batches, 1.0), keys, [by_batch[k] for k in keys])  # ends held flat
    else:
        step_ms = np.full_like(batches, base_ms)
    busy_w = 0.0
    if t is not None and t.busy_power_w is not None:
        busy_w = t.busy_power_w
    elif t is not None and t.j_per_token is not None:
        busy_w = t.j_per_token / (base_ms / 1e3)  # a token every step: power = J/token / s/token
    prefill_ms = t.prefill_ms_per_token if t is not None and t.prefill_ms_per_token is not None else 0.0
    idle_w = spec.device.idle_power_w if spec.device.backend == "cpu" else 0.0
    return ReplicaProfile(
        energy_source=f"measured:{t.energy_source}" if measured else "assumed",
        gpus=1,
        max_batch=spec.max_batch,
        clocks_mhz=np.array([CLOCK_NOT_CONTROLLED]),
        decode_step_s=(step_ms / 1e3)[None, :],
        decode_power_w=np.full((1, len(batches)), busy_w),
        prefill_s_per_token=np.array([prefill_ms / 1e3]),
        # a prompt takes at least one engine step, also where the engine reports no prefill time
        # (synthetic): the planner divides by the chunk step
        prefill_overhead_s=float(step_ms[1]) / 1e3,
        prefill_power_w=np.array([busy_w]),
        idle_power_w=idle_w,
    )
