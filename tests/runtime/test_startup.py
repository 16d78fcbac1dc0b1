"""Start-up time: where it goes (the per-phase log line) and what the gateway process imports."""

from __future__ import annotations

import math
import subprocess
import sys

from runtime.api.server import StartupPhases, replica_phases


def test_replica_phases_line_up_the_actor_marks_with_its_creation():
    marks = {"process_unix_s": 90.0, "init_unix_s": 103.0, "model_files_unix_s": 103.5,
             "model_loaded_unix_s": 118.0, "engine_ready_unix_s": 118.25}
    # the worker process existed before the actor was created: waiting starts at creation
    assert replica_phases(marks, 100.0) == ("worker process + imports 3.0 s, model files 0.5 s, "
                                            "model load 14.5 s, engine start 0.2 s")
    late = {**marks, "process_unix_s": 101.0}  # a fresh worker: from its start
    assert replica_phases(late, 100.0).startswith("worker process + imports 2.0 s")
    unknown = {**marks, "process_unix_s": math.nan}
    assert replica_phases(unknown, 100.0).startswith("worker process + imports 3.0 s")
    starting = {k: v for k, v in marks.items() if k != "engine_ready_unix_s"}  # vLLM still starting
    assert "engine start" not in replica_phases(starting, 100.0)


def test_startup_phases_line():
    t = iter([0.0, 4.0, 4.5, 30.0, 30.1])
    phases = StartupPhases(clock=lambda: next(t))
    for name in ("Ray", "actors created", "experts ready", "gRPC bind"):
        phases.mark(name)
    assert phases.line(["edge/0: model load 20.0 s"]) == (
        "start-up took 30.1 s: Ray 4.0 s, actors created 0.5 s, experts ready 25.5 s, gRPC bind 0.1 s "
        "[edge/0: model load 20.0 s]")


def test_the_gateway_process_does_not_import_torch_for_text_experts():
    # torch took ~4 s of every `wattserve serve` start on the 2-core host before any phase began;
    # only image experts (the diffusion worker) need it in the gateway's process
    code = ("import sys, runtime.api.server, runtime.cli.serve; "
            "print(sorted(m for m in ('torch', 'transformers', 'diffusers') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == "[]"
    code = "import runtime.cluster as c; print(c.ImageExpertActor.__qualname__, c.ImageExpertActor.__module__)"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.stdout.strip() == "ImageExpertActor runtime.cluster", out.stderr


def test_serve_with_a_wrong_ray_address_says_so_at_once(tmp_path):
    # ray.init retried an address where nothing listens for minutes, printing only Ray's warnings
    import socket

    with socket.socket() as s:  # a port that was free a moment ago: nothing listens there
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"ray: {{address: '127.0.0.1:{port}'}}\nauth: {{enabled: false}}\n"
                   "experts: [{name: e, engine: {kind: synthetic}, device: cpu}]\n")
    out = subprocess.run([sys.executable, "-c", "import sys; from runtime.cli import main; sys.exit(main())",
                          "serve", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120)
    assert out.returncode == 2, out.stderr
    assert f"could not join the Ray cluster at ray.address='127.0.0.1:{port}'" in out.stderr
    assert "ray start --head" in out.stderr and "Traceback" not in out.stderr
