"""Early exit inside the torch engine: setup from the spec, per-request operating points,
per-step decode, and the accounting that reaches responses, profiles and modeled devices."""

from __future__ import annotations

from dataclasses import dataclass, field

import torch

from wattserve.errors import ExitCalibrationError
from wattserve.specs import EarlyExitSpec
from wattserve.types import ExitUsage, GenerateCall

from ..runner import DecoderRunner
from .adapters import load_adapters
from .decode import (
    ALWAYS,
    NEVER,
    Deferred,
    EarlyExitRunner,
    ExitHeads,
    ExitLayout,
    head_layers,
    kv_share,
    model_fingerprint,
)
from .points import FULL, EnergyRates, ExitProfile, PointChooser, effective_fraction, per_layer_j


@dataclass(slots=True)
class ExitTally:
    """One request's operating point and what its completion tokens cost so far."""

    point: str
    thresholds: torch.Tensor | None  # (num_exits,), None: full depth
    tokens: int = 0
    layers_run: int = 0
    compute: float = 0.0  # effective full-depth tokens (K/V propagation included)
    saved_j: float = 0.0
    deferred: Deferred | None = None  # kv_fill="deferred": its tokens whose deeper layers wait

    def usage(self, num_layers: int) -> ExitUsage:
        n = max(1, self.tokens)
        return ExitUsage(
            num_layers=num_layers,
            avg_exit_layer=self.layers_run / n if self.tokens else float(num_layers),
            layers_skipped=self.tokens * num_layers - self.layers_run,
            compute_fraction=self.compute / n if self.tokens else 1.0,
            energy_saved_j=self.saved_j,
            operating_point=self.point,
        )


@dataclass(slots=True)
class StepExits:
    """What a decode step's exits mean for the device model and the profile."""

    depths: list[int]
    compute_sum: float  # sum over rows of effective fractions
    weight_fraction: float  # layers whose weights were read, K/V-only layers at their share
    counts: dict[int, int] = field(default_factory=dict)
    probed: bool = False  # the exit probes ran (False: every row at full depth on the plain path)


class ExitControl:
    """Owns the early-exit runner and the operating points of one torch engine."""

    def __init__(self, spec: EarlyExitSpec, runner: DecoderRunner, source: str = "early_exit") -> None:
        self.spec = spec
        self.num_layers = len(runner.layers)
        self.layout = ExitLayout.build(self.num_layers, spec.exit_every, spec.min_exit_layer, spec.criterion)
        self.fingerprint = model_fingerprint(runner)
        adapters, adapters_sha = {}, None
        if spec.adapters_path:
            adapters, adapters_sha = load_adapters(spec.adapters_path, self.fingerprint, runner.dtype, runner.device)
        self.adapters_sha256 = adapters_sha
        profile = None
        if spec.thresholds_path:
            profile = ExitProfile.load(spec.thresholds_path)
            profile.check(self.fingerprint, self.layout.exits, spec.criterion, adapters_sha, spec.thresholds_path)
        self.profile = profile
        self.heads = ExitHeads(runner, self.layout, spec.criterion, list(profile.shortlist) if profile else None, adapters)
        self.runner = EarlyExitRunner(runner, self.heads, spec.kv_fill)
        self.deferred = spec.kv_fill == "deferred"
        self.kv_share = kv_share(runner)
        self.head_layers = head_layers(runner)
        self.chooser = PointChooser(
            self.num_layers, profile.points if profile else [], spec.default_compute_budget,
            self._inline(spec.thresholds, source), self.head_layers,
        )
        self.rates = EnergyRates()
        self.device = runner.device

    def _inline(self, thresholds: list[float] | None, source: str) -> tuple[float, ...] | None:
        if thresholds is None:
            return None
        want = self.layout.num_exits - 1
        if len(thresholds) != want:
            raise ExitCalibrationError(
                f"{source}.thresholds has {len(thresholds)} values but the expert has {want} exits before "
                f"the last (after layers {list(self.layout.exits[:-1])}): give one threshold per exit"
            )
        return tuple(thresholds) + (ALWAYS,)

    # -- requests ------------------------------------------------------------------------------
    def assign(self, call: GenerateCall, prompt_tokens: int) -> ExitTally:
        name, thresholds = self.chooser.choose(
            call.compute_budget, call.energy_budget_j, prompt_tokens, call.max_tokens, self.rates
        )
        if thresholds is None:
            return ExitTally(FULL, None)
        return ExitTally(name, torch.tensor(thresholds, dtype=torch.float32, device=self.device))

    def count_prefill_token(self, tally: ExitTally) -> None:
        """The first completion token comes from prefill, at full depth."""
        tally.tokens += 1
        tally.layers_run += self.num_layers
        tally.compute += 1.0

    # -- steps ---------------------------------------------------------------------------------
    def decode(self, token_ids: list[int], tallies: list[ExitTally]) -> tuple[torch.Tensor, StepExits]:
        """One decode step for rows ``0..B-1`` with each row's operating point."""
        if all(t.thresholds is None for t in tallies):
            logits = self.runner.runner.decode(token_ids)
            depths, work = [self.num_layers] * len(token_ids), None
        else:
            full = torch.full((self.layout.num_exits,), NEVER, device=self.device)
            full[-1] = ALWAYS
            rows = torch.stack([full if t.thresholds is None or self._must_catch_up(t) else t.thresholds for t in tallies])
            step = self.runner.decode(token_ids, rows, deferred=[t.deferred for t in tallies] if self.deferred else None)
            logits, depths, work = step.logits, step.depths, step.work
            if self.deferred:
                for tally, left in zip(tallies, step.deferred, strict=True):
                    tally.deferred = left
        step_exits = self._account(depths, tallies, work if self.deferred else None)
        step_exits.probed = any(t.thresholds is not None for t in tallies)  # the branch above
        return logits, step_exits

    def _must_catch_up(self, tally: ExitTally) -> bool:
        """A sequence holding ``max_deferred_tokens`` waiting tokens runs its next at full depth."""
        return self.deferred and tally.deferred is not None and len(tally.deferred) >= self.spec.max_deferred_tokens

    def _account(self, depths: list[int], tallies: list[ExitTally], work: list[int] | None = None) -> StepExits:
        """Per-row costs. Propagation: the layers run plus the K/V share of skipped ones.
        Deferred filling: the layer-tokens the row ran (its token's and the waiting ones')."""
        n, share = self.num_layers, self.kv_share
        counts: dict[int, int] = {}
        compute_sum = 0.0
        for row, (depth, tally) in enumerate(zip(depths, tallies, strict=True)):
            frac = effective_fraction(depth, n, share) if work is None else work[row] / n
            tally.tokens += 1
            tally.layers_run += depth
            tally.compute += frac
            if self.rates.decode_j:  # the layers skipped, at the per-layer rate (the head is paid anyway)
                tally.saved_j += (1.0 - frac) * n * per_layer_j(self.rates.decode_j, n, self.head_layers)
            counts[depth] = counts.get(depth, 0) + 1
            compute_sum += frac
        deepest = max(depths) if depths else n
        weights = effective_fraction(deepest, n, share) if work is None else deepest / n
        return StepExits(depths, compute_sum, weights, counts)

    def observe_energy(self, prefill_j_per_layer_token: float | None, decode_j_per_layer_token: float | None) -> None:
        self.rates = EnergyRates(prefill_j_per_layer_token, decode_j_per_layer_token)
