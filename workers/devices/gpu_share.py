"""One GPU's energy counter, split between the processes that meter it.

Replicas placed on the same GPU (``resources: {num_gpus: 0.5}``) are separate processes, and each
reads the GPU's one energy counter around its own steps. Read naively, a joule spent while two
replicas step at once is booked by both, and idle energy by every replica, so their sum exceeds
what the GPU drew. :class:`GpuEnergyShare` keeps a small ledger per GPU in a file on the host
(``/dev/shm``, keyed by the GPU's UUID), updated under an exclusive file lock:

- every update first *settles* the counter's rise since the last update (read by whichever
  process holds the lock) among the members that were busy (stepping) since then, in equal
  shares, or among all members when none was;
- a member turns busy or idle only in an update, so the busy set is constant between two
  settlements and every joule goes to exactly one set of members.

Each process's :meth:`~GpuEnergyShare.energy_j` is its own accumulated share, a counter the
engine loop meters exactly as it would the whole GPU's, and the shares of all processes add up to
the GPU's counter. Equal shares between replicas that step at the same time is a split rule, not
a measurement: the counter cannot tell whose kernels drew the power. A process that dies leaves
the ledger at the next update (its pid is gone).
"""

from __future__ import annotations

import contextlib
import fcntl
import json
import os
import re
import tempfile
import threading
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

COUNTER_RESET_J = 1000.0  # a drop this large is a driver reload, not interpolation jitter


def share_dir() -> Path:
    """Where ledgers live: ``$WATTSERVE_GPU_SHARE_DIR``, else ``/dev/shm``, else the temp dir."""
    configured = os.environ.get("WATTSERVE_GPU_SHARE_DIR")
    if configured:
        return Path(configured)
    return Path("/dev/shm") if os.path.isdir("/dev/shm") else Path(tempfile.gettempdir())


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # someone else's process, alive
    return True


class GpuEnergyShare:
    """This process's share of the energy counter of the GPU called ``key`` on this host.

    ``read_total_j`` returns the GPU's counter in joules on a scale every process shares (the
    counter since driver load, not since this process opened it).
    """

    def __init__(self, key: str, read_total_j: Callable[[], float], directory: Path | None = None) -> None:
        name = re.sub(r"[^A-Za-z0-9_.-]", "_", key)
        self.path = (directory or share_dir()) / f"wattserve-gpu-{name}.json"
        self._read = read_total_j
        self._me = f"{os.getpid()}-{uuid.uuid4().hex[:8]}"
        self._lock = threading.Lock()  # the engine loop and the status thread share one member
        self._returned = 0.0
        self._fd: int | None = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o600)
        with self._ledger() as members:
            members[self._me] = {"pid": os.getpid(), "busy": False, "j": 0.0}

    @contextlib.contextmanager
    def _ledger(self) -> Iterator[dict]:
        """The settled ledger's members, under the lock; written back on exit."""
        with self._lock:
            if self._fd is None:
                raise RuntimeError("GPU energy share used after close()")
            fcntl.flock(self._fd, fcntl.LOCK_EX)
            try:
                raw = os.pread(self._fd, 1 << 20, 0)
                state = json.loads(raw) if raw.strip() else {"last_j": None, "members": {}}
                self._settle(state)
                yield state["members"]
                data = json.dumps(state).encode()
                os.ftruncate(self._fd, 0)
                os.pwrite(self._fd, data, 0)
            finally:
                fcntl.flock(self._fd, fcntl.LOCK_UN)

    def _settle(self, state: dict) -> None:
        now = self._read()
        members = state["members"]
        for key in [k for k, m in members.items() if not _alive(m["pid"])]:
            del members[key]
        last = state["last_j"]
        if last is None or now < last - COUNTER_RESET_J:
            state["last_j"] = now
            return
        if now > last and members:
            takers = [m for m in members.values() if m["busy"]] or list(members.values())
            for m in takers:
                m["j"] += (now - last) / len(takers)
            state["last_j"] = now  # readings a little behind the last (another process's interpolation) wait

    def energy_j(self) -> float:
        """Joules booked to this process since it joined; never decreases."""
        with self._ledger() as members:
            self._returned = max(self._returned, members[self._me]["j"])
            return self._returned

    def set_busy(self, busy: bool) -> None:
        """Mark this process stepping (its steps take shares of what the GPU draws) or idle."""
        with self._ledger() as members:
            members[self._me]["busy"] = busy

    def members(self) -> int:
        """Processes metering this GPU now (this one included)."""
        with self._ledger() as members:
            return len(members)

    def close(self) -> None:
        if self._fd is None:
            return
        with self._ledger() as members:
            members.pop(self._me, None)
        os.close(self._fd)
        self._fd = None
