"""Per-request energy attribution with exact conservation.

Each engine step's device energy (a counter delta) is split over the requests in that step in
proportion to the tokens each had processed (prompt tokens in prefill, one per decode); energy
drawn while the engine loop waits with nothing to do is idle and kept apart (the loop's work
between two busy steps belongs to the next step). Every delta it is given lands in exactly one bucket, so
``requests_j + idle_j == device_j`` holds by construction (``tests/workers/test_energy.py``
checks the split, not the measurement). Whether the deltas add up to what the device drew is
the engine loop's job: it reads the counter when it starts and, freshly synced, when it ends,
and ``tests/workers/test_energy_conservation.py`` compares requests + idle with the counter's
own delta over whole runs (fake NVML, replicas sharing one GPU, simulated and CPU devices).
"""

from __future__ import annotations

from collections.abc import Mapping

from wattserve.types import EnergyTotals


class EnergyLedger:
    def __init__(self, energy_source: str) -> None:
        self.energy_source = energy_source
        self.device_j = 0.0
        self.idle_j = 0.0
        self.requests_j = 0.0
        self._open: dict[str, float] = {}  # requests still being served -> joules so far

    def add_idle(self, joules: float) -> None:
        self.device_j += joules
        self.idle_j += joules

    def add_step(self, joules: float, tokens_by_request: Mapping[str, int]) -> None:
        """Split one step's energy by tokens processed; a step with no tokens is idle."""
        total = sum(tokens_by_request.values())
        if total <= 0:
            self.add_idle(joules)
            return
        self.device_j += joules
        self.requests_j += joules
        items = list(tokens_by_request.items())
        assigned = 0.0
        for rid, tokens in items[:-1]:
            share = joules * tokens / total
            assigned += share
            self._open[rid] = self._open.get(rid, 0.0) + share
        last = items[-1][0]
        self._open[last] = self._open.get(last, 0.0) + (joules - assigned)  # no rounding drift

    def charged(self, request_id: str) -> float:
        return self._open.get(request_id, 0.0)

    def close(self, request_id: str) -> float:
        """The request finished: return its total and stop tracking it."""
        return self._open.pop(request_id, 0.0)

    def totals(self) -> EnergyTotals:
        return EnergyTotals(
            requests_j=self.requests_j,
            idle_j=self.idle_j,
            device_j=self.device_j,
            energy_source=self.energy_source,
        )


class ExitSavingMeter:
    """Early exit's saving net of what was measured, per request.

    ``ExitUsage.energy_saved_j`` is a gross estimate: the layers skipped times a per-layer rate.
    It ignores what early exit adds (the exit probes' norm + LM head + distance, K/V propagation,
    a smaller effective batch), which on CPU made batch-8 early exit *slower* than full depth.
    This meter compares measured joules instead: for each batch size ``b`` it keeps the measured
    J per row of decode-only steps run at full depth with no exit probes (an EWMA, ``R_b``), and
    an early-exit decode-only step of ``b`` rows that measured ``E`` joules saved ``b R_b - E``
    (negative when it cost more), split over its rows like its energy (one token each).
    Steps that also prefill, and early-exit steps of a batch size never measured at full depth,
    have no reference and add nothing; a request none of whose steps had one gets ``None``.
    """

    def __init__(self, alpha: float = 0.2) -> None:
        self.alpha = alpha
        self.full_j_per_row: dict[int, float] = {}  # batch size -> measured J per row at full depth
        self._net: dict[str, float] = {}  # request -> net joules saved so far (steps with a reference)

    def observe(self, energy_j: float, prefill_tokens: int, tokens_by_request: Mapping[str, int],
                probed: bool) -> None:
        """One engine step: its measured energy, whether it prefilled, the tokens each request
        processed, and whether exit probes ran (an early-exit decode step)."""
        rows = len(tokens_by_request)
        if prefill_tokens or rows == 0:
            return
        if not probed:
            old = self.full_j_per_row.get(rows)
            new = energy_j / rows
            self.full_j_per_row[rows] = new if old is None else (1 - self.alpha) * old + self.alpha * new
            return
        ref = self.full_j_per_row.get(rows)
        if ref is None:
            return
        per_row = ref - energy_j / rows
        for rid in tokens_by_request:
            self._net[rid] = self._net.get(rid, 0.0) + per_row

    def close(self, request_id: str) -> float | None:
        """The request finished: its net saving in joules, or None where nothing could be compared."""
        return self._net.pop(request_id, None)
