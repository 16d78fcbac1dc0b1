"""The ``power:`` section of the server configuration (the governor, its rows and its policy)."""

from __future__ import annotations

from pydantic import Field, model_validator

from wattserve.specs import Strict

from .policy import PolicyConfig

DEFAULT_ROW = "cluster"


class RowSpec(Strict):
    """A power row: GPUs on these nodes share one provisioned budget."""

    name: str = Field(description="Row id used in status, events and `wattserve power set --row`.")
    provisioned_power_w: float | None = Field(
        default=None, gt=0, description="Budget P of the row in watts; null: monitor only until an operator sets it."
    )
    nodes: list[str] = Field(
        default_factory=list, description="Ray node ids or node IP addresses whose GPUs belong to this row."
    )


class PowerConfig(Strict):
    """The POLCA power governor: node agents sample GPU power, one governor caps per row."""

    enabled: bool = Field(default=False, description="Start node agents and the governor with the server.")
    provisioned_power_w: float | None = Field(
        default=None, gt=0,
        description=f"Budget P in watts of the default row `{DEFAULT_ROW}` (GPUs on nodes no row lists); "
        "null: monitor only until an operator sets it.",
    )
    rows: list[RowSpec] = Field(default_factory=list, description="Extra rows with their own budgets.")
    interval_s: float = Field(default=2.0, gt=0, description="Telemetry and control period (POLCA: 2 s).")
    telemetry_timeout_s: float = Field(
        default=6.0, gt=0, description="A GPU without a reading this long makes its row's telemetry incomplete."
    )
    priority_window_s: float = Field(
        default=60.0, gt=0, description="A GPU is low-priority if every request it started in this window was LOW."
    )
    resend_after_s: float = Field(
        default=10.0, gt=0, description="Re-send a cap a GPU does not report as in effect after this long."
    )
    event_log_size: int = Field(default=1000, ge=10, description="Events kept for GetPowerStatus (oldest dropped).")
    nvml: bool = Field(
        default=True, description="Node agents sample and cap every NVML GPU on their node (where a driver exists)."
    )
    policy: PolicyConfig = Field(default_factory=PolicyConfig, description="Thresholds, hysteresis and clocks.")

    @model_validator(mode="after")
    def _rows_unique(self) -> PowerConfig:
        names = [r.name for r in self.rows]
        if DEFAULT_ROW in names or len(set(names)) != len(names):
            raise ValueError(f"row names must be unique and not {DEFAULT_ROW!r} (the default row)")
        if self.telemetry_timeout_s < self.interval_s:
            raise ValueError("telemetry_timeout_s must be at least interval_s")
        return self

    def row_of(self, node_id: str, node_ip: str) -> str:
        """The row a node's GPUs belong to."""
        for row in self.rows:
            if node_id in row.nodes or node_ip in row.nodes:
                return row.name
        return DEFAULT_ROW

    def budgets(self) -> dict[str, float | None]:
        """Row name -> configured budget in watts (None: monitor only)."""
        return {DEFAULT_ROW: self.provisioned_power_w, **{r.name: r.provisioned_power_w for r in self.rows}}
