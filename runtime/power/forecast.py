"""Headroom forecasting for the ``forecast`` power policy: cap only when the row's power could
reach the budget before a cap decided later would take effect.

POLCA's fixed thresholds cap whenever power crosses 0.80 P, whether or not the row could reach
P before a cap acts. What matters is the *rise* power can make over the time a decision needs to
act: a reading is taken, the next one comes ``interval`` later, and a cap decided then takes
``actuation delay`` more to show. If the row is not capped now, the earliest a later cap can
hold it is ``horizon_s`` (interval + actuation delay) away. So the rule is::

    cap when  p + rise_q  >=  guard x P

where ``rise_q`` is a high quantile of the row's own power rises over the horizon, learned online
from the telemetry the policy already reads (no model of the servers, no trace knowledge): every
reading adds the sample ``p(now) - p(now - horizon)`` (the latest reading at least ``horizon_s``
old), kept for the last ``window_samples`` readings and sorted per band of the power it started
from; the quantile for a reading pools its own band and its neighbours (see :meth:`forecast_w`).
Before ``min_samples`` samples exist the policy uses a conservative prior rise
(``forecast_prior_rise_fraction`` x P: 0.13 P with the 0.93 guard caps at 0.80 P, POLCA's T1),
so a fresh governor starts as cautious as POLCA. The levels, T2 and release rules live in
``policy.py``.

Samples are taken only while the cap level did not change between the two readings and the
telemetry was complete: a rise across a release would be the cap's saving, a fall across an
escalation the cap's effect, neither a property of the load.

Pure code, like the policy: plain numbers and the caller's ``now_s``; deterministic.
"""

from __future__ import annotations

import bisect
import collections
import heapq
import math


class RiseStatistics:
    """Online distribution of the row's power rise over ``horizon_s`` (watts), overall and per
    band of the power the rise started from (``band_w`` wide): a row near its peak cannot rise
    as far as an idle one, so the band of the current reading predicts better than the whole
    hour's rises, which are dominated by idle-to-burst jumps that matter nowhere near P."""

    def __init__(self, horizon_s: float, window_samples: int, min_samples: int, band_w: float) -> None:
        if horizon_s <= 0 or window_samples < 1 or min_samples < 1 or band_w <= 0:
            raise ValueError("horizon_s and band_w must be > 0, window_samples and min_samples >= 1")
        self.horizon_s = horizon_s
        self.window_samples = window_samples
        self.min_samples = min_samples
        self.band_w = band_w
        self._readings: collections.deque[tuple[float, float, int]] = collections.deque()  # (t, W, level)
        self._fifo: collections.deque[tuple[int, float]] = collections.deque()  # (band, rise), oldest first
        self._all: list[float] = []  # every remembered rise, sorted
        self._bands: dict[int, list[float]] = {}  # band of the start -> its rises (W), sorted

    @property
    def samples(self) -> int:
        return len(self._fifo)

    def band_samples(self, power_w: float) -> int:
        return len(self._bands.get(self._band(power_w), ()))

    def observe(self, now_s: float, power_w: float, level: int) -> float | None:
        """Record a complete reading; returns the rise sample it produced (None: no reading old
        enough yet, or the cap level changed in between)."""
        if self._readings and now_s <= self._readings[-1][0]:
            return None  # time must advance; a repeated reading adds nothing
        self._readings.append((now_s, power_w, level))
        # keep the newest reading that is at least horizon old, and everything after it
        while len(self._readings) >= 2 and self._readings[1][0] <= now_s - self.horizon_s:
            self._readings.popleft()
        then_s, then_w, then_level = self._readings[0]
        if now_s - then_s < self.horizon_s or then_level != level:
            return None
        rise = power_w - then_w
        self._add(self._band(then_w), rise)
        return rise

    def forget_readings(self) -> None:
        """Telemetry was incomplete: the next sample must not span the gap."""
        self._readings.clear()

    def quantile_w(self, q: float) -> float | None:
        """The q-quantile (nearest rank, rounded up: conservative) of all remembered rises (W);
        None while fewer than ``min_samples`` are known."""
        if len(self._all) < self.min_samples:
            return None
        return _nearest_rank(self._all, q)

    def forecast_w(self, q: float, power_w: float) -> float | None:
        """The power (W) the row may reach within the horizon from ``power_w``: ``power_w`` plus
        the q-quantile of the rises that started near it, pooled band by band outwards (its own
        band, the one below, the one above, two below, ...) until ``min_samples`` are in. A row
        near its peak cannot rise as far as an idle one, so the rises of the whole hour (idle to
        burst) would cap far too early. None while fewer than ``min_samples`` are known."""
        if len(self._all) < self.min_samples:
            return None
        own = self._band(power_w)
        pooled: list[list[float]] = []
        count, step = 0, 0
        reach = max(abs(own - min(self._bands)), abs(max(self._bands) - own))
        while count < self.min_samples and step <= reach:
            for band in ((own,) if step == 0 else (own - step, own + step)):
                rises = self._bands.get(band)
                if rises:
                    pooled.append(rises)
                    count += len(rises)
            step += 1
        merged = pooled[0] if len(pooled) == 1 else list(heapq.merge(*pooled))
        return power_w + max(0.0, _nearest_rank(merged, q))

    def _band(self, power_w: float) -> int:
        return math.floor(power_w / self.band_w)

    def _add(self, band: int, rise: float) -> None:
        self._fifo.append((band, rise))
        bisect.insort(self._all, rise)
        bisect.insort(self._bands.setdefault(band, []), rise)
        if len(self._fifo) > self.window_samples:
            old_band, old = self._fifo.popleft()
            del self._all[bisect.bisect_left(self._all, old)]
            rises = self._bands[old_band]
            del rises[bisect.bisect_left(rises, old)]
            if not rises:
                del self._bands[old_band]


def _nearest_rank(sorted_values: list[float], q: float) -> float:
    n = len(sorted_values)
    return sorted_values[min(n - 1, max(0, math.ceil(q * n) - 1))]
