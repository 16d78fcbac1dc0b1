"""``settle_heap`` runs in a process of its own here: frozen objects stay frozen for the rest of a
process, which the test session must not inherit."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]

SCRIPT = """
import gc, json, weakref
from runtime.heap import YOUNG_THRESHOLD, settle_heap

class Node:
    pass

kept = [Node() for _ in range(1000)]  # alive at start-up: frozen
old_threshold = gc.get_threshold()
first, second = settle_heap(), settle_heap()
frozen = gc.get_freeze_count()

# a reference cycle that becomes garbage after start-up is still collected
a, b = Node(), Node()
a.other, b.other = b, a
gone = weakref.ref(a)
del a, b
gc.collect()
print(json.dumps({"first": first, "second": second, "frozen": frozen, "threshold": gc.get_threshold(),
                  "old_threshold": old_threshold, "young": YOUNG_THRESHOLD, "cycle_collected": gone() is None}))
"""


def test_settle_heap_freezes_once_raises_the_young_threshold_and_still_collects_cycles():
    out = subprocess.run([sys.executable, "-c", SCRIPT], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         check=True, env={"PYTHONPATH": str(ROOT), "PATH": ""})
    r = json.loads(out.stdout)
    assert r["first"] is True and r["second"] is False  # once per process
    assert r["frozen"] >= 1000  # everything alive at the call, our 1000 nodes included
    assert r["threshold"] == [r["young"], *r["old_threshold"][1:]]  # only the young generation's changes
    assert r["young"] > r["old_threshold"][0]
    assert r["cycle_collected"]
