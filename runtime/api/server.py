"""Assembles and runs a wattserve server: Ray, expert actors, gateway, the gRPC endpoint and
the HTTP endpoint (OpenAI-compatible API, Prometheus ``/metrics``, ``/health``).

``WattserveServer`` is used by ``wattserve serve`` and, unchanged, by the end-to-end tests (on
free loopback ports). Besides our services it serves the standard ``grpc.health.v1`` health
service (SERVING while at least one expert replica is healthy) and server reflection. Both
endpoints run on one asyncio loop and share one gateway, so they share its lifecycle and metrics.
"""

from __future__ import annotations

import asyncio
import ipaddress
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from grpc import aio
from grpc_health.v1 import health_pb2, health_pb2_grpc
from grpc_health.v1._async import HealthServicer
from grpc_reflection.v1alpha import reflection

from wattserve.errors import ConfigError
from workers.models import default_cache_dir

from ..cluster import ExpertPool, start_ray, stop_ray
from ..config import WattserveConfig, resolve_http_port
from ..gateway import Gateway
from ..image_metrics import ImageMetrics
from ..metrics import ServingMetrics
from ..power.plane import PowerPlane
from ..security.keys import KeyStore, load_keys
from ..security.tls import grpc_server_credentials
from .gen import wattserve_pb2 as pb
from .gen import wattserve_pb2_grpc as pb_grpc
from .http_server import HttpApi
from .interceptors import ErrorInterceptor
from .prometheus import export as export_gateway
from .servicer import AdminServicer, InferenceServicer

log = logging.getLogger(__name__)

SERVICE_NAMES = (
    pb.DESCRIPTOR.services_by_name["Inference"].full_name,
    pb.DESCRIPTOR.services_by_name["Admin"].full_name,
)


INFERENCE_PREFIX = f"/{SERVICE_NAMES[0]}/"
#: the gRPC transport accepts messages this many times gateway.max_message_bytes, for the
#: interceptor to refuse them in words
TRANSPORT_HEADROOM = 4


def is_loopback(host: str) -> bool:
    """Whether binding ``host`` keeps the endpoint on this machine."""
    if host == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False  # a host name: assume it is reachable from elsewhere


class StartupPhases:
    """Times the server's start-up stages for one log line (issue 18: restarts took 37-45 s)."""

    def __init__(self, clock=time.monotonic) -> None:
        self.clock = clock
        self.start = self.last = clock()
        self.phases: list[tuple[str, float]] = []

    def mark(self, name: str) -> None:
        now = self.clock()
        self.phases.append((name, now - self.last))
        self.last = now

    def line(self, replicas: list[str]) -> str:
        stages = ", ".join(f"{name} {s:.1f} s" for name, s in self.phases)
        detail = f" [{'; '.join(replicas)}]" if replicas else ""
        return f"start-up took {self.last - self.start:.1f} s: {stages}{detail}"


def replica_phases(marks: dict[str, float], created_unix_s: float) -> str:
    """``ExpertWorker.startup_phases`` as durations: worker process and imports (from the actor's
    creation to its ``__init__``), model files (cache check or conversion), model load, engine
    start (vLLM starts its engine after load; stepped engines are ready at once)."""
    begin = created_unix_s
    if math.isfinite(marks.get("process_unix_s", math.nan)):
        begin = max(begin, marks["process_unix_s"])  # a worker Ray started earlier did not make us wait
    steps = (("worker process + imports", begin, "init_unix_s"), ("model files", "init_unix_s", "model_files_unix_s"),
             ("model load", "model_files_unix_s", "model_loaded_unix_s"),
             ("engine start", "model_loaded_unix_s", "engine_ready_unix_s"))
    parts = []
    for name, a, b in steps:
        t0 = a if isinstance(a, float) else marks.get(a)
        t1 = marks.get(b)
        if t0 is not None and t1 is not None:
            parts.append(f"{name} {max(0.0, t1 - t0):.1f} s")
    return ", ".join(parts)


class WattserveServer:
    def __init__(self, config: WattserveConfig, progress: Callable[[str], None] = log.info) -> None:
        self.config = config
        self.progress = progress
        self.cache_dir = str(Path(config.model_cache_dir).expanduser() if config.model_cache_dir else default_cache_dir())
        self.ray_address = ""
        self._owns_ray = False
        self.pool: ExpertPool | None = None
        self.gateway: Gateway | None = None
        self.power: PowerPlane | None = None
        self.capacity = None  # the capacity controller, when capacity.enabled
        self.server: aio.Server | None = None
        self.health = HealthServicer()
        self.metrics = ServingMetrics()  # a registry per server: tests run several in one process
        self.image_metrics = ImageMetrics(self.metrics.registry)
        self.http: HttpApi | None = None
        self.port = 0
        self.http_port = 0
        self.keys: KeyStore | None = None
        self.startup_line = ""  # where start-up time went (StartupPhases), once started

    async def start(self) -> int:
        """Bring everything up; returns the bound port. Cleans up if any stage fails."""
        try:
            return await self._start()
        except BaseException:
            await self.stop()
            raise

    async def _start(self) -> int:
        cfg = self.config
        phases = StartupPhases()
        self.keys = self._security_checks()
        self.progress("starting Ray" + (f" (joining {cfg.ray.address})" if cfg.ray.address else " (embedded, loopback)"))
        self.ray_address, self._owns_ray = start_ray(cfg.ray)
        phases.mark("Ray")
        self.pool = ExpertPool(cfg.experts, self.cache_dir)
        created_unix_s = time.time()
        self.pool.create()
        phases.mark("actors created")
        self.progress(f"loading {len(self.pool.all())} expert replica(s): {', '.join(r.name for r in self.pool.all())}")
        await self.pool.wait_ready(cfg.ray.ready_timeout_s, self.progress, require_all=cfg.ray.require_all_experts)
        phases.mark("experts ready")
        replicas = await self._replica_phases(created_unix_s)
        self.gateway = Gateway(cfg, self.pool.clients(), on_health_change=self._set_health, metrics=self.metrics,
                               image_metrics=self.image_metrics)
        export_gateway(self.gateway.admin, self.metrics.registry)
        await self.gateway.start()
        phases.mark("gateway")
        if cfg.power.enabled:
            self.progress("starting the power governor")
            self.power = PowerPlane(cfg.power, self.pool.all(), mirror_into=self.gateway.admin.power)
            await self.power.start()
            phases.mark("power governor")
        if cfg.capacity.enabled:
            await self._start_capacity()

        limit, meta = cfg.gateway.max_message_bytes, cfg.gateway.max_metadata_bytes
        self.server = aio.server(
            interceptors=[ErrorInterceptor(self.keys, meta, limit, on_refused=self._refused)],
            # gRPC's own metadata and receive limits sit above ours (x4), so a client over ours
            # gets a clear INVALID_ARGUMENT naming the limit from the interceptor; only far beyond
            # it does the transport refuse the call (RESOURCE_EXHAUSTED).
            options=[("grpc.max_receive_message_length", TRANSPORT_HEADROOM * limit),
                     ("grpc.max_send_message_length", limit),
                     ("grpc.max_metadata_size", 4 * meta), ("grpc.absolute_max_metadata_size", 8 * meta)],
        )
        pb_grpc.add_InferenceServicer_to_server(InferenceServicer(self.gateway), self.server)
        pb_grpc.add_AdminServicer_to_server(AdminServicer(self.gateway, self.ray_address, self.power), self.server)
        health_pb2_grpc.add_HealthServicer_to_server(self.health, self.server)
        reflection.enable_server_reflection(
            (*SERVICE_NAMES, health_pb2.DESCRIPTOR.services_by_name["Health"].full_name, reflection.SERVICE_NAME),
            self.server,
        )
        address = f"{cfg.gateway.host}:{cfg.gateway.port}"
        try:
            if cfg.tls.enabled:
                self.port = self.server.add_secure_port(address, grpc_server_credentials(cfg.tls))
            else:
                self.port = self.server.add_insecure_port(address)
        except RuntimeError as exc:
            raise ConfigError(f"cannot listen on {address}: {exc} (is the port in use? try --port 0)") from None
        await self.server.start()
        await self._set_health_async(self.gateway.admin.healthy())
        phases.mark("gRPC bind")
        if cfg.http.enabled:
            await self._start_http()
            phases.mark("HTTP bind")
        self.startup_line = phases.line(replicas)
        self.progress(self.startup_line)
        return self.port

    async def _start_capacity(self) -> None:
        # Imported here: the planner pulls numpy and the device models, which a server without
        # the controller need not load.
        from ..capacity.controller import CapacityController

        admin = self.gateway.admin
        self.progress(f"starting the capacity controller for {', '.join(self.config.capacity.experts) or 'no expert'}")
        self.capacity = CapacityController(
            self.config.capacity, {e.name: e for e in self.config.experts}, self.gateway.replicas, self.pool,
            admin.capacity, power_budget_w=lambda: admin.power.budget_w,
            on_replicas_changed=self._replicas_changed if self.power is not None else None,
        )
        await self.capacity.start()

    async def _replicas_changed(self) -> None:
        """The capacity controller added or released replicas: the power governor caps the new set."""
        if self.power is not None and self.pool is not None:
            await self.power.update_replicas(self.pool.all())

    async def _replica_phases(self, created_unix_s: float) -> list[str]:
        """Where each replica's start-up went, from its own wall-clock marks (same host)."""
        out = []
        for replica in self.pool.all():
            try:
                marks = await asyncio.wait_for(replica.actor.startup_phases.remote(), 10.0)
            except Exception:  # noqa: BLE001 - failed or image replicas report nothing; a diagnostic only
                continue
            out.append(f"{replica.name}: {replica_phases(marks, created_unix_s)}")
        return out

    def _refused(self, method: str, exc) -> None:
        """An Inference call refused by the interceptor (credentials, size, bytes): counted."""
        if self.gateway is not None and method.startswith(INFERENCE_PREFIX):
            self.gateway.refused("grpc", exc)

    async def _start_http(self) -> None:
        gateway = self.gateway
        http = self.config.http.model_copy(update={"port": resolve_http_port(self.config.http, self.config.gateway.port)})
        self.http = HttpApi(
            gateway, self.metrics.registry, http,
            healthy=gateway.admin.healthy,
            keys=self.keys, auth=self.config.auth, tls=self.config.tls,
        )
        try:
            self.http_port = await self.http.start()
        except OSError as exc:
            address = f"{http.host}:{http.port}"
            raise ConfigError(f"cannot listen on {address} for HTTP: {exc.strerror} (is the port in use? try --http-port 0)") from None

    def _load_keys(self) -> KeyStore | None:
        """The configured keys; ConfigError when auth is on without any, without an operator
        key, or with keys for tenants the config does not have."""
        cfg = self.config
        keys = load_keys(cfg.auth)
        unknown = sorted(keys.tenants() - {t.name for t in cfg.tenants}) if keys and cfg.tenants else []
        if unknown:
            raise ConfigError(f"auth keys name tenants that are not configured: {', '.join(unknown)}")
        return keys

    def reload_keys(self) -> str:
        """Re-read auth.keys_file and the keys variable (``wattserve serve`` does on SIGHUP):
        new keys work and removed ones stop at once, for calls that arrive from now on. A file
        that would not load (unreadable, malformed, no operator key left) changes nothing.
        Returns what happened, for the operator's log."""
        if self.keys is None:
            return "API keys not reloaded: authentication is off (auth.enabled: false)"
        try:
            fresh = self._load_keys()
        except ConfigError as exc:
            log.error("API keys not reloaded, the old keys stay in force: %s", exc)
            return f"API keys not reloaded, the old keys stay in force: {exc}"
        self.keys.replace_with(fresh)
        message = f"API keys reloaded: {fresh.count('client')} client, {fresh.count('operator')} operator"
        log.info(message)
        return message

    def _security_checks(self) -> KeyStore | None:
        """Load the keys (ConfigError when auth is on without any) and warn loudly about
        exposure: auth off, or keys in clear text, on a non-loopback address."""
        cfg = self.config
        keys = self._load_keys()
        hosts = [cfg.gateway.host] + ([cfg.http.host] if cfg.http.enabled else [])
        exposed = [h for h in hosts if not is_loopback(h)]
        if exposed and keys is None:
            self._warn(f"authentication is OFF and the server listens on {', '.join(exposed)}: anyone who can "
                       "reach it can send requests and change budgets (set auth.enabled: true and configure keys)")
        elif exposed and not cfg.tls.enabled:
            self._warn(f"TLS is off on {', '.join(exposed)}: API keys cross the network in clear text "
                       "(set tls.cert_file and tls.key_file)")
        elif keys is None:
            log.info("authentication is off (auth.enabled: false); loopback only")
        return keys

    def _warn(self, message: str) -> None:
        banner = "!" * 100
        log.warning("%s\nWARNING: %s\n%s", banner, message, banner)
        self.progress(f"WARNING: {message}")

    def _set_health(self, serving: bool) -> None:
        asyncio.get_running_loop().create_task(self._set_health_async(serving))

    async def _set_health_async(self, serving: bool) -> None:
        status = health_pb2.HealthCheckResponse.SERVING if serving else health_pb2.HealthCheckResponse.NOT_SERVING
        for name in ("", *SERVICE_NAMES):
            await self.health.set(name, status)

    async def wait(self) -> None:
        if self.server is not None:
            await self.server.wait_for_termination()

    def cut_streams_now(self) -> None:
        """End the shutdown grace period at once (``wattserve serve`` on a second signal)."""
        if self.gateway is not None:
            self.gateway.drain.cut_now()

    async def stop(self, grace_s: float | None = None) -> str:
        """Drain, then take everything down; returns what happened to the streams in flight.

        Both APIs drain alike (``runtime/shutdown.py``): health turns NOT_SERVING, new requests
        get UNAVAILABLE/503, streams in flight may finish within ``grace_s`` (default
        ``gateway.shutdown_grace_s``) and are cut with a message saying so after it.
        """
        grace = self.config.gateway.shutdown_grace_s if grace_s is None else grace_s
        report = ""
        if self.gateway is not None and (self.server is not None or self.http is not None):
            if self.server is not None:
                await self.health.enter_graceful_shutdown()
            gateway = self.gateway
            outcome = await gateway.drain.drain(grace, busy=lambda: gateway.inflight)
            report = outcome.message()
            self.progress(report)
        if self.http is not None:
            await self.http.stop()
            self.http = None
        if self.server is not None:
            await self.health.enter_graceful_shutdown()
            await self.server.stop(1.0)  # drained above: only calls that are not streams remain
            self.server = None
        if self.capacity is not None:
            await self.capacity.stop()
            self.capacity = None
        if self.gateway is not None:
            await self.gateway.stop()
            self.gateway = None
        if self.power is not None:
            await self.power.stop()
            self.power = None
        if self.pool is not None:
            self.pool.kill()
            self.pool = None
        if self._owns_ray:
            stop_ray()
            self._owns_ray = False
        return report
