"""What an ensemble of experts adds over its best member, measured on labelled multiple choice.

Score can run several experts and mix their answers (``router.quality.combine``). Whether a second
expert is worth its joules depends on how often the mix is right where the better expert alone is
wrong, and how often the mix spoils a right answer: a property of the experts and the tasks,
measured here from each expert's per-choice log-likelihoods on a labelled set (kept by
``wattserve quality measure --logprobs``), not assumed.

For a set S of experts (two or more), on the items every member scored:

- ``best``: the member with the highest accuracy alone on those items;
- ``wins``: items the mix gets right and ``best`` alone gets wrong; ``losses``: the reverse;
- ``lift = (wins - losses) / n``: the accuracy the mix adds over its best member.

At plan time the router predicts a set's quality for one prompt as the best member's predicted
quality plus the set's measured lift, ``q_S(x) = max_{i in S} q_i(x) + lift(S)`` (lift 0 for one
expert): the gate says per prompt who is better, the measurement says what mixing adds beyond
choosing the better one. A set not measured has no predicted gain (``None``).

The mix is scored as the labels are (``router.quality.mc_choice``): each expert's choice scores
normalised per character (``per_char``) or summed, a softmax per expert, then the weighted mean of
the softmaxes (equal weights unless per-item weights are given, e.g. the gate's renormalised).
Pure: no Ray, no gRPC, no engines.
"""

from __future__ import annotations

import itertools
import json
import math
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from wattserve.errors import ConfigError

from .quality import LabelledItem, choice_scores, combine

ENSEMBLE_FILE = "ensemble.json"


@dataclass(slots=True, frozen=True)
class EnsembleMeasure:
    """One set of experts, measured on ``n`` multiple-choice items."""

    experts: tuple[str, ...]  # sorted
    n: int
    accuracy: float  # the mix
    best: str  # the member with the highest accuracy alone
    best_accuracy: float
    wins: int  # the mix right, ``best`` wrong
    losses: int  # the mix wrong, ``best`` right

    @property
    def lift(self) -> float:
        """Accuracy the mix adds over its best member (may be negative)."""
        return (self.wins - self.losses) / self.n if self.n else 0.0

    @property
    def lift_se(self) -> float:
        """Standard error of :attr:`lift` (paired: only the items where they differ vary)."""
        if self.n < 2:
            return math.inf
        d = [1.0] * self.wins + [-1.0] * self.losses + [0.0] * (self.n - self.wins - self.losses)
        mean = sum(d) / self.n
        var = sum((v - mean) ** 2 for v in d) / (self.n - 1)
        return math.sqrt(var / self.n)

    def as_json(self) -> dict:
        return {"experts": list(self.experts), "n": self.n, "accuracy": round(self.accuracy, 6), "best": self.best,
                "best_accuracy": round(self.best_accuracy, 6), "wins": self.wins, "losses": self.losses,
                "lift": round(self.lift, 6), "lift_se": round(self.lift_se, 6)}


class EnsembleGains:
    """Measured lifts per set of experts; :meth:`gain` is the router's marginal value of adding one."""

    def __init__(self, measures: Iterable[EnsembleMeasure], source: str = "") -> None:
        self.measures = {frozenset(m.experts): m for m in measures}
        self.source = source

    def __bool__(self) -> bool:
        return bool(self.measures)

    def lift(self, experts: Iterable[str]) -> float | None:
        """The measured lift of the set (0 for a single expert); None when not measured."""
        key = frozenset(experts)
        if len(key) <= 1:
            return 0.0
        m = self.measures.get(key)
        return None if m is None else m.lift

    def gain(self, quality: Mapping[str, float], chosen: Sequence[str], added: str) -> float | None:
        """Predicted quality of ``chosen + [added]`` less that of ``chosen`` for one prompt whose
        per-expert predicted quality is ``quality``: ``(q_added - max q_chosen)^+`` plus the change
        of measured lift. None when either set's lift was not measured."""
        before, after = self.lift(chosen), self.lift([*chosen, added])
        if before is None or after is None:
            return None
        top = max(quality.get(e, 0.0) for e in chosen)
        return max(0.0, quality.get(added, 0.0) - top) + after - before

    def renamed(self, names: Mapping[str, str]) -> EnsembleGains:
        """The same table keyed by serving experts: ``names`` maps expert -> measured column (as
        ``router.gate_outputs``). Sets naming a column no expert maps to are dropped."""
        back: dict[str, str] = {}
        for expert, column in names.items():
            back.setdefault(column, expert)
        kept = []
        for m in self.measures.values():
            if all(e in back for e in m.experts):
                kept.append(EnsembleMeasure(tuple(sorted(back[e] for e in m.experts)), m.n, m.accuracy, back[m.best],
                                            m.best_accuracy, m.wins, m.losses))
        return EnsembleGains(kept, self.source)

    def as_json(self) -> dict:
        return {"sets": [m.as_json() for m in sorted(self.measures.values(), key=lambda m: (len(m.experts), m.experts))]}

    def save(self, path: str | Path, **meta) -> None:
        Path(path).write_text(json.dumps({**meta, **self.as_json()}, indent=2) + "\n")

    @classmethod
    def load(cls, path: str | Path) -> EnsembleGains:
        """A table written by :meth:`save` (``wattserve quality ensemble``)."""
        path = Path(path)
        try:
            raw = json.loads(path.read_text())
            measures = [EnsembleMeasure(tuple(sorted(s["experts"])), int(s["n"]), float(s["accuracy"]), str(s["best"]),
                                        float(s["best_accuracy"]), int(s["wins"]), int(s["losses"]))
                        for s in raw["sets"]]
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigError(f"cannot read the ensemble measurements {path}: {exc}") from None
        for m in measures:
            if len(m.experts) < 2 or m.n < 1 or m.wins < 0 or m.losses < 0 or m.wins + m.losses > m.n:
                raise ConfigError(f"{path}: set {list(m.experts)} is not a valid measurement (n {m.n}, wins {m.wins}, "
                                  f"losses {m.losses})")
        return cls(measures, source=str(path))


def mixed_choice(item: LabelledItem, logprobs: Mapping[str, Sequence[float]], norm: str = "per_char",
                 weights: Mapping[str, float] | None = None) -> int:
    """The choice a weighted mix of ``logprobs`` (per expert) picks; ties go to the first choice."""
    w = {e: (weights or {}).get(e, 1.0) for e in logprobs}
    if sum(w.values()) <= 0:
        w = dict.fromkeys(logprobs, 1.0)
    mix = combine(w, {e: choice_scores(lps, item.choices, norm) for e, lps in logprobs.items()})
    return max(range(len(mix)), key=lambda k: (mix[k], -k))


def measure(items: Sequence[LabelledItem], logprobs: Mapping[tuple[str, str], Sequence[float]], experts: Sequence[str],
            *, norm: str = "per_char", max_size: int = 3,
            weights: Mapping[str, Mapping[str, float]] | None = None) -> EnsembleGains:
    """Measure every set of 2..``max_size`` of ``experts`` on the multiple-choice ``items`` that all
    its members scored. ``logprobs[(item id, expert)]`` are per-choice log-likelihoods;
    ``weights[item id][expert]``, if given, weigh the mix per item (else equal weights)."""
    mc = [it for it in items if it.kind == "mc"]
    measures = []
    for size in range(2, max(2, max_size) + 1):
        for subset in itertools.combinations(sorted(experts), size):
            rows = [it for it in mc if all((it.id, e) in logprobs for e in subset)]
            if not rows:
                continue
            alone = {e: [mixed_choice(it, {e: logprobs[(it.id, e)]}, norm) == it.gold for it in rows] for e in subset}
            best = max(subset, key=lambda e: (sum(alone[e]), e))
            mixed = [mixed_choice(it, {e: logprobs[(it.id, e)] for e in subset}, norm,
                                  (weights or {}).get(it.id)) == it.gold for it in rows]
            wins = sum(m and not b for m, b in zip(mixed, alone[best], strict=True))
            losses = sum(b and not m for m, b in zip(mixed, alone[best], strict=True))
            measures.append(EnsembleMeasure(subset, len(rows), sum(mixed) / len(rows), best,
                                            sum(alone[best]) / len(rows), wins, losses))
    return EnsembleGains(measures)
