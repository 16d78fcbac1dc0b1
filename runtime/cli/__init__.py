"""The ``wattserve`` command line. Each feature registers its subcommands from its own module
(``COMMAND_MODULES``), so adding a command touches only that module and the list below."""

from __future__ import annotations

import argparse
import importlib
import sys
import time

from wattserve.errors import WattserveError

COMMAND_MODULES = (
    "runtime.cli.serve",
    "runtime.cli.client",
    "runtime.cli.loadtest",
    "runtime.cli.router",
    "runtime.cli.images",
    "runtime.cli.power",
    "runtime.cli.capacity",
    "runtime.cli.auth",
    "runtime.cli.exits",
    "runtime.cli.quality",
)


def say(msg: str) -> None:
    """Progress line on stderr, timestamped."""
    print(f"[wattserve {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="wattserve", description="Energy-aware LLM serving on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    for name in COMMAND_MODULES:
        importlib.import_module(name).register(sub)
    return p


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except WattserveError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
