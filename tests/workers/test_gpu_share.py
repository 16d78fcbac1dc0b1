"""Splitting one GPU's energy counter between the processes (replicas) that meter it."""

from __future__ import annotations

import multiprocessing
import os
import time

import pytest

from workers.devices.gpu_share import GpuEnergyShare


class Counter:
    """A GPU energy counter (joules since driver load) the test moves by hand."""

    def __init__(self, joules: float = 5000.0) -> None:
        self.j = joules

    def __call__(self) -> float:
        return self.j


def test_busy_replicas_split_what_the_gpu_draws_and_idle_is_shared(tmp_path):
    gpu = Counter()
    a, b = (GpuEnergyShare("GPU-1", gpu, tmp_path) for _ in range(2))
    assert a.members() == b.members() == 2 and a.energy_j() == b.energy_j() == 0.0
    gpu.j += 100  # both idle: half each
    assert a.energy_j() == pytest.approx(50) and b.energy_j() == pytest.approx(50)
    a.set_busy(True)
    gpu.j += 300  # only a steps: all of it
    assert a.energy_j() == pytest.approx(350) and b.energy_j() == pytest.approx(50)
    b.set_busy(True)
    gpu.j += 200  # both step: equal shares
    a.set_busy(False)
    gpu.j += 40  # only b steps
    b.set_busy(False)
    assert a.energy_j() == pytest.approx(450) and b.energy_j() == pytest.approx(190)
    assert a.energy_j() + b.energy_j() == pytest.approx(gpu.j - 5000)  # every joule once
    gpu.j -= 0.5  # another process's interpolated reading a little behind: nothing moves back
    assert a.energy_j() == pytest.approx(450)
    b.close()
    gpu.j += 10.5  # alone again: the whole rise past the highest reading so far
    assert a.members() == 1 and a.energy_j() == pytest.approx(460)
    a.close()
    a.close()


def _child(directory: str, started, release) -> None:
    share = GpuEnergyShare("GPU-2", lambda: 0.0, __import__("pathlib").Path(directory))
    share.set_busy(True)  # and dies holding the GPU "busy", never closing
    started.set()
    release.wait(30)
    os._exit(0)


def test_another_process_takes_its_share_and_leaves_when_it_dies(tmp_path):
    gpu = Counter(0.0)
    me = GpuEnergyShare("GPU-2", gpu, tmp_path)
    ctx = multiprocessing.get_context("spawn")
    started, release = ctx.Event(), ctx.Event()
    child = ctx.Process(target=_child, args=(str(tmp_path), started, release))
    child.start()
    try:
        assert started.wait(60)
        assert me.members() == 2
        gpu.j += 100  # the child steps, this process is idle: none of it is ours
        assert me.energy_j() == 0.0
    finally:
        release.set()
        child.join(30)
    deadline = time.monotonic() + 10
    while me.members() != 1 and time.monotonic() < deadline:
        time.sleep(0.05)
    assert me.members() == 1  # a dead replica's busy flag does not keep its shares
    gpu.j += 30
    assert me.energy_j() == pytest.approx(30)
    me.close()
