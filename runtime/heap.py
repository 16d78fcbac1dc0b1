"""The cyclic garbage collector in a serving process (the gateway, each replica actor).

A serving process imports Ray, gRPC, protobuf and the engines before its first request: about
110,000 objects that live as long as it does. CPython's collector walks all of them in every
full collection, and with its default young-generation threshold (700 net allocations) a
request's short-lived containers (asyncio futures and tasks, protobuf conversions, dataclasses)
trigger a young collection every few requests and a full one every couple of thousand. Measured
at full speed on a 2-core Xeon (docs/benchmarks.md, "Serving-path overhead"): 0.07-0.2 ms of the
gateway's ~1 ms of CPU per request and 0.03-0.14 ms of the replica's ~0.5 ms went to the
collector.

:func:`settle_heap` moves what start-up left alive out of the collector's reach (``gc.freeze``:
never scanned again; reference counting still frees it) and raises the young threshold, so a
collection runs every few thousand requests' worth of allocations instead of every few requests.
Reference cycles are still collected (garbage that needs the collector waits a little longer:
at most ``YOUNG_THRESHOLD`` net container allocations). Call it once per process, where the
process is ours alone (the ``wattserve serve`` entry point, a replica actor once it is ready),
never from a library call: a test process that froze its heap would keep every cycle that was
alive at that moment for the rest of the session.
"""

from __future__ import annotations

import gc

#: net container allocations between young collections (CPython's default: 700)
YOUNG_THRESHOLD = 10_000

_settled = False


def settle_heap() -> bool:
    """Freeze the objects alive now and raise the young-generation threshold; once per process
    (later calls do nothing). Returns whether this call did it."""
    global _settled
    if _settled:
        return False
    _settled = True
    gc.collect()  # what start-up left as garbage goes now, not into the frozen generation
    gc.freeze()
    _, older, oldest = gc.get_threshold()
    gc.set_threshold(YOUNG_THRESHOLD, older, oldest)
    return True
