"""Creates the power plane's Ray actors: one node agent per alive node (pinned there with node
affinity) and one named governor. With ``runtime/cluster.py`` (expert actors) this is the only
code that creates Ray actors; it is a sibling rather than more of cluster.py so the power plane
can be started, stopped and reasoned about apart from the expert pool.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from typing import Any

import ray
from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

from wattserve.errors import ConfigError, GovernorUnavailable, WattserveError
from wattserve.power import PowerStatus, RowStatus

from ..cluster import Replica
from .agent import NodeAgent
from .config import DEFAULT_ROW, PowerConfig
from .governor import PowerGovernor

log = logging.getLogger(__name__)

GOVERNOR_NAME = "wattserve:power-governor"
#: how often the server re-asserts that the governor loop runs (a restarted actor resumes)
WATCHDOG_INTERVALS = 5


def agent_name(node_id: str) -> str:
    return f"wattserve:power-agent:{node_id[:16]}"


class PowerPlane:
    """Owns the node agents and the governor of one server."""

    def __init__(self, config: PowerConfig, replicas: list[Replica], mirror_into=None) -> None:
        self.config = config
        self.replicas = replicas
        self.mirror_into = mirror_into  # a runtime.power.state.PowerState to keep current, or None
        self.agents: dict[str, tuple[Any, str]] = {}  # node id -> (handle, node address)
        self.governor: Any = None
        self._watchdog: asyncio.Task | None = None

    async def start(self, timeout_s: float = 60.0) -> None:
        """Create the actors, hand each expert replica to its node's agent, start the loop."""
        nodes = [n for n in ray.nodes() if n.get("Alive")]
        if not nodes:
            raise ConfigError("power governor: Ray reports no alive node")
        by_node = await asyncio.wait_for(self._experts_by_node(), timeout_s)
        missing = sorted(set(by_node) - {n["NodeID"] for n in nodes})
        if missing:
            raise ConfigError(f"power governor: experts run on nodes without an agent: {', '.join(missing)}")
        agent_cls = ray.remote(NodeAgent)
        for node in nodes:
            node_id, address = node["NodeID"], node["NodeManagerAddress"]
            # the expert list goes into the constructor: a restarted agent rebuilds it by itself
            handle = agent_cls.options(
                name=agent_name(node_id), num_cpus=0, max_restarts=-1, max_concurrency=64,
                scheduling_strategy=NodeAffinitySchedulingStrategy(node_id, soft=False),
            ).remote(node_id, address, nvml=self.config.nvml, priority_window_s=self.config.priority_window_s,
                     call_timeout_s=max(1.0, self.config.interval_s), experts=by_node.get(node_id, []))
            self.agents[node_id] = (handle, address)
        await asyncio.wait_for(asyncio.gather(*(h.ready.remote() for h, _ in self.agents.values())), timeout_s)
        self.governor = ray.remote(PowerGovernor).options(
            name=GOVERNOR_NAME, num_cpus=0, max_restarts=-1, max_concurrency=64,
        ).remote(self.config, self.agents)
        await asyncio.wait_for(self.governor.start.remote(), timeout_s)
        self._watchdog = asyncio.get_running_loop().create_task(self._keep_running(), name="power-watchdog")
        log.info("power governor running over %d node(s)", len(self.agents))

    async def _experts_by_node(self) -> dict[str, list[tuple[str, int, Any]]]:
        """Ray node id -> the (expert, replica, actor handle) running there."""
        node_ids = await asyncio.gather(*(r.actor.node_id.remote() for r in self.replicas))
        by_node: dict[str, list[tuple[str, int, Any]]] = defaultdict(list)
        for replica, node_id in zip(self.replicas, node_ids, strict=True):
            by_node[node_id].append((replica.expert, replica.index, replica.actor))
        return by_node

    async def update_replicas(self, replicas: list[Replica], timeout_s: float = 10.0) -> None:
        """The expert replicas changed at run time (the capacity controller added or released some):
        hand each node's agent its replicas now, so the governor reads and caps the new ones and
        forgets the released. A replica on a node without an agent (one that joined after the
        governor started) is reported and left uncapped."""
        self.replicas = list(replicas)
        by_node = await asyncio.wait_for(self._experts_by_node(), timeout_s)
        unknown = sorted(set(by_node) - set(self.agents))
        if unknown:
            log.warning("power governor: replicas on nodes without an agent are not capped: %s",
                        ", ".join(f"{e}/{i}" for n in unknown for e, i, _ in by_node[n]))
        await asyncio.wait_for(asyncio.gather(*(
            handle.set_experts.remote(by_node.get(node_id, [])) for node_id, (handle, _) in self.agents.items()
        )), timeout_s)

    async def _keep_running(self) -> None:
        """Restart the governor's loop if its actor came back without it, and mirror its status
        into the gateway's power picture (what /metrics exports)."""
        beats = 0
        while True:
            await asyncio.sleep(self.config.interval_s)
            if self.mirror_into is not None:
                try:
                    self.mirror_into.mirror(await asyncio.wait_for(self.governor.status.remote(0), 10.0))
                except Exception as exc:  # noqa: BLE001 - metrics go stale; the watchdog below reports
                    log.debug("power status not mirrored: %s", exc)
            beats += 1
            if beats % WATCHDOG_INTERVALS:
                continue
            try:
                if await asyncio.wait_for(self.governor.start.remote(), 10.0):
                    log.warning("power governor loop was not running (actor restarted?): started it again")
            except Exception as exc:  # noqa: BLE001 - keep watching; caps stay where they are meanwhile
                log.warning("power governor unreachable: %s", exc)

    # -- operators (the Admin servicer calls these) ------------------------------------------------
    async def set_budget(self, row: str, provisioned_power_w: float) -> RowStatus:
        """Set a row's budget P in watts ("" is the default row); returns the row afterwards."""
        await self._call(self.governor.set_budget.remote(row, provisioned_power_w))
        status: PowerStatus = await self._call(self.governor.status.remote(0))
        return next(r for r in status.rows if r.name == (row or DEFAULT_ROW))

    async def status(self, max_events: int = 100) -> PowerStatus:
        return await self._call(self.governor.status.remote(max_events))

    async def _call(self, ref, timeout_s: float = 10.0):
        try:
            return await asyncio.wait_for(ref, timeout_s)
        except WattserveError:
            raise  # e.g. InvalidRequest for an unknown row: Ray re-raises it as itself
        except Exception as exc:  # noqa: BLE001 - dead, restarting or slow governor
            raise GovernorUnavailable(
                f"the power governor did not answer ({type(exc).__name__}); caps stay as they are, retry shortly"
            ) from None

    async def stop(self) -> None:
        if self._watchdog is not None:
            self._watchdog.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watchdog
            self._watchdog = None
        if self.governor is not None:
            try:
                await asyncio.wait_for(self.governor.release_all.remote(), 10.0)
            except Exception as exc:  # noqa: BLE001 - report; the actors go away regardless
                log.warning("power governor could not release its caps: %s", exc)
        handles = [self.governor] if self.governor is not None else []
        handles += [h for h, _ in self.agents.values()]
        for handle in handles:
            with contextlib.suppress(Exception):
                ray.kill(handle, no_restart=True)
        self.governor, self.agents = None, {}
