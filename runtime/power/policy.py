"""The POLCA power policy as pure code: measured row power in, a cap level and per-GPU clock
targets out. No Ray, no I/O, no clock of its own (callers pass ``now_s``): the live governor
(``runtime/power/governor.py``) and the cluster simulator (``runtime/power/sim.py``) run this
same class, and tests drive it with plain numbers.

Rules (Patel et al., "POLCA", ASPLOS'24; thresholds configurable):

- Row power ``p`` is compared with the provisioned budget ``P``. At ``p >= T1 = 0.80 P`` the
  low-priority GPUs' SM clocks are locked (1275 MHz on an A100); at ``p >= T2 = 0.89 P`` the
  low-priority ones lower (1110 MHz) and high-priority ones moderately (1305 MHz); at
  ``p >= P`` the power brake puts every GPU at its lowest clock (and lowest power limit).
- Escalation is immediate. Release is one level at a time, only after ``p`` has stayed at least
  ``release_margin_fraction * P`` (5%) below the threshold that capped for ``dwell_s`` seconds,
  and never within ``settle_s`` of the last change (actuation takes time to show in power).
- Lost telemetry fails safe: while the caller says telemetry is incomplete, caps never loosen
  (they may still tighten on what is known), and an alert is raised once.
- Clock targets are given for an A100 (max 1410 MHz) and scaled by each GPU's own maximum.

Presets are the paper's policy and the baselines it is compared with: ``polca``; ``lp-only``
(only low-priority GPUs are ever capped, until the brake); ``all-one-threshold`` (one threshold,
T1, at which every GPU is locked to the same clock); ``none`` (no capping: only the brake, the
datacenter's last line of defence); ``forecast`` (lp-only's levels and clocks by default, but T1
starts where the row's power plus a learned high quantile of its rise over the actuation horizon
reaches a guard under P, T2 where that forecast passes P by far or T1 has not held the reading
under the guard for ``forecast_t2_sustain_s``; see ``runtime/power/forecast.py``: it caps only
when power could reach the budget before a later cap would act).
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

from pydantic import Field, model_validator

from wattserve.errors import InvalidRequest
from wattserve.power import CapLevel, EventKind
from wattserve.specs import Strict

from .forecast import RiseStatistics

Preset = Literal["polca", "lp-only", "all-one-threshold", "none", "forecast"]
PRESETS: tuple[str, ...] = ("polca", "lp-only", "all-one-threshold", "none", "forecast")
LOW, HIGH = "low", "high"
MIN_CLOCK = "min"  # level table marker: the GPU's lowest clock


class PolicyConfig(Strict):
    """Thresholds, hysteresis and clock targets of the power policy."""

    preset: Preset = Field(
        default="polca",
        description="polca: priority-aware two thresholds + brake; lp-only: cap only low-priority GPUs; "
        "all-one-threshold: lock every GPU at T1; none: no capping, only the brake at the budget; "
        "forecast: lp-only's levels, entered when power + its learned rise over the horizon reaches the guard.",
    )
    t1_fraction: float = Field(default=0.80, gt=0, lt=1, description="T1 as a fraction of the budget P.")
    t2_fraction: float = Field(default=0.89, gt=0, lt=1, description="T2 as a fraction of P (above T1).")
    brake_fraction: float = Field(default=1.0, gt=0, le=2, description="Power brake threshold as a fraction of P.")
    release_margin_fraction: float = Field(
        default=0.05, ge=0, lt=1, description="Release only this far (fraction of P) below the threshold that capped."
    )
    dwell_s: float = Field(default=10.0, ge=0, description="...and only after staying there this long (seconds).")
    settle_s: float = Field(
        default=2.0, ge=0, description="No release within this many seconds of a level change (actuation delay)."
    )
    reference_max_sm_clock_mhz: float = Field(
        default=1410.0, gt=0, description="Max SM clock of the GPU the clock targets below are given for (A100)."
    )
    lp_t1_sm_clock_mhz: float = Field(default=1275.0, gt=0, description="Low-priority clock above T1 (A100 MHz).")
    lp_t2_sm_clock_mhz: float = Field(default=1110.0, gt=0, description="Low-priority clock above T2 (A100 MHz).")
    hp_t2_sm_clock_mhz: float = Field(default=1305.0, gt=0, description="High-priority clock above T2 (A100 MHz).")
    single_sm_clock_mhz: float = Field(
        default=1110.0, gt=0, description="all-one-threshold: the clock every GPU gets above T1 (A100 MHz)."
    )
    brake_power_limit: bool = Field(
        default=True, description="The brake also sets each GPU's lowest power limit, not only its lowest clock."
    )
    forecast_horizon_s: float = Field(
        default=3.0, gt=0, description="forecast: how far ahead a decision must look, in seconds: the telemetry "
        "interval plus the actuation delay (a cap not set now acts this late at the earliest).",
    )
    forecast_quantile: float = Field(
        default=0.999, gt=0, le=1, description="forecast: quantile of the learned power rises over the horizon used "
        "as the worst rise to expect.",
    )
    forecast_window_samples: int = Field(
        default=1800, ge=1, description="forecast: rises remembered (one per reading; 1800 = 1 h at 2 s).",
    )
    forecast_min_samples: int = Field(
        default=30, ge=1, description="forecast: rises needed before the learned quantile replaces the prior, "
        "and pooled (the reading's band, then its neighbours outwards) for each forecast.",
    )
    forecast_prior_rise_fraction: float = Field(
        default=0.13, ge=0, lt=1, description="forecast: rise assumed (fraction of P) until enough are learned; "
        "0.13 with the 0.93 guard caps at 0.80 P like POLCA's T1.",
    )
    forecast_cap_high_priority: bool = Field(
        default=False, description="forecast: T2 also locks high-priority GPUs (POLCA's table); false: only "
        "low-priority GPUs are capped before the brake (lp-only's table).",
    )
    forecast_band_fraction: float = Field(
        default=0.05, gt=0, le=1, description="forecast: rises are learned per band of the power they started from, "
        "this wide (fraction of P); a band with too few rises is pooled with its neighbours.",
    )
    forecast_guard_fraction: float = Field(
        default=0.93, gt=0, le=2, description="forecast: enter T1 when power + expected rise reaches this fraction "
        "of P (under the brake: room for the quantile's misses and for a cap's slow bite).",
    )
    forecast_t2_step_fraction: float = Field(
        default=0.20, ge=0, lt=1, description="forecast: enter T2 when the forecast exceeds the guard by this "
        "fraction of P more (0.20: only when even the brake line would be crossed by far).",
    )
    forecast_t2_sustain_s: float | None = Field(
        default=60.0, gt=0, description="forecast: also enter T2 when T1 has not brought the reading itself under "
        "the guard for this long (seconds; a load above the guard for longer than a burst); null: never.",
    )
    forecast_cap_saving_fraction: float = Field(
        default=0.05, ge=0, lt=1, description="forecast: power (fraction of P) a level is assumed to hold back: "
        "release only if the forecast plus this stays under the guard by the release margin.",
    )

    @model_validator(mode="after")
    def _ordered(self) -> PolicyConfig:
        if not self.t1_fraction < self.t2_fraction < self.brake_fraction:
            raise ValueError(
                f"need t1_fraction < t2_fraction < brake_fraction (got {self.t1_fraction}, "
                f"{self.t2_fraction}, {self.brake_fraction})"
            )
        for name in ("lp_t1_sm_clock_mhz", "lp_t2_sm_clock_mhz", "hp_t2_sm_clock_mhz", "single_sm_clock_mhz"):
            if getattr(self, name) > self.reference_max_sm_clock_mhz:
                raise ValueError(f"{name} is above reference_max_sm_clock_mhz ({self.reference_max_sm_clock_mhz})")
        return self

    def levels(self) -> dict[CapLevel, dict[str, float | str | None]]:
        """Per enabled level, the clock (reference MHz, ``"min"`` or None) per priority class."""
        brake = {CapLevel.BRAKE: {LOW: MIN_CLOCK, HIGH: MIN_CLOCK}}
        if self.preset == "none":
            return brake
        if self.preset == "all-one-threshold":
            return {CapLevel.T1: {LOW: self.single_sm_clock_mhz, HIGH: self.single_sm_clock_mhz}, **brake}
        hp_caps = self.preset == "polca" or (self.preset == "forecast" and self.forecast_cap_high_priority)
        hp_t2 = self.hp_t2_sm_clock_mhz if hp_caps else None
        return {
            CapLevel.T1: {LOW: self.lp_t1_sm_clock_mhz, HIGH: None},
            CapLevel.T2: {LOW: self.lp_t2_sm_clock_mhz, HIGH: hp_t2},
            **brake,
        }

    def fraction(self, level: CapLevel) -> float:
        """The threshold of ``level`` as a fraction of P (forecast: what power + rise is held to)."""
        if self.preset == "forecast" and level != CapLevel.BRAKE:
            step = self.forecast_t2_step_fraction if level == CapLevel.T2 else 0.0
            return self.forecast_guard_fraction + step
        return {CapLevel.T1: self.t1_fraction, CapLevel.T2: self.t2_fraction,
                CapLevel.BRAKE: self.brake_fraction}[level]


def classify_priority(priority_class: str, low_requests: int, other_requests: int) -> str:
    """A GPU is low-priority when its expert is configured so, or when every request it started
    in the governor's window was LOW. A GPU with no recent requests keeps its configured class."""
    if priority_class == LOW or (low_requests > 0 and other_requests == 0):
        return LOW
    return HIGH


@dataclass(slots=True, frozen=True)
class ClockTarget:
    """What the policy wants for one GPU: an SM clock ceiling (None: unlocked) and a power
    limit (None: the default)."""

    sm_clock_mhz: float | None
    power_limit_w: float | None = None


@dataclass(slots=True)
class Decision:
    """The outcome of one :meth:`PowerPolicy.update`."""

    level: CapLevel
    previous: CapLevel
    events: list[tuple[EventKind, str]] = field(default_factory=list)

    @property
    def changed(self) -> bool:
        return self.level != self.previous


class PowerPolicy:
    """One row's policy state. Call :meth:`update` at every telemetry interval."""

    def __init__(self, config: PolicyConfig, provisioned_power_w: float | None, *, row: str = "row") -> None:
        self.config = config
        self.row = row
        self.provisioned_power_w = _check_budget(provisioned_power_w)
        self.level = CapLevel.NONE
        self._levels = config.levels()
        self._changed_s: float | None = None  # when the level last changed
        self._below_since: float | None = None  # release condition held since
        self._lost_since: float | None = None  # telemetry incomplete since
        self._last_s: float | None = None
        self.capped_s = 0.0  # time spent above NONE
        self.braked_s = 0.0
        self.rises: RiseStatistics | None = None  # forecast: the learned rises over the horizon
        self._reading_w: float | None = None  # the reading being judged (its band picks the rises)
        self._over_guard_since: float | None = None  # forecast: capped at T1 and still >= the guard since
        self._new_rises()

    def _new_rises(self) -> None:
        cfg = self.config
        if cfg.preset == "forecast" and self.provisioned_power_w is not None:
            self.rises = RiseStatistics(cfg.forecast_horizon_s, cfg.forecast_window_samples, cfg.forecast_min_samples,
                                        cfg.forecast_band_fraction * self.provisioned_power_w)

    # -- inputs -----------------------------------------------------------------------------------
    def set_budget(self, provisioned_power_w: float | None) -> None:
        """Change P at run time (operators). The next :meth:`update` applies it."""
        old = self.provisioned_power_w
        self.provisioned_power_w = _check_budget(provisioned_power_w)
        self._below_since = None
        if self.provisioned_power_w != old:  # the bands are fractions of P: learn afresh
            self.rises = None
            self._new_rises()

    def threshold_w(self, level: CapLevel) -> float | None:
        """The power at which ``level`` starts, in watts (None without a budget). For the
        forecast preset it moves: the guard minus the rise expected over the horizon."""
        if self.provisioned_power_w is None:
            return None
        watts = self.config.fraction(level) * self.provisioned_power_w
        if self.rises is not None and level != CapLevel.BRAKE:
            watts -= self.expected_rise_w()
        return watts

    def expected_rise_w(self) -> float:
        """forecast: the rise (W) power may make before a cap decided at the next reading acts:
        the learned quantile, or the prior until enough rises are known. Never negative."""
        reached = None
        if self.rises is not None and self._reading_w is not None:
            reached = self.rises.forecast_w(self.config.forecast_quantile, self._reading_w)
        if reached is None:
            return self.config.forecast_prior_rise_fraction * (self.provisioned_power_w or 0.0)
        return max(0.0, reached - self._reading_w)

    def update(self, now_s: float, row_power_w: float | None, telemetry_ok: bool = True) -> Decision:
        """Feed the row's power at ``now_s`` (seconds, any monotonic origin) and get the level.

        ``row_power_w`` is the sum of the latest readings (None: nothing known at all);
        ``telemetry_ok`` is False when some GPU's reading is missing or stale.
        """
        self._account(now_s)
        decision = Decision(level=self.level, previous=self.level)
        self._watch_telemetry(now_s, row_power_w, telemetry_ok, decision)
        if row_power_w is not None:
            self._reading_w = row_power_w
        if self.rises is not None:  # learn from complete readings only; a gap breaks the series
            if telemetry_ok and row_power_w is not None:
                self.rises.observe(now_s, row_power_w, int(self.level))
            else:
                self.rises.forget_readings()
        if self.provisioned_power_w is None:
            if self.level != CapLevel.NONE:  # monitor only: a removed budget releases everything
                self._move(now_s, CapLevel.NONE, decision, "no provisioned budget: monitoring only")
            return decision
        if row_power_w is None:
            return decision
        wanted = self._level_for(row_power_w)
        if self.rises is not None:
            wanted = max(wanted, self._sustained_level(now_s, row_power_w))
        if wanted > self.level:
            self._move(now_s, wanted, decision, self._why_up(row_power_w, wanted))
        elif self.level > CapLevel.NONE and telemetry_ok:
            self._maybe_release(now_s, row_power_w, decision)
        else:
            self._below_since = None
        return decision

    # -- outputs ----------------------------------------------------------------------------------
    def target(self, priority: str, max_sm_clock_mhz: float, min_sm_clock_mhz: float,
               min_power_limit_w: float | None = None, level: CapLevel | None = None) -> ClockTarget:
        """The clock ceiling for a GPU of ``priority`` whose clocks span the given range (MHz)."""
        level = self.level if level is None else level
        wanted = self._levels.get(level, {}).get(priority)
        if wanted is None:
            return ClockTarget(None)
        if wanted == MIN_CLOCK:
            limit = min_power_limit_w if self.config.brake_power_limit else None
            return ClockTarget(float(min_sm_clock_mhz), limit)
        scaled = float(wanted) * max_sm_clock_mhz / self.config.reference_max_sm_clock_mhz
        return ClockTarget(max(float(min_sm_clock_mhz), min(float(max_sm_clock_mhz), round(scaled))))

    # -- internals --------------------------------------------------------------------------------
    def _level_for(self, power_w: float) -> CapLevel:
        wanted = CapLevel.NONE
        for level in self._levels:
            if power_w >= self.threshold_w(level):
                wanted = max(wanted, level)
        return wanted

    def _sustained_level(self, now_s: float, power_w: float) -> CapLevel:
        """forecast: T1 that has not brought the reading itself under the guard for
        ``forecast_t2_sustain_s`` is not enough (a steady load, not a burst): go to T2."""
        sustain_s = self.config.forecast_t2_sustain_s
        if sustain_s is None or self.level != CapLevel.T1 or power_w < self.config.forecast_guard_fraction * self.provisioned_power_w:
            self._over_guard_since = None
            return CapLevel.NONE
        if self._over_guard_since is None:
            self._over_guard_since = now_s
        return CapLevel.T2 if now_s - self._over_guard_since >= sustain_s else CapLevel.NONE

    def _maybe_release(self, now_s: float, power_w: float, decision: Decision) -> None:
        line = CapLevel.T1 if self.rises is not None and self.level == CapLevel.T2 else self.level
        release_w = self.threshold_w(line) - self.config.release_margin_fraction * self.provisioned_power_w
        if self.rises is not None and self.level < CapLevel.BRAKE:
            # the reading is held down by the cap itself: releasing gives that power back
            release_w -= self.config.forecast_cap_saving_fraction * self.provisioned_power_w
        settled = self._changed_s is None or now_s - self._changed_s >= self.config.settle_s
        if power_w > release_w or not settled:
            self._below_since = None
            return
        if self._below_since is None:
            self._below_since = now_s
        if now_s - self._below_since < self.config.dwell_s:
            return
        lower = max((lv for lv in self._levels if lv < self.level), default=CapLevel.NONE)
        saving = (f" - {self.config.forecast_cap_saving_fraction:.0%} of P assumed saving"
                  if self.rises is not None and self.level < CapLevel.BRAKE else "")
        reason = (f"row {self.row} at {power_w:.0f} W stayed <= {release_w:.0f} W ({self.level.name} threshold "
                  f"- {self.config.release_margin_fraction:.0%} of P{saving}) for {self.config.dwell_s:g} s")
        self._move(now_s, lower, decision, reason)

    def _move(self, now_s: float, level: CapLevel, decision: Decision, reason: str) -> None:
        previous = self.level
        self.level = decision.level = level
        self._changed_s = now_s
        self._below_since = None
        if level == CapLevel.BRAKE:
            decision.events.append((EventKind.BRAKE, reason))
        elif previous == CapLevel.BRAKE:
            decision.events.append((EventKind.BRAKE_RELEASE, reason))
        decision.events.append((EventKind.LEVEL, f"{previous.name} -> {level.name}: {reason}"))

    def _why_up(self, power_w: float, level: CapLevel) -> str:
        p = self.provisioned_power_w
        if self.rises is not None and level != CapLevel.BRAKE:
            rise, n = self.expected_rise_w(), self.rises.samples
            source = (f"q{self.config.forecast_quantile:g} of {n} rises" if n >= self.rises.min_samples
                      else f"prior, {n} rises known")
            return (f"row {self.row} at {power_w:.0f} W + expected rise {rise:.0f} W over "
                    f"{self.config.forecast_horizon_s:g} s ({source}) = {(power_w + rise) / p:.2f} P >= {level.name} "
                    f"{self.config.fraction(level):.2f} P (P = {p:.0f} W)")
        return (f"row {self.row} at {power_w:.0f} W = {power_w / p:.2f} P >= {level.name} "
                f"{self.config.fraction(level):.2f} P (P = {p:.0f} W)")

    def _watch_telemetry(self, now_s: float, power_w: float | None, ok: bool, decision: Decision) -> None:
        if not ok or power_w is None:
            if self._lost_since is None:
                self._lost_since = now_s
                decision.events.append((EventKind.ALERT, f"row {self.row}: telemetry incomplete; caps held "
                                                         f"at {self.level.name} until it returns"))
            return
        if self._lost_since is not None:
            decision.events.append((EventKind.RECOVERED, f"row {self.row}: telemetry complete again after "
                                                         f"{now_s - self._lost_since:.1f} s"))
            self._lost_since = None

    def _account(self, now_s: float) -> None:
        if self._last_s is not None and now_s > self._last_s:
            dt = now_s - self._last_s
            if self.level > CapLevel.NONE:
                self.capped_s += dt
            if self.level == CapLevel.BRAKE:
                self.braked_s += dt
        self._last_s = now_s


def _check_budget(watts: float | None) -> float | None:
    if watts is not None and not watts > 0:
        raise InvalidRequest(f"provisioned power must be > 0 W (got {watts})")
    return watts
