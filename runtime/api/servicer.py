"""gRPC servicers: protobuf <-> domain objects, nothing else.

Errors are domain exceptions raised by the gateway; ``interceptors.ErrorInterceptor`` maps them
to status codes (and has already checked the caller's key). The tenant of a request comes from the
caller's client key when there is one (``bind_tenant``), never from the request alone. Deadlines and cancellation need no code here: grpc.aio cancels the handler task,
and the gateway's ``finally`` aborts the work on the expert.
"""

from __future__ import annotations

import wattserve
from wattserve.errors import FeatureDisabled, InvalidRequest, WattserveError
from wattserve.power import PowerStatus
from wattserve.types import ChatMessage, Priority, SamplingParams, evolve

from ..gateway import Chunk, Final, Gateway, Request
from ..gateway.admin import ReplicaView
from ..security.keys import bind_tenant
from .auth import current_principal
from .capacity_proto import capacity_to_proto
from .gen import wattserve_pb2 as pb
from .gen import wattserve_pb2_grpc as pb_grpc
from .image_protocol import (
    frames_from_proto,
    image_answer_to_proto,
    image_request_from_proto,
    stream_event_to_proto,
    stream_request_from_proto,
)
from .power_proto import row_to_proto, status_to_proto
from .routing_messages import (
    add_plan_to_usage,
    budget_from_proto,
    budget_to_proto,
    change_to_proto,
    score_request_from_proto,
    score_response_to_proto,
)


def request_from_proto(msg: pb.GenerateRequest, time_remaining_s: float | None) -> Request:
    s = msg.sampling
    if msg.priority not in Priority._value2member_map_ and msg.priority != pb.PRIORITY_UNSPECIFIED:
        raise InvalidRequest(f"priority {msg.priority} is not one of LOW, NORMAL, HIGH")
    return Request(
        prompt=msg.prompt,
        messages=tuple(ChatMessage(role=m.role, content=m.content) for m in msg.messages),
        max_tokens=msg.max_tokens,
        sampling=SamplingParams(
            temperature=s.temperature,
            top_p=s.top_p or 1.0,  # unset (0) is 1, as validation reads it: no copy there
            top_k=s.top_k,
            seed=s.seed if s.HasField("seed") else None,
            stop=tuple(s.stop),
            ignore_eos=s.ignore_eos,
            repetition_penalty=s.repetition_penalty if s.HasField("repetition_penalty") else 1.0,
            presence_penalty=s.presence_penalty,
            frequency_penalty=s.frequency_penalty,
            min_p=s.min_p,
            min_tokens=s.min_tokens,
        ),
        expert=msg.expert,
        energy_budget_j=msg.energy_budget_j if msg.HasField("energy_budget_j") else None,
        compute_budget=msg.compute_budget if msg.HasField("compute_budget") else None,
        latency_budget_ms=msg.latency_budget_ms if msg.HasField("latency_budget_ms") else None,
        priority=Priority(msg.priority) if msg.priority else Priority.NORMAL,
        tenant=msg.tenant,
        request_id=msg.request_id,
        timeout_s=time_remaining_s,
    )


def usage_to_proto(final: Final) -> pb.Usage:
    u = final.usage
    usage = pb.Usage(
        prompt_tokens=u.prompt_tokens,
        completion_tokens=u.completion_tokens,
        expert=final.expert,
        replica=final.replica,
        ttft_ms=final.ttft_ms,
        total_latency_ms=final.total_latency_ms,
        energy_j=u.energy_j,
        energy_source=u.energy_source,
        finish_reason=u.finish_reason.value,
        request_id=final.request_id,
        routing_policy=final.plan.policy,
        routing_reason=final.plan.reason,
        expert_ttft_ms=u.ttft_ms,
    )
    if u.exits is not None:
        e = u.exits
        usage.num_layers, usage.avg_exit_layer, usage.layers_skipped = e.num_layers, e.avg_exit_layer, e.layers_skipped
        usage.compute_fraction, usage.energy_saved_j = e.compute_fraction, e.energy_saved_j
        usage.exit_operating_point = e.operating_point
        if e.energy_saved_net_j is not None:
            usage.energy_saved_net_j = e.energy_saved_net_j
    return add_plan_to_usage(usage, final.plan, u.mean_logprob)


class InferenceServicer(pb_grpc.InferenceServicer):
    def __init__(self, gateway: Gateway) -> None:
        self.gateway = gateway
        self.images = gateway.images

    async def Generate(self, request, context):
        try:
            req = _bound(request_from_proto(request, context.time_remaining()))
        except WattserveError as exc:  # before the gateway: count it here
            self.gateway.refused("grpc", exc)
            raise
        async for item in self.gateway.generate(req):
            if isinstance(item, Chunk):
                yield pb.GenerateResponse(chunk=pb.TokenChunk(text=item.text, token_ids=item.token_ids))
            else:
                yield pb.GenerateResponse(usage=usage_to_proto(item))

    async def Score(self, request, context):
        outcome = await self.gateway.score(_bound(score_request_from_proto(request)))
        return score_response_to_proto(outcome, request.choices)

    async def Feedback(self, request, context):
        if not request.HasField("score"):
            raise InvalidRequest("score is required: a number in [0, 1] (1: a good answer, 0: a wrong one)")
        tenant = bind_tenant(current_principal(), request.tenant)
        served, correction = await self.gateway.feedback(request.request_id, request.score, tenant)
        return pb.FeedbackResponse(request_id=request.request_id, expert=served.expert,
                                   predicted_quality=served.predicted_quality, quality_correction=correction)

    async def StreamImages(self, request_iterator, context):
        first = await anext(request_iterator, None)
        if first is None or first.WhichOneof("kind") != "config":
            raise InvalidRequest("the first StreamImages message must be `config`; frames follow it")
        req = _bound(stream_request_from_proto(first.config))
        async for event in self.images.stream(req, frames_from_proto(request_iterator)):
            yield stream_event_to_proto(event)

    async def GenerateImage(self, request, context):
        answer = await self.images.generate(_bound(image_request_from_proto(request, context.time_remaining())))
        return image_answer_to_proto(answer)


class AdminServicer(pb_grpc.AdminServicer):
    def __init__(self, gateway: Gateway, ray_address: str, power=None) -> None:
        self.gateway = gateway
        self.ray_address = ray_address
        self.power = power  # runtime.power.plane.PowerPlane, or None without a governor

    async def SetPowerBudget(self, request, context):
        if self.power is None:
            raise FeatureDisabled("this server runs without the power governor: set power.enabled: true")
        if not request.provisioned_power_w > 0:
            raise InvalidRequest(f"provisioned_power_w must be > 0 W (got {request.provisioned_power_w})")
        row = await self.power.set_budget(request.row, request.provisioned_power_w)
        return pb.SetPowerBudgetResponse(row=row_to_proto(row))

    async def GetPowerStatus(self, request, context):
        if self.power is None:
            return status_to_proto(PowerStatus(enabled=False, policy="", interval_s=0.0))
        return status_to_proto(await self.power.status(request.max_events or 100))

    async def GetCapacityStatus(self, request, context):
        return capacity_to_proto(self.gateway.admin.capacity_view(request.max_events or 50))

    async def ListExperts(self, request, context):
        admin = self.gateway.admin
        await admin.refresh()
        return pb.ListExpertsResponse(experts=[_expert_to_proto(e) for e in admin.experts()])

    async def GetStatus(self, request, context):
        admin = self.gateway.admin
        await admin.refresh()
        st = admin.status()
        return pb.GetStatusResponse(
            version=wattserve.__version__, uptime_s=st.uptime_s, ray_address=self.ray_address,
            routing_policy=st.routing_policy, inflight=st.inflight, max_inflight=st.max_inflight,
            healthy_replicas=st.healthy_replicas, total_replicas=st.total_replicas, requests_total=st.requests_total,
            requests_failed=st.requests_failed, requests_energy_j=st.requests_energy_j, idle_energy_j=st.idle_energy_j,
            energy_sources=list(st.energy_sources), gate=st.gate,
        )

    async def SetEnergyBudget(self, request, context):
        energy_j, window_s, throttle = budget_from_proto(request)
        view, change = self.gateway.admin.set_budget(
            request.scope, energy_j, window_s=window_s, throttle_fraction=throttle, actor=_actor(request.actor),
            peer=context.peer() or "", reason=request.reason)
        return pb.SetEnergyBudgetResponse(budget=budget_to_proto(view), change=change_to_proto(change))

    async def SetEnergyPrice(self, request, context):
        choices = [request.HasField("quality_per_j"), request.auto, request.inherit]
        if sum(choices) != 1:
            raise InvalidRequest("give exactly one of quality_per_j, auto or inherit")
        value = request.quality_per_j if choices[0] else ("auto" if request.auto else None)
        view, old = self.gateway.admin.set_price(request.scope, value, actor=_actor(request.actor),
                                                 peer=context.peer() or "", reason=request.reason)
        return pb.SetEnergyPriceResponse(budget=budget_to_proto(view), old_price=old)

    async def GetEnergyBudget(self, request, context):
        admin = self.gateway.admin
        return pb.GetEnergyBudgetResponse(
            budgets=[budget_to_proto(v) for v in admin.budgets(list(request.scopes))],
            changes=[change_to_proto(c) for c in admin.budget_changes(request.recent_changes)],
        )


def _bound(req):
    """``req`` with its tenant bound to the caller's key (a client key decides the tenant)."""
    tenant = bind_tenant(current_principal(), req.tenant)
    return req if tenant == req.tenant else evolve(req, tenant=tenant)


def _actor(claimed: str) -> str:
    """Who changed a budget: the operator key's name (what the request claims, when different,
    in brackets); without auth, what the request claims."""
    principal = current_principal()
    if not principal.is_operator:
        return claimed
    return principal.name if claimed in ("", principal.name) else f"{principal.name} ({claimed})"


def _prediction_to_proto(err) -> pb.PredictionError | None:
    if err is None:
        return None
    return pb.PredictionError(
        energy_rel_error=err.energy_rel_error or 0.0, latency_rel_error=err.latency_rel_error or 0.0,
        energy_correction=err.energy_correction, latency_correction=err.latency_correction, samples=err.samples,
    )


def _expert_to_proto(e) -> pb.ExpertInfo:
    spec, first = e.spec, e.profile
    return pb.ExpertInfo(
        name=spec.name, model=first.model if first else spec.model_label, engine=spec.engine.kind,
        device_backend=spec.device.label, energy_source=first.energy_source if first else "",
        priority_class=spec.priority_class, max_batch=spec.max_batch,
        max_model_len=first.max_model_len if first else spec.max_model_len, params=first.params if first else 0,
        replicas=[_replica_to_proto(r) for r in e.replicas], prediction=_prediction_to_proto(e.prediction),
        quality_prior=spec.quality_prior, score_prediction=_prediction_to_proto(e.score_prediction),
    )


def _replica_to_proto(view: ReplicaView) -> pb.ExpertReplica:
    p = view.profile
    msg = pb.ExpertReplica(replica=view.index, healthy=view.healthy, error=view.error)
    if p is not None:
        msg.running, msg.waiting = p.running, p.waiting
        msg.prefill_ms_per_token = p.prefill_ms_per_token or 0.0
        msg.decode_ms_per_token = p.decode_ms_per_token or 0.0
        msg.j_per_token = p.j_per_token or 0.0
        msg.requests_finished = p.requests_finished
        msg.device = p.device
        msg.energy_source = p.energy_source
        msg.host, msg.pid = p.host, p.pid
        msg.num_layers, msg.j_per_layer_token = p.num_layers, p.j_per_layer_token or 0.0
        msg.exit_histogram.update(p.exit_histogram)
        if p.kv_cache_usage is not None:
            msg.kv_cache_usage = p.kv_cache_usage
        if p.energy:
            msg.requests_energy_j, msg.idle_energy_j = p.energy.requests_j, p.energy.idle_j
            msg.device_energy_j, msg.probe_energy_j = p.energy.device_j, p.energy.probe_j
    return msg
