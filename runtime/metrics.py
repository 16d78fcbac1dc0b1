"""Prometheus metrics, recorded once in the gateway's request lifecycle (so gRPC and HTTP
requests are counted alike) and exported on the HTTP server's ``/metrics``.

Two kinds of series:

* per request, pushed by a :class:`RequestRecorder` that the gateway drives: request counts by
  API, expert and outcome, refusals included (also counted by API, reason and status code in
  ``wattserve_refused_requests_total``, the APIs reporting those refused before the gateway); TTFT, inter-token and end-to-end latency histograms per expert
  (``wattserve_*_seconds``); tokens; energy by expert, tenant and energy source; how much of
  its energy budget each request used and how many budgets were missed (tenant labels are
  bounded: without configured tenants, all but "default" read "other");
* per scrape, pulled from the gateway's latest telemetry through its admin façade by
  ``runtime/api/prometheus.py``: queue depths, health, device power / power limit / SM clock per
  replica, energy per replica (requests and idle), the power budget and cap events.

Every server owns its own ``CollectorRegistry``: tests start several servers in one process.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TYPE_CHECKING, NamedTuple

from prometheus_client import CollectorRegistry, Counter, Histogram

from wattserve.errors import WattserveError

if TYPE_CHECKING:
    from .gateway.request import Chunk, Final

TTFT_BUCKETS_S = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
ITL_BUCKETS_S = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.25, 0.5, 1.0, 2.5)
E2E_BUCKETS_S = (0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 20.0, 30.0, 60.0, 120.0, 300.0)
ENERGY_BUCKETS_J = (0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 25.0, 50.0, 100.0, 250.0, 1000.0)
BUDGET_USE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 1.0, 1.1, 1.25, 1.5, 2.0, 4.0)

#: the ``reason`` label of a refusal: a fixed set, so clients cannot grow the series
REFUSAL_REASONS = frozenset({
    "invalid_json", "not_an_object", "unknown_field", "unsupported_value", "invalid_value", "token_ids",
    "too_large", "unknown_model", "queue_full", "budget_infeasible", "budget_exhausted", "unauthenticated",
    "permission_denied",
})
_REASON_BY_ERROR = {"UnknownExpert": "unknown_model", "RequestTooLarge": "too_large", "QueueFull": "queue_full",
                    "BudgetInfeasible": "budget_infeasible", "BudgetExhausted": "budget_exhausted",
                    "Unauthenticated": "unauthenticated", "PermissionDenied": "permission_denied"}
#: the tenant label of requests from tenants that are not configured (``tenants: []``): any
#: string a client sends is a tenant then, and must not become a label value of its own
UNLISTED_TENANT_LABEL = "other"


def refusal_reason(exc: BaseException) -> str | None:
    """Why a request was refused (a client error, 4xx), or None when ``exc`` is not a refusal
    (a server-side failure, a timeout or a cancellation)."""
    if not isinstance(exc, WattserveError) or not 400 <= exc.http_status < 499:
        return None
    reason = exc.details.get("reason") or _REASON_BY_ERROR.get(type(exc).__name__, "invalid_value")
    return reason if reason in REFUSAL_REASONS else "invalid_value"


def status_label(exc: BaseException) -> str:
    """The outcome label of a failed request: the gRPC code name in lower case."""
    if isinstance(exc, WattserveError):
        return exc.grpc_code.lower()
    if isinstance(exc, (GeneratorExit, KeyboardInterrupt)) or type(exc).__name__ == "CancelledError":
        return "cancelled"
    return "internal"


class ServingMetrics:
    """The per-request series of one server, in a registry of its own."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry or CollectorRegistry()
        r = self.registry
        self.requests = Counter(
            "wattserve_requests", "Requests by API, expert and outcome (ok or a gRPC code name).",
            ["api", "expert", "status"], registry=r,
        )
        self.refusals = Counter(
            "wattserve_refused_requests", "Requests refused as the client's error (4xx), by API, reason and the code "
            "the API answered (an HTTP status for http, a gRPC code name for grpc); also in wattserve_requests_total.",
            ["api", "reason", "code"], registry=r,
        )
        self.ttft = Histogram(
            "wattserve_time_to_first_token_seconds", "Gateway: request received -> first token sent.",
            ["expert"], buckets=TTFT_BUCKETS_S, registry=r,
        )
        self.itl = Histogram(
            "wattserve_inter_token_latency_seconds",
            "Gateway: time between streamed chunks (a chunk carries the tokens that arrived together).",
            ["expert"], buckets=ITL_BUCKETS_S, registry=r,
        )
        self.e2e = Histogram(
            "wattserve_e2e_request_latency_seconds", "Gateway: request received -> last token sent.",
            ["expert"], buckets=E2E_BUCKETS_S, registry=r,
        )
        self.prompt_tokens = Counter("wattserve_prompt_tokens", "Prompt tokens of finished requests.", ["expert"], registry=r)
        self.generation_tokens = Counter(
            "wattserve_generation_tokens", "Tokens generated by finished requests.", ["expert"], registry=r
        )
        self.energy = Counter(
            "wattserve_request_energy_joules",
            "Energy attributed to finished requests; energy_source says measured:... or modeled:...",
            ["expert", "tenant", "energy_source"], registry=r,
        )
        self.energy_per_request = Histogram(
            "wattserve_energy_per_request_joules", "Energy of one finished request.",
            ["expert"], buckets=ENERGY_BUCKETS_J, registry=r,
        )
        self.budget_use = Histogram(
            "wattserve_energy_budget_use_ratio", "Energy used / energy_budget_j, for requests that set one.",
            ["expert"], buckets=BUDGET_USE_BUCKETS, registry=r,
        )
        self.budgeted = Counter(
            "wattserve_budgeted_requests", "Finished requests that carried a budget, by kind (energy, latency).",
            ["kind", "expert"], registry=r,
        )
        self.budget_violations = Counter(
            "wattserve_budget_violations", "Finished requests that exceeded their budget, by kind (energy, latency).",
            ["kind", "expert"], registry=r,
        )
        self._by_expert: dict[str, _ExpertSeries] = {}
        self._children: dict[tuple, object] = {}  # labelled(): per-request series with other labels

    def expert_series(self, expert: str) -> _ExpertSeries:
        """``expert``'s labelled series, looked up once: ``labels()`` costs a lock and a dict
        walk per call, and a request records several of them."""
        series = self._by_expert.get(expert)
        if series is None:
            series = self._by_expert[expert] = _ExpertSeries(
                self.ttft.labels(expert), self.itl.labels(expert), self.e2e.labels(expert),
                self.prompt_tokens.labels(expert), self.generation_tokens.labels(expert),
                self.energy_per_request.labels(expert),
            )
        return series

    def labelled(self, metric, *values: str):
        """``metric.labels(*values)``, looked up once (as :meth:`expert_series` does for the
        series labelled by expert alone); callers pass bounded label sets only."""
        key = (metric, values)
        child = self._children.get(key)
        if child is None:
            child = self._children[key] = metric.labels(*values)
        return child

    def refused(self, api: str, exc: BaseException) -> None:
        """Count ``exc`` in ``wattserve_refused_requests_total`` if it is a refusal (a 4xx)."""
        reason = refusal_reason(exc)
        if reason is not None:
            code = str(exc.http_status) if api == "http" else status_label(exc)
            self.refusals.labels(api, reason, code).inc()

    def begin(self, api: str, clock: Callable[[], float]) -> RequestRecorder:
        """A recorder for one request arriving now through ``api`` (grpc or http)."""
        return RequestRecorder(self, api, clock)


class _ExpertSeries(NamedTuple):
    ttft: Histogram
    itl: Histogram
    e2e: Histogram
    prompt_tokens: Counter
    generation_tokens: Counter
    energy_per_request: Histogram


class RequestRecorder:
    """Follows one request through the gateway and records it once, when it ends."""

    __slots__ = ("metrics", "api", "clock", "expert", "_itl", "_last_chunk_s", "_done")

    def __init__(self, metrics: ServingMetrics, api: str, clock: Callable[[], float]) -> None:
        self.metrics = metrics
        self.api = api
        self.clock = clock
        self.expert = "none"  # until routed
        self._itl = None  # the expert's inter-token histogram, looked up when routed, not per chunk
        self._last_chunk_s: float | None = None
        self._done = False

    def routed(self, expert: str) -> None:
        self.expert = expert
        self._itl = self.metrics.expert_series(expert).itl

    def chunk(self, chunk: Chunk) -> None:
        now = self.clock()
        if self._last_chunk_s is not None:
            (self._itl or self.metrics.itl.labels(self.expert)).observe(now - self._last_chunk_s)
        self._last_chunk_s = now

    def finished(self, final: Final, tenant: str, energy_budget_j: float | None, latency_budget_ms: float | None) -> None:
        m, expert, u = self.metrics, final.expert, final.usage
        self._done = True
        series = m.expert_series(expert)
        m.labelled(m.requests, self.api, expert, "ok").inc()
        series.ttft.observe(final.ttft_ms / 1000.0)
        series.e2e.observe(final.total_latency_ms / 1000.0)
        series.prompt_tokens.inc(u.prompt_tokens)
        series.generation_tokens.inc(u.completion_tokens)
        m.labelled(m.energy, expert, tenant, u.energy_source).inc(u.energy_j)  # tenant: Lifecycle.tenant_label, bounded
        series.energy_per_request.observe(u.energy_j)
        if energy_budget_j is not None:
            m.budgeted.labels("energy", expert).inc()
            m.budget_use.labels(expert).observe(u.energy_j / energy_budget_j)
            if u.energy_j > energy_budget_j:
                m.budget_violations.labels("energy", expert).inc()
        if latency_budget_ms is not None:
            m.budgeted.labels("latency", expert).inc()
            if final.total_latency_ms > latency_budget_ms:
                m.budget_violations.labels("latency", expert).inc()

    def succeeded(self, expert: str) -> None:
        """A call without a token stream (Score) answered."""
        self._done = True
        self.metrics.requests.labels(self.api, expert, "ok").inc()

    def failed(self, exc: BaseException) -> None:
        if not self._done:
            self._done = True
            self.metrics.requests.labels(self.api, self.expert, status_label(exc)).inc()
            self.metrics.refused(self.api, exc)
