"""The price of energy: how much quality a joule is worth, fixed by an operator or derived online.

Generate answers with argmax_i q_i(x) - lam E_i(x) (``router/policies/moe2.py``). ``lam`` is in quality
units per joule: at lam = 0.02, an expert must predict 0.1 more quality to be worth 5 J more.

Two ways to set it (DESIGN.md section 10):

- **fixed**: an operator's number, cluster-wide or per tenant;
- **auto**: the dual variable of an energy budget (MoE²'s Lagrangian, our reading). Every
  ``interval_s`` the price moves by the relative overspend of the last interval::

      lam <- clip(lam + step * (burn_w - budget_w) / budget_w, 0, max_quality_per_j)

  ``burn_w`` is the energy charged in the interval over its length; ``budget_w`` is the
  budget's joules over its window. Dividing by ``budget_w`` is the classic update
  ``lam + eta (burn - budget)`` with ``eta = step / budget_w``: one ``step`` then suits a 200 W
  laptop and a 200 kW row alike. Over budget the price rises (cheaper experts answer), under it the
  price falls towards 0 (a budget that does not bind costs nothing). Without a budget there is
  nothing to take the dual of: the price is ``default_quality_per_j``.

Pure: plain values and an injected clock, no Ray, no gRPC.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass

#: quality units per joule when nothing else says (docs/routing.md §4, "Choosing the default price").
#: Re-derived for the default experts on llama.cpp (2-core dev machine, modeled:cpu): cloud costs
#: ~0.03 J more per output token than edge (0.11 vs 0.08 measured at 64 tokens), and the fitted
#: gate's predicted quality gap between them has a median of 0.044; at 0.02/J that gap buys
#: 2.2 J, the extra cost of a ~70-token answer, so the price decides inside the 8-128-token
#: answers served. Offline on the labelled set (out-of-sample gate predictions, seeds 0-4) 0.01-0.02
#: gave the best quality for 8- and 64-token answers, above 0 and above 0.05-0.1.
DEFAULT_QUALITY_PER_J = 0.02


@dataclass(slots=True, frozen=True)
class PriceSettings:
    """How an ``auto`` price moves (plain values; runtime/config.py fills them from YAML)."""

    default_quality_per_j: float = DEFAULT_QUALITY_PER_J  # start value, and the price with no budget
    step: float = 0.002  # quality per J added per interval at 100 % overspend
    max_quality_per_j: float = 0.1  # upper bound (the price never makes every expert worthless)
    interval_s: float = 30.0  # how often the price moves

    def __post_init__(self) -> None:
        for name in ("default_quality_per_j", "step", "max_quality_per_j", "interval_s"):
            value = getattr(self, name)
            if not math.isfinite(value) or value < 0:
                raise ValueError(f"{name} must be a finite number >= 0 (got {value})")
        if self.interval_s <= 0:
            raise ValueError("interval_s must be > 0")
        if self.default_quality_per_j > self.max_quality_per_j:
            raise ValueError("default_quality_per_j must be <= max_quality_per_j")


class EnergyPrice:
    """The price of one budget scope (the cluster, or a tenant): fixed, or the budget's dual.

    ``charge`` records energy as it is spent; ``value`` returns the price now, first moving it if
    an interval has passed. ``budget_w`` is read at each move (operators change budgets live).
    """

    def __init__(self, fixed: float | None = None, settings: PriceSettings | None = None, *,
                 clock: Callable[[], float] = time.monotonic) -> None:
        if fixed is not None and (not math.isfinite(fixed) or fixed < 0):
            raise ValueError(f"a fixed price must be a finite number >= 0 quality units per J (got {fixed})")
        self.fixed = fixed
        self.settings = settings or PriceSettings()
        self.clock = clock
        self.lam = fixed if fixed is not None else self.settings.default_quality_per_j
        self._since = clock()
        self._spent_j = 0.0
        self.updates = 0
        self.last_burn_w: float | None = None

    @property
    def auto(self) -> bool:
        return self.fixed is None

    def charge(self, energy_j: float) -> None:
        """Energy charged to this scope (measured, or the predicted part of an abandoned request)."""
        if energy_j > 0 and math.isfinite(energy_j):
            self._spent_j += energy_j

    def value(self, budget_w: float | None) -> float:
        """The price now (quality units per J). ``budget_w``: the scope's budget as an average
        power (J per window / window s), None when it has none."""
        if self.fixed is not None:
            return self.fixed
        now = self.clock()
        elapsed = now - self._since
        if elapsed >= self.settings.interval_s:
            self._move(self._spent_j / elapsed, budget_w)
            self._since, self._spent_j = now, 0.0
        return self.lam

    def _move(self, burn_w: float, budget_w: float | None) -> None:
        s = self.settings
        self.last_burn_w = burn_w
        self.updates += 1
        if budget_w is None:
            self.lam = s.default_quality_per_j
            return
        if budget_w <= 0:  # a zero budget: nothing may be spent, price at its bound
            self.lam = s.max_quality_per_j
            return
        self.lam = min(s.max_quality_per_j, max(0.0, self.lam + s.step * (burn_w - budget_w) / budget_w))

    def describe(self) -> str:
        if self.fixed is not None:
            return f"fixed {self.fixed:g}/J"
        burn = "" if self.last_burn_w is None else f", last burn {self.last_burn_w:.3g} W"
        return f"auto {self.lam:.4g}/J ({self.updates} update(s){burn})"
