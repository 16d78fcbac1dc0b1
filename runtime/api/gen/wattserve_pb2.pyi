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
    __slots__ = ("prompt", "max_tokens", "sampling", "expert", "energy_budget_j", "latency_budget_ms", "priority", "tenant", "request_id", "compute_budget")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    MAX_TOKENS_FIELD_NUMBER: _ClassVar[int]
    SAMPLING_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ENERGY_BUDGET_J_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_BUDGET_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    max_tokens: int
    sampling: SamplingParams
    expert: str
    energy_budget_j: float
    latency_budget_ms: float
    priority: Priority
    tenant: str
    request_id: str
    compute_budget: float
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., expert: _Optional[str] = ..., energy_budget_j: _Optional[float] = ..., latency_budget_ms: _Optional[float] = ..., priority: _Optional[_Union[Priority, str]] = ..., tenant: _Optional[str] = ..., request_id: _Optional[str] = ..., compute_budget: _Optional[float] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "expert", "replica", "ttft_ms", "total_latency_ms", "energy_j", "energy_source", "finish_reason", "request_id", "routing_policy", "routing_reason", "expert_ttft_ms", "num_layers", "avg_exit_layer", "layers_skipped", "compute_fraction", "energy_saved_j", "exit_operating_point")
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
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    AVG_EXIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SAVED_J_FIELD_NUMBER: _ClassVar[int]
    EXIT_OPERATING_POINT_FIELD_NUMBER: _ClassVar[int]
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
    num_layers: int
    avg_exit_layer: float
    layers_skipped: int
    compute_fraction: float
    energy_saved_j: float
    exit_operating_point: str
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., expert: _Optional[str] = ..., replica: _Optional[int] = ..., ttft_ms: _Optional[float] = ..., total_latency_ms: _Optional[float] = ..., energy_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., finish_reason: _Optional[str] = ..., request_id: _Optional[str] = ..., routing_policy: _Optional[str] = ..., routing_reason: _Optional[str] = ..., expert_ttft_ms: _Optional[float] = ..., num_layers: _Optional[int] = ..., avg_exit_layer: _Optional[float] = ..., layers_skipped: _Optional[int] = ..., compute_fraction: _Optional[float] = ..., energy_saved_j: _Optional[float] = ..., exit_operating_point: _Optional[str] = ...) -> None: ...

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
    __slots__ = ("replica", "healthy", "error", "running", "waiting", "prefill_ms_per_token", "decode_ms_per_token", "j_per_token", "requests_energy_j", "idle_energy_j", "requests_finished", "device", "device_energy_j", "energy_source", "host", "pid", "num_layers", "j_per_layer_token", "exit_histogram")
    class ExitHistogramEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: int
        value: int
        def __init__(self, key: _Optional[int] = ..., value: _Optional[int] = ...) -> None: ...
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
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    J_PER_LAYER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXIT_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
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
    num_layers: int
    j_per_layer_token: float
    exit_histogram: _containers.ScalarMap[int, int]
    def __init__(self, replica: _Optional[int] = ..., healthy: _Optional[bool] = ..., error: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., prefill_ms_per_token: _Optional[float] = ..., decode_ms_per_token: _Optional[float] = ..., j_per_token: _Optional[float] = ..., requests_energy_j: _Optional[float] = ..., idle_energy_j: _Optional[float] = ..., requests_finished: _Optional[int] = ..., device: _Optional[str] = ..., device_energy_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., num_layers: _Optional[int] = ..., j_per_layer_token: _Optional[float] = ..., exit_histogram: _Optional[_Mapping[int, int]] = ...) -> None: ...

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
