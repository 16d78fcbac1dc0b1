"""Prometheus series read at scrape time from the gateway's admin façade (no replica calls on
the scrape path): queue depths, health, device power / power limit / SM clock per replica, energy
per replica (requests and idle), energy budgets and prediction errors, and the power budget and
cap events the governor wrote (``runtime/power/state.py``), and the capacity controller's replicas
wanted and running, cold starts, clock targets and estimated energy saved. The per-request series are
``runtime/metrics.py``'s."""

from __future__ import annotations

from prometheus_client import CollectorRegistry
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily

from ..gateway.admin import Admin


def export(admin: Admin, registry: CollectorRegistry) -> None:
    """Export ``admin``'s gateway at every scrape of ``registry``."""
    registry.register(GatewayCollector(admin))


class GatewayCollector:
    """Reads the gateway's last telemetry poll at scrape time (no replica calls on the scrape path)."""

    def __init__(self, admin: Admin) -> None:
        self.admin = admin

    def describe(self):
        return []  # dynamic families; prometheus_client then skips the collision check for them

    def collect(self):
        status = self.admin.status()
        yield _gauge("wattserve_gateway_inflight_requests", "Requests the gateway is serving now.", [], [([], status.inflight)])
        yield _gauge("wattserve_gateway_max_inflight_requests", "The gateway's admission limit.", [],
                     [([], status.max_inflight)])
        yield from self._replicas(self.admin)
        yield from self._power(self.admin)
        yield from self._budgets(self.admin)
        yield from self._capacity(self.admin)

    def _capacity(self, admin: Admin):
        view = admin.capacity_view(last_events=0)
        if not view.enabled:
            return
        rows = [([e.expert], e) for e in view.experts]
        yield _gauge("wattserve_capacity_replicas_wanted", "Replicas the capacity controller's last plan wants.",
                     ["expert"], [(k, e.wanted) for k, e in rows])
        yield _gauge("wattserve_capacity_replicas_running", "Healthy replicas taking calls.", ["expert"],
                     [(k, e.running) for k, e in rows])
        yield _gauge("wattserve_capacity_replicas_starting", "Replicas the controller is starting.", ["expert"],
                     [(k, e.starting) for k, e in rows])
        starts = CounterMetricFamily("wattserve_capacity_cold_starts", "Replicas the capacity controller started "
                                     "(scale-ups and wakes).", labels=["expert"])
        for k, e in rows:
            starts.add_metric(k, e.cold_starts)
        yield starts
        yield _gauge("wattserve_capacity_cold_start_seconds", "Measured start time of a replica (EWMA; configured "
                     "until one is measured).", ["expert"], [(k, e.cold_start_s) for k, e in rows])
        yield _gauge("wattserve_capacity_target_sm_clock_mhz", "The planner's SM clock for the expert: recorded, not "
                     "applied (the controller actuates no clock).", ["expert", "applied"],
                     [([*k, str(e.clock_applied).lower()], e.target_clock_mhz) for k, e in rows
                      if e.target_clock_mhz is not None])
        saved = CounterMetricFamily(
            "wattserve_capacity_energy_saved_joules", "Estimate, not a measurement: idle power of the expert's replica "
            "profile x replica-seconds not running, against max_replicas always on.", labels=["expert", "kind", "energy_source"])
        for k, e in rows:
            saved.add_metric([*k, "estimate", e.energy_source], e.saved_energy_j)
        yield saved

    def _budgets(self, admin: Admin):
        """Energy budgets as the router's ledger holds them now (config or Admin.SetEnergyBudget)."""
        statuses = [b.status for b in admin.budgets()]
        tenants = [([st.scope.removeprefix("tenant:")], st.limit.energy_j) for st in statuses
                   if st.scope.startswith("tenant:") and st.limit is not None]
        yield _gauge("wattserve_tenant_energy_budget_joules", "Energy a tenant may use per budget window.", ["tenant"], tenants)
        used: dict[str, float] = {}
        for st in statuses:  # scopes of unlisted tenants without a limit share one label value
            scope = st.scope
            if st.limit is None and scope.startswith("tenant:"):
                scope = "tenant:" + admin.tenant_label(scope.removeprefix("tenant:"))
            used[scope] = used.get(scope, 0.0) + st.used_j
        yield _gauge("wattserve_energy_budget_used_joules", "Measured energy charged to a budget scope in its current window.",
                     ["scope"], [([scope], j) for scope, j in used.items()])
        yield _gauge("wattserve_router_prediction_relative_error", "EWMA of |predicted - measured| / measured per expert "
                     "(Generate).", ["expert", "kind"], _errors(admin.prediction_errors()))
        yield _gauge("wattserve_router_score_prediction_relative_error", "EWMA of |predicted - measured| / measured "
                     "per expert for Score's prefill-only work (its own corrections).", ["expert", "kind"],
                     _errors(admin.prediction_errors(prefill_only=True)))

    def _replicas(self, admin: Admin):
        labels = ["expert", "replica", "device"]
        rows: dict[str, list] = {k: [] for k in ("healthy", "running", "waiting", "inflight", "power", "gpu", "limit",
                                                 "clock", "kv")}
        energy = CounterMetricFamily(
            "wattserve_replica_energy_joules", "Device energy of a replica since it started, split into the part "
            "attributed to requests, the idle part and its start-up probe's (no tenant's).", labels=[*labels, "energy_source", "part"],
        )
        exits = CounterMetricFamily(
            "wattserve_early_exit_tokens", "Decoded tokens by the layer they left at (early-exit experts; the "
            "deepest layer is full depth).", labels=[*labels, "exit_layer"],
        )
        for r in admin.replicas():
            key = [r.expert, str(r.index), r.device]
            rows["healthy"].append((key, 1.0 if r.healthy else 0.0))
            rows["inflight"].append((key, r.inflight))
            p = r.profile
            if p is None:
                continue
            rows["running"].append((key, p.running))
            rows["waiting"].append((key, p.waiting))
            if p.kv_cache_usage is not None:
                rows["kv"].append((key, p.kv_cache_usage))
            if p.power_w is not None:
                rows["gpu" if r.gpu else "power"].append(([*key, p.energy_source], p.power_w))
            if r.gpu and p.power_limit_w is not None:
                rows["limit"].append((key, p.power_limit_w))
            if r.gpu and p.sm_clock_mhz is not None:
                rows["clock"].append((key, p.sm_clock_mhz))
            if p.energy is not None:
                energy.add_metric([*key, p.energy.energy_source, "requests"], p.energy.requests_j)
                energy.add_metric([*key, p.energy.energy_source, "idle"], p.energy.idle_j)
                energy.add_metric([*key, p.energy.energy_source, "probe"], p.energy.probe_j)
            for layer, tokens in sorted(p.exit_histogram.items()):
                exits.add_metric([*key, str(layer)], tokens)
        src = [*labels, "energy_source"]
        yield _gauge("wattserve_replica_healthy", "1 if the replica answered its last health poll healthy.", labels, rows["healthy"])
        yield _gauge("wattserve_replica_running_requests", "Requests in the replica's running batch.", labels, rows["running"])
        yield _gauge("wattserve_replica_waiting_requests", "Requests queued at the replica for a batch slot.", labels, rows["waiting"])
        yield _gauge("wattserve_replica_kv_cache_usage_ratio", "Share of the replica's KV cache in use (engines that report it: vllm).",
                     labels, rows["kv"])
        yield _gauge("wattserve_replica_gateway_inflight_requests", "Requests the gateway has in flight to the replica.", labels, rows["inflight"])
        yield _gauge("wattserve_gpu_power_watts", "GPU power of a replica's device (measured or modeled, see energy_source).", src, rows["gpu"])
        yield _gauge("wattserve_cpu_power_watts", "Modeled CPU power of a replica that runs on CPU.", src, rows["power"])
        yield _gauge("wattserve_gpu_power_limit_watts", "Enforced board power limit of a replica's GPU.", labels, rows["limit"])
        yield _gauge("wattserve_gpu_sm_clock_mhz", "Current SM clock of a replica's GPU.", labels, rows["clock"])
        yield energy
        yield exits

    def _power(self, admin: Admin):
        power = admin.power
        budget = [([], power.budget_w)] if power.budget_w is not None else []
        yield _gauge("wattserve_power_budget_watts", "Provisioned power budget the governor keeps the cluster under.", [], budget)
        events = CounterMetricFamily("wattserve_power_cap_events", "Power-cap actuations by kind.", labels=["kind"])
        for kind, count in sorted(power.cap_events.items()):
            events.add_metric([kind], count)
        yield events
        caps = [([e, str(i), cap], 1.0) for (e, i), cap in sorted(power.caps.items())]
        yield _gauge("wattserve_replica_power_cap", "1 for the cap a replica is under now.", ["expert", "replica", "cap"], caps)


def _gauge(name: str, doc: str, labels: list[str], rows) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, doc, labels=labels)
    for values, value in rows:
        family.add_metric(values, float(value))
    return family


def _errors(errors) -> list:
    return [([e, kind], v) for e, err in sorted(errors.items())
            for kind, v in (("energy", err.energy_rel_error), ("latency", err.latency_rel_error)) if v is not None]
