"""``wattserve serve`` and ``wattserve prepare``."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
from pathlib import Path

from ..heap import settle_heap
from . import say

DEFAULT_CONFIG = "configs/local.yaml"


def load_cli_config(args):
    """The config file named by ``--config``, with command-line overrides applied."""
    from ..config import load_config

    cfg = load_config(args.config)
    if getattr(args, "address", None):
        cfg.ray.address = args.address
    if getattr(args, "host", None):
        cfg.gateway.host = args.host
    if getattr(args, "port", None) is not None:
        cfg.gateway.port = args.port
    if getattr(args, "http_port", None) is not None:
        if args.http_port < 0:
            cfg.http.enabled = False
        else:
            cfg.http.port = args.http_port
    if getattr(args, "host", None):
        cfg.http.host = args.host
    return cfg


# -- prepare ------------------------------------------------------------------------------------
def cmd_prepare(args) -> int:
    from workers.models import default_cache_dir, prepare_for_engine

    cfg = load_cli_config(args)
    cache = Path(cfg.model_cache_dir).expanduser() if cfg.model_cache_dir else default_cache_dir()
    for expert in cfg.experts:
        if expert.model is not None:  # llamacpp experts need only their GGUF file, no conversion
            say(f"{expert.name}: {prepare_for_engine(expert.model, expert.engine.kind, cache, progress=say)}")
    return 0


# -- serve --------------------------------------------------------------------------------------
def cmd_serve(args) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    cfg = load_cli_config(args)
    return asyncio.run(_serve(cfg))


async def _serve(cfg) -> int:
    from ..api.server import WattserveServer

    server = WattserveServer(cfg, progress=say)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, stop.set)
    start = asyncio.create_task(server.start())
    done, _ = await asyncio.wait({start, asyncio.create_task(stop.wait())}, return_when=asyncio.FIRST_COMPLETED)
    if start not in done:
        say("interrupted while starting; shutting down")
        start.cancel()
        await server.stop()
        return 130
    port = start.result()
    settle_heap()  # this process is the server's alone: start-up's objects leave the collector's walks
    loop.add_signal_handler(signal.SIGHUP, lambda: say(server.reload_keys()))
    target = f"{cfg.gateway.host}:{port}"
    experts = ", ".join(f"{e.name} ({e.model_label}, {e.engine.kind}, {e.device.label}) x{e.replicas}" for e in cfg.experts)
    http = (
        f"  HTTP (OpenAI-compatible /v1, /metrics, /health): http://{cfg.http.host}:{server.http_port}\n"
        if server.http is not None else "  HTTP: disabled\n"
    )
    print(
        f"\nwattserve is listening on {target} (gRPC: wattserve.v1.Inference, wattserve.v1.Admin)\n"
        f"{http}"
        f"  experts: {experts}\n"
        f"  send a prompt:  .venv/bin/wattserve generate --target {target} \"The capital of France is\"\n"
        f"  status:         .venv/bin/wattserve status --target {target}\n"
        f"  Ctrl-C stops the server{'; kill -HUP ' + str(os.getpid()) + ' reloads the API keys' if server.keys else ''}.\n",
        flush=True,
    )
    await stop.wait()
    grace = cfg.gateway.shutdown_grace_s
    say(f"shutting down: streams in flight may finish within {grace:g} s (gateway.shutdown_grace_s); "
        "a second Ctrl-C cuts them now")
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, server.cut_streams_now)
    await server.stop()  # says what happened to the streams (runtime/shutdown.py)
    say("stopped")
    return 0



def register(sub) -> None:
    s = sub.add_parser("serve", help="start Ray, the experts and the gRPC server")
    s.add_argument("--config", default=DEFAULT_CONFIG, help=f"YAML config (default {DEFAULT_CONFIG})")
    s.add_argument("--address", help="join this Ray cluster instead of starting one (e.g. auto, 10.0.0.5:6379)")
    s.add_argument("--host", help="interface to listen on (default from config: 127.0.0.1)")
    s.add_argument("--port", type=int, help="gRPC port to listen on (0: any free port)")
    s.add_argument("--http-port", type=int, help="HTTP port (OpenAI API, /metrics; 0: any free port, -1: no HTTP)")
    s.set_defaults(func=cmd_serve)

    s = sub.add_parser("prepare", help="convert the config's packaged models into the local cache")
    s.add_argument("--config", default=DEFAULT_CONFIG)
    s.set_defaults(func=cmd_prepare)
