"""Ray lifecycle, the only code that creates expert actors, and the only serving code that calls them.

``start_ray`` starts an embedded instance on loopback (or joins a cluster), ``ExpertPool``
creates one actor per expert replica (named ``wattserve:<expert>:<i>``, restartable, placed by
the resources in its spec), waits until every replica has loaded its model, and can add and remove
replicas at run time. :class:`RayReplicaClient` is the gateway's ``ReplicaClient`` over one such
actor: it turns Ray's failures into domain errors, in one place. The power plane's actors (node
agents, governor) are created by its sibling ``runtime/power/plane.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray.exceptions import RayActorError, RayError

from wattserve.errors import ConfigError, ExpertUnavailable, WattserveError
from wattserve.specs import ExpertSpec
from workers.expert import ExpertWorker

from .config import RayConfig
from .gateway.replicas import ReplicaClient, ReplicaDied, ReplicaStream

log = logging.getLogger(__name__)


def start_ray(cfg: RayConfig) -> tuple[str, bool]:
    """Start or join Ray; returns the GCS address and whether this call started the connection
    (only then should the caller shut it down)."""
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address, False
    if cfg.address:
        ray.init(address=cfg.address, namespace=cfg.namespace, log_to_driver=True)
    else:
        # Keep every Ray port on loopback: by default Ray binds the external interface.
        os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
        ray.init(
            num_cpus=cfg.num_cpus,
            object_store_memory=cfg.object_store_memory_mb * 1024 * 1024,
            _node_ip_address=cfg.node_ip_address,
            include_dashboard=False,
            namespace=cfg.namespace,
            log_to_driver=True,
        )
    return ray.get_runtime_context().gcs_address, True


def stop_ray() -> None:
    if ray.is_initialized():
        ray.shutdown()


@dataclass(slots=True)
class Replica:
    """A handle to one expert replica actor."""

    expert: str
    index: int
    actor: ray.actor.ActorHandle

    @property
    def name(self) -> str:
        return actor_name(self.expert, self.index)


def actor_name(expert: str, index: int) -> str:
    return f"wattserve:{expert}:{index}"


class _OnNode:
    """What only Ray can tell an expert body: the node it runs on (the power plane gives each
    expert to its node's agent). Mixed in here so ``workers/`` stays free of Ray."""

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()


class ExpertActor(_OnNode, ExpertWorker):
    """A text expert replica as a Ray actor."""


def __getattr__(name: str):
    """``ImageExpertActor``, defined on first use: the diffusion worker imports torch (seconds),
    which a gateway serving only text experts need not pay at start-up (issue 18, item 7)."""
    if name != "ImageExpertActor":
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from workers.diffusion.worker import ImageExpertWorker

    cls = type("ImageExpertActor", (_OnNode, ImageExpertWorker),
               {"__doc__": "An image expert replica as a Ray actor.", "__module__": __name__})
    globals()[name] = cls  # Ray pickles it by reference: a worker resolves the same name here
    return cls


class ExpertPool:
    """Creates and owns the expert replica actors of a configuration."""

    def __init__(self, experts: list[ExpertSpec], cache_dir: str) -> None:
        self.specs = {e.name: e for e in experts}
        self.cache_dir = cache_dir
        self.replicas: dict[str, list[Replica]] = {}
        self._remote: dict[str, object] = {}

    def create(self) -> None:
        for spec in self.specs.values():
            self.replicas[spec.name] = [self._create(spec, i) for i in range(spec.replicas)]

    def add(self, expert: str) -> Replica:
        """Start one more replica of ``expert`` (it loads its model in the background: await
        ``actor.ready`` or let the gateway's telemetry find it healthy)."""
        group = self.replicas.setdefault(expert, [])
        replica = self._create(self.specs[expert], max((r.index for r in group), default=-1) + 1)
        group.append(replica)
        return replica

    async def start_replica(self, expert: str, timeout_s: float) -> RayReplicaClient:
        """Start one more replica of ``expert`` and return its client once it has loaded; a replica
        that fails or is not ready within ``timeout_s`` is released and ExpertUnavailable raised."""
        replica = self.add(expert)
        try:
            await asyncio.wait_for(replica.actor.ready.remote(), timeout_s)
        except BaseException as exc:
            self.remove(expert, replica.index)
            if isinstance(exc, asyncio.CancelledError):
                raise
            why = f"not ready after {timeout_s:.0f} s" if isinstance(exc, TimeoutError) else _root_cause(exc)
            raise ExpertUnavailable(f"{replica.name} did not start: {why}") from None
        return RayReplicaClient(replica)

    def remove(self, expert: str, index: int) -> None:
        """Kill replica ``index`` of ``expert`` (drain it through the gateway first)."""
        group = self.replicas.get(expert, [])
        for r in [r for r in group if r.index == index]:
            group.remove(r)
            _kill(r)

    def _create(self, spec: ExpertSpec, index: int) -> Replica:
        # Text experts and image experts are different actor bodies behind the same lifecycle.
        if spec.modality not in self._remote:
            body = ExpertActor if spec.modality == "text" else __getattr__("ImageExpertActor")
            self._remote[spec.modality] = ray.remote(body)
        res = spec.resources
        actor = self._remote[spec.modality].options(
            name=actor_name(spec.name, index),
            max_restarts=spec.max_restarts,
            max_task_retries=0,  # a generation is not idempotent: never replay it silently
            num_cpus=res.num_cpus,
            num_gpus=res.num_gpus,
            resources=dict(res.custom) or None,
            max_concurrency=1024,
        ).remote(spec, index, self.cache_dir)
        return Replica(spec.name, index, actor)

    def all(self) -> list[Replica]:
        return [r for group in self.replicas.values() for r in group]

    def clients(self) -> list[RayReplicaClient]:
        """The gateway's clients of every replica."""
        return [RayReplicaClient(r) for r in self.all()]

    async def wait_ready(
        self, timeout_s: float, progress: Callable[[str], None] = log.info, *, require_all: bool = True
    ) -> list[str]:
        """Wait until every replica answers ``ready``; raise ConfigError naming those that failed.

        With ``require_all=False`` failures are reported through ``progress`` and returned, and
        only a pool where no replica came up is an error (the failed ones stay, unhealthy, with
        their reason in their profile when their actor is alive).
        """
        start = time.monotonic()
        ready = 0
        pending = {r.name: asyncio.ensure_future(r.actor.ready.remote()) for r in self.all()}
        failures: list[str] = []
        while pending:
            done, _ = await asyncio.wait(pending.values(), timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
            for name, fut in list(pending.items()):
                if fut in done:
                    del pending[name]
                    if fut.exception() is not None:
                        failures.append(f"{name}: {_root_cause(fut.exception())}")
                    else:
                        ready += 1
                        progress(f"{name} ready ({time.monotonic() - start:.1f} s)")
            if pending and time.monotonic() - start > timeout_s:
                for fut in pending.values():
                    fut.cancel()
                failures += [f"{name}: not ready after {timeout_s:.0f} s" for name in pending]
                break
            if pending and not done:
                progress(f"waiting for {', '.join(sorted(pending))} to load ({time.monotonic() - start:.0f} s)")
        if failures and (require_all or not ready):
            raise ConfigError("experts failed to start: " + "; ".join(failures))
        for failure in failures:
            progress(f"serving without {failure}")
        return failures

    def kill(self) -> None:
        for r in self.all():
            _kill(r)


def _kill(replica: Replica) -> None:
    try:
        ray.kill(replica.actor, no_restart=True)
    except Exception:  # noqa: BLE001 - already dead is fine at shutdown
        pass


class RayReplicaClient(ReplicaClient):
    """The gateway's view of one expert replica actor."""

    def __init__(self, replica: Replica) -> None:
        super().__init__(replica.expert, replica.index)
        self.actor = replica.actor

    async def profile(self):
        return await self._call(self.actor.profile.remote(), "telemetry")

    def generate(self, call) -> ReplicaStream:
        return _RayStream(self, self.actor.generate.remote(call))

    def abort(self, request_id: str) -> None:
        self.actor.abort.remote(request_id)

    async def score(self, call):
        return await self._call(self.actor.score.remote(call), "scoring", cancel=True)

    async def engine_metrics(self) -> str:
        return await self._call(self.actor.engine_metrics.remote(), "engine metrics")

    async def open_session(self, call):
        return await self._call(self.actor.open_session.remote(call), "opening an image stream", cancel=True)

    async def push_frame(self, session_id, index, image) -> None:
        await self._call(self.actor.push_frame.remote(session_id, index, image), "taking a frame", cancel=True)

    async def end_input(self, session_id) -> None:
        await self._call(self.actor.end_input.remote(session_id), "ending a stream's input", cancel=True)

    def stream_outputs(self, session_id) -> ReplicaStream:
        # A slow reader makes the replica drop its oldest results, never grow memory.
        return _RayStream(self, self.actor.stream_outputs.options(
            _generator_backpressure_num_objects=OUTPUT_BACKPRESSURE_OBJECTS).remote(session_id))

    def close_session(self, session_id) -> None:
        self.actor.close_session.remote(session_id)

    async def generate_image(self, call):
        return await self._call(self.actor.generate_image.remote(call), "generating an image", cancel=True)

    async def _call(self, ref, doing: str, *, cancel: bool = False):
        """Await an actor call: domain errors raised in the actor arrive as themselves (Ray
        re-raises them as instances of their class), Ray's own become ExpertUnavailable."""
        try:
            return await ref
        except WattserveError:
            raise
        except asyncio.CancelledError:
            if cancel:
                _cancel(ref)
            raise
        except RayError as exc:
            raise self._unavailable(exc, doing) from None

    def _unavailable(self, exc: BaseException, doing: str) -> ExpertUnavailable:
        if isinstance(exc, RayActorError):
            return ReplicaDied(f"expert {self.name} died while {doing} ({type(exc).__name__}); retry")
        return ExpertUnavailable(f"expert {self.name} failed while {doing}: {str(exc).strip().splitlines()[-1][:300]}")


#: results an image replica may have produced and the gateway not yet taken
OUTPUT_BACKPRESSURE_OBJECTS = 2


class _RayStream(ReplicaStream):
    """A Ray streaming generator (Generate events, image results): one object per batch."""

    def __init__(self, client: RayReplicaClient, gen) -> None:  # an ObjectRefGenerator
        self.client = client
        self.gen = gen

    async def next(self) -> list:
        try:
            ref = await self.gen.__anext__()
            return await ref
        except StopAsyncIteration:
            raise ExpertUnavailable(f"expert {self.client.name} ended the stream without a final message") from None
        except WattserveError:
            raise  # Ray re-raises actor errors as instances of the original class
        except RayError as exc:
            raise self.client._unavailable(exc, "serving this request") from None

    def cancel(self) -> None:
        _cancel(self.gen)


def _cancel(ref) -> None:
    try:
        ray.cancel(ref)
    except Exception:  # noqa: BLE001 - an abort (the caller's) is what frees the slot
        pass


def _root_cause(exc: BaseException) -> str:
    """Ray wraps actor constructor errors; show the innermost message."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause or exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
