"""A calibrated power/latency model of a named accelerator, behind the :class:`Device` door.

Used where the real device is absent (CPU-only hosts, cluster simulations): the engine runs its
step on whatever hardware it has, and this device books what the step *would* have cost on the
named GPU. Every joule it reports is modeled and labelled ``modeled:<profile>``.

The model (units in names; ``lf`` is the step's layer fraction, ``P`` the parameters held by
one GPU, ``B`` bytes per parameter, ``b`` the sequences in the step, ``r = f_sm / f_max``)::

    weight_bytes = P * B * wf                                                 # wf: weight_fraction
    seq_bytes    = b * lf * seq_bytes * (P / 1e10) ** seq_bytes_exponent       # KV-cache reads
    flops        = 2 * P * (prefill_tokens + decode_tokens) * lf
    t_mem_s      = (weight_bytes + seq_bytes) / (bandwidth * eta_mem)
    t_compute_s  = flops / (peak * eta_compute * r)
    latency_s    = step_overhead_s + max(t_mem_s, t_compute_s)                 # roofline
    u_mem        = (weight_bytes + seq_bytes) / (latency_s * bandwidth)
    u_compute    = flops / (latency_s * peak)
    power_w      = idle_w + (tdp_w - idle_w) * (1 - exp(-(k_mem * u_mem + k_compute * u_compute * r**gamma)))

Why this shape: decode reads every weight once per step whatever the batch, so it is bound by
memory bandwidth and barely moves with the SM clock, while prefill is matrix-matrix work whose
time scales as 1/clock (Splitwise, Patel et al. 2024; POLCA, Patel et al. 2023). Each decoding
sequence also reads its KV cache every step; requests carry no context length here, so that
traffic is a fitted bytes-per-sequence that grows weakly with model size (GQA models keep KV
small). Power saturates at TDP because the board's power limiter holds it there. Energy per
operation scales with V^2 and DVFS lowers V with the clock, so the compute share of dynamic
power scales as ``r**gamma`` (gamma assumed, see the profile JSON: the data has no clock sweeps).

The numbers live in ``profiles/profiles.json``, written by :mod:`workers.devices.fit_profiles`
from the measurements in ``shared/data/energy``; the JSON records sources, rows and fit errors.
"""

from __future__ import annotations

import json
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from functools import lru_cache
from importlib import resources
from typing import Any

import numpy as np

from wattserve.devices import SimulatedDeviceSpec
from wattserve.errors import DeviceError, InvalidRequest
from wattserve.power import DeviceControl
from wattserve.types import StepWork
from workers.devices.base import Device, DeviceContext

PROFILES_RESOURCE = "profiles/profiles.json"


@dataclass(frozen=True, slots=True)
class DeviceProfile:
    """Datasheet figures of one accelerator plus the efficiency parameters fitted to data.

    Datasheet (cited per profile in the JSON): ``tdp_w`` board power limit (W),
    ``peak_bf16_tflops`` dense BF16 tensor throughput (TFLOP/s), ``mem_bandwidth_gbps`` (GB/s),
    SM clock range (MHz). Assumed: ``idle_w`` (W, a loaded-but-idle GPU; no datasheet gives it)
    and ``clock_power_exponent``. Fitted: the rest (dimensionless unless the name has a unit).
    """

    name: str
    description: str
    tdp_w: float
    idle_w: float
    peak_bf16_tflops: float
    mem_bandwidth_gbps: float
    max_sm_clock_mhz: float
    min_sm_clock_mhz: float
    eta_compute: float  # achieved / peak FLOP rate in compute-bound steps
    eta_mem: float  # achieved / peak bandwidth in memory-bound steps
    seq_bytes: float  # bytes one sequence reads per step (KV cache) with a 10B-param model
    seq_bytes_exponent: float  # how per-sequence bytes grow with parameters per GPU
    step_overhead_s: float  # launch, scheduling and sampling time per step
    power_k_mem: float
    power_k_compute: float
    clock_power_exponent: float = 2.0
    provenance: Mapping[str, Any] = field(default_factory=dict, compare=False, repr=False)

    @property
    def power_label(self) -> str:
        """The profile's name, or where its power is unvalidated, a name that says so."""
        return (self.provenance.get("power") or {}).get("label", self.name)

    @property
    def power_basis(self) -> str:
        """Where the power model comes from, in words (the profile's "power" block)."""
        return (self.provenance.get("power") or {}).get("basis", "")

    def __post_init__(self) -> None:
        if not 0 < self.idle_w < self.tdp_w:
            raise DeviceError(f"profile {self.name}: need 0 < idle_w < tdp_w")
        if not 0 < self.min_sm_clock_mhz <= self.max_sm_clock_mhz:
            raise DeviceError(f"profile {self.name}: need 0 < min_sm_clock_mhz <= max_sm_clock_mhz")
        for attr in ("eta_compute", "eta_mem"):
            if not 0 < getattr(self, attr) <= 1:
                raise DeviceError(f"profile {self.name}: {attr} must be in (0, 1]")

    def clock_ratio(self, sm_clock_mhz):
        """``sm_clock_mhz / max_sm_clock_mhz`` (a float, or an array for an array of clocks);
        None means the maximum clock."""
        if sm_clock_mhz is None:
            return 1.0
        clocks = np.asarray(sm_clock_mhz, dtype=float)
        if np.any(clocks < self.min_sm_clock_mhz) or np.any(clocks > self.max_sm_clock_mhz):
            raise ValueError(
                f"{self.name}: SM clock {sm_clock_mhz} MHz outside "
                f"[{self.min_sm_clock_mhz:g}, {self.max_sm_clock_mhz:g}] MHz"
            )
        return clocks / self.max_sm_clock_mhz if clocks.ndim else float(clocks) / self.max_sm_clock_mhz

    @property
    def min_power_limit_w(self) -> float:
        """Lowest board power limit accepted, in watts. Assumed 0.25 x TDP: NVIDIA's A100 SXM
        accepts 100 W of 400 W and H100 SXM 200 W of 700 W; no datasheet gives the rest."""
        return 0.25 * self.tdp_w


# --- the model, vectorised: every argument may be a float or a numpy array ---------------------


def step_terms(
    profile: DeviceProfile,
    prefill_tokens,
    decode_tokens,
    batch_size,
    layer_fraction,
    model_params,
    bytes_per_param=2.0,
    sm_clock_mhz=None,
    weight_fraction=None,
    *,
    ratio=None,
) -> tuple[Any, Any, Any]:
    """Return ``(latency_s, u_mem, u_compute)`` of one step (see the module docstring).

    ``weight_fraction`` (default: ``layer_fraction``) scales the weight bytes read: with early
    exit in a batch a layer's weights are read if any row runs it, while FLOPs and KV reads
    follow the rows that did. ``ratio`` (``sm_clock_mhz / max_sm_clock_mhz``, already checked)
    replaces ``sm_clock_mhz`` in hot loops such as the cluster simulator's.
    """
    if weight_fraction is None:
        weight_fraction = layer_fraction
    r = profile.clock_ratio(sm_clock_mhz) if ratio is None else ratio
    bandwidth_bps = profile.mem_bandwidth_gbps * 1e9
    peak_flops = profile.peak_bf16_tflops * 1e12
    weight_bytes = np.asarray(model_params, dtype=float) * bytes_per_param * weight_fraction
    seq_bytes = np.asarray(batch_size, dtype=float) * profile.seq_bytes * layer_fraction * (
        np.asarray(model_params, dtype=float) / 1e10) ** profile.seq_bytes_exponent
    moved_bytes = weight_bytes + seq_bytes
    flops = 2.0 * np.asarray(model_params, dtype=float) * (
        np.asarray(prefill_tokens, dtype=float) + decode_tokens
    ) * layer_fraction
    t_mem = moved_bytes / (bandwidth_bps * profile.eta_mem)
    t_compute = flops / (peak_flops * profile.eta_compute * r)
    latency_s = profile.step_overhead_s + np.maximum(t_mem, t_compute)
    return latency_s, moved_bytes / (latency_s * bandwidth_bps), flops / (latency_s * peak_flops)


def power_from_utilisation(profile: DeviceProfile, u_mem, u_compute, sm_clock_mhz=None, *, ratio=None):
    """Board power in watts for the given bandwidth and FLOP utilisations (0..1); ``ratio`` as
    in :func:`step_terms`."""
    r = profile.clock_ratio(sm_clock_mhz) if ratio is None else ratio
    compute = profile.power_k_compute * u_compute * r**profile.clock_power_exponent
    activity = profile.power_k_mem * u_mem + compute
    return profile.idle_w + (profile.tdp_w - profile.idle_w) * (1.0 - np.exp(-activity))


def step_latency_s(
    profile: DeviceProfile,
    work: StepWork,
    model_params: int,
    sm_clock_mhz: float | None = None,
    *,
    bytes_per_param: float = 2.0,
) -> float:
    """Modeled wall time in seconds of one engine step on ``profile`` (default: max clock)."""
    latency, _, _ = step_terms(
        profile, work.prefill_tokens, work.decode_tokens, _sequences(work), work.layer_fraction,
        model_params, bytes_per_param, sm_clock_mhz, work.weight_fraction,
    )
    return float(latency)


def step_power_w(
    profile: DeviceProfile,
    work: StepWork,
    model_params: int,
    sm_clock_mhz: float | None = None,
    *,
    bytes_per_param: float = 2.0,
) -> float:
    """Modeled average board power in watts while the step runs."""
    _, u_mem, u_compute = step_terms(
        profile, work.prefill_tokens, work.decode_tokens, _sequences(work), work.layer_fraction,
        model_params, bytes_per_param, sm_clock_mhz, work.weight_fraction,
    )
    return float(power_from_utilisation(profile, u_mem, u_compute, sm_clock_mhz))


def _sequences(work: StepWork) -> int:
    # An engine that leaves batch_size at 0 still ran one sequence per decode token.
    return work.batch_size or work.decode_tokens or (1 if work.prefill_tokens else 0)


# --- profiles ----------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _profiles_document() -> dict[str, Any]:
    text = resources.files("workers.devices").joinpath(PROFILES_RESOURCE).read_text()
    return json.loads(text)


def available_profiles() -> list[str]:
    """Names accepted by :func:`load_profile`, e.g. ``['a100', 'b200', 'h100', 'orin']``."""
    return sorted(_profiles_document()["profiles"])


def profile_from_entry(name: str, entry: Mapping[str, Any]) -> DeviceProfile:
    """Build a profile from one ``profiles`` entry of the JSON document."""
    sheet, assumed, fitted = entry["datasheet"], entry["assumed"], entry["fitted"]
    return DeviceProfile(
        name=name,
        description=entry["description"],
        tdp_w=sheet["tdp_w"],
        idle_w=assumed["idle_w"],
        peak_bf16_tflops=sheet["peak_bf16_tflops"],
        mem_bandwidth_gbps=sheet["mem_bandwidth_gbps"],
        max_sm_clock_mhz=sheet["max_sm_clock_mhz"],
        min_sm_clock_mhz=sheet["min_sm_clock_mhz"],
        eta_compute=fitted["eta_compute"],
        eta_mem=fitted["eta_mem"],
        seq_bytes=fitted["seq_bytes"],
        seq_bytes_exponent=fitted["seq_bytes_exponent"],
        step_overhead_s=fitted["step_overhead_s"],
        power_k_mem=fitted["power_k_mem"],
        power_k_compute=fitted["power_k_compute"],
        clock_power_exponent=assumed["clock_power_exponent"],
        provenance=entry,
    )


def load_profile(name: str) -> DeviceProfile:
    """The named profile from the packaged JSON; unknown names raise :class:`DeviceError`."""
    profiles = _profiles_document()["profiles"]
    key = name.strip().lower()
    if key not in profiles:
        raise DeviceError(
            f"unknown simulated device profile {name!r}; available: {', '.join(available_profiles())}"
        )
    return profile_from_entry(key, profiles[key])


def open_from_spec(spec: SimulatedDeviceSpec, context: DeviceContext) -> SimulatedDevice:
    """The ``simulated`` backend's factory (``workers.devices.BACKENDS``)."""
    if context.model_params <= 0:
        raise DeviceError(
            f"device simulated:{spec.profile} needs the model's parameter count "
            "(open_device(..., model_params=N)) to model step latency and energy"
        )
    return SimulatedDevice(load_profile(spec.profile), context.model_params, clock=context.clock,
                           actuation_delay_s=spec.actuation_delay_s)


# --- the device --------------------------------------------------------------------------------


class SimulatedDevice(Device):
    """Books modeled joules for each step and idle power between steps, and obeys clock locks and
    power limits the way the modeled board would.

    ``energy_j()`` = ``idle_w`` x (wall time outside steps, on ``clock``) + the sum over steps of
    modeled step power x modeled step latency. The wall time the host spends inside a step is
    not charged: the step's cost is what it would have cost on the profiled device.

    Control: a clock lock is a ceiling on the SM clock; a power limit below the step's modeled
    power makes the board's limiter lower the clock until the step fits (bisection on the model).
    Where even the lowest clock does not fit (memory-bound decode barely responds to the SM
    clock), power is clipped at the limit and latency is that of the lowest clock: the limiter
    would also slow memory, which this model does not represent. Commands take effect
    ``actuation_delay_s`` after they are issued (on ``clock``), as in-band NVML commands do after
    a short delay and out-of-band (BMC) caps after up to tens of seconds.
    """

    models_step_work = True

    def __init__(
        self,
        profile: DeviceProfile | str,
        model_params: int,
        clock: Callable[[], float] = time.monotonic,
        *,
        bytes_per_param: float = 2.0,
        sm_clock_mhz: float | None = None,
        actuation_delay_s: float = 0.0,
    ) -> None:
        self.profile = load_profile(profile) if isinstance(profile, str) else profile
        if model_params < 0:
            raise DeviceError(f"model_params must be >= 0, got {model_params}")
        if actuation_delay_s < 0:
            raise DeviceError(f"actuation_delay_s must be >= 0, got {actuation_delay_s}")
        self.profile.clock_ratio(sm_clock_mhz)  # reject an impossible clock at open
        self.model_params = int(model_params)
        self.bytes_per_param = bytes_per_param
        self.actuation_delay_s = actuation_delay_s
        self._base_clock_mhz = sm_clock_mhz if sm_clock_mhz is not None else self.profile.max_sm_clock_mhz
        self._lock_mhz: float | None = None
        self._limit_w: float = self.profile.tdp_w
        self._pending: list[tuple[float, str, float | None]] = []  # (effective at, what, value)
        self._control_lock = threading.Lock()
        self._clock = clock
        self._idle_since: float | None = clock()  # None while a step runs
        self._idle_j = 0.0
        self._steps_j = 0.0
        self._last_step_w = self.profile.idle_w
        self._last_step_clock_mhz: float | None = None  # the limiter's clock in the last step
        self.last_step_latency_s = 0.0  # modeled; engines may use it to pace a simulation

    @property
    def name(self) -> str:
        power = self.profile.provenance.get("power") or {}
        caveat = "" if power.get("validated", True) else f" [power unvalidated: {power.get('basis', '')}]"
        return f"simulated {self.profile.description}{caveat}"

    @property
    def energy_source(self) -> str:
        # A profile whose power is not validated says so where every joule is labelled (Orin:
        # ``modeled:orin-unvalidated-power-from-a100-fit``, see the profile's "power" block).
        return f"modeled:{self.profile.power_label}"

    # -- the model at the device's current settings ---------------------------------------------
    def _ceiling_mhz(self) -> float:
        self._settle()
        return self._base_clock_mhz if self._lock_mhz is None else min(self._base_clock_mhz, self._lock_mhz)

    def step_clock_mhz(self, work: StepWork) -> float:
        """The SM clock ``work`` runs at: the lock's ceiling, lowered by the power limiter."""
        ceiling = self._ceiling_mhz()
        if self._limit_w >= self.profile.tdp_w or not work.tokens or self._power(work, ceiling) <= self._limit_w:
            return ceiling
        lo, hi = self.profile.min_sm_clock_mhz, ceiling
        if self._power(work, lo) > self._limit_w:
            return lo
        for _ in range(24):  # power rises with the clock: bisect to within ~0.1 MHz
            mid = 0.5 * (lo + hi)
            lo, hi = (mid, hi) if self._power(work, mid) <= self._limit_w else (lo, mid)
        return lo

    def _power(self, work: StepWork, clock_mhz: float) -> float:
        return step_power_w(self.profile, work, self.model_params, clock_mhz, bytes_per_param=self.bytes_per_param)

    def step_latency_s(self, work: StepWork) -> float:
        """Modeled seconds of ``work`` on this device at its current clock lock and power limit."""
        return step_latency_s(self.profile, work, self.model_params, self.step_clock_mhz(work),
                              bytes_per_param=self.bytes_per_param)

    def step_power_w(self, work: StepWork) -> float:
        """Modeled watts while ``work`` runs on this device at its current clock lock and power limit."""
        return min(self._limit_w, self._power(work, self.step_clock_mhz(work)))

    def cap_slowdown_s(self, work: StepWork) -> tuple[float, float]:
        """Modeled extra (prefill, decode) seconds of ``work`` at the current caps versus uncapped.

        Prefill and decode are modeled as separate steps (prompt tokens alone; the batch's
        decode tokens alone), so prefill shows its ~1/f slowdown and decode stays nearly flat.
        """
        if self._ceiling_mhz() >= self._base_clock_mhz and self._limit_w >= self.profile.tdp_w:
            return 0.0, 0.0  # uncapped: the common case, kept cheap (called every engine step)
        parts = (StepWork(prefill_tokens=work.prefill_tokens, layer_fraction=work.layer_fraction),
                 StepWork(decode_tokens=work.decode_tokens, batch_size=work.batch_size,
                          layer_fraction=work.layer_fraction))
        out = []
        for part in parts:
            if not part.tokens:
                out.append(0.0)
                continue
            capped = self.step_latency_s(part)
            free = step_latency_s(self.profile, part, self.model_params, self._base_clock_mhz,
                                  bytes_per_param=self.bytes_per_param)
            out.append(max(0.0, capped - free))
        return out[0], out[1]

    # -- the step hooks and readings ------------------------------------------------------------
    def begin_step(self) -> None:
        self._accrue_idle()
        self._idle_since = None

    def end_step(self, work: StepWork) -> None:
        if self._idle_since is not None:
            # end_step without begin_step: charge idle up to now so the counter stays exact.
            self._accrue_idle()
        latency_s = self.step_latency_s(work) if work.tokens else 0.0
        power_w = self.step_power_w(work) if work.tokens else self.profile.idle_w
        self._steps_j += power_w * latency_s
        self._last_step_w = power_w
        self._last_step_clock_mhz = self.step_clock_mhz(work) if work.tokens else None
        self.last_step_latency_s = latency_s
        self._idle_since = self._clock()

    def energy_j(self) -> float:
        idle_j = self._idle_j
        if self._idle_since is not None:
            idle_j += self.profile.idle_w * max(0.0, self._clock() - self._idle_since)
        return idle_j + self._steps_j

    def power_w(self) -> float:
        """The last step's modeled power while a step runs; ``idle_w`` between steps."""
        return self._last_step_w if self._idle_since is None else self.profile.idle_w

    def power_limit_w(self) -> float | None:
        self._settle()
        return self._limit_w

    def default_power_limit_w(self) -> float | None:
        return self.profile.tdp_w

    def power_limit_range_w(self) -> tuple[float, float] | None:
        return self.profile.min_power_limit_w, self.profile.tdp_w

    def sm_clock_mhz(self) -> float | None:
        """The clock ceiling in effect, lowered to the limiter's clock if the last step needed it."""
        ceiling = self._ceiling_mhz()
        if self._last_step_clock_mhz is not None and self._limit_w < self.profile.tdp_w:
            return min(ceiling, self._last_step_clock_mhz)
        return ceiling

    def max_sm_clock_mhz(self) -> float | None:
        return self.profile.max_sm_clock_mhz

    def min_sm_clock_mhz(self) -> float | None:
        return self.profile.min_sm_clock_mhz

    # -- control --------------------------------------------------------------------------------
    def control(self) -> DeviceControl:
        return DeviceControl(can_lock_sm_clock=True, can_set_power_limit=True)

    def locked_sm_clock_mhz(self) -> float | None:
        self._settle()
        return self._lock_mhz

    def lock_sm_clock_mhz(self, max_mhz: float) -> None:
        try:
            self.profile.clock_ratio(max_mhz)
        except ValueError as exc:
            raise InvalidRequest(str(exc)) from None
        self._command("lock", float(max_mhz))

    def unlock_sm_clock(self) -> None:
        self._command("lock", None)

    def set_power_limit_w(self, limit_w: float) -> None:
        lo, hi = self.profile.min_power_limit_w, self.profile.tdp_w
        if not lo <= limit_w <= hi:
            raise InvalidRequest(f"{self.profile.name}: power limit {limit_w:g} W outside [{lo:g}, {hi:g}] W")
        self._command("limit", float(limit_w))

    def reset_power_limit(self) -> None:
        self._command("limit", self.profile.tdp_w)

    def _command(self, what: str, value: float | None) -> None:
        with self._control_lock:
            self._pending.append((self._clock() + self.actuation_delay_s, what, value))
        self._settle()

    def _settle(self) -> None:
        """Apply commands whose actuation delay has passed, in the order they were issued."""
        if not self._pending:
            return
        now = self._clock()
        with self._control_lock:
            due = [c for c in self._pending if c[0] <= now]
            self._pending = [c for c in self._pending if c[0] > now]
        for _, what, value in due:
            if what == "lock":
                self._lock_mhz = value
            else:
                self._limit_w = float(value)
                self._last_step_clock_mhz = None

    def _accrue_idle(self) -> None:
        now = self._clock()
        if self._idle_since is not None:
            self._idle_j += self.profile.idle_w * max(0.0, now - self._idle_since)
        self._idle_since = now
