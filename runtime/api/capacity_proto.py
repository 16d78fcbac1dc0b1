"""Capacity controller views (``runtime/gateway/admin.py``) -> protobuf. Conversion only."""

from __future__ import annotations

from ..gateway.admin import CapacityView
from .gen import wattserve_pb2 as pb


def capacity_to_proto(view: CapacityView) -> pb.CapacityStatus:
    experts = []
    for e in view.experts:
        msg = pb.ExpertCapacity(
            expert=e.expert, replicas_wanted=e.wanted, replicas_running=e.running, replicas_starting=e.starting,
            cold_starts=e.cold_starts, cold_start_s=e.cold_start_s, clock_applied=e.clock_applied,
            energy_saved_j=e.saved_energy_j, energy_source=e.energy_source, reason=e.last_reason,
        )
        if e.target_clock_mhz is not None:
            msg.target_sm_clock_mhz = e.target_clock_mhz
        experts.append(msg)
    events = []
    for ev in view.events:
        msg = pb.CapacityEvent(time_unix_s=ev.at_unix_s, expert=ev.expert, action=ev.action,
                               replicas_from=ev.replicas_from, replicas_to=ev.replicas_to, reason=ev.reason)
        if ev.target_clock_mhz is not None:
            msg.target_sm_clock_mhz = ev.target_clock_mhz
        events.append(msg)
    return pb.CapacityStatus(enabled=view.enabled, experts=experts, events=events)
