"""The node agent: one per Ray node, it reads every GPU on its node and applies the caps the
governor sends. ``runtime/power/plane.py`` makes it a Ray actor pinned to its node.

Two kinds of GPU (see docs/governor.md):

- **NVML GPUs** of the node, opened here directly (all of them, used by an expert or not): the
  agent reads their power and locks their clocks itself, so actuation needs root only in this
  process and never waits behind an expert's engine. An expert whose device reports the same
  NVML UUID lends the GPU its name and priority; the GPU is listed once.
- **Expert-owned devices** that are not NVML GPUs (``simulated:<profile>`` on CPU hosts): the
  model lives inside the expert actor, so the agent reads and caps it through that actor's
  ``power_sample`` / ``apply_power_cap``.

Failures become values: an unreachable expert gives a sample with ``power_w=None`` and an
error, a refused cap a :class:`CapResult` with ``applied=False``. The agent never raises for a
device.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, replace
from typing import Any

from wattserve.devices import NvmlDeviceSpec
from wattserve.errors import DeviceError
from wattserve.power import CapResult, DeviceSample, GpuSample, PowerCap
from workers.devices import open_device
from workers.devices.base import Device
from workers.devices.control import apply_cap, sample_device

log = logging.getLogger(__name__)


@dataclass(slots=True)
class ExpertTarget:
    """An expert replica on this node, reached through its actor handle."""

    expert: str
    replica: int
    actor: Any  # a Ray actor handle exposing power_sample / apply_power_cap

    @property
    def gpu(self) -> str:
        return f"{self.expert}/{self.replica}"


class NodeAgent:
    """Reads and caps the GPUs of one node. ``call_timeout_s`` bounds every call to an expert."""

    def __init__(self, node_id: str, node: str, *, nvml: bool = True, priority_window_s: float = 60.0,
                 call_timeout_s: float = 2.0, experts: list[tuple[str, int, Any]] | None = None) -> None:
        """``experts``: the replicas on this node, as for :meth:`set_experts`. Given here, a
        restarted agent actor (Ray re-runs the constructor with the same arguments) knows its
        experts again without anyone calling it."""
        logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
        self.node_id = node_id
        self.node = node
        self.priority_window_s = priority_window_s
        self.call_timeout_s = call_timeout_s
        self.nvml: dict[str, Device] = self._open_nvml() if nvml else {}
        self.experts: dict[str, ExpertTarget] = {t.gpu: t for t in (ExpertTarget(e, r, a) for e, r, a in experts or ())}

    def _open_nvml(self) -> dict[str, Device]:
        from workers.devices.nvml import visible_gpu_count

        try:
            count = visible_gpu_count()
        except DeviceError as exc:
            log.info("node %s: no NVML GPUs to govern (%s)", self.node, exc)
            return {}
        devices = {}
        for index in range(count):
            try:
                devices[f"{self.node}/nvml:{index}"] = open_device(NvmlDeviceSpec(index=index))
            except DeviceError as exc:
                log.warning("node %s: cannot open GPU %d: %s", self.node, index, exc)
        return devices

    async def ready(self) -> dict[str, int]:
        return {"nvml_gpus": len(self.nvml), "experts": len(self.experts)}

    async def set_experts(self, experts: list[tuple[str, int, Any]]) -> None:
        """The expert replicas that run on this node: (expert, replica, actor handle)."""
        self.experts = {t.gpu: t for t in (ExpertTarget(e, r, a) for e, r, a in experts)}

    # -- telemetry ----------------------------------------------------------------------------------
    async def sample(self) -> list[GpuSample]:
        """One reading of every GPU of this node (NVML GPUs and expert-owned devices)."""
        now = time.time()
        expert_samples = await asyncio.gather(*(self._sample_expert(t) for t in self.experts.values()))
        nvml_samples = await asyncio.gather(*(asyncio.to_thread(sample_device, d) for d in self.nvml.values()))
        by_uuid = {s.uuid: gpu for gpu, s in zip(self.nvml, nvml_samples, strict=True) if s.uuid}
        owners: dict[str, tuple[ExpertTarget, DeviceSample]] = {}
        out: list[GpuSample] = []
        for target, sample in zip(self.experts.values(), expert_samples, strict=True):
            if sample.uuid and sample.uuid in by_uuid:
                owners[by_uuid[sample.uuid]] = (target, sample)  # read and capped through NVML here
            else:
                out.append(GpuSample(target.gpu, self.node, target.expert, target.replica, now, sample))
        for gpu, sample in zip(self.nvml, nvml_samples, strict=True):
            if gpu in owners:
                target, info = owners[gpu]
                sample = _with_expert_info(sample, info)
                out.append(GpuSample(gpu, self.node, target.expert, target.replica, now, sample))
            else:
                out.append(GpuSample(gpu, self.node, "", -1, now, _unused(sample)))
        return out

    async def _sample_expert(self, target: ExpertTarget) -> DeviceSample:
        try:
            return await asyncio.wait_for(target.actor.power_sample.remote(self.priority_window_s),
                                          self.call_timeout_s)
        except Exception as exc:  # noqa: BLE001 - dead, restarting or slow: a missing reading
            return DeviceSample(device=target.gpu, power_w=None, error=f"no reading: {_short(exc)}")

    # -- control ------------------------------------------------------------------------------------
    async def apply(self, caps: dict[str, PowerCap]) -> list[CapResult]:
        """Apply each GPU's cap; one result per GPU, in the order given."""
        return list(await asyncio.gather(*(self._apply_one(gpu, cap) for gpu, cap in caps.items())))

    async def _apply_one(self, gpu: str, cap: PowerCap) -> CapResult:
        if gpu in self.nvml:
            return await asyncio.to_thread(apply_cap, self.nvml[gpu], cap, gpu)
        target = self.experts.get(gpu)
        if target is None:
            return CapResult(gpu=gpu, applied=False, error=f"node {self.node} has no GPU {gpu!r}")
        try:
            return await asyncio.wait_for(target.actor.apply_power_cap.remote(cap, gpu), self.call_timeout_s)
        except Exception as exc:  # noqa: BLE001 - retried by the governor after resend_after_s
            return CapResult(gpu=gpu, applied=False, error=f"expert unreachable: {_short(exc)}")

    def shutdown(self) -> None:
        for device in self.nvml.values():
            device.close()


def _with_expert_info(sample: DeviceSample, info: DeviceSample) -> DeviceSample:
    return replace(sample, priority_class=info.priority_class, low_requests=info.low_requests,
                   other_requests=info.other_requests)


def _unused(sample: DeviceSample) -> DeviceSample:
    """A GPU no expert uses: nothing to protect, so the governor may treat it as low priority."""
    return replace(sample, priority_class="low")


def _short(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[-1][:200]}" if text else type(exc).__name__
