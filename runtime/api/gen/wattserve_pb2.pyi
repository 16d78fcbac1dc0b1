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

class ImageFormat(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    IMAGE_FORMAT_UNSPECIFIED: _ClassVar[ImageFormat]
    IMAGE_FORMAT_PNG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_JPEG: _ClassVar[ImageFormat]
    IMAGE_FORMAT_RAW_RGB: _ClassVar[ImageFormat]

class CfgType(int, metaclass=_enum_type_wrapper.EnumTypeWrapper):
    __slots__ = ()
    CFG_TYPE_UNSPECIFIED: _ClassVar[CfgType]
    CFG_TYPE_NONE: _ClassVar[CfgType]
    CFG_TYPE_SELF: _ClassVar[CfgType]
    CFG_TYPE_INITIALIZE: _ClassVar[CfgType]
    CFG_TYPE_FULL: _ClassVar[CfgType]
PRIORITY_UNSPECIFIED: Priority
PRIORITY_LOW: Priority
PRIORITY_NORMAL: Priority
PRIORITY_HIGH: Priority
IMAGE_FORMAT_UNSPECIFIED: ImageFormat
IMAGE_FORMAT_PNG: ImageFormat
IMAGE_FORMAT_JPEG: ImageFormat
IMAGE_FORMAT_RAW_RGB: ImageFormat
CFG_TYPE_UNSPECIFIED: CfgType
CFG_TYPE_NONE: CfgType
CFG_TYPE_SELF: CfgType
CFG_TYPE_INITIALIZE: CfgType
CFG_TYPE_FULL: CfgType

class SamplingParams(_message.Message):
    __slots__ = ("temperature", "top_p", "top_k", "seed", "stop", "ignore_eos", "repetition_penalty", "presence_penalty", "frequency_penalty", "min_p", "min_tokens")
    TEMPERATURE_FIELD_NUMBER: _ClassVar[int]
    TOP_P_FIELD_NUMBER: _ClassVar[int]
    TOP_K_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    STOP_FIELD_NUMBER: _ClassVar[int]
    IGNORE_EOS_FIELD_NUMBER: _ClassVar[int]
    REPETITION_PENALTY_FIELD_NUMBER: _ClassVar[int]
    PRESENCE_PENALTY_FIELD_NUMBER: _ClassVar[int]
    FREQUENCY_PENALTY_FIELD_NUMBER: _ClassVar[int]
    MIN_P_FIELD_NUMBER: _ClassVar[int]
    MIN_TOKENS_FIELD_NUMBER: _ClassVar[int]
    temperature: float
    top_p: float
    top_k: int
    seed: int
    stop: _containers.RepeatedScalarFieldContainer[str]
    ignore_eos: bool
    repetition_penalty: float
    presence_penalty: float
    frequency_penalty: float
    min_p: float
    min_tokens: int
    def __init__(self, temperature: _Optional[float] = ..., top_p: _Optional[float] = ..., top_k: _Optional[int] = ..., seed: _Optional[int] = ..., stop: _Optional[_Iterable[str]] = ..., ignore_eos: _Optional[bool] = ..., repetition_penalty: _Optional[float] = ..., presence_penalty: _Optional[float] = ..., frequency_penalty: _Optional[float] = ..., min_p: _Optional[float] = ..., min_tokens: _Optional[int] = ...) -> None: ...

class ChatMessage(_message.Message):
    __slots__ = ("role", "content")
    ROLE_FIELD_NUMBER: _ClassVar[int]
    CONTENT_FIELD_NUMBER: _ClassVar[int]
    role: str
    content: str
    def __init__(self, role: _Optional[str] = ..., content: _Optional[str] = ...) -> None: ...

class GenerateRequest(_message.Message):
    __slots__ = ("prompt", "max_tokens", "sampling", "expert", "energy_budget_j", "latency_budget_ms", "priority", "tenant", "request_id", "compute_budget", "messages")
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
    MESSAGES_FIELD_NUMBER: _ClassVar[int]
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
    messages: _containers.RepeatedCompositeFieldContainer[ChatMessage]
    def __init__(self, prompt: _Optional[str] = ..., max_tokens: _Optional[int] = ..., sampling: _Optional[_Union[SamplingParams, _Mapping]] = ..., expert: _Optional[str] = ..., energy_budget_j: _Optional[float] = ..., latency_budget_ms: _Optional[float] = ..., priority: _Optional[_Union[Priority, str]] = ..., tenant: _Optional[str] = ..., request_id: _Optional[str] = ..., compute_budget: _Optional[float] = ..., messages: _Optional[_Iterable[_Union[ChatMessage, _Mapping]]] = ...) -> None: ...

class TokenChunk(_message.Message):
    __slots__ = ("text", "token_ids")
    TEXT_FIELD_NUMBER: _ClassVar[int]
    TOKEN_IDS_FIELD_NUMBER: _ClassVar[int]
    text: str
    token_ids: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, text: _Optional[str] = ..., token_ids: _Optional[_Iterable[int]] = ...) -> None: ...

class Usage(_message.Message):
    __slots__ = ("prompt_tokens", "completion_tokens", "expert", "replica", "ttft_ms", "total_latency_ms", "energy_j", "energy_source", "finish_reason", "request_id", "routing_policy", "routing_reason", "expert_ttft_ms", "gate", "subset", "gate_weights", "predicted_energy_j", "predicted_latency_ms", "budget_exceeded", "cascade", "mean_logprob", "num_layers", "avg_exit_layer", "layers_skipped", "compute_fraction", "energy_saved_j", "exit_operating_point", "energy_saved_net_j")
    class GateWeightsEntry(_message.Message):
        __slots__ = ("key", "value")
        KEY_FIELD_NUMBER: _ClassVar[int]
        VALUE_FIELD_NUMBER: _ClassVar[int]
        key: str
        value: float
        def __init__(self, key: _Optional[str] = ..., value: _Optional[float] = ...) -> None: ...
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
    GATE_FIELD_NUMBER: _ClassVar[int]
    SUBSET_FIELD_NUMBER: _ClassVar[int]
    GATE_WEIGHTS_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    BUDGET_EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    CASCADE_FIELD_NUMBER: _ClassVar[int]
    MEAN_LOGPROB_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    AVG_EXIT_LAYER_FIELD_NUMBER: _ClassVar[int]
    LAYERS_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    COMPUTE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SAVED_J_FIELD_NUMBER: _ClassVar[int]
    EXIT_OPERATING_POINT_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SAVED_NET_J_FIELD_NUMBER: _ClassVar[int]
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
    gate: str
    subset: _containers.RepeatedScalarFieldContainer[str]
    gate_weights: _containers.ScalarMap[str, float]
    predicted_energy_j: float
    predicted_latency_ms: float
    budget_exceeded: bool
    cascade: _containers.RepeatedScalarFieldContainer[str]
    mean_logprob: float
    num_layers: int
    avg_exit_layer: float
    layers_skipped: int
    compute_fraction: float
    energy_saved_j: float
    exit_operating_point: str
    energy_saved_net_j: float
    def __init__(self, prompt_tokens: _Optional[int] = ..., completion_tokens: _Optional[int] = ..., expert: _Optional[str] = ..., replica: _Optional[int] = ..., ttft_ms: _Optional[float] = ..., total_latency_ms: _Optional[float] = ..., energy_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., finish_reason: _Optional[str] = ..., request_id: _Optional[str] = ..., routing_policy: _Optional[str] = ..., routing_reason: _Optional[str] = ..., expert_ttft_ms: _Optional[float] = ..., gate: _Optional[str] = ..., subset: _Optional[_Iterable[str]] = ..., gate_weights: _Optional[_Mapping[str, float]] = ..., predicted_energy_j: _Optional[float] = ..., predicted_latency_ms: _Optional[float] = ..., budget_exceeded: _Optional[bool] = ..., cascade: _Optional[_Iterable[str]] = ..., mean_logprob: _Optional[float] = ..., num_layers: _Optional[int] = ..., avg_exit_layer: _Optional[float] = ..., layers_skipped: _Optional[int] = ..., compute_fraction: _Optional[float] = ..., energy_saved_j: _Optional[float] = ..., exit_operating_point: _Optional[str] = ..., energy_saved_net_j: _Optional[float] = ...) -> None: ...

class GenerateResponse(_message.Message):
    __slots__ = ("chunk", "usage")
    CHUNK_FIELD_NUMBER: _ClassVar[int]
    USAGE_FIELD_NUMBER: _ClassVar[int]
    chunk: TokenChunk
    usage: Usage
    def __init__(self, chunk: _Optional[_Union[TokenChunk, _Mapping]] = ..., usage: _Optional[_Union[Usage, _Mapping]] = ...) -> None: ...

class FeedbackRequest(_message.Message):
    __slots__ = ("request_id", "score", "tenant")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    SCORE_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    score: float
    tenant: str
    def __init__(self, request_id: _Optional[str] = ..., score: _Optional[float] = ..., tenant: _Optional[str] = ...) -> None: ...

class FeedbackResponse(_message.Message):
    __slots__ = ("request_id", "expert", "predicted_quality", "quality_correction")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_QUALITY_FIELD_NUMBER: _ClassVar[int]
    QUALITY_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    expert: str
    predicted_quality: float
    quality_correction: float
    def __init__(self, request_id: _Optional[str] = ..., expert: _Optional[str] = ..., predicted_quality: _Optional[float] = ..., quality_correction: _Optional[float] = ...) -> None: ...

class ListExpertsRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class ExpertReplica(_message.Message):
    __slots__ = ("replica", "healthy", "error", "running", "waiting", "prefill_ms_per_token", "decode_ms_per_token", "j_per_token", "requests_energy_j", "idle_energy_j", "requests_finished", "device", "device_energy_j", "energy_source", "host", "pid", "kv_cache_usage", "num_layers", "j_per_layer_token", "exit_histogram", "probe_energy_j")
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
    KV_CACHE_USAGE_FIELD_NUMBER: _ClassVar[int]
    NUM_LAYERS_FIELD_NUMBER: _ClassVar[int]
    J_PER_LAYER_TOKEN_FIELD_NUMBER: _ClassVar[int]
    EXIT_HISTOGRAM_FIELD_NUMBER: _ClassVar[int]
    PROBE_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
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
    kv_cache_usage: float
    num_layers: int
    j_per_layer_token: float
    exit_histogram: _containers.ScalarMap[int, int]
    probe_energy_j: float
    def __init__(self, replica: _Optional[int] = ..., healthy: _Optional[bool] = ..., error: _Optional[str] = ..., running: _Optional[int] = ..., waiting: _Optional[int] = ..., prefill_ms_per_token: _Optional[float] = ..., decode_ms_per_token: _Optional[float] = ..., j_per_token: _Optional[float] = ..., requests_energy_j: _Optional[float] = ..., idle_energy_j: _Optional[float] = ..., requests_finished: _Optional[int] = ..., device: _Optional[str] = ..., device_energy_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., host: _Optional[str] = ..., pid: _Optional[int] = ..., kv_cache_usage: _Optional[float] = ..., num_layers: _Optional[int] = ..., j_per_layer_token: _Optional[float] = ..., exit_histogram: _Optional[_Mapping[int, int]] = ..., probe_energy_j: _Optional[float] = ...) -> None: ...

class PredictionError(_message.Message):
    __slots__ = ("energy_rel_error", "latency_rel_error", "energy_correction", "latency_correction", "samples")
    ENERGY_REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    LATENCY_REL_ERROR_FIELD_NUMBER: _ClassVar[int]
    ENERGY_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    LATENCY_CORRECTION_FIELD_NUMBER: _ClassVar[int]
    SAMPLES_FIELD_NUMBER: _ClassVar[int]
    energy_rel_error: float
    latency_rel_error: float
    energy_correction: float
    latency_correction: float
    samples: int
    def __init__(self, energy_rel_error: _Optional[float] = ..., latency_rel_error: _Optional[float] = ..., energy_correction: _Optional[float] = ..., latency_correction: _Optional[float] = ..., samples: _Optional[int] = ...) -> None: ...

class ExpertInfo(_message.Message):
    __slots__ = ("name", "model", "engine", "device_backend", "energy_source", "priority_class", "max_batch", "max_model_len", "params", "replicas", "prediction", "quality_prior", "score_prediction")
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
    PREDICTION_FIELD_NUMBER: _ClassVar[int]
    QUALITY_PRIOR_FIELD_NUMBER: _ClassVar[int]
    SCORE_PREDICTION_FIELD_NUMBER: _ClassVar[int]
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
    prediction: PredictionError
    quality_prior: float
    score_prediction: PredictionError
    def __init__(self, name: _Optional[str] = ..., model: _Optional[str] = ..., engine: _Optional[str] = ..., device_backend: _Optional[str] = ..., energy_source: _Optional[str] = ..., priority_class: _Optional[str] = ..., max_batch: _Optional[int] = ..., max_model_len: _Optional[int] = ..., params: _Optional[int] = ..., replicas: _Optional[_Iterable[_Union[ExpertReplica, _Mapping]]] = ..., prediction: _Optional[_Union[PredictionError, _Mapping]] = ..., quality_prior: _Optional[float] = ..., score_prediction: _Optional[_Union[PredictionError, _Mapping]] = ...) -> None: ...

class ListExpertsResponse(_message.Message):
    __slots__ = ("experts",)
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertInfo]
    def __init__(self, experts: _Optional[_Iterable[_Union[ExpertInfo, _Mapping]]] = ...) -> None: ...

class GetStatusRequest(_message.Message):
    __slots__ = ()
    def __init__(self) -> None: ...

class GetStatusResponse(_message.Message):
    __slots__ = ("version", "uptime_s", "ray_address", "routing_policy", "inflight", "max_inflight", "healthy_replicas", "total_replicas", "requests_total", "requests_failed", "requests_energy_j", "idle_energy_j", "energy_sources", "gate")
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
    GATE_FIELD_NUMBER: _ClassVar[int]
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
    gate: str
    def __init__(self, version: _Optional[str] = ..., uptime_s: _Optional[float] = ..., ray_address: _Optional[str] = ..., routing_policy: _Optional[str] = ..., inflight: _Optional[int] = ..., max_inflight: _Optional[int] = ..., healthy_replicas: _Optional[int] = ..., total_replicas: _Optional[int] = ..., requests_total: _Optional[int] = ..., requests_failed: _Optional[int] = ..., requests_energy_j: _Optional[float] = ..., idle_energy_j: _Optional[float] = ..., energy_sources: _Optional[_Iterable[str]] = ..., gate: _Optional[str] = ...) -> None: ...

class ScoreRequest(_message.Message):
    __slots__ = ("prompt", "choices", "energy_budget_j", "latency_budget_ms", "priority", "tenant", "expert", "request_id", "choice_norm")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    CHOICES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_BUDGET_J_FIELD_NUMBER: _ClassVar[int]
    LATENCY_BUDGET_MS_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    CHOICE_NORM_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    choices: _containers.RepeatedScalarFieldContainer[str]
    energy_budget_j: float
    latency_budget_ms: float
    priority: Priority
    tenant: str
    expert: str
    request_id: str
    choice_norm: str
    def __init__(self, prompt: _Optional[str] = ..., choices: _Optional[_Iterable[str]] = ..., energy_budget_j: _Optional[float] = ..., latency_budget_ms: _Optional[float] = ..., priority: _Optional[_Union[Priority, str]] = ..., tenant: _Optional[str] = ..., expert: _Optional[str] = ..., request_id: _Optional[str] = ..., choice_norm: _Optional[str] = ...) -> None: ...

class ExpertScore(_message.Message):
    __slots__ = ("expert", "replica", "weight", "choice_logprobs", "choice_probs", "energy_j", "energy_source", "latency_ms")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    WEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHOICE_LOGPROBS_FIELD_NUMBER: _ClassVar[int]
    CHOICE_PROBS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    expert: str
    replica: int
    weight: float
    choice_logprobs: _containers.RepeatedScalarFieldContainer[float]
    choice_probs: _containers.RepeatedScalarFieldContainer[float]
    energy_j: float
    energy_source: str
    latency_ms: float
    def __init__(self, expert: _Optional[str] = ..., replica: _Optional[int] = ..., weight: _Optional[float] = ..., choice_logprobs: _Optional[_Iterable[float]] = ..., choice_probs: _Optional[_Iterable[float]] = ..., energy_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., latency_ms: _Optional[float] = ...) -> None: ...

class ScoreResponse(_message.Message):
    __slots__ = ("request_id", "best_choice", "best_text", "choice_probs", "experts", "energy_j", "total_latency_ms", "routing_policy", "routing_reason", "gate", "budget_exceeded", "predicted_energy_j")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    BEST_CHOICE_FIELD_NUMBER: _ClassVar[int]
    BEST_TEXT_FIELD_NUMBER: _ClassVar[int]
    CHOICE_PROBS_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    ROUTING_POLICY_FIELD_NUMBER: _ClassVar[int]
    ROUTING_REASON_FIELD_NUMBER: _ClassVar[int]
    GATE_FIELD_NUMBER: _ClassVar[int]
    BUDGET_EXCEEDED_FIELD_NUMBER: _ClassVar[int]
    PREDICTED_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    best_choice: int
    best_text: str
    choice_probs: _containers.RepeatedScalarFieldContainer[float]
    experts: _containers.RepeatedCompositeFieldContainer[ExpertScore]
    energy_j: float
    total_latency_ms: float
    routing_policy: str
    routing_reason: str
    gate: str
    budget_exceeded: bool
    predicted_energy_j: float
    def __init__(self, request_id: _Optional[str] = ..., best_choice: _Optional[int] = ..., best_text: _Optional[str] = ..., choice_probs: _Optional[_Iterable[float]] = ..., experts: _Optional[_Iterable[_Union[ExpertScore, _Mapping]]] = ..., energy_j: _Optional[float] = ..., total_latency_ms: _Optional[float] = ..., routing_policy: _Optional[str] = ..., routing_reason: _Optional[str] = ..., gate: _Optional[str] = ..., budget_exceeded: _Optional[bool] = ..., predicted_energy_j: _Optional[float] = ...) -> None: ...

class EnergyBudget(_message.Message):
    __slots__ = ("scope", "unlimited", "energy_budget_j", "window_s", "average_power_w", "throttle_fraction", "used_j", "remaining_j", "state", "retry_after_s", "quality_per_j", "price")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    ENERGY_BUDGET_J_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_POWER_W_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    USED_J_FIELD_NUMBER: _ClassVar[int]
    REMAINING_J_FIELD_NUMBER: _ClassVar[int]
    STATE_FIELD_NUMBER: _ClassVar[int]
    RETRY_AFTER_S_FIELD_NUMBER: _ClassVar[int]
    QUALITY_PER_J_FIELD_NUMBER: _ClassVar[int]
    PRICE_FIELD_NUMBER: _ClassVar[int]
    scope: str
    unlimited: bool
    energy_budget_j: float
    window_s: float
    average_power_w: float
    throttle_fraction: float
    used_j: float
    remaining_j: float
    state: str
    retry_after_s: float
    quality_per_j: float
    price: str
    def __init__(self, scope: _Optional[str] = ..., unlimited: _Optional[bool] = ..., energy_budget_j: _Optional[float] = ..., window_s: _Optional[float] = ..., average_power_w: _Optional[float] = ..., throttle_fraction: _Optional[float] = ..., used_j: _Optional[float] = ..., remaining_j: _Optional[float] = ..., state: _Optional[str] = ..., retry_after_s: _Optional[float] = ..., quality_per_j: _Optional[float] = ..., price: _Optional[str] = ...) -> None: ...

class BudgetChange(_message.Message):
    __slots__ = ("unix_s", "scope", "old_budget", "new_budget", "actor", "peer", "reason")
    UNIX_S_FIELD_NUMBER: _ClassVar[int]
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    OLD_BUDGET_FIELD_NUMBER: _ClassVar[int]
    NEW_BUDGET_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    PEER_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    unix_s: float
    scope: str
    old_budget: str
    new_budget: str
    actor: str
    peer: str
    reason: str
    def __init__(self, unix_s: _Optional[float] = ..., scope: _Optional[str] = ..., old_budget: _Optional[str] = ..., new_budget: _Optional[str] = ..., actor: _Optional[str] = ..., peer: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SetEnergyBudgetRequest(_message.Message):
    __slots__ = ("scope", "energy_budget_j", "average_power_w", "window_s", "throttle_fraction", "unlimited", "actor", "reason")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_BUDGET_J_FIELD_NUMBER: _ClassVar[int]
    AVERAGE_POWER_W_FIELD_NUMBER: _ClassVar[int]
    WINDOW_S_FIELD_NUMBER: _ClassVar[int]
    THROTTLE_FRACTION_FIELD_NUMBER: _ClassVar[int]
    UNLIMITED_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    scope: str
    energy_budget_j: float
    average_power_w: float
    window_s: float
    throttle_fraction: float
    unlimited: bool
    actor: str
    reason: str
    def __init__(self, scope: _Optional[str] = ..., energy_budget_j: _Optional[float] = ..., average_power_w: _Optional[float] = ..., window_s: _Optional[float] = ..., throttle_fraction: _Optional[float] = ..., unlimited: _Optional[bool] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SetEnergyBudgetResponse(_message.Message):
    __slots__ = ("budget", "change")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    CHANGE_FIELD_NUMBER: _ClassVar[int]
    budget: EnergyBudget
    change: BudgetChange
    def __init__(self, budget: _Optional[_Union[EnergyBudget, _Mapping]] = ..., change: _Optional[_Union[BudgetChange, _Mapping]] = ...) -> None: ...

class SetEnergyPriceRequest(_message.Message):
    __slots__ = ("scope", "quality_per_j", "auto", "inherit", "actor", "reason")
    SCOPE_FIELD_NUMBER: _ClassVar[int]
    QUALITY_PER_J_FIELD_NUMBER: _ClassVar[int]
    AUTO_FIELD_NUMBER: _ClassVar[int]
    INHERIT_FIELD_NUMBER: _ClassVar[int]
    ACTOR_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    scope: str
    quality_per_j: float
    auto: bool
    inherit: bool
    actor: str
    reason: str
    def __init__(self, scope: _Optional[str] = ..., quality_per_j: _Optional[float] = ..., auto: _Optional[bool] = ..., inherit: _Optional[bool] = ..., actor: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class SetEnergyPriceResponse(_message.Message):
    __slots__ = ("budget", "old_price")
    BUDGET_FIELD_NUMBER: _ClassVar[int]
    OLD_PRICE_FIELD_NUMBER: _ClassVar[int]
    budget: EnergyBudget
    old_price: str
    def __init__(self, budget: _Optional[_Union[EnergyBudget, _Mapping]] = ..., old_price: _Optional[str] = ...) -> None: ...

class GetEnergyBudgetRequest(_message.Message):
    __slots__ = ("scopes", "recent_changes")
    SCOPES_FIELD_NUMBER: _ClassVar[int]
    RECENT_CHANGES_FIELD_NUMBER: _ClassVar[int]
    scopes: _containers.RepeatedScalarFieldContainer[str]
    recent_changes: int
    def __init__(self, scopes: _Optional[_Iterable[str]] = ..., recent_changes: _Optional[int] = ...) -> None: ...

class GetEnergyBudgetResponse(_message.Message):
    __slots__ = ("budgets", "changes")
    BUDGETS_FIELD_NUMBER: _ClassVar[int]
    CHANGES_FIELD_NUMBER: _ClassVar[int]
    budgets: _containers.RepeatedCompositeFieldContainer[EnergyBudget]
    changes: _containers.RepeatedCompositeFieldContainer[BudgetChange]
    def __init__(self, budgets: _Optional[_Iterable[_Union[EnergyBudget, _Mapping]]] = ..., changes: _Optional[_Iterable[_Union[BudgetChange, _Mapping]]] = ...) -> None: ...

class Image(_message.Message):
    __slots__ = ("data", "format", "width", "height", "channels")
    DATA_FIELD_NUMBER: _ClassVar[int]
    FORMAT_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    CHANNELS_FIELD_NUMBER: _ClassVar[int]
    data: bytes
    format: ImageFormat
    width: int
    height: int
    channels: int
    def __init__(self, data: _Optional[bytes] = ..., format: _Optional[_Union[ImageFormat, str]] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., channels: _Optional[int] = ...) -> None: ...

class SimilarityFilter(_message.Message):
    __slots__ = ("enabled", "threshold", "max_skip_frames")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    THRESHOLD_FIELD_NUMBER: _ClassVar[int]
    MAX_SKIP_FRAMES_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    threshold: float
    max_skip_frames: int
    def __init__(self, enabled: _Optional[bool] = ..., threshold: _Optional[float] = ..., max_skip_frames: _Optional[int] = ...) -> None: ...

class ImageParams(_message.Message):
    __slots__ = ("prompt", "negative_prompt", "t_index_list", "cfg_type", "guidance_scale", "delta", "width", "height", "seed", "output_format", "jpeg_quality")
    PROMPT_FIELD_NUMBER: _ClassVar[int]
    NEGATIVE_PROMPT_FIELD_NUMBER: _ClassVar[int]
    T_INDEX_LIST_FIELD_NUMBER: _ClassVar[int]
    CFG_TYPE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    JPEG_QUALITY_FIELD_NUMBER: _ClassVar[int]
    prompt: str
    negative_prompt: str
    t_index_list: _containers.RepeatedScalarFieldContainer[int]
    cfg_type: CfgType
    guidance_scale: float
    delta: float
    width: int
    height: int
    seed: int
    output_format: ImageFormat
    jpeg_quality: int
    def __init__(self, prompt: _Optional[str] = ..., negative_prompt: _Optional[str] = ..., t_index_list: _Optional[_Iterable[int]] = ..., cfg_type: _Optional[_Union[CfgType, str]] = ..., guidance_scale: _Optional[float] = ..., delta: _Optional[float] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ..., jpeg_quality: _Optional[int] = ...) -> None: ...

class ImageStreamConfig(_message.Message):
    __slots__ = ("params", "similarity_filter", "frame_buffer_size", "expert", "priority", "tenant", "request_id")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FILTER_FIELD_NUMBER: _ClassVar[int]
    FRAME_BUFFER_SIZE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    params: ImageParams
    similarity_filter: SimilarityFilter
    frame_buffer_size: int
    expert: str
    priority: Priority
    tenant: str
    request_id: str
    def __init__(self, params: _Optional[_Union[ImageParams, _Mapping]] = ..., similarity_filter: _Optional[_Union[SimilarityFilter, _Mapping]] = ..., frame_buffer_size: _Optional[int] = ..., expert: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ..., tenant: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class StreamImagesRequest(_message.Message):
    __slots__ = ("config", "frame")
    CONFIG_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    config: ImageStreamConfig
    frame: Image
    def __init__(self, config: _Optional[_Union[ImageStreamConfig, _Mapping]] = ..., frame: _Optional[_Union[Image, _Mapping]] = ...) -> None: ...

class StreamStarted(_message.Message):
    __slots__ = ("request_id", "expert", "replica", "t_index_list", "timesteps", "cfg_type", "guidance_scale", "delta", "frame_buffer_size", "width", "height", "seed", "similarity_filter", "output_format", "unet_evaluations_per_frame", "output_lag_frames", "energy_source", "setup_energy_j", "routing_policy", "routing_reason")
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    T_INDEX_LIST_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    CFG_TYPE_FIELD_NUMBER: _ClassVar[int]
    GUIDANCE_SCALE_FIELD_NUMBER: _ClassVar[int]
    DELTA_FIELD_NUMBER: _ClassVar[int]
    FRAME_BUFFER_SIZE_FIELD_NUMBER: _ClassVar[int]
    WIDTH_FIELD_NUMBER: _ClassVar[int]
    HEIGHT_FIELD_NUMBER: _ClassVar[int]
    SEED_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FILTER_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FORMAT_FIELD_NUMBER: _ClassVar[int]
    UNET_EVALUATIONS_PER_FRAME_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_LAG_FRAMES_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    SETUP_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ROUTING_POLICY_FIELD_NUMBER: _ClassVar[int]
    ROUTING_REASON_FIELD_NUMBER: _ClassVar[int]
    request_id: str
    expert: str
    replica: int
    t_index_list: _containers.RepeatedScalarFieldContainer[int]
    timesteps: _containers.RepeatedScalarFieldContainer[int]
    cfg_type: CfgType
    guidance_scale: float
    delta: float
    frame_buffer_size: int
    width: int
    height: int
    seed: int
    similarity_filter: SimilarityFilter
    output_format: ImageFormat
    unet_evaluations_per_frame: int
    output_lag_frames: int
    energy_source: str
    setup_energy_j: float
    routing_policy: str
    routing_reason: str
    def __init__(self, request_id: _Optional[str] = ..., expert: _Optional[str] = ..., replica: _Optional[int] = ..., t_index_list: _Optional[_Iterable[int]] = ..., timesteps: _Optional[_Iterable[int]] = ..., cfg_type: _Optional[_Union[CfgType, str]] = ..., guidance_scale: _Optional[float] = ..., delta: _Optional[float] = ..., frame_buffer_size: _Optional[int] = ..., width: _Optional[int] = ..., height: _Optional[int] = ..., seed: _Optional[int] = ..., similarity_filter: _Optional[_Union[SimilarityFilter, _Mapping]] = ..., output_format: _Optional[_Union[ImageFormat, str]] = ..., unet_evaluations_per_frame: _Optional[int] = ..., output_lag_frames: _Optional[int] = ..., energy_source: _Optional[str] = ..., setup_energy_j: _Optional[float] = ..., routing_policy: _Optional[str] = ..., routing_reason: _Optional[str] = ...) -> None: ...

class ImageFrameResult(_message.Message):
    __slots__ = ("frame_index", "source_frame_index", "skipped", "image", "latency_ms", "expert_latency_ms", "energy_j", "energy_source", "energy_saved_j", "unet_evaluations", "similarity", "input_frames_dropped", "output_frames_dropped", "dropped_frame_indices")
    FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    SOURCE_FRAME_INDEX_FIELD_NUMBER: _ClassVar[int]
    SKIPPED_FIELD_NUMBER: _ClassVar[int]
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SAVED_J_FIELD_NUMBER: _ClassVar[int]
    UNET_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    SIMILARITY_FIELD_NUMBER: _ClassVar[int]
    INPUT_FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FRAME_INDICES_FIELD_NUMBER: _ClassVar[int]
    frame_index: int
    source_frame_index: int
    skipped: bool
    image: Image
    latency_ms: float
    expert_latency_ms: float
    energy_j: float
    energy_source: str
    energy_saved_j: float
    unet_evaluations: int
    similarity: float
    input_frames_dropped: int
    output_frames_dropped: int
    dropped_frame_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, frame_index: _Optional[int] = ..., source_frame_index: _Optional[int] = ..., skipped: _Optional[bool] = ..., image: _Optional[_Union[Image, _Mapping]] = ..., latency_ms: _Optional[float] = ..., expert_latency_ms: _Optional[float] = ..., energy_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., energy_saved_j: _Optional[float] = ..., unet_evaluations: _Optional[int] = ..., similarity: _Optional[float] = ..., input_frames_dropped: _Optional[int] = ..., output_frames_dropped: _Optional[int] = ..., dropped_frame_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class ImageStreamSummary(_message.Message):
    __slots__ = ("frames_received", "frames_processed", "frames_skipped", "input_frames_dropped", "output_frames_dropped", "unet_calls", "unet_evaluations", "energy_j", "setup_energy_j", "energy_saved_j", "energy_source", "total_latency_ms", "dropped_frame_indices")
    FRAMES_RECEIVED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_PROCESSED_FIELD_NUMBER: _ClassVar[int]
    FRAMES_SKIPPED_FIELD_NUMBER: _ClassVar[int]
    INPUT_FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    OUTPUT_FRAMES_DROPPED_FIELD_NUMBER: _ClassVar[int]
    UNET_CALLS_FIELD_NUMBER: _ClassVar[int]
    UNET_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    SETUP_ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SAVED_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    TOTAL_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    DROPPED_FRAME_INDICES_FIELD_NUMBER: _ClassVar[int]
    frames_received: int
    frames_processed: int
    frames_skipped: int
    input_frames_dropped: int
    output_frames_dropped: int
    unet_calls: int
    unet_evaluations: int
    energy_j: float
    setup_energy_j: float
    energy_saved_j: float
    energy_source: str
    total_latency_ms: float
    dropped_frame_indices: _containers.RepeatedScalarFieldContainer[int]
    def __init__(self, frames_received: _Optional[int] = ..., frames_processed: _Optional[int] = ..., frames_skipped: _Optional[int] = ..., input_frames_dropped: _Optional[int] = ..., output_frames_dropped: _Optional[int] = ..., unet_calls: _Optional[int] = ..., unet_evaluations: _Optional[int] = ..., energy_j: _Optional[float] = ..., setup_energy_j: _Optional[float] = ..., energy_saved_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., total_latency_ms: _Optional[float] = ..., dropped_frame_indices: _Optional[_Iterable[int]] = ...) -> None: ...

class StreamImagesResponse(_message.Message):
    __slots__ = ("started", "frame", "summary")
    STARTED_FIELD_NUMBER: _ClassVar[int]
    FRAME_FIELD_NUMBER: _ClassVar[int]
    SUMMARY_FIELD_NUMBER: _ClassVar[int]
    started: StreamStarted
    frame: ImageFrameResult
    summary: ImageStreamSummary
    def __init__(self, started: _Optional[_Union[StreamStarted, _Mapping]] = ..., frame: _Optional[_Union[ImageFrameResult, _Mapping]] = ..., summary: _Optional[_Union[ImageStreamSummary, _Mapping]] = ...) -> None: ...

class GenerateImageRequest(_message.Message):
    __slots__ = ("params", "expert", "priority", "tenant", "request_id")
    PARAMS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    PRIORITY_FIELD_NUMBER: _ClassVar[int]
    TENANT_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    params: ImageParams
    expert: str
    priority: Priority
    tenant: str
    request_id: str
    def __init__(self, params: _Optional[_Union[ImageParams, _Mapping]] = ..., expert: _Optional[str] = ..., priority: _Optional[_Union[Priority, str]] = ..., tenant: _Optional[str] = ..., request_id: _Optional[str] = ...) -> None: ...

class GenerateImageResponse(_message.Message):
    __slots__ = ("image", "expert", "replica", "request_id", "latency_ms", "expert_latency_ms", "energy_j", "energy_source", "unet_calls", "unet_evaluations", "timesteps", "cfg_type", "routing_policy", "routing_reason")
    IMAGE_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICA_FIELD_NUMBER: _ClassVar[int]
    REQUEST_ID_FIELD_NUMBER: _ClassVar[int]
    LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    EXPERT_LATENCY_MS_FIELD_NUMBER: _ClassVar[int]
    ENERGY_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    UNET_CALLS_FIELD_NUMBER: _ClassVar[int]
    UNET_EVALUATIONS_FIELD_NUMBER: _ClassVar[int]
    TIMESTEPS_FIELD_NUMBER: _ClassVar[int]
    CFG_TYPE_FIELD_NUMBER: _ClassVar[int]
    ROUTING_POLICY_FIELD_NUMBER: _ClassVar[int]
    ROUTING_REASON_FIELD_NUMBER: _ClassVar[int]
    image: Image
    expert: str
    replica: int
    request_id: str
    latency_ms: float
    expert_latency_ms: float
    energy_j: float
    energy_source: str
    unet_calls: int
    unet_evaluations: int
    timesteps: _containers.RepeatedScalarFieldContainer[int]
    cfg_type: CfgType
    routing_policy: str
    routing_reason: str
    def __init__(self, image: _Optional[_Union[Image, _Mapping]] = ..., expert: _Optional[str] = ..., replica: _Optional[int] = ..., request_id: _Optional[str] = ..., latency_ms: _Optional[float] = ..., expert_latency_ms: _Optional[float] = ..., energy_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., unet_calls: _Optional[int] = ..., unet_evaluations: _Optional[int] = ..., timesteps: _Optional[_Iterable[int]] = ..., cfg_type: _Optional[_Union[CfgType, str]] = ..., routing_policy: _Optional[str] = ..., routing_reason: _Optional[str] = ...) -> None: ...

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

class GetCapacityStatusRequest(_message.Message):
    __slots__ = ("max_events",)
    MAX_EVENTS_FIELD_NUMBER: _ClassVar[int]
    max_events: int
    def __init__(self, max_events: _Optional[int] = ...) -> None: ...

class ExpertCapacity(_message.Message):
    __slots__ = ("expert", "replicas_wanted", "replicas_running", "replicas_starting", "cold_starts", "cold_start_s", "target_sm_clock_mhz", "clock_applied", "energy_saved_j", "energy_source", "reason")
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_WANTED_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_RUNNING_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_STARTING_FIELD_NUMBER: _ClassVar[int]
    COLD_STARTS_FIELD_NUMBER: _ClassVar[int]
    COLD_START_S_FIELD_NUMBER: _ClassVar[int]
    TARGET_SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    CLOCK_APPLIED_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SAVED_J_FIELD_NUMBER: _ClassVar[int]
    ENERGY_SOURCE_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    expert: str
    replicas_wanted: int
    replicas_running: int
    replicas_starting: int
    cold_starts: int
    cold_start_s: float
    target_sm_clock_mhz: float
    clock_applied: bool
    energy_saved_j: float
    energy_source: str
    reason: str
    def __init__(self, expert: _Optional[str] = ..., replicas_wanted: _Optional[int] = ..., replicas_running: _Optional[int] = ..., replicas_starting: _Optional[int] = ..., cold_starts: _Optional[int] = ..., cold_start_s: _Optional[float] = ..., target_sm_clock_mhz: _Optional[float] = ..., clock_applied: _Optional[bool] = ..., energy_saved_j: _Optional[float] = ..., energy_source: _Optional[str] = ..., reason: _Optional[str] = ...) -> None: ...

class CapacityEvent(_message.Message):
    __slots__ = ("time_unix_s", "expert", "action", "replicas_from", "replicas_to", "target_sm_clock_mhz", "reason")
    TIME_UNIX_S_FIELD_NUMBER: _ClassVar[int]
    EXPERT_FIELD_NUMBER: _ClassVar[int]
    ACTION_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_FROM_FIELD_NUMBER: _ClassVar[int]
    REPLICAS_TO_FIELD_NUMBER: _ClassVar[int]
    TARGET_SM_CLOCK_MHZ_FIELD_NUMBER: _ClassVar[int]
    REASON_FIELD_NUMBER: _ClassVar[int]
    time_unix_s: float
    expert: str
    action: str
    replicas_from: int
    replicas_to: int
    target_sm_clock_mhz: float
    reason: str
    def __init__(self, time_unix_s: _Optional[float] = ..., expert: _Optional[str] = ..., action: _Optional[str] = ..., replicas_from: _Optional[int] = ..., replicas_to: _Optional[int] = ..., target_sm_clock_mhz: _Optional[float] = ..., reason: _Optional[str] = ...) -> None: ...

class CapacityStatus(_message.Message):
    __slots__ = ("enabled", "experts", "events")
    ENABLED_FIELD_NUMBER: _ClassVar[int]
    EXPERTS_FIELD_NUMBER: _ClassVar[int]
    EVENTS_FIELD_NUMBER: _ClassVar[int]
    enabled: bool
    experts: _containers.RepeatedCompositeFieldContainer[ExpertCapacity]
    events: _containers.RepeatedCompositeFieldContainer[CapacityEvent]
    def __init__(self, enabled: _Optional[bool] = ..., experts: _Optional[_Iterable[_Union[ExpertCapacity, _Mapping]]] = ..., events: _Optional[_Iterable[_Union[CapacityEvent, _Mapping]]] = ...) -> None: ...
