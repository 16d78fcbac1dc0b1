from google.protobuf.internal import containers as _containers
from google.protobuf.internal import enum_type_wrapper as _enum_type_wrapper
from google.protobuf import descriptor as _descriptor
from google.protobuf import message as _message
from collections.abc import Iterable as _Iterable, Mapping as _Mapping
from typing import ClassVar as _ClassVar, Optional as _Optional, Union as _Union

DESCRIPTOR: _descriptor.FileDescriptor

class Priority(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    PRIORITY_UNSPECIFIED: _ClassVar[Priority]
    PRIORITY_LOW: _ClassVar[Priority]
    PRIORITY_NORMAL: _ClassVar[Priority]
    PRIORITY_HIGH: _ClassVar[Priority]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LOW: Priority
PRIORITY_NORMAL: Priority
PRIORITY_HIGH: Priority

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_tokens", "sampling", "expert", "energy_budget_j", "latency_budget_ms", "priority", "tenant", "request_id")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ENERGY_BUDGET_J_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_tokens: int
    sampling: SamplingParams
    expert: str
    energy_budget_j: float
    latency_budget_ms: float
    priority: Priority
    tenant: str
    request_id: str
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., expert: _Optional[str] = ..., energy_budget_j: _Optional[float] = ..., latency_budget_ms: _Optional[float] = ..., priority: _Optional[_Union[Priority, str]] = ..., tenant: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "expert", "replica", "ttft_ms", "total_latency_ms", "energy_j", "energy_source", "finish_reason", "request_id", "routing_policy", "routing_reason", "expert_ttft_ms")
    PROMPT_TOKENS_FIELD_NUMBER: _ClassVar[int]
    COMPLETION_TOKENS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    FINISH_REASON_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    ROUTING_POLICY_FIELD_NUMBER: _ClassVar[int]
    ROUTING_REASON_FIELD_NUMBER: _ClassVar[int]
    EXPERT_TTFT_MS_FIELD_NUMBER: _ClassVar[int]
    prompt_tokens: int
    completion_tokens: int
    expert: str
    replica: int
    ttft_ms: float
    total_latency_ms: float
    energy_j: float
    energy_source: str
    finish_reason: str
    request_id: str
    routing_policy: str
    routing_reason: str
    expert_ttft_ms: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., expert: _Optional[str] = ..., replica: _Optional[int] = ..., ttft_ms: _Optional[float] = ..., total_latency_ms: _Optional[float] = ..., energy_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., finish_reason: _Optional[str] = ..., request_id: _Optional[str] = ..., routing_policy: _Optional[str] = ..., routing_reason: _Optional[str] = ..., expert_ttft_ms: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("chunk", "usage")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    chunk: TokenChunk
    usage: Usage
    def __init__(self, chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class ListExpertsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertReplica(_message.Message):
    __slots__ = ("replica", "healthy", "error", "running", "waiting", "prefill_ms_per_token", "decode_ms_per_token", "j_per_token", "requests_energy_j", "idle_energy_j", "requests_finished", "device", "device_energy_j", "energy_source", "host", "pid")
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    RUNNING_FIELD_NUMBER: _ClassVar[int]
    WAITING_FIELD_NUMBER: _ClassVar[int]
    PREFILL_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    DECODE_MS_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    J_PER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    IDLE_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FINISHED_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    HOST_FIELD_NUMBER: _ClassVar[int]
    PID_FIELD_NUMBER: _ClassVar[int]
    replica: int
    healthy: bool
    error: str
    running: int
    waiting: int
    prefill_ms_per_token: float
    decode_ms_per_token: float
    j_per_token: float
    requests_energy_j: float
    idle_energy_j: float
    requests_finished: int
    device: str
    device_energy_j: float
    energy_source: str
    host: str
    pid: int
    def __init__(self, replica: _Optional[int] = ..., healthy: _Optional[bool] = ..., error: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., prefill_ms_per_token: _Optional[float] = ..., decode_ms_per_token: _Optional[float] = ..., j_per_token: _Optional[float] = ..., requests_energy_j: _Optional[float] = ..., idle_energy_j: _Optional[float] = ..., requests_finished: _Optional[int] = ..., device: _Optional[str] = ..., device_energy_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ...) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("name", "model", "engine", "device_backend", "energy_source", "priority_class", "max_batch", "max_model_len", "params", "replicas")
    NAME_FIELD_NUMBER: _ClassVar[int]
    MODEL_FIELD_NUMBER: _ClassVar[int]
    ENGINE_FIELD_NUMBER: _ClassVar[int]
    DEVICE_BACKEND_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_CLASS_FIELD_NUMBER: _ClassVar[int]
    MAX_BATCH_FIELD_NUMBER: _ClassVar[int]
    MAX_MODEL_LEN_FIELD_NUMBER: _ClassVar[int]
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FIELD_NUMBER: _ClassVar[int]
    name: str
    model: str
    engine: str
    device_backend: str
    energy_source: str
    priority_class: str
    max_batch: int
    max_model_len: int
    params: int
    replicas: _containers.RepeatedCompositeFieldContainer[ExpertReplica]
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., engine: _Optional[str] = ..., device_backend: _Optional[str] = ..., energy_source: _Optional[str] = ..., priority_class: _Optional[str] = ..., max_batch: _Optional[int] = ..., max_model_len: _Optional[int] = ..., params: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ExpertReplica, _Mapping]]] = ...) -> None: ...

class ListExpertsResponse(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertInfo]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertInfo, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("version", "uptime_s", "ray_address", "routing_policy", "inflight", "max_inflight", "healthy_replicas", "total_replicas", "requests_total", "requests_failed", "requests_energy_j", "idle_energy_j", "energy_sources")
    VERSION_FIELD_NUMBER: _ClassVar[int]
    UPTIME_S_FIELD_NUMBER: _ClassVar[int]
    RAY_ADDRESS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_POLICY_FIELD_NUMBER: _ClassVar[int]
    INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    MAX_INFLIGHT_FIELD_NUMBER: _ClassVar[int]
    HEALTHY_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    TOTAL_REPLICAS_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_TOTAL_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_FAILED_FIELD_NUMBER: _ClassVar[int]
    REQUESTS_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    IDLE_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCES_FIELD_NUMBER: _ClassVar[int]
    version: str
    uptime_s: float
    ray_address: str
    routing_policy: str
    inflight: int
    max_inflight: int
    healthy_replicas: int
    total_replicas: int
    requests_total: int
    requests_failed: int
    requests_energy_j: float
    idle_energy_j: float
    energy_sources: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., ray_address: _Optional[str] = ..., routing_policy: _Optional[str] = ..., inflight: _Optional[int] = ..., max_inflight: _Optional[int] = ..., healthy_replicas: _Optional[int] = ..., total_replicas: _Optional[int] = ..., requests_total: _Optional[int] = ..., requests_failed: _Optional[int] = ..., requests_energy_j: _Optional[float] = ..., idle_energy_j: _Optional[float] = ..., energy_sources: _Optional[_Iterable[str]] = ...) -> None: ...

class SetPowerBudgetRequest(_message.Message):
    __slots__ = ("row", "provisioned_power_w")
    ROW_FIELD_NUMBER: _ClassVar[int]
    PROVISIONED_POWER_W_FIELD_NUMBER: _ClassVar[int]
    row: str
    provisioned_power_w: float
    def __init__(self, row: _Optional[str] = ..., provisioned_power_w: _Optional[float] = ...) -> None: ...

class SetPowerBudgetResponse(_message.Message):
    __slots__ = ("row",)
    ROW_FIELD_NUMBER: _ClassVar[int]
    row: PowerRow
    def __init__(self, row: _Optional[_Union[PowerRow, _Mapping]] = ...) -> None: ...

class GetPowerStatusRequest(_message.Message):
    __slots__ = ("max_events",)
    MAX_EVENTS_FIELD_NUMBER: _ClassVar[int]
    max_events: int
    def __init__(self, max_events: _Optional[int] = ...) -> None: ...

class PowerRow(_message.Message):
    __slots__ = ("name", "provisioned_power_w", "power_w", "level", "t1_w", "t2_w", "brake_w", "telemetry_ok", "gpus", "capped_s")
    NAME_FIELD_NUMBER: _ClassVar[int]
    PROVISIONED_POWER_W_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    LEVEL_FIELD_NUMBER: _ClassVar[int]
    T1_W_FIELD_NUMBER: _ClassVar[int]
    T2_W_FIELD_NUMBER: _ClassVar[int]
    BRAKE_W_FIELD_NUMBER: _ClassVar[int]
    TELEMETRY_OK_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    CAPPED_S_FIELD_NUMBER: _ClassVar[int]
    name: str
    provisioned_power_w: float
    power_w: float
    level: str
    t1_w: float
    t2_w: float
    brake_w: float
    telemetry_ok: bool
    gpus: int
    capped_s: float
    def __init__(self, name: _Optional[str] = ..., provisioned_power_w: _Optional[float] = ..., power_w: _Optional[float] = ..., level: _Optional[str] = ..., t1_w: _Optional[float] = ..., t2_w: _Optional[float] = ..., brake_w: _Optional[float] = ..., telemetry_ok: _Optional[bool] = ..., gpus: _Optional[int] = ..., capped_s: _Optional[float] = ...) -> None: ...

class GpuPower(_message.Message):
    __slots__ = ("gpu", "node", "row", "expert", "replica", "device", "priority", "power_w", "sm_clock_mhz", "max_sm_clock_mhz", "locked_sm_clock_mhz", "target_sm_clock_mhz", "power_limit_w", "can_actuate", "control_reason", "sample_age_s", "error")
    GPU_FIELD_NUMBER: _ClassVar[int]
    NODE_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    DEVICE_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    POWER_W_FIELD_NUMBER: _ClassVar[int]
    SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    MAX_SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    LOCKED_SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    TARGET_SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    POWER_LIMIT_W_FIELD_NUMBER: _ClassVar[int]
    CAN_ACTUATE_FIELD_NUMBER: _ClassVar[int]
    CONTROL_REASON_FIELD_NUMBER: _ClassVar[int]
    SAMPLE_AGE_S_FIELD_NUMBER: _ClassVar[int]
    ERROR_FIELD_NUMBER: _ClassVar[int]
    gpu: str
    node: str
    row: str
    expert: str
    replica: int
    device: str
    priority: str
    power_w: float
    sm_clock_mhz: float
    max_sm_clock_mhz: float
    locked_sm_clock_mhz: float
    target_sm_clock_mhz: float
    power_limit_w: float
    can_actuate: bool
    control_reason: str
    sample_age_s: float
    error: str
    def __init__(self, gpu: _Optional[str] = ..., node: _Optional[str] = ..., row: _Optional[str] = ..., expert: _Optional[str] = ..., replica: _Optional[int] = ..., device: _Optional[str] = ..., priority: _Optional[str] = ..., power_w: _Optional[float] = ..., sm_clock_mhz: _Optional[float] = ..., max_sm_clock_mhz: _Optional[float] = ..., locked_sm_clock_mhz: _Optional[float] = ..., target_sm_clock_mhz: _Optional[float] = ..., power_limit_w: _Optional[float] = ..., can_actuate: _Optional[bool] = ..., control_reason: _Optional[str] = ..., sample_age_s: _Optional[float] = ..., error: _Optional[str] = ...) -> None: ...

class PowerEvent(_message.Message):
    __slots__ = ("time_unix_s", "kind", "row", "gpu", "reason", "row_power_w", "provisioned_power_w", "from_sm_clock_mhz", "to_sm_clock_mhz")
    TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    KIND_FIELD_NUMBER: _ClassVar[int]
    ROW_FIELD_NUMBER: _ClassVar[int]
    GPU_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    ROW_POWER_W_FIELD_NUMBER: _ClassVar[int]
    PROVISIONED_POWER_W_FIELD_NUMBER: _ClassVar[int]
    FROM_SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    TO_SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    time_unix_s: float
    kind: str
    row: str
    gpu: str
    reason: str
    row_power_w: float
    provisioned_power_w: float
    from_sm_clock_mhz: float
    to_sm_clock_mhz: float
    def __init__(self, time_unix_s: _Optional[float] = ..., kind: _Optional[str] = ..., row: _Optional[str] = ..., gpu: _Optional[str] = ..., reason: _Optional[str] = ..., row_power_w: _Optional[float] = ..., provisioned_power_w: _Optional[float] = ..., from_sm_clock_mhz: _Optional[float] = ..., to_sm_clock_mhz: _Optional[float] = ...) -> None: ...

class PowerStatus(_message.Message):
    __slots__ = ("enabled", "policy", "interval_s", "rows", "gpus", "events", "counters", "alerts")
    class CountersEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: int
        def __init__(self, key: _Optional[str] = ..., value: _Optional[int] = ...) -> None: ...
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    POLICY_FIELD_NUMBER: _ClassVar[int]
    INTERVAL_S_FIELD_NUMBER: _ClassVar[int]
    ROWS_FIELD_NUMBER: _ClassVar[int]
    GPUS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    COUNTERS_FIELD_NUMBER: _ClassVar[int]
    ALERTS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    policy: str
    interval_s: float
    rows: _containers.RepeatedCompositeFieldContainer[PowerRow]
    gpus: _containers.RepeatedCompositeFieldContainer[GpuPower]
    events: _containers.RepeatedCompositeFieldContainer[PowerEvent]
    counters: _containers.ScalarMap[str, int]
    alerts: _containers.RepeatedScalarFieldContainer[str]
    def __init__(self, enabled: _Optional[bool] = ..., policy: _Optional[str] = ..., interval_s: _Optional[float] = ..., rows: _Optional[_Iterable[_Union[PowerRow, _Mapping]]] = ..., gpus: _Optional[_Iterable[_Union[GpuPower, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[PowerEvent, _Mapping]]] = ..., counters: _Optional[_Mapping[str, int]] = ..., alerts: _Optional[_Iterable[str]] = ...) -> None: ...
