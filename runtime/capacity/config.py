"""The live capacity controller's configuration (``capacity:`` in a server config; off by default).

Per expert it names the range of replicas, the SLOs of the expert's priority class and the idle
delay before its last replica is released; the planner's knobs are ``planner`` (shared).
"""

from __future__ import annotations

from pydantic import Field, model_validator

from wattserve.specs import Strict

from .planner import SLO, PlannerConfig


class ExpertCapacity(Strict):
    """How the controller may size one expert."""

    min_replicas: int = Field(default=1, ge=0, description="Fewest replicas; 0 allows scale to zero.")
    max_replicas: int = Field(default=1, ge=1, le=64, description="Most replicas the controller may run.")
    slo: SLO = Field(default_factory=lambda: SLO(ttft_ms=2000.0, tpot_ms=200.0),
                     description="TTFT/TPOT targets of the expert's priority class.")
    scale_to_zero_after_s: float = Field(
        default=300.0, ge=0, description="Release the last replica after no request and no work this long (s)."
    )
    scale_down_delay_s: float | None = Field(
        default=None, ge=0,
        description="A smaller count must be wanted this long (s); None: planner.scale_down_delay_s."
    )
    cold_start_s: float = Field(
        default=30.0, ge=0, description="Seconds a start is assumed to take until one has been measured."
    )

    @model_validator(mode="after")
    def _range(self) -> ExpertCapacity:
        if self.min_replicas > self.max_replicas:
            raise ValueError(f"min_replicas ({self.min_replicas}) > max_replicas ({self.max_replicas})")
        return self


class CapacityConfig(Strict):
    """The live controller: replicas per expert from the measured load (``docs/capacity.md``)."""

    enabled: bool = Field(default=False, description="Run the controller in the server process.")
    interval_s: float = Field(default=10.0, gt=0, le=3600, description="Seconds between plans.")
    experts: dict[str, ExpertCapacity] = Field(
        default_factory=dict, description="Experts the controller sizes (others keep their configured replicas)."
    )
    planner: PlannerConfig = Field(
        default_factory=PlannerConfig,
        description="The planner's knobs (interval_s and scale_to_zero_after_s are set above and per expert).",
    )
    ready_timeout_s: float = Field(default=600.0, gt=0, description="A start not ready after this long has failed.")
    wake_timeout_s: float = Field(
        default=120.0, gt=0,
        description="Most a request without a deadline waits for a cold expert to start (s); one with a "
        "deadline waits at most until it."
    )
    wakes_per_request: int = Field(
        default=2, ge=1, le=16,
        description="Replicas one request may wake: a woken replica that fails before the request's first token "
        "is replaced by a healthy one of the plan, else by waking another, until this many were woken; then "
        "UNAVAILABLE."
    )
    events_kept: int = Field(default=500, ge=1, le=100_000, description="Decisions kept in the event log.")
    assumed_prompt_tokens: int = Field(default=256, ge=1, description="Prompt tokens per request until measured.")
    assumed_output_tokens: int = Field(default=128, ge=1, description="Output tokens per request until measured.")
    assumed_decode_ms_per_token: float = Field(
        default=50.0, gt=0, description="CPU experts: decode step time until the replica has measured one (ms)."
    )
