"""Reading and capping a device for the power governor, the same way wherever the device lives.

Expert actors use these for the device they own (simulated devices live there), node agents for
the GPUs they open through NVML. Both functions turn device failures into values (an error
string in the sample, ``applied=False`` in the result) so a failing GPU never takes down the
process that asked: the governor reports it and keeps the rest of the row under control.
"""

from __future__ import annotations

from wattserve.errors import ActuationUnavailable, DeviceError, InvalidRequest
from wattserve.power import CapResult, DeviceControl, DeviceSample, PowerCap
from workers.devices.base import Device


def sample_device(device: Device, *, priority_class: str = "high", low_requests: int = 0,
                  other_requests: int = 0) -> DeviceSample:
    """Read power, clocks and limits of ``device`` (blocking: NVML calls; run off event loops)."""
    try:
        power_w = device.power_w()
        return DeviceSample(
            device=device.name,
            power_w=power_w,
            sm_clock_mhz=device.sm_clock_mhz(),
            max_sm_clock_mhz=device.max_sm_clock_mhz(),
            min_sm_clock_mhz=device.min_sm_clock_mhz(),
            locked_sm_clock_mhz=device.locked_sm_clock_mhz(),
            power_limit_w=device.power_limit_w(),
            default_power_limit_w=device.default_power_limit_w(),
            min_power_limit_w=_min_limit(device),
            control=device.control(),
            uuid=device.uuid(),
            priority_class=priority_class,
            low_requests=low_requests,
            other_requests=other_requests,
        )
    except DeviceError as exc:
        return DeviceSample(device=device.name, power_w=None, control=_safe_control(device),
                            priority_class=priority_class, low_requests=low_requests,
                            other_requests=other_requests, error=str(exc))


def apply_cap(device: Device, cap: PowerCap, gpu: str) -> CapResult:
    """Set ``device``'s SM clock ceiling to ``cap.sm_clock_mhz`` (None: unlock) and its power
    limit to ``cap.power_limit_w`` (None: leave it, or restore the default if
    ``cap.reset_power_limit``).

    Never raises for device trouble: :class:`ActuationUnavailable` comes back as a permanent
    failure (no control, no permission), other device errors as a transient one.
    """
    nothing_to_undo = cap.sm_clock_mhz is None and cap.power_limit_w is None and not cap.reset_power_limit
    if nothing_to_undo and not device.control().can_actuate:
        return CapResult(gpu=gpu, applied=True)  # a device that cannot be capped is never capped
    try:
        if cap.sm_clock_mhz is None:
            device.unlock_sm_clock()
        else:
            device.lock_sm_clock_mhz(cap.sm_clock_mhz)
        if cap.power_limit_w is not None:
            device.set_power_limit_w(cap.power_limit_w)
        elif cap.reset_power_limit:
            device.reset_power_limit()
    except ActuationUnavailable as exc:
        return CapResult(gpu=gpu, applied=False, error=str(exc), permanent=True)
    except (DeviceError, InvalidRequest) as exc:
        return CapResult(gpu=gpu, applied=False, error=str(exc))
    return CapResult(gpu=gpu, applied=True, locked_sm_clock_mhz=cap.sm_clock_mhz, power_limit_w=cap.power_limit_w)


def _safe_control(device: Device) -> DeviceControl:
    try:
        return device.control()
    except DeviceError as exc:
        return DeviceControl(reason=str(exc))


def _min_limit(device: Device) -> float | None:
    try:
        limits = device.power_limit_range_w()
    except DeviceError:
        return None
    return None if limits is None else limits[0]
