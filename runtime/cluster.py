"""Ray lifecycle and the only code that creates Ray actors.

``start_ray`` starts an embedded instance on loopback (or joins a cluster), ``ExpertPool``
creates one actor per expert replica (named ``wattserve:<expert>:<i>``, restartable, placed by
the resources in its spec) and waits until every replica has loaded its model. The power plane's
actors (node agents, governor) are created by its sibling ``runtime/power/plane.py``.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable
from dataclasses import dataclass

import ray

from wattserve.errors import ConfigError
from wattserve.specs import ExpertSpec
from workers.expert import ExpertWorker

from .config import RayConfig

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

    def create(self) -> None:
        # Text experts and image experts are different actor bodies behind the same lifecycle.
        remote: dict[str, object] = {}
        for spec in self.specs.values():
            if spec.modality not in remote:
                body = ExpertActor if spec.modality == "text" else __getattr__("ImageExpertActor")
                remote[spec.modality] = ray.remote(body)
            actor_cls = remote[spec.modality]
            res = spec.resources
            options = dict(
                name=actor_name(spec.name, 0),
                max_restarts=spec.max_restarts,
                max_task_retries=0,  # a generation is not idempotent: never replay it silently
                num_cpus=res.num_cpus,
                num_gpus=res.num_gpus,
                resources=dict(res.custom) or None,
                max_concurrency=1024,
            )
            self.replicas[spec.name] = [
                Replica(
                    spec.name,
                    i,
                    actor_cls.options(**{**options, "name": actor_name(spec.name, i)}).remote(
                        spec, i, self.cache_dir
                    ),
                )
                for i in range(spec.replicas)
            ]

    def all(self) -> list[Replica]:
        return [r for group in self.replicas.values() for r in group]

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
            try:
                ray.kill(r.actor, no_restart=True)
            except Exception:  # noqa: BLE001 - already dead is fine at shutdown
                pass


def _root_cause(exc: BaseException) -> str:
    """Ray wraps actor constructor errors; show the innermost message."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause or exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
