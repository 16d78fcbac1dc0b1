"""Calibrated early-exit operating points: the thresholds file, and picking a point per request.

``wattserve exits calibrate`` writes one JSON file per expert holding the exit layout it was
calibrated for, the criterion's vocabulary shortlist, a fingerprint of the model (and of the
adapters, if any) and several operating points: per-exit thresholds for a target average depth,
with the depth, compute and agreement they achieved on the calibration text. The engine loads
the file, refuses one made for another model or layout, and gives each request the most
accurate point its compute or energy budget affords. No torch here: plain values.
"""

from __future__ import annotations

import json
import math
from dataclasses import asdict, dataclass, field
from pathlib import Path

from wattserve.errors import ExitCalibrationError

FORMAT = "wattserve-exits/1"
FULL = "full"  # the name reported when a request ran at full depth


@dataclass(frozen=True, slots=True)
class ModelFingerprint:
    """Enough of a model's identity to refuse thresholds calibrated on another one."""

    model_type: str
    num_layers: int  # decoder layers loaded (max_exit_layer when set)
    hidden_size: int
    vocab_size: int
    head_checksum: float  # sum of the first LM-head rows, rounded

    def matches(self, other: ModelFingerprint) -> bool:
        same = (self.model_type, self.num_layers, self.hidden_size, self.vocab_size) == (
            other.model_type, other.num_layers, other.hidden_size, other.vocab_size)
        return same and math.isclose(self.head_checksum, other.head_checksum, rel_tol=1e-3, abs_tol=1e-3)


@dataclass(frozen=True, slots=True)
class OperatingPoint:
    """Per-exit thresholds for one target average depth, and what they achieved when calibrated."""

    name: str
    thresholds: tuple[float, ...]  # one per exit; the last is +inf (the last exit always fires)
    target_layers: float  # the requested average depth (decoder layers per token)
    avg_layers: float  # achieved on the calibration tokens
    compute_fraction: float  # effective share of full-depth compute, K/V propagation included
    agreement: float | None  # calibration tokens whose exit token equals the full model's
    exit_fractions: tuple[float, ...]  # share of calibration tokens leaving at each exit
    lam: float  # DeeR's lambda: target exit shares proportional to lambda**k


@dataclass(slots=True)
class ExitProfile:
    """The contents of a thresholds file (see the module docstring)."""

    fingerprint: ModelFingerprint
    criterion: str
    exit_every: int
    min_exit_layer: int | None
    exits: tuple[int, ...]
    kv_share: float  # K/V projections' share of a decoder layer's weights
    shortlist: tuple[int, ...]
    adapters_sha256: str | None
    points: list[OperatingPoint]
    calibration: dict = field(default_factory=dict)  # data file, token counts, when

    # -- files ---------------------------------------------------------------------------------
    def save(self, path: str | Path) -> Path:
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"format": FORMAT, **asdict(self)}
        doc["points"] = sorted(doc["points"], key=lambda p: p["avg_layers"])
        path.write_text(json.dumps(doc, indent=1) + "\n")  # thresholds may be inf: Python's JSON dialect
        return path

    @classmethod
    def load(cls, path: str | Path) -> ExitProfile:
        path = Path(path).expanduser()
        try:
            doc = json.loads(path.read_text())
        except OSError as exc:
            raise ExitCalibrationError(
                f"{path}: cannot read the early-exit thresholds ({exc.strerror}); run "
                "`wattserve exits calibrate` for this expert or fix thresholds_path"
            ) from None
        except json.JSONDecodeError as exc:
            raise ExitCalibrationError(f"{path}: not a thresholds file ({exc})") from None
        if not isinstance(doc, dict) or doc.get("format") != FORMAT:
            raise ExitCalibrationError(f"{path}: not a {FORMAT} thresholds file; recalibrate")
        try:
            return cls(
                fingerprint=ModelFingerprint(**doc["fingerprint"]),
                criterion=doc["criterion"],
                exit_every=int(doc["exit_every"]),
                min_exit_layer=doc["min_exit_layer"],
                exits=tuple(doc["exits"]),
                kv_share=float(doc["kv_share"]),
                shortlist=tuple(doc["shortlist"]),
                adapters_sha256=doc["adapters_sha256"],
                points=[_point(p) for p in doc["points"]],
                calibration=doc.get("calibration", {}),
            )
        except (KeyError, TypeError, ValueError) as exc:
            raise ExitCalibrationError(f"{path}: malformed thresholds file ({exc!r}); recalibrate") from None

    # -- checks --------------------------------------------------------------------------------
    def check(
        self, fingerprint: ModelFingerprint, exits: tuple[int, ...], criterion: str, adapters_sha256: str | None,
        source: str = "thresholds file",
    ) -> None:
        """Raise :class:`ExitCalibrationError` unless this file fits the loaded expert."""
        problems = []
        if not self.fingerprint.matches(fingerprint):
            problems.append(f"it was calibrated on another model ({self.fingerprint} vs {fingerprint})")
        if tuple(self.exits) != tuple(exits):
            problems.append(f"its exits are after layers {list(self.exits)}, the expert's {list(exits)}")
        if self.criterion != criterion:
            problems.append(f"its criterion is {self.criterion!r}, the expert's {criterion!r}")
        if self.adapters_sha256 != adapters_sha256:
            have = "adapters" if adapters_sha256 else "no adapters"
            made = "other adapters" if self.adapters_sha256 else "no adapters"
            problems.append(f"it was calibrated with {made} but the expert loads {have}")
        if problems:
            raise ExitCalibrationError(
                f"{source} does not fit this expert: {'; '.join(problems)}. Run `wattserve exits "
                "calibrate` with the expert's current early_exit settings."
            )


def _point(doc: dict) -> OperatingPoint:
    return OperatingPoint(
        name=str(doc["name"]),
        thresholds=tuple(float(t) for t in doc["thresholds"]),
        target_layers=float(doc["target_layers"]),
        avg_layers=float(doc["avg_layers"]),
        compute_fraction=float(doc["compute_fraction"]),
        agreement=None if doc.get("agreement") is None else float(doc["agreement"]),
        exit_fractions=tuple(float(x) for x in doc["exit_fractions"]),
        lam=float(doc["lam"]),
    )


def effective_fraction(depth: float, num_layers: int, kv_share: float) -> float:
    """Share of full-depth decoder compute for a token that ran ``depth`` layers: the layers
    it ran, plus the K/V projections state propagation still runs for the skipped ones."""
    return (depth + kv_share * (num_layers - depth)) / num_layers


@dataclass(frozen=True, slots=True)
class EnergyRates:
    """The expert's measured joules per layer-token (one token through one decoder layer)."""

    prefill_j: float | None = None
    decode_j: float | None = None


def per_layer_j(decode_j_per_layer_token: float, num_layers: int, head_layers: float) -> float:
    """Joules of one token through one decoder layer, from the measured J per layer-token of
    full-depth decode (whose steps also pay the LM head): ``J_token = rate * (n + head)``."""
    return decode_j_per_layer_token * num_layers / (num_layers + head_layers)


class PointChooser:
    """Maps a request's budget to an operating point (name, per-exit thresholds or None)."""

    def __init__(
        self,
        num_layers: int,
        points: list[OperatingPoint],
        default_compute_budget: float = 1.0,
        inline: tuple[float, ...] | None = None,
        head_layers: float = 0.0,
    ) -> None:
        self.num_layers = num_layers
        self.head_layers = head_layers  # the LM head in layer equivalents: paid per token at any depth
        self.points = sorted(points, key=lambda p: p.compute_fraction)
        self.default_compute_budget = default_compute_budget
        self.inline = inline

    def by_depth(self, fraction: float) -> tuple[str, tuple[float, ...] | None]:
        """The most accurate point whose calibrated depth is within ``fraction`` of full depth."""
        if fraction >= 1.0 or not self.points:
            return FULL, None
        fits = [p for p in self.points if p.avg_layers / self.num_layers <= fraction + 1e-9]
        best = max(fits, key=lambda p: p.avg_layers) if fits else min(self.points, key=lambda p: p.avg_layers)
        return best.name, best.thresholds

    def by_compute(self, fraction: float) -> tuple[str, tuple[float, ...] | None]:
        """The most accurate point whose effective compute is within ``fraction``."""
        if fraction >= 1.0 or not self.points:
            return FULL, None
        fits = [p for p in self.points if p.compute_fraction <= fraction + 1e-9]
        best = fits[-1] if fits else self.points[0]
        return best.name, best.thresholds

    def choose(
        self,
        compute_budget: float | None,
        energy_budget_j: float | None,
        prompt_tokens: int,
        max_tokens: int,
        rates: EnergyRates,
    ) -> tuple[str, tuple[float, ...] | None]:
        """An explicit compute budget wins; else an energy budget through the measured J per
        layer-token (prompt at full depth, ``max_tokens`` at the point's compute plus the LM
        head each token pays whatever its depth); else the expert's default (inline
        thresholds, or ``default_compute_budget``)."""
        if compute_budget is not None:
            return self.by_depth(compute_budget)
        if energy_budget_j is not None and rates.decode_j:
            n, head = self.num_layers, self.head_layers
            prefill_j = rates.prefill_j or rates.decode_j  # unmeasured: assume decode's (dearer) rate
            spare_j = energy_budget_j - prompt_tokens * n * prefill_j
            # a decode token at compute share f costs (f n + head) layers at the true per-layer rate
            afford = spare_j / (max(1, max_tokens) * per_layer_j(rates.decode_j, n, head))
            return self.by_compute((afford - head) / n)
        if self.inline is not None:
            return "inline", self.inline
        return self.by_depth(self.default_compute_budget)
