"""The server's configuration: YAML files validated by pydantic models that forbid unknown keys.

``load_config(path)`` returns a :class:`WattserveConfig` or raises ``ConfigError`` whose message
names the file and the dotted path of every bad key, e.g.::

    configs/local.yaml: experts.1.device.nvml.indx: unknown key (allowed: backend, index)
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Literal, get_args

import yaml
from pydantic import Field, ValidationError, field_validator, model_validator

from router.base import ReplicaOrder
from router.cost import CostPrior
from router.policies import policy_names
from router.price import DEFAULT_QUALITY_PER_J
from wattserve.errors import ConfigError
from wattserve.specs import ExpertSpec, Strict
from wattserve.types import Priority

from .capacity.config import CapacityConfig
from .power.config import PowerConfig
from .security.config import AuthConfig, TlsConfig


class RayConfig(Strict):
    """Where the experts run. No address: an embedded local Ray instance on loopback."""

    address: str | None = Field(
        default=None, description="Existing cluster, e.g. 10.0.0.5:6379 or auto; None: embedded."
    )
    namespace: str = Field(default="wattserve", description="Ray namespace for named actors.")
    num_cpus: int | None = Field(default=2, ge=1, description="Embedded only: CPUs Ray may schedule.")
    object_store_memory_mb: int = Field(default=256, ge=80, description="Embedded only.")
    node_ip_address: str = Field(default="127.0.0.1", description="Embedded only: keep Ray on loopback.")
    ready_timeout_s: float = Field(default=600.0, gt=0, description="Wait this long for experts to load.")
    require_all_experts: bool = Field(
        default=True,
        description="Refuse to start unless every expert replica starts. false: serve once any replica is up; "
        "the others stay listed as unhealthy with their reason (requests pinned to them get UNAVAILABLE).",
    )


class GatewayConfig(Strict):
    """The gRPC endpoint, its limits, and how it watches the experts."""

    host: str = Field(default="127.0.0.1", description="Interface the gRPC server binds.")
    port: int = Field(default=50051, ge=0, le=65535, description="0 picks a free port.")
    max_inflight: int = Field(
        default=256, ge=1, description="Requests served at once; more get RESOURCE_EXHAUSTED."
    )
    max_prompt_bytes: int = Field(default=64 * 1024, ge=1, description="Larger prompts are rejected.")
    max_message_bytes: int = Field(default=4 * 1024 * 1024, ge=1024, description="gRPC message size limit: a larger request gets INVALID_ARGUMENT naming it "
                                   "(the transport itself accepts up to 4x this, then RESOURCE_EXHAUSTED).")
    default_max_tokens: int = Field(default=128, ge=1, description="Used when a request sends 0.")
    max_tokens_limit: int = Field(default=4096, ge=1, description="Upper bound on max_tokens.")
    health_interval_s: float = Field(default=1.0, gt=0, description="How often expert telemetry is polled.")
    health_timeout_s: float = Field(default=5.0, gt=0, description="A replica silent this long is unhealthy.")
    max_metadata_bytes: int = Field(
        default=8 * 1024, ge=1024,
        description="Request metadata (gRPC) / headers (HTTP) larger than this are INVALID_ARGUMENT (HTTP 400/431).",
    )
    max_chat_messages: int = Field(default=256, ge=1, description="Most messages in one chat request.")
    max_score_choices: int = Field(default=64, ge=1, description="Most candidate answers in one Score request.")
    max_score_choice_bytes: int = Field(default=4096, ge=1, description="Largest candidate answer (UTF-8 bytes).")
    max_temperature: float = Field(default=100.0, gt=0, description="Largest sampling temperature accepted.")
    max_stream_fps: float = Field(
        default=60.0, gt=0,
        description="StreamImages: frames per second a stream may send on average; faster is INVALID_ARGUMENT.",
    )
    stream_frame_burst: int = Field(
        default=30, ge=1, description="StreamImages: frames a stream may send at once above max_stream_fps."
    )
    tenant_max_inflight: int | None = Field(
        default=None, ge=1,
        description="Requests one tenant may have in flight (tenants[].max_inflight overrides); None: max_inflight.",
    )
    fair_share_above: float = Field(
        default=0.75, gt=0, le=1,
        description="Once this share of max_inflight is in use, a tenant may hold at most its weighted fair "
        "share of max_inflight (among the tenants in flight); more get RESOURCE_EXHAUSTED with a retry hint.",
    )
    shutdown_grace_s: float = Field(
        default=30.0, ge=0,
        description="On SIGINT/SIGTERM, how long streams in flight (gRPC and HTTP alike) may run to their end; "
        "new requests get UNAVAILABLE/503 meanwhile, and streams still running after it are cut with a message "
        "saying so. A second signal cuts at once.",
    )
    retry_unstarted: bool = Field(
        default=True,
        description="A request whose expert fails before it streamed any token is retried once on another "
        "eligible replica (one that streamed tokens ends with UNAVAILABLE instead); a replica it woke that fails "
        "so is replaced within capacity.wakes_per_request.",
    )
    routing_policy: str = Field(
        default="least_loaded",
        description="How experts are chosen: moe2 (gate + budgets, docs/routing.md) or a baseline; one of "
        + ", ".join(policy_names()) + ".",
    )

    replica_order: ReplicaOrder = Field(
        default="least_loaded",
        description="Which of the chosen expert's replicas a request tries first, in every policy but "
        "least_loaded and packed (whose names say it): least_loaded spreads requests over the replicas; packed "
        "sends each to the fullest replica whose occupancy plus the request stays within 0.9 of its max_batch "
        "(and whose predicted latency meets latency_budget_ms, if given), none with room: the least loaded, so "
        "idle replicas are left for the capacity controller to release (docs/capacity.md, packing live).",
    )

    @field_validator("routing_policy")
    @classmethod
    def _known_policy(cls, name: str) -> str:
        # The registry, not this file, knows the policies: a new policy module is selectable at once.
        if name not in policy_names():
            raise ValueError(f"unknown routing policy {name!r}; known: {', '.join(policy_names())}")
        return name


class CostPriorConfig(Strict):
    """Costs the router assumes for an expert until it has measured any (cold start)."""

    # With busy_power_w energy is predicted like a measured profile's, power x compute time, so
    # prompt and output tokens are priced apart (docs/routing.md section 2); j_per_token alone
    # (the older form) prices every token alike.

    prefill_ms_per_token: float = Field(ge=0, description="Prompt processing time per token.")
    decode_ms_per_token: float = Field(ge=0, description="Time of one decode step (one output token).")
    busy_power_w: float | None = Field(
        default=None, gt=0,
        description="Power while computing (energy of a step / its time); energy = this x predicted compute time.",
    )
    prefill_power_w: float | None = Field(
        default=None, gt=0, description="Power while prefilling (prompt-only steps); None: busy_power_w.",
    )
    decode_power_w: float | None = Field(
        default=None, gt=0, description="Power while decoding (decode-only steps); None: busy_power_w.",
    )
    j_per_token: float | None = Field(
        default=None, ge=0, description="Older form, used only without busy_power_w: energy per token processed.",
    )

    @model_validator(mode="after")
    def _an_energy_figure(self) -> CostPriorConfig:
        if self.busy_power_w is None and self.j_per_token is None:
            raise ValueError("a cost prior needs busy_power_w (or the older j_per_token)")
        if self.busy_power_w is None and (self.prefill_power_w is not None or self.decode_power_w is not None):
            raise ValueError("prefill_power_w and decode_power_w refine busy_power_w: give it too")
        return self

    def prior(self) -> CostPrior:
        """The cost model's form of this prior."""
        return CostPrior(self.prefill_ms_per_token, self.decode_ms_per_token, self.j_per_token, self.busy_power_w,
                         self.prefill_power_w, self.decode_power_w)


class ClusterBudgetConfig(Strict):
    """The whole cluster's energy budget: joules per window, or an average power over the window."""

    energy_budget_j: float | None = Field(default=None, ge=0, description="Joules per window.")
    average_power_w: float | None = Field(
        default=None, ge=0, description="Alternative: average watts; the budget is this x window_s joules."
    )
    window_s: float = Field(default=3600.0, gt=0, description="Rolling window length.")

    @model_validator(mode="after")
    def _one_of(self) -> ClusterBudgetConfig:
        if (self.energy_budget_j is None) == (self.average_power_w is None):
            raise ValueError("give exactly one of energy_budget_j or average_power_w")
        return self

    @property
    def joules(self) -> float:
        return self.energy_budget_j if self.energy_budget_j is not None else self.average_power_w * self.window_s


def _check_price(value: float | str | None, name: str) -> None:
    if isinstance(value, float | int) and not (value >= 0 and value != float("inf")):
        raise ValueError(f"{name} must be a finite number >= 0 quality units per J, or auto (got {value})")


class PriceConfig(Strict):
    """The price of energy as the dual of an energy budget (router/price.py, docs/routing.md)."""

    default_quality_per_j: float = Field(
        default=DEFAULT_QUALITY_PER_J, ge=0,
        description="The price with no cluster budget, and the start value of a derived one (quality units per J).",
    )
    step: float = Field(
        default=0.002, ge=0,
        description="Quality units per J the price moves per interval at 100% over (or under) the budget's rate.",
    )
    max_quality_per_j: float = Field(default=0.1, gt=0, description="Upper bound of a derived price.")
    interval_s: float = Field(default=30.0, gt=0, description="How often a derived price moves (burn rate measured over it).")

    @model_validator(mode="after")
    def _bounded(self) -> PriceConfig:
        if self.default_quality_per_j > self.max_quality_per_j:
            raise ValueError("default_quality_per_j must be <= max_quality_per_j")
        return self


class FeedbackConfig(Strict):
    """Online corrections of each expert's predicted quality from feedback (router/feedback.py)."""

    prior_weight: float = Field(
        default=2.0, gt=0, description="Pseudo-count of the gate's own prediction: the correction after n scores is "
        "their mean residual x n / (n + prior_weight).",
    )
    max_weight: float = Field(
        default=20.0, gt=0,
        description="Scores remembered per expert (older ones fade): bounds how long a change in quality takes to show.",
    )
    max_correction: float = Field(default=0.5, gt=0, le=1, description="Largest correction of a predicted quality (either sign).")
    explore_share: float = Field(
        default=0.05, ge=0, le=0.5,
        description="Generate: share of requests answered by another expert that fits their budgets, so feedback can "
        "correct an expert the router stopped using. Only once feedback has been received (none: no exploration).",
    )
    cascade_weight: float = Field(
        default=0.5, ge=0, le=1,
        description="Weight of a cascade outcome as feedback on the cheap expert (kept answer: 1, escalated: 0); 0: off.",
    )
    remember_requests: int = Field(
        default=100_000, ge=1, description="Most finished requests remembered for feedback (oldest forgotten first)."
    )
    remember_s: float = Field(default=3600.0, gt=0, description="Feedback is accepted this long after a request finished.")


class RouterConfig(Strict):
    """The MoE² router: gate, cost model, budgets and the baselines' knobs (docs/routing.md)."""

    gate_path: str | None = Field(
        default=None,
        description="Directory written by `wattserve gate fit` (relative to the config file); "
        "None: the documented prior gate from each expert's quality_prior.",
    )
    gate_outputs: dict[str, str] = Field(
        default_factory=dict,
        description="Expert name -> gate output (a quality column of the training data); default: the expert name.",
    )
    infeasible: Literal["reject", "serve_cheapest"] = Field(
        default="reject",
        description="When no expert fits a request's budget: FAILED_PRECONDITION naming the cheapest "
        "feasible budget, or serve the cheapest expert and flag budget_exceeded.",
    )
    aggregation_ms: float = Field(default=5.0, ge=0, description="Score: time to combine several experts' answers.")
    quality_per_j: float | Literal["auto"] = Field(
        default="auto",
        description="Price of energy in quality units per joule when a request brings no energy budget: Generate "
        "answers with argmax q - price x E. A number fixes it; auto derives it online from the cluster budget's "
        "burn rate (router.price), or uses router.price.default_quality_per_j when there is no cluster budget. "
        "0: the strongest expert that fits answers.",
    )
    price: PriceConfig = Field(default_factory=PriceConfig, description="How an auto price is derived.")
    feedback: FeedbackConfig = Field(
        default_factory=FeedbackConfig, description="Learning expert quality from clients' feedback scores."
    )
    cascade_below_logprob: float | None = Field(
        default=None, le=0,
        description="moe2 Generate: answer first from the cheapest expert of the chosen subset and, when "
        "that answer's mean token log-probability (nats) is below this, answer again from the top expert "
        "(the first answer is held back, not streamed). None: no cascade.",
    )
    strong: str | None = Field(default=None, description="threshold policy: the strong expert (default: highest prior).")
    weak: str | None = Field(default=None, description="threshold policy: the weak expert (default: lowest prior).")
    threshold: float = Field(default=0.0, description="threshold policy: strong when q_strong - q_weak >= this.")
    cost_priors: dict[str, CostPriorConfig] = Field(
        default_factory=dict, description="Expert name -> costs assumed before it has measured any."
    )
    cost_ewma_alpha: float = Field(default=0.1, gt=0, le=1, description="Weight of one outcome in the online corrections.")
    cluster_budget: ClusterBudgetConfig | None = Field(default=None, description="None: no cluster budget.")
    throttle_fraction: float = Field(
        default=0.8, gt=0, le=1,
        description="A tenant or the cluster past this share of its budget is throttled to the cheapest expert.",
    )
    seed: int | None = Field(default=None, description="Seed of the random and least-loaded tie breaks (and of exploration).")

    @model_validator(mode="after")
    def _price_not_negative(self) -> RouterConfig:
        _check_price(self.quality_per_j, "quality_per_j")
        return self


class HttpConfig(Strict):
    """The OpenAI-compatible HTTP API, Prometheus ``/metrics`` and ``/health``, served by the
    same process and event loop as the gRPC endpoint."""

    enabled: bool = Field(default=True, description="Serve HTTP next to gRPC.")
    host: str = Field(default="127.0.0.1", description="Interface the HTTP server binds.")
    port: int | None = Field(
        default=None, ge=0, le=65535,
        description="0 picks a free port. None: 8000, or a free port when the gRPC port is 0 (tests, side-by-side servers).",
    )
    max_body_bytes: int = Field(
        default=1024 * 1024, ge=1024, description="Larger request bodies are answered 413."
    )


DEFAULT_HTTP_PORT = 8000


def resolve_http_port(http: HttpConfig, grpc_port: int) -> int:
    """The HTTP port to bind: the configured one, else 8000 (a free one when gRPC's is 0)."""
    if http.port is not None:
        return http.port
    return 0 if grpc_port == 0 else DEFAULT_HTTP_PORT


class TenantConfig(Strict):
    """A client organisation; requests name it in `tenant`."""

    name: str = Field(description="Tenant id used in requests and metrics.")
    energy_budget_j: float | None = Field(
        default=None, ge=0, description="Energy the tenant may use per budget window; None: unlimited."
    )
    budget_window_s: float = Field(default=3600.0, gt=0, description="Window of energy_budget_j.")
    max_priority: Literal["low", "normal", "high"] = Field(
        default="high", description="Requests above this priority are lowered to it."
    )
    max_inflight: int | None = Field(
        default=None, ge=1, description="Requests this tenant may have in flight; None: gateway.tenant_max_inflight."
    )
    weight: float = Field(default=1.0, gt=0, description="Share of the server when it is saturated (fair share).")
    quality_per_j: float | Literal["auto"] | None = Field(
        default=None,
        description="This tenant's price of energy (quality units per J): a number replaces the cluster's; auto adds "
        "the dual of the tenant's own energy budget to the cluster's price; None: the cluster's price.",
    )

    @model_validator(mode="after")
    def _price_not_negative(self) -> TenantConfig:
        _check_price(self.quality_per_j, "quality_per_j")
        return self

    @property
    def max_priority_value(self) -> Priority:
        return Priority[self.max_priority.upper()]


class LedgerConfig(Strict):
    """Where tenant and cluster energy use (the budget ledger) is kept across gateway restarts."""

    path: str | None = Field(
        default=None,
        description="SQLite file (relative to the config file); None: in memory only, use resets on restart.",
    )
    retention_s: float = Field(
        default=7 * 86400.0, gt=0, description="Charges older than this (and than every budget window) are deleted."
    )


class WattserveConfig(Strict):
    """A whole deployment: where Ray is, the gateway, the experts and the tenants."""

    ray: RayConfig = Field(default_factory=RayConfig, description="Ray cluster or embedded instance.")
    gateway: GatewayConfig = Field(default_factory=GatewayConfig, description="The gRPC endpoint.")
    http: HttpConfig = Field(default_factory=HttpConfig, description="The OpenAI-compatible HTTP API and /metrics.")
    model_cache_dir: str | None = Field(
        default=None,
        description="Where converted models live; default $WATTSERVE_CACHE_DIR or ~/.cache/wattserve. "
        "Relative paths are relative to the config file.",
    )
    experts: list[ExpertSpec] = Field(min_length=1, description="At least one expert.")
    tenants: list[TenantConfig] = Field(
        default_factory=list, description="Empty: any tenant name is accepted."
    )
    router: RouterConfig = Field(default_factory=RouterConfig, description="MoE² routing and energy budgets.")
    power: PowerConfig = Field(
        default_factory=PowerConfig, description="The power governor (off unless enabled)."
    )
    capacity: CapacityConfig = Field(
        default_factory=CapacityConfig, description="The capacity controller: replicas per expert from the load "
        "(off unless enabled)."
    )
    auth: AuthConfig = Field(default_factory=AuthConfig, description="API keys of clients and operators.")
    tls: TlsConfig = Field(default_factory=TlsConfig, description="TLS for gRPC and HTTP (off unless a cert is set).")
    ledger: LedgerConfig = Field(default_factory=LedgerConfig, description="Durable budget ledger.")

    @model_validator(mode="after")
    def _unique_names(self) -> WattserveConfig:
        for kind, names in (("expert", [e.name for e in self.experts]), ("tenant", [t.name for t in self.tenants])):
            dupes = sorted({n for n in names if names.count(n) > 1})
            if dupes:
                raise ValueError(f"duplicate {kind} names: {', '.join(dupes)}")
        names = {e.name for e in self.experts}
        r = self.router
        for what, keys in (("gate_outputs", r.gate_outputs), ("cost_priors", r.cost_priors),
                           ("strong", [r.strong] if r.strong else []), ("weak", [r.weak] if r.weak else [])):
            unknown = sorted(set(keys) - names)
            if unknown:
                raise ValueError(f"router.{what} names unknown experts {unknown}; experts are {sorted(names)}")
        text = {e.name for e in self.experts if e.modality == "text"}
        unsized = sorted(set(self.capacity.experts) - text)
        if unsized:
            raise ValueError(f"capacity.experts names {unsized}, which are not text experts; text experts are "
                             f"{sorted(text)}")
        return self

    def expert(self, name: str) -> ExpertSpec | None:
        return next((e for e in self.experts if e.name == name), None)

    def tenant(self, name: str) -> TenantConfig | None:
        return next((t for t in self.tenants if t.name == name), None)


def _models_in(annotation) -> list[type[Strict]]:
    """The config models an annotation can hold (through Optional, list, Union, Annotated)."""
    if isinstance(annotation, type) and issubclass(annotation, Strict):
        return [annotation]
    return [m for arg in get_args(annotation) for m in _models_in(arg)]


def _tag(model: type[Strict], field: str) -> object:
    """The discriminator value a union member is chosen by (``kind`` or ``backend``), if any."""
    return getattr(model.model_fields.get(field), "default", None)


def _allowed_keys(loc: tuple) -> list[str]:
    """Best effort: the keys allowed where an unknown key ``loc[-1]`` was found."""
    models: list[type[Strict]] = [WattserveConfig]
    for part in loc[:-1]:
        if isinstance(part, int):
            continue
        by_tag = [m for m in models if part in (_tag(m, "kind"), _tag(m, "backend"))]
        if by_tag:  # a discriminated union puts the tag in the location
            models = by_tag
            continue
        fields = [m.model_fields[part] for m in models if part in m.model_fields]
        models = [m for f in fields for m in _models_in(f.annotation)]
        if not models:
            return []
    return sorted({k for m in models for k in m.model_fields})


def _describe(err: dict) -> str:
    where = ".".join(str(p) for p in err["loc"]) or "(top level)"
    if err["type"] == "extra_forbidden":
        allowed = _allowed_keys(tuple(err["loc"]))
        return f"{where}: unknown key" + (f" (allowed: {', '.join(allowed)})" if allowed else "")
    if err["type"] == "missing":
        return f"{where}: required key is missing"
    return f"{where}: {err['msg']}"


def parse_config(data: object, source: str = "<config>") -> WattserveConfig:
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: expected a mapping at the top level, got {type(data).__name__}")
    try:
        return WattserveConfig.model_validate(data)
    except ValidationError as exc:
        problems = "; ".join(_describe(e) for e in exc.errors())
        raise ConfigError(f"{source}: {problems}") from None


def load_config(path: str | Path) -> WattserveConfig:
    path = Path(path)
    try:
        text = path.read_text()
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read config file ({exc.strerror})") from None
    try:
        data = yaml.safe_load(text)
    except yaml.YAMLError as exc:
        raise ConfigError(f"{path}: not valid YAML: {exc}") from None
    cfg = parse_config(data, str(path))
    if cfg.model_cache_dir and not Path(cfg.model_cache_dir).expanduser().is_absolute():
        cfg.model_cache_dir = str((path.parent / cfg.model_cache_dir).resolve())
    for expert in cfg.experts:
        exits = getattr(expert.engine, "early_exit", None)
        for key in ("thresholds_path", "adapters_path"):
            value = getattr(exits, key, None)
            if value and not Path(value).expanduser().is_absolute():
                setattr(exits, key, str((path.parent / value).resolve()))
    if cfg.router.gate_path and not Path(cfg.router.gate_path).expanduser().is_absolute():
        cfg.router.gate_path = str((path.parent / cfg.router.gate_path).resolve())
    for section, key in (("auth", "keys_file"), ("tls", "cert_file"), ("tls", "key_file"),
                         ("tls", "client_ca_file"), ("ledger", "path")):
        obj = getattr(cfg, section)
        value = getattr(obj, key)
        if value and not Path(value).expanduser().is_absolute():
            setattr(obj, key, str((path.parent / value).resolve()))
    return cfg


def config_reference() -> str:
    """Markdown reference of every config key, generated from the models (docs/config.md)."""
    from wattserve.devices import CpuDeviceSpec, NvmlDeviceSpec, SimulatedDeviceSpec
    from wattserve.specs import (
        DiffusionEngineSpec,
        EarlyExitSpec,
        GgufPackageSource,
        HubModelSource,
        LlamaCppEngineSpec,
        LocalModelSource,
        ResourceSpec,
        SyntheticEngineSpec,
        TorchEngineSpec,
        VllmEngineSpec,
    )

    from .capacity.config import ExpertCapacity
    from .capacity.planner import SLO, PlannerConfig
    from .power.config import RowSpec
    from .power.policy import PolicyConfig

    sections = [
        ("top level", WattserveConfig),
        ("ray", RayConfig),
        ("gateway", GatewayConfig),
        ("http", HttpConfig),
        ("tenants[]", TenantConfig),
        ("router", RouterConfig),
        ("router.cost_priors.<expert>", CostPriorConfig),
        ("router.cluster_budget", ClusterBudgetConfig),
        ("router.price", PriceConfig),
        ("router.feedback", FeedbackConfig),
        ("experts[]", ExpertSpec),
        ("experts[].model (kind: local)", LocalModelSource),
        ("experts[].model (kind: gguf_package)", GgufPackageSource),
        ("experts[].model (kind: hub)", HubModelSource),
        ("experts[].engine (kind: torch)", TorchEngineSpec),
        ("experts[].engine.early_exit", EarlyExitSpec),
        ("experts[].engine (kind: llamacpp)", LlamaCppEngineSpec),
        ("experts[].engine (kind: vllm)", VllmEngineSpec),
        ("experts[].engine (kind: synthetic)", SyntheticEngineSpec),
        ("experts[].engine (kind: diffusion): image experts", DiffusionEngineSpec),
        ("experts[].device (backend: cpu)", CpuDeviceSpec),
        ("experts[].device (backend: nvml)", NvmlDeviceSpec),
        ("experts[].device (backend: simulated)", SimulatedDeviceSpec),
        ("experts[].resources", ResourceSpec),
        ("auth", AuthConfig),
        ("tls", TlsConfig),
        ("ledger", LedgerConfig),
        ("power", PowerConfig),
        ("power.rows[]", RowSpec),
        ("power.policy", PolicyConfig),
        ("capacity", CapacityConfig),
        ("capacity.experts.<expert>", ExpertCapacity),
        ("capacity.experts.<expert>.slo", SLO),
        ("capacity.planner", PlannerConfig),
    ]
    out = [
        "# Configuration reference",
        "",
        "Generated from the pydantic models by `python -m runtime.config` (a test keeps it current).",
        "Unknown keys are errors that name the file and the key.",
        "",
    ]
    for title, model in sections:
        out += [f"## {title}", "", (model.__doc__ or "").strip().replace("\n", " "), "", "| key | type | default | meaning |", "| --- | --- | --- | --- |"]
        for name, f in model.model_fields.items():
            default = "required" if f.is_required() else ("see its section" if f.default_factory else repr(f.default))
            kind = f.annotation.__name__ if isinstance(f.annotation, type) else str(f.annotation)
            kind = re.sub(r"\b(?:[a-z_]+\.)+(\w)", r"\1", kind).replace("NoneType", "None")
            kind = re.sub(r"Annotated\[(.*), FieldInfo\(.*\)\]", r"\1", kind)
            desc = (f.description or "").replace("|", "\\|")
            out.append(f"| `{name}` | `{kind}` | `{default}` | {desc} |")
        out.append("")
    return "\n".join(out)


if __name__ == "__main__":
    print(config_reference())
