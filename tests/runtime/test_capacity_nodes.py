"""The capacity controller on a two-node Ray cluster whose nodes are separate ``ray start``
processes (not ``ray.cluster_utils``), with ``wattserve serve`` joining it as a third process.

The head node has the custom resource ``node_a``, the worker node ``node_b``; expert ``a`` is
pinned to ``node_a`` and expert ``b`` to ``node_b`` through their ``resources``. A burst makes the
controller add a replica of ``b``, quiet time scales ``b`` to zero and a request wakes it: every
replica of ``b`` must come up on the worker node (Ray places it by the resource; the gateway and
the head node are elsewhere), ``a``'s on the head. Where each actor runs is read from the cluster
by a separate probe process, and the controller's ``started`` events name the same node.

How the cluster is run here, and why (Ray 2.60 on Linux):

- ``RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER=1`` in every process of the cluster: the test suite sets it
  to 0 (it keeps an embedded Ray on loopback), and with 0 ``ray start --address`` refuses to add a
  node ("Multi-node Ray clusters are not supported");
- ``--node-ip-address 127.0.0.2``: with clusters enabled Ray replaces exactly ``127.0.0.1`` (and
  ``localhost``) by the host's routable address; any other loopback address is kept, so the nodes
  talk over loopback. Ray's servers still listen on every interface once clusters are enabled,
  hence:
- token authentication with a fresh token per run (``RAY_AUTH_MODE=token``, ``RAY_AUTH_TOKEN``) in
  every process; without an explicit mode, a process that finds ``~/.ray/auth_token`` turns token
  auth on while another does not, and the calls between them fail with ``InvalidAuthToken``;
- a private ``--temp-dir`` (short: Ray's socket paths must fit 107 bytes) and ports picked per run;
- teardown by process id: SIGTERM to the two ``ray start --block`` processes (each stops its own
  daemons), then SIGKILL to any descendant still alive. ``ray stop`` is never used: it would stop
  every Ray on the machine, this suite's own included.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import secrets
import shutil
import socket
import subprocess
import sys
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path

import grpc
import psutil
import pytest
import yaml

from runtime.api.gen import wattserve_pb2 as pb
from runtime.api.gen import wattserve_pb2_grpc as pb_grpc
from tests.runtime.grpc_helpers import collect, start_serve_process, stop_process

pytestmark = [pytest.mark.slow, pytest.mark.timeout(480),
              pytest.mark.skipif(sys.platform != "linux", reason="needs the loopback address 127.0.0.2")]

NODE_IP = "127.0.0.2"
NAMESPACE = "wattserve-two-nodes"
RAY = Path(sys.executable).parent / "ray"

# Runs as its own process for the module (the test process may hold a Ray connection of its own):
# for every line on stdin, one line saying where each named actor of the namespace runs and each
# live node's custom resources.
PROBE = """
import json, sys, ray
ray.init(address=sys.argv[1], namespace=sys.argv[2], log_to_driver=False)
for _ in sys.stdin:
    nodes = {n["NodeID"]: sorted(k for k in n["Resources"] if k.startswith("node_")) for n in ray.nodes() if n["Alive"]}
    names = [a["name"] for a in ray.util.list_named_actors(all_namespaces=True) if a["namespace"] == sys.argv[2]]
    actors = {}
    for name in names:
        if name.startswith("wattserve:") and name.count(":") == 2:
            try:
                actors[name] = ray.get(ray.get_actor(name).node_id.remote(), timeout=30)
            except Exception:
                pass  # released between the listing and the call
    print("PROBE " + json.dumps({"nodes": nodes, "actors": actors}), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind((NODE_IP, 0))
        return s.getsockname()[1]


@dataclass
class Cluster:
    address: str
    env: dict[str, str]
    tmp: Path
    procs: list[subprocess.Popen] = field(default_factory=list)
    prober: subprocess.Popen | None = None

    def start_node(self, name: str, *args: str) -> None:
        log = open(self.tmp / f"{name}.log", "w")  # noqa: SIM115 - closed with the process
        self.procs.append(subprocess.Popen(
            [str(RAY), "start", "--block", "--node-ip-address", NODE_IP, "--num-cpus", "1",
             "--object-store-memory", str(80 * 1024 * 1024), "--disable-usage-stats", *args],
            stdout=log, stderr=subprocess.STDOUT, env=self.env, start_new_session=True))

    def probe(self) -> dict:
        """Where the namespace's actors run now (the probe process is started on first use)."""
        if self.prober is None:
            self.prober = subprocess.Popen([sys.executable, "-c", PROBE, self.address, NAMESPACE], text=True,
                                           stdin=subprocess.PIPE, stdout=subprocess.PIPE,
                                           stderr=open(self.tmp / "probe.log", "w"), env=self.env)  # noqa: SIM115
        self.prober.stdin.write("\n")
        self.prober.stdin.flush()
        for line in self.prober.stdout:
            if line.startswith("PROBE "):
                return json.loads(line.removeprefix("PROBE "))
        raise AssertionError(f"the probe process ended (rc {self.prober.wait()}):\n{self.logs()}")

    def logs(self) -> str:
        return "".join(f"--- {p.name}\n{p.read_text()[-3000:]}" for p in sorted(self.tmp.glob("*.log")))

    def stop(self) -> None:
        """SIGTERM each ``ray start --block`` (it stops the daemons it started), then SIGKILL any
        descendant still alive, and any process whose command line names this cluster's private
        temp dir (daemons of a node that failed to join): all by process id."""
        if self.prober is not None:
            self.prober.stdin.close()  # it exits at the end of its input
            try:
                self.prober.wait(timeout=30)
            except subprocess.TimeoutExpired:
                self.prober.kill()
                self.prober.wait()
        family: list[psutil.Process] = []
        for proc in self.procs:
            try:
                family += psutil.Process(proc.pid).children(recursive=True)
            except psutil.NoSuchProcess:
                pass
        for p in psutil.process_iter(["cmdline"]):
            if p.pid != os.getpid() and str(self.tmp) in " ".join(p.info["cmdline"] or ()):
                family.append(p)
        for proc in reversed(self.procs):  # the worker node first
            stop_process(proc, timeout_s=30)
        _, alive = psutil.wait_procs(family, timeout=10)
        for p in alive:
            try:
                p.kill()
            except psutil.NoSuchProcess:
                pass
        psutil.wait_procs(alive, timeout=10)


@pytest.fixture(scope="module")
def cluster():
    tmp = Path(tempfile.mkdtemp(prefix="ws2n-", dir="/tmp"))
    port = free_port()
    # RAY_ADDRESS may name this test process's own Ray: every command here names its address
    env = {**{k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"},
           "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER": "1", "RAY_AUTH_MODE": "token",
           "RAY_AUTH_TOKEN": secrets.token_hex(32), "RAY_USAGE_STATS_ENABLED": "0"}
    c = Cluster(f"{NODE_IP}:{port}", env, tmp)
    try:
        c.start_node("head", "--head", "--port", str(port), "--temp-dir", str(tmp),
                     "--ray-client-server-port", str(free_port()), "--include-dashboard", "false",
                     "--resources", json.dumps({"node_a": 1}))
        deadline = time.monotonic() + 240  # generous: on a loaded 2-core host a node takes 30 s and more
        head_log = tmp / "head.log"
        while "Ray runtime started" not in head_log.read_text():  # the head is up, not only its GCS port
            assert c.procs[0].poll() is None and time.monotonic() < deadline, f"no head node:\n{c.logs()}"
            time.sleep(0.5)
        tries = 0
        while True:  # both nodes registered; a worker node that timed out joining is started again
            if c.procs[-1] is c.procs[0] or c.procs[-1].poll() is not None:
                assert tries < 3 and c.procs[0].poll() is None, f"the worker node did not join:\n{c.logs()}"
                tries += 1
                c.start_node(f"worker-{tries}", "--address", c.address, "--resources", json.dumps({"node_b": 1}))
            nodes = c.probe()["nodes"]
            if sorted(nodes.values()) == [["node_a"], ["node_b"]]:
                break
            assert time.monotonic() < deadline, f"cluster did not come up:\n{c.logs()}"
            time.sleep(1)
        yield c
    finally:
        c.stop()
        shutil.rmtree(tmp, ignore_errors=True)


@pytest.fixture(scope="module")
def served(cluster):
    """``wattserve serve`` joining the cluster; its output is drained (and kept) while it runs."""
    config = {
        "auth": {"enabled": False},
        "http": {"enabled": False},
        "gateway": {"port": 0, "health_interval_s": 0.2},
        "ray": {"address": cluster.address, "namespace": NAMESPACE},
        "model_cache_dir": str(cluster.tmp / "cache"),
        "experts": [
            {"name": "a", "engine": {"kind": "synthetic", "step_ms": 5}, "resources": {"custom": {"node_a": 1}}},
            # 20 ms per step, batches of 2: a burst of long answers needs a second replica; two fit node_b
            {"name": "b", "engine": {"kind": "synthetic", "step_ms": 20}, "max_batch": 2, "max_queue": 16,
             "resources": {"custom": {"node_b": 0.5}}},
        ],
        "capacity": {
            "enabled": True, "interval_s": 0.5, "planner": {"peak_window_s": 0, "ewma_s": 1.0},
            "experts": {"b": {"min_replicas": 0, "max_replicas": 2, "scale_down_delay_s": 1.0,
                              "scale_to_zero_after_s": 2.0, "cold_start_s": 5.0,
                              "slo": {"ttft_ms": 5000, "tpot_ms": 100}}},
        },
    }
    path = cluster.tmp / "serve.yaml"
    path.write_text(yaml.safe_dump(config))
    extra = {k: cluster.env[k] for k in ("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "RAY_AUTH_MODE", "RAY_AUTH_TOKEN")}
    try:
        proc, lines, target, _ = start_serve_process(path, timeout_s=180, env=extra)
    except AssertionError as exc:
        raise AssertionError(f"{exc}\n{cluster.logs()}") from None
    drain = threading.Thread(target=lambda: lines.extend(proc.stdout), daemon=True)
    drain.start()
    try:
        yield target, lines
    finally:
        stop_process(proc)
        drain.join(timeout=5)


def request(expert: str, max_tokens: int) -> pb.GenerateRequest:
    return pb.GenerateRequest(prompt="a b c", max_tokens=max_tokens, expert=expert,
                              sampling=pb.SamplingParams(ignore_eos=True))


async def test_the_controller_places_replicas_on_the_node_with_the_resource(cluster, served):
    target, lines = served
    async with grpc.aio.insecure_channel(target) as channel:
        stub, admin = pb_grpc.InferenceStub(channel), pb_grpc.AdminStub(channel)

        async def capacity(expert: str = "b"):
            reply = await admin.GetCapacityStatus(pb.GetCapacityStatusRequest(max_events=200))
            return next(e for e in reply.experts if e.expert == expert), [e for e in reply.events if e.expert == expert]

        async def until(predicate, timeout_s: float = 90.0) -> None:
            deadline = time.monotonic() + timeout_s
            while not await predicate():
                assert time.monotonic() < deadline, "condition not reached in time:\n" + "".join(lines[-60:])
                await asyncio.sleep(0.2)

        def on(placed: dict, resource: str) -> list[str]:
            """Actors of the namespace on the node that has ``resource``."""
            node = next(n for n, res in placed["nodes"].items() if resource in res)
            return sorted(name for name, where in placed["actors"].items() if where == node)

        # a burst: eight long answers on one replica of batch 2 -> the controller adds one
        burst = asyncio.gather(*(collect(stub, request("b", 100)) for _ in range(8)))

        async def two_running():
            return (await capacity())[0].replicas_running == 2

        await until(two_running)
        placed = await asyncio.to_thread(cluster.probe)  # while the burst runs: the second is still up
        node_b = next(n for n, res in placed["nodes"].items() if "node_b" in res)
        assert on(placed, "node_b") == ["wattserve:b:0", "wattserve:b:1"]  # both on the worker node
        assert on(placed, "node_a") == ["wattserve:a:0"]
        results = await burst
        assert [usage.completion_tokens for _, _, usage in results] == [100] * 8

        # quiet: scaled to zero; a request wakes b, and its replica starts on the worker node again
        async def released():
            state, events = await capacity()
            return state.replicas_running == 0 and state.replicas_starting == 0 and any(e.action == "scale_to_zero" for e in events)

        await until(released)
        assert not [n for n in (await asyncio.to_thread(cluster.probe))["actors"] if n.startswith("wattserve:b:")]
        _, _, usage = await collect(stub, request("b", 5))
        assert usage.completion_tokens == 5 and usage.expert == "b"
        placed = await asyncio.to_thread(cluster.probe)
        b_now = sorted(n for n in placed["actors"] if n.startswith("wattserve:b:"))
        # the one it woke (and a second, if the next plan wanted two for the burst's long answers)
        assert f"wattserve:b:{usage.replica}" in b_now and set(b_now) <= set(on(placed, "node_b"))
        # a's replica never moved; it answers from the head node
        _, _, usage_a = await collect(stub, request("a", 3))
        assert usage_a.completion_tokens == 3 and on(placed, "node_a") == ["wattserve:a:0"]

        state, events = await capacity()
        started = [e.reason for e in events if e.action == "started"]
        assert len(started) >= 2 and all(f"on node {node_b}" in r for r in started), started
        actions = [e.action for e in events]
        assert {"scale_up", "scale_to_zero", "wake", "started", "removed"} <= set(actions)
        status = await admin.GetStatus(pb.GetStatusRequest())
        assert status.requests_failed == 0  # nothing lost while replicas came and went across nodes
    assert not [ln for ln in lines if re.search(r"InvalidAuthToken|Traceback", ln)]
