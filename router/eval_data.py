"""Labelled prompts for the offline evaluator (``wattserve route eval``).

Reads a table of (prompt, per-expert quality) rows from a CSV file or a pickled pandas DataFrame.
Two layouts are understood without options:

- wattserve / RouteLLM CSVs: a ``prompt`` column and one quality column per expert
  (``True``/``False``, a number, or a percentage such as ``87%``; scores above 1, such as 1-10
  judge scores, are all divided by the largest score in the table, one scale for every expert);
- RouterBench's released table: ``sample_id, prompt, eval_name, <model>...`` with per-model quality,
  plus ``<model>|model_response`` and ``<model>|total_cost`` columns. Columns whose name holds a
  ``|`` describe a model's answer and are never quality columns.

A task column (``task``, ``subject``, ``category`` or ``eval_name``, first found) groups prompts
for the within-task AUC. A blank quality cell is an error naming its row and column, unless
``skip_blank`` is set: then the row is dropped and counted.
"""

from __future__ import annotations

import ast
import csv
import hashlib
import math
import random
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from wattserve.errors import InvalidRequest

TASK_COLUMNS = ("task", "subject", "category", "eval_name")
ID_COLUMNS = {"prompt", "sample_id", "question_id", "id", "turn", "prompt_turn1", "oracle_model_to_route_to", *TASK_COLUMNS}


@dataclass(slots=True)
class EvalData:
    prompts: list[str]
    experts: list[str]  # quality column names, in file order
    quality: np.ndarray  # (N, experts) in [0, 1]
    tasks: list[str] | None  # one task name per row, when the file has a task column
    source: str
    skipped_blank: int = 0  # rows dropped for a blank quality cell (skip_blank)

    def subset(self, rows: np.ndarray) -> EvalData:
        return EvalData([self.prompts[i] for i in rows], self.experts, self.quality[rows],
                        [self.tasks[i] for i in rows] if self.tasks is not None else None, self.source, self.skipped_blank)


def prompt_sha1(prompt: str) -> str:
    """First 16 hex characters of sha1(prompt, UTF-8): how a gate records the rows it trained on."""
    return hashlib.sha1(prompt.encode("utf-8", "surrogatepass")).hexdigest()[:16]


def _parse(value: object) -> float | None:
    """A quality cell -> float; None when blank; raises ValueError when not a number."""
    if value is None:
        return None
    if isinstance(value, bool):
        return 1.0 if value else 0.0
    if isinstance(value, (int, float)):
        x = float(value)
        return None if math.isnan(x) else x
    v = str(value).strip()
    if not v or v.lower() in ("nan", "none", "null"):
        return None
    if v.lower() in ("true", "false"):
        return 1.0 if v.lower() == "true" else 0.0
    if v.endswith("%"):  # a percentage score: 87% is 0.87
        x = float(v[:-1]) / 100.0
        if not math.isfinite(x):
            raise ValueError(v)
        return x
    x = float(v)
    if not math.isfinite(x):
        raise ValueError(v)
    return x


def _prompt_text(value: object) -> str:
    # RouterBench stores multi-turn prompts as a list (or its repr): join the turns.
    if isinstance(value, (list, tuple)):
        return "\n".join(str(v) for v in value)
    text = "" if value is None else str(value)
    if text.startswith("['") and text.endswith("']"):
        try:
            turns = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            return text
        if isinstance(turns, list):
            return "\n".join(str(t) for t in turns)
    return text


def _read_rows(path: Path) -> tuple[list[str], list[dict]]:
    if path.suffix in (".pkl", ".pickle"):
        try:
            import pandas as pd
        except ImportError:
            raise InvalidRequest(f"{path}: reading a pickled DataFrame (RouterBench's release) needs pandas: "
                                 "pip install pandas, or save the table as CSV") from None
        try:
            frame = pd.read_pickle(path)
        except (OSError, ValueError, EOFError) as exc:
            raise InvalidRequest(f"cannot read {path}: {exc}") from None
        return [str(c) for c in frame.columns], frame.to_dict(orient="records")
    try:
        with path.open(newline="", encoding="utf-8") as f:
            reader = csv.DictReader(f)
            rows = list(reader)
            return list(reader.fieldnames or []), rows
    except OSError as exc:
        raise InvalidRequest(f"cannot read {path}: {exc.strerror}") from None


def _numeric(values: list[object]) -> bool:
    seen = 0
    for v in values:
        try:
            x = _parse(v)
        except ValueError:
            return False
        seen += x is not None
    return seen > 0


def read_eval_data(path: str | Path, columns: Sequence[str] | None = None, *, limit: int | None = None,
                   sample: int | None = None, seed: int = 0, skip_blank: bool = False) -> EvalData:
    """Read labelled rows (see the module docstring); ``columns`` names the quality columns
    (default: every numeric column that is not an id, task or ``model|...`` column)."""
    path = Path(path)
    header, rows = _read_rows(path)
    if not rows or "prompt" not in header:
        found = ", ".join(repr(c) for c in header) or "none"
        raise InvalidRequest(f"{path}: expected a table with a 'prompt' column and one quality column per expert; "
                             f"{'columns found: ' + found if rows else 'it has no rows'}")
    if columns:
        unknown = [c for c in columns if c not in header]
        if unknown:
            raise InvalidRequest(f"{path}: no column {unknown[0]!r}; columns are {header}")
        cols = list(columns)
    else:
        cols = [c for c in header if c not in ID_COLUMNS and "|" not in c and _numeric([r.get(c) for r in rows[:200]])]
    if len(cols) < 2:
        raise InvalidRequest(f"{path}: need at least two expert quality columns, found {cols}; name the quality columns (--columns, or the experts file)")
    task_col = next((c for c in TASK_COLUMNS if c in header), None)
    if limit:
        rows = rows[:limit]
    if sample and sample < len(rows):
        keep = sorted(random.Random(seed).sample(range(len(rows)), sample))
        rows = [rows[i] for i in keep]
    prompts, values, tasks, skipped = [], [], [], 0
    for n, r in enumerate(rows, start=2):  # line 1 is the header
        parsed = []
        for c in cols:
            try:
                x = _parse(r.get(c))
            except ValueError:
                raise InvalidRequest(f"{path}: row {n}, column {c!r}: {r.get(c)!r} is not a quality (a number or true/false)") from None
            if x is None:
                if skip_blank:
                    break
                raise InvalidRequest(f"{path}: row {n}, column {c!r} is blank; pass --skip-blank to skip such rows (they are counted)")
            parsed.append(x)
        if len(parsed) < len(cols):
            skipped += 1
            continue
        text = _prompt_text(r.get("prompt"))
        if not text:
            if skip_blank:
                skipped += 1
                continue
            raise InvalidRequest(f"{path}: row {n}, column 'prompt' is blank; pass --skip-blank to skip such rows")
        prompts.append(text)
        values.append(parsed)
        tasks.append(str(r.get(task_col) or "")) if task_col else None
    if not prompts:
        raise InvalidRequest(f"{path}: no usable rows ({skipped} skipped for blank cells)")
    q = np.asarray(values, dtype=np.float32)
    # scores such as 1-10 -> [0, 1]: one scale for every expert's column, so that an expert whose
    # best score in these rows is a 9 does not have it read as the other's 10
    top = float(q.max())
    if top > 1.0:
        q = q / top
    return EvalData(prompts, cols, np.clip(q, 0.0, 1.0), tasks if task_col else None, str(path), skipped)
