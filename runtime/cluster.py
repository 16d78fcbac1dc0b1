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
import pickle
import socket
import time
import uuid
import warnings
from collections.abc import Callable
from dataclasses import dataclass

import ray
from ray import cloudpickle
from ray.exceptions import RayActorError, RayError

from wattserve.errors import ClusterUnavailable, ConfigError, ExpertUnavailable, WattserveError
from wattserve.specs import ExpertSpec
from workers.expert import ExpertWorker

from .config import RayConfig
from .gateway.replicas import ReplicaClient, ReplicaDied, ReplicaStream
from .heap import settle_heap

log = logging.getLogger(__name__)

#: seconds a replica's start-up probe (~60 prompt tokens, 8 output tokens) may take
PROBE_TIMEOUT_S = 120.0


def start_ray(cfg: RayConfig) -> tuple[str, bool]:
    """Start or join Ray; returns the GCS address and whether this call started the connection
    (only then should the caller shut it down)."""
    if ray.is_initialized():
        return ray.get_runtime_context().gcs_address, False
    if cfg.address:
        _check_reachable(cfg.address)
    try:
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
    except Exception as exc:  # Ray raises bare Exception/ConnectionError/RuntimeError here
        where = f"join the Ray cluster at ray.address={cfg.address!r}" if cfg.address else "start an embedded Ray"
        hint = ("check that `ray start --head` runs there and the address and port are right" if cfg.address
                else "an overloaded host or a stale Ray session can cause this: retry, or `ray stop` and retry")
        raise ClusterUnavailable(f"could not {where}: {str(exc).strip() or type(exc).__name__} ({hint})") from exc
    return ray.get_runtime_context().gcs_address, True


def _check_reachable(address: str, timeout_s: float = 5.0) -> None:
    """Refuse a ``host:port`` nobody listens on at once: ``ray.init`` would retry it for minutes."""
    host, sep, port = address.rpartition(":")
    if not sep or not port.isdigit() or "://" in address:
        return  # "auto", ray:// client addresses: Ray resolves them itself
    try:
        socket.create_connection((host.strip("[]"), int(port)), timeout=timeout_s).close()
    except OSError as exc:
        raise ClusterUnavailable(
            f"could not join the Ray cluster at ray.address={address!r}: nothing answers there ({exc}); "
            "check that `ray start --head` runs on that host and the address and port are right") from exc


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
    expert to its node's agent). Mixed in here so ``workers/`` stays free of Ray. Also what only
    a process of its own may do: settle the collector once the replica is ready (``heap.py``)."""

    async def node_id(self) -> str:
        return ray.get_runtime_context().get_node_id()

    async def ready(self) -> bool:
        ok = await super().ready()
        settle_heap()  # the actor's process is this replica's alone; the model and engine are loaded
        return ok


class ExpertActor(_OnNode, ExpertWorker):
    """A text expert replica as a Ray actor. One that Ray restarted after a crash probes itself
    (:meth:`ExpertWorker.probe`), started by the gateway's first telemetry poll: the pool probed
    the process it started, and without a probe the new one is priced by its prior until it serves."""

    _restart_checked = False

    async def profile(self):
        if not self._restart_checked:
            self._restart_checked = True
            if self.spec.startup_probe and _was_restarted():
                self._restart_probe = asyncio.ensure_future(self._probe_after_restart())
        return await super().profile()

    # The multiplexed stream's wire side (``_Multiplexed`` is the gateway's): the same
    # ``submit``/``open_stream`` as in process, their payloads as bytes pickled here (``pack``).
    # Without task events: a submit is a Ray task per batch of calls, and recording each one for
    # Ray's state API cost the gateway about 20 us of its event loop per submit.
    @ray.method(enable_task_events=False)
    async def submit_packed(self, stream_id: str, calls: bytes) -> bytes | None:
        """:meth:`ExpertWorker.submit` of the packed calls; None when every call started (the
        common answer, nothing to unpack), else the packed list of refusals."""
        refused = await self.submit(stream_id, pickle.loads(calls))
        return None if all(r is None for r in refused) else pack(refused)

    @ray.method(enable_task_events=False)
    async def open_stream_packed(self, stream_id: str):
        """:meth:`ExpertWorker.open_stream`, each batch packed."""
        async for batch in self.open_stream(stream_id):
            yield pack(batch)

    async def _probe_after_restart(self) -> None:
        try:
            await asyncio.wait_for(self.probe(), PROBE_TIMEOUT_S)
        except Exception as exc:  # noqa: BLE001 - priced by its prior until it serves, as at start-up
            log.warning("%s restarted; its probe failed (%s): priced by router.cost_priors until it serves",
                        actor_name(self.spec.name, self.replica), exc)


def _was_restarted() -> bool:
    """Whether Ray restarted this actor; asked once per process (a query to Ray's state API, whose
    property reads a deprecated attribute and would warn in every replica's log)."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return bool(ray.get_runtime_context().was_current_actor_reconstructed)


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
        """Start one more replica of ``expert`` and return its client once it has loaded (with the
        node Ray placed it on, by the expert's ``resources``); a replica that fails or is not ready
        within ``timeout_s`` (none of the cluster's nodes has its resources free, say) is released and
        ExpertUnavailable raised."""
        replica = self.add(expert)
        try:
            await asyncio.wait_for(replica.actor.ready.remote(), timeout_s)
            node = await replica.actor.node_id.remote()
        except BaseException as exc:
            self.remove(expert, replica.index)
            if isinstance(exc, asyncio.CancelledError):
                raise
            why = f"not ready after {timeout_s:.0f} s" if isinstance(exc, TimeoutError) else _root_cause(exc)
            raise ExpertUnavailable(f"{replica.name} did not start: {why}") from None
        await self.probe([replica])
        client = RayReplicaClient(replica)
        client.node = node
        return client

    async def probe(self, replicas: list[Replica], progress: Callable[[str], None] = log.info) -> None:
        """Each ready text replica's start-up probe (``ExpertWorker.probe``: one short request, so
        the router prices it from measurement), one replica at a time: on a shared CPU two probes
        at once would each measure the other's contention. A probe that fails is reported and
        skipped; that replica is priced by ``router.cost_priors`` until it has served a request."""
        for r in replicas:
            spec = self.specs.get(r.expert)
            if spec is None or spec.modality != "text" or not spec.startup_probe:
                continue
            try:
                m = await asyncio.wait_for(r.actor.probe.remote(), PROBE_TIMEOUT_S)
            except Exception as exc:  # noqa: BLE001 - serving goes on; the prior stands in
                why = f"no answer after {PROBE_TIMEOUT_S:.0f} s" if isinstance(exc, TimeoutError) else _root_cause(exc)
                progress(f"{r.name}: start-up probe failed ({why}); priced by router.cost_priors until it serves")
                continue
            def at(power_w) -> str:
                return f" at {power_w:.1f} W" if power_w else ""

            progress(f"{r.name} measured by its start-up probe: prefill {m['prefill_ms_per_token'] or 0:.2f} ms/token"
                     f"{at(m.get('prefill_power_w'))}, decode {m['decode_ms_per_token'] or 0:.1f} ms/step"
                     f"{at(m.get('decode_power_w'))}; {m['energy_j']:.3f} J ({m['energy_source']}, not charged to any "
                     "tenant)")

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
        up: set[str] = set()
        while pending:
            done, _ = await asyncio.wait(pending.values(), timeout=5.0, return_when=asyncio.FIRST_COMPLETED)
            for name, fut in list(pending.items()):
                if fut in done:
                    del pending[name]
                    if fut.exception() is not None:
                        failures.append(f"{name}: {_root_cause(fut.exception())}")
                    else:
                        ready += 1
                        up.add(name)
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
        await self.probe([r for r in self.all() if r.name in up], progress)
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
        self._mux: _Multiplexed | None = None

    async def profile(self):
        return await self._call(self.actor.profile.remote(), "telemetry")

    def generate(self, call) -> ReplicaStream:
        if self._mux is None:
            self._mux = _Multiplexed(self)
        return _MuxStream(self, self._mux, call)

    def close(self) -> None:
        if self._mux is not None:
            self._mux.close()
            self._mux = None

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


#: submits one replica's stream may have on their way at once: the first call of a burst leaves
#: at once, the rest of the burst in the next one instead of waiting for the first's reply (the
#: time to first token of a burst of arrivals was two submit round trips behind the engine)
MAX_SUBMITS_IN_FLIGHT = 2

#: results an image replica may have produced and the gateway not yet taken
OUTPUT_BACKPRESSURE_OBJECTS = 2


class _RayStream(ReplicaStream):
    """A Ray streaming generator of one call (an image session's results): one object per batch."""

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


class _Multiplexed:
    """The gateway's side of one replica's multiplexed stream (``workers/streams.py``).

    A Ray streaming generator per request costs the replica an actor task per request and an
    object per yield (about 2 ms of its CPU per request on a 2-core host: docs/benchmarks.md,
    "Serving-path overhead"). Instead one long-lived ``open_stream`` generator per replica brings
    back the events of every request, sorted here into a queue per request, and calls go to the
    replica in batches: up to ``MAX_SUBMITS_IN_FLIGHT`` submits on their way, those started
    meanwhile in the next, so batches grow with the load and a lone call leaves in the next turn of
    the event loop. The replica's answer to a submit only matters for the calls it refused: their
    error goes into their queue like any event. If the stream fails (the replica died), every
    request on it gets the error and the next call opens a fresh stream.
    """

    def __init__(self, client: RayReplicaClient) -> None:
        self.client = client
        self._queues: dict[str, asyncio.Queue] = {}
        self._on_stream: dict[str, str] = {}  # request id -> the stream it was submitted on
        self._pending: list = []  # calls started and not yet submitted
        self._stream_id = ""
        self._reader: asyncio.Task | None = None
        self._generator = None
        self._scheduled = False  # a flush is scheduled for the next turn of the event loop
        self._in_flight = 0  # submits on their way
        # what bench_gateway_loop.py reports: calls per submit and stream batches per call
        self.submits = self.calls_submitted = self.batches_read = 0

    def start(self, call) -> asyncio.Queue:
        """Queue ``call`` for the next submit; returns the queue of its events. A refusal (the
        exception the replica's ``submit`` answered for it, or the submit's own failure) arrives
        in the same queue, so the first token never waits for the submit's reply."""
        if self._reader is None or self._reader.done():
            self._open()
        if self._in_flight < MAX_SUBMITS_IN_FLIGHT and not self._scheduled:
            self._scheduled = True
            asyncio.get_running_loop().call_soon(self._flush)
        self._pending.append(call)
        queue = self._queues[call.request_id] = asyncio.Queue()
        self._on_stream[call.request_id] = self._stream_id
        return queue

    def forget(self, request_id: str) -> None:
        """The request is over for the gateway; a call not yet submitted never will be."""
        self._queues.pop(request_id, None)
        self._on_stream.pop(request_id, None)
        self._pending = [c for c in self._pending if c.request_id != request_id]

    def close(self) -> None:
        if self._reader is not None:
            self._reader.cancel()
        if self._generator is not None:
            _cancel(self._generator)  # the replica aborts what the stream still had

    def _open(self) -> None:
        self._stream_id = uuid.uuid4().hex
        self._generator = self.client.actor.open_stream_packed.remote(self._stream_id)
        self._reader = asyncio.create_task(self._read(self._generator, self._stream_id),
                                           name=f"stream-{self.client.expert}-{self.client.index}")

    def _flush(self) -> None:
        self._scheduled = False
        batch, self._pending = self._pending, []
        if not batch:
            return
        if self._reader is None or self._reader.done():
            self._open()  # the stream failed since these calls were started
        for call in batch:
            self._on_stream[call.request_id] = self._stream_id
        ref = self.client.actor.submit_packed.remote(self._stream_id, pack(batch))
        self._in_flight += 1
        self.submits += 1
        self.calls_submitted += len(batch)
        asyncio.ensure_future(self._settle(ref, batch))

    async def _settle(self, ref, batch: list) -> None:
        try:
            results = await ref
        except BaseException as exc:  # noqa: BLE001 - every call of the batch gets it
            results = [exc] * len(batch)
        finally:
            self._in_flight -= 1
            if self._pending and not self._scheduled:
                self._flush()  # the calls that waited for a free submit
        if results is None:
            return  # every call started
        if isinstance(results, bytes):
            results = pickle.loads(results)
        for call, refused in zip(batch, results, strict=True):
            queue = self._queues.get(call.request_id)
            if refused is not None and queue is not None:
                queue.put_nowait(refused)

    async def _read(self, generator, stream_id: str) -> None:
        try:
            async for ref in generator:
                # The generator has waited for the object: read it now rather than await it
                # again, which would cost another wake-up through Ray's thread and the loop.
                self.batches_read += 1
                for rid, item in pickle.loads(ray.get(ref)):
                    queue = self._queues.get(rid)
                    if queue is not None:
                        queue.put_nowait(item)
            error: BaseException = StopAsyncIteration()
        except asyncio.CancelledError:
            raise
        except BaseException as exc:  # noqa: BLE001 - the requests on this stream get it
            error = exc
        for rid, sid in list(self._on_stream.items()):
            if sid == stream_id:
                self._queues[rid].put_nowait(error)


class _MuxStream(ReplicaStream):
    """One Generate call on a replica's multiplexed stream."""

    def __init__(self, client: RayReplicaClient, mux: _Multiplexed, call) -> None:
        self.client, self.mux, self.request_id = client, mux, call.request_id
        self.queue = mux.start(call)

    async def next(self) -> list:
        """Everything the stream delivered for this call since the last call (events that arrived
        together leave as one chunk), or the error that ended it (a refusal of the submit too)."""
        item = await self.queue.get()
        events: list = []
        while True:
            if isinstance(item, BaseException):
                self._raise(item)
            events.extend(item)
            if self.queue.empty():
                return events
            item = self.queue.get_nowait()

    def cancel(self) -> None:
        self.mux.forget(self.request_id)

    def _raise(self, exc: BaseException):
        if isinstance(exc, WattserveError):
            raise exc  # the replica's own answer (QueueFull, InvalidRequest, EngineDead, ...)
        if isinstance(exc, StopAsyncIteration):
            raise ExpertUnavailable(f"expert {self.client.name} ended its stream without a final message; retry")
        if isinstance(exc, RayError):
            raise self.client._unavailable(exc, "serving this request") from None
        raise exc


def _cancel(ref) -> None:
    try:
        ray.cancel(ref)
    except Exception:  # noqa: BLE001 - an abort (the caller's) is what frees the slot
        pass


def pack(obj) -> bytes:
    """What crosses the replica's stream and submits: the standard library's pickle (Ray's
    serializer, cloudpickle, calls a Python hook per object, 3-5x slower on these small
    dataclasses; bytes pass through Ray as they are, and a stream item is deserialised twice in
    the gateway, once on Ray's thread and once by ``ray.get``), cloudpickle only for what the
    standard pickler refuses (an exception class defined in a function, say)."""
    try:
        return pickle.dumps(obj, pickle.HIGHEST_PROTOCOL)
    except Exception:  # noqa: BLE001 - anything the standard pickler cannot do, cloudpickle can
        return cloudpickle.dumps(obj, pickle.HIGHEST_PROTOCOL)


def _root_cause(exc: BaseException) -> str:
    """Ray wraps actor constructor errors; show the innermost message."""
    cause = getattr(exc, "cause", None) or exc.__cause__
    while cause is not None and (getattr(cause, "cause", None) or cause.__cause__) is not None:
        cause = getattr(cause, "cause", None) or cause.__cause__
    text = str(cause or exc).strip().splitlines()
    return text[-1] if text else type(exc).__name__
