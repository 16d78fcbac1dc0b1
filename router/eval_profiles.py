"""Energy profiles of the experts in an offline evaluation (configs/eval/*.yaml).

An expert's joules per output token and time per output token come from one of:

- ``mlenergy: {model, gpu, max_batch_size[, task]}``: that ML.ENERGY leaderboard row, labelled
  ``measured:mlenergy``; with ``stand_in: true`` the row belongs to another model standing in for
  this one (e.g. Llama-3.1-405B for GPT-4, whose energy is not public) and the label is
  ``modeled:mlenergy-stand-in``;
- ``params_b: <billions>`` with a top-level ``by_size: {source, task, gpu, max_batch_size}``: a
  power law ``J/token = a * params^b`` (and the same for TPOT) least-squares fitted in log-log
  space to the dense text models of that ML.ENERGY slice, one row per model at the max batch size
  nearest the one asked; labelled ``modeled:mlenergy-by-size``;
- ``j_per_token`` and ``tpot_ms`` given directly: labelled ``modeled:profile-file``.
"""

from __future__ import annotations

import csv
import math
import re
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

from wattserve.errors import InvalidRequest
from wattserve.types import ExpertProfile

from .base import Candidate

# Multimodal and mixture-of-experts rows do not follow a dense text model's size law.
_NOT_DENSE_TEXT = re.compile(r"llava|chameleon|vision|-VL|Mixtral|-A\d+B|Scout|Maverick|Omni", re.IGNORECASE)


@dataclass(slots=True, frozen=True)
class EvalExpert:
    name: str
    column: str  # quality column in the data (and gate output)
    j_per_token: float  # J per output token
    tpot_ms: float  # time per output token
    batch: float  # average batch size of the measurement
    max_batch: int
    source: str  # where the numbers come from, in words
    note: str = ""
    energy_source: str = "modeled:profile-file"  # measured:mlenergy | modeled:mlenergy-stand-in | modeled:mlenergy-by-size | ...


def _csv_path(spec: Mapping, base_dir: Path, shared_dir: Path | None) -> Path:
    ref = str(spec.get("mlenergy_csv", ""))
    if ref.startswith("shared:"):
        if shared_dir is None:
            raise InvalidRequest("the profile file refers to shared data but no shared/data folder was found "
                                 "(set WATTSERVE_SHARED_DATA)")
        return shared_dir / ref.removeprefix("shared:")
    return base_dir / ref


def _rows(csv_path: Path) -> list[dict]:
    try:
        with csv_path.open(newline="") as f:
            return list(csv.DictReader(f))
    except OSError as exc:
        raise InvalidRequest(f"cannot read the ML.ENERGY table {csv_path}: {exc.strerror}") from None


def mlenergy_row(csv_path: Path, model: str, gpu: str, max_batch_size: int, task: str = "") -> dict:
    rows = [r for r in _rows(csv_path) if r["model"] == model and r["gpu"] == gpu
            and int(float(r["max_batch_size"])) == max_batch_size and (not task or r["task"] == task)]
    if not rows:
        raise InvalidRequest(f"{csv_path}: no ML.ENERGY row for {model} on {gpu} at max batch {max_batch_size}")
    return rows[0]


@dataclass(slots=True, frozen=True)
class SizeLaw:
    """``value = exp(a) * params_b ** b`` for J/token and TPOT, fitted on ``anchors``."""

    j_a: float
    j_b: float
    t_a: float
    t_b: float
    anchors: tuple[tuple[str, float, int, float, float], ...]  # (model, params B, max batch, J/token, TPOT ms)
    describe: str

    def j_per_token(self, params_b: float) -> float:
        return math.exp(self.j_a) * params_b ** self.j_b

    def tpot_ms(self, params_b: float) -> float:
        return math.exp(self.t_a) * params_b ** self.t_b


def _fit(xs: list[float], ys: list[float]) -> tuple[float, float]:
    lx, ly = [math.log(x) for x in xs], [math.log(y) for y in ys]
    mx, my = sum(lx) / len(lx), sum(ly) / len(ly)
    sxx = sum((x - mx) ** 2 for x in lx)
    b = sum((x - mx) * (y - my) for x, y in zip(lx, ly, strict=True)) / sxx
    return my - b * mx, b


def size_law(csv_path: Path, source: str, task: str, gpu: str, max_batch_size: int) -> SizeLaw:
    """Fit the power laws on one ML.ENERGY slice (see the module docstring)."""
    best: dict[str, dict] = {}
    for r in _rows(csv_path):
        if r["source"] != source or r["task"] != task or r["gpu"] != gpu or _NOT_DENSE_TEXT.search(r["model"]):
            continue
        try:
            params = float(r["total_params_B"])
        except ValueError:
            continue
        dist = abs(math.log(float(r["max_batch_size"]) / max_batch_size))
        cur = best.get(r["model"])
        if cur is None or dist < cur["_dist"]:
            best[r["model"]] = {**r, "_dist": dist, "_params": params}
    if len({r["_params"] for r in best.values()}) < 3:
        raise InvalidRequest(f"{csv_path}: fewer than three model sizes for {source} {task} on {gpu}; cannot fit a size law")
    anchors = tuple(sorted(
        ((m, r["_params"], int(float(r["max_batch_size"])), float(r["energy_per_output_token_J"]), float(r["avg_tpot_or_itl_ms"]))
         for m, r in best.items()), key=lambda a: (a[1], a[0]),
    ))
    j_a, j_b = _fit([a[1] for a in anchors], [a[3] for a in anchors])
    t_a, t_b = _fit([a[1] for a in anchors], [a[4] for a in anchors])
    sizes = ", ".join(f"{a[1]:g}B" for a in anchors)
    describe = (f"ML.ENERGY {source} {task} on {gpu}, max batch ~{max_batch_size}: J/token = "
                f"{math.exp(j_a):.4f} x params_B^{j_b:.3f}, fitted on {len(anchors)} dense models ({sizes})")
    return SizeLaw(j_a, j_b, t_a, t_b, anchors, describe)


def load_experts(spec: Mapping, base_dir: Path, shared_dir: Path | None) -> list[EvalExpert]:
    """Experts of an eval profile file (see the module docstring and configs/eval/*.yaml)."""
    law: SizeLaw | None = None
    experts = []
    for e in spec.get("experts", []):
        if "mlenergy" in e:
            m = e["mlenergy"]
            row = mlenergy_row(_csv_path(spec, base_dir, shared_dir), m["model"], m["gpu"], int(m["max_batch_size"]), m.get("task", ""))
            stand_in = bool(m.get("stand_in", False))
            experts.append(EvalExpert(
                name=e["name"], column=e["column"], j_per_token=float(row["energy_per_output_token_J"]),
                tpot_ms=float(row["avg_tpot_or_itl_ms"]), batch=float(row["avg_batch_size"]),
                max_batch=int(float(row["max_batch_size"])),
                source=(f"ML.ENERGY {row['source']} {row['task']}: {row['model']} on {row['num_gpus']} x {row['gpu']}"
                        + (" (a stand-in for this expert)" if stand_in else "")),
                note=e.get("note", ""),
                energy_source="modeled:mlenergy-stand-in" if stand_in else "measured:mlenergy",
            ))
        elif "params_b" in e:
            if law is None:
                bs = spec.get("by_size")
                if not bs:
                    raise InvalidRequest(f"expert {e['name']!r} gives params_b but the profile file has no by_size section")
                law = size_law(_csv_path(spec, base_dir, shared_dir), bs["source"], bs["task"], bs["gpu"], int(bs["max_batch_size"]))
            p = float(e["params_b"])
            if p <= 0:
                raise InvalidRequest(f"expert {e['name']!r}: params_b must be > 0, got {p}")
            experts.append(EvalExpert(
                name=e["name"], column=e["column"], j_per_token=law.j_per_token(p), tpot_ms=law.tpot_ms(p),
                batch=float(spec["by_size"]["max_batch_size"]), max_batch=int(spec["by_size"]["max_batch_size"]),
                source=f"{p:g}B parameters on the size law of {law.describe}", note=e.get("note", ""),
                energy_source="modeled:mlenergy-by-size",
            ))
        else:
            experts.append(EvalExpert(e["name"], e["column"], float(e["j_per_token"]), float(e["tpot_ms"]),
                                      float(e.get("batch", 1)), int(e.get("max_batch", 1)), "profile file", e.get("note", ""),
                                      str(e.get("energy_source", "modeled:profile-file"))))
    if len(experts) < 2:
        raise InvalidRequest("an evaluation needs at least two experts")
    names = [x.name for x in experts]
    if len(set(names)) != len(names):
        raise InvalidRequest(f"expert names must be unique, got {names}")
    return experts


def candidate(e: EvalExpert) -> Candidate:
    """A replica whose live profile is the expert's row: the cost model predicts J/token x tokens
    and TPOT x tokens for it."""
    # The row already is per request at its batch size: present it as a batch-1 step of TPOT ms
    # whose power makes one token cost the row's joules. No live load offline.
    prof = ExpertProfile(
        expert=e.name, replica=0, model=e.column, engine="offline", device=e.source, energy_source=e.energy_source,
        priority_class="high", max_batch=max(1, e.max_batch), max_queue=0, max_model_len=1 << 20, params=0,
        healthy=True, running=0, waiting=0, prefill_ms_per_token=0.0, decode_ms_per_token=e.tpot_ms,
        j_per_token=e.j_per_token, decode_ms_per_step_by_batch={1: e.tpot_ms},
        busy_power_w=e.j_per_token * 1000.0 / e.tpot_ms,
    )
    return Candidate(e.name, 0, True, 0, prof)
