"""Power governor messages: domain (``wattserve.power``) -> protobuf. Conversion only."""

from __future__ import annotations

from wattserve.power import GpuStatus, PowerEvent, PowerStatus, RowStatus

from .gen import wattserve_pb2 as pb


def _set_optional(msg, **values) -> None:
    for name, value in values.items():
        if value is not None:
            setattr(msg, name, value)


def row_to_proto(row: RowStatus) -> pb.PowerRow:
    msg = pb.PowerRow(name=row.name, power_w=row.power_w, level=row.level.name, telemetry_ok=row.telemetry_ok,
                      gpus=row.gpus, capped_s=row.capped_s)
    _set_optional(msg, provisioned_power_w=row.provisioned_power_w, t1_w=row.t1_w, t2_w=row.t2_w,
                  brake_w=row.brake_w)
    return msg


def gpu_to_proto(gpu: GpuStatus) -> pb.GpuPower:
    msg = pb.GpuPower(gpu=gpu.gpu, node=gpu.node, row=gpu.row, expert=gpu.expert, replica=gpu.replica,
                      device=gpu.device, priority=gpu.priority, can_actuate=gpu.can_actuate,
                      control_reason=gpu.control_reason, error=gpu.error)
    _set_optional(msg, power_w=gpu.power_w, sm_clock_mhz=gpu.sm_clock_mhz, max_sm_clock_mhz=gpu.max_sm_clock_mhz,
                  locked_sm_clock_mhz=gpu.locked_sm_clock_mhz, target_sm_clock_mhz=gpu.target_sm_clock_mhz,
                  power_limit_w=gpu.power_limit_w, sample_age_s=gpu.sample_age_s)
    return msg


def event_to_proto(event: PowerEvent) -> pb.PowerEvent:
    msg = pb.PowerEvent(time_unix_s=event.time_unix_s, kind=event.kind.value, row=event.row, gpu=event.gpu,
                        reason=event.reason)
    _set_optional(msg, row_power_w=event.row_power_w, provisioned_power_w=event.provisioned_power_w,
                  from_sm_clock_mhz=event.from_sm_clock_mhz, to_sm_clock_mhz=event.to_sm_clock_mhz)
    return msg


def status_to_proto(status: PowerStatus) -> pb.PowerStatus:
    return pb.PowerStatus(
        enabled=status.enabled, policy=status.policy, interval_s=status.interval_s,
        rows=[row_to_proto(r) for r in status.rows], gpus=[gpu_to_proto(g) for g in status.gpus],
        events=[event_to_proto(e) for e in status.events], counters=status.counters, alerts=list(status.alerts),
    )
