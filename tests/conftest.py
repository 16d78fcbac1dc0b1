"""Shared fixtures: tiny models built once per session, and a small Ray instance."""

from __future__ import annotations

import os
import random
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))  # `tests.tiny_models`

os.environ.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
os.environ.setdefault("HF_HUB_OFFLINE", "1")  # tests never reach for the hub
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# Packaged models are converted once into the repo's cache, as `./dev` does, and reused.
os.environ.setdefault("WATTSERVE_CACHE_DIR", str(ROOT / ".cache" / "wattserve"))


def pytest_addoption(parser):
    parser.addoption(
        "--shuffle-seed", type=int, default=None, metavar="N",
        help="run modules, and the tests inside each module, in an order shuffled by seed N "
        "(every test must pass alone and in any order; modules stay whole so module fixtures start once)",
    )


def pytest_terminal_summary(terminalreporter, config):
    seed = config.getoption("--shuffle-seed")
    if seed is not None:  # in the summary, where -q still shows it: what reproduces this order
        terminalreporter.write_line(f"shuffled order: --shuffle-seed {seed}")


@pytest.hookimpl(tryfirst=True)  # before pytest regroups tests by parametrized fixtures
def pytest_collection_modifyitems(config, items):
    seed = config.getoption("--shuffle-seed")
    if seed is None:
        return
    rng = random.Random(seed)
    by_module: dict[str, list[pytest.Item]] = {}
    for item in items:
        by_module.setdefault(item.nodeid.split("::", 1)[0], []).append(item)
    modules = list(by_module.values())
    rng.shuffle(modules)
    items[:] = []
    for tests in modules:
        rng.shuffle(tests)
        items.extend(tests)


@pytest.fixture(scope="session")
def tiny_model_dirs(tmp_path_factory) -> dict[str, Path]:
    """One tiny random model per supported family, saved in HF format."""
    from tests.tiny_models import FAMILIES, build_model

    base = tmp_path_factory.mktemp("tiny-models")
    return {fam: build_model(base / fam, fam) for fam in FAMILIES}


@pytest.fixture(scope="session")
def tiny_llama(tiny_model_dirs) -> Path:
    return tiny_model_dirs["llama"]


@pytest.fixture(scope="session")
def ray_session():
    """One small local Ray instance for the whole session (start-up costs ~5 s)."""
    import ray

    ray.init(
        num_cpus=2,
        object_store_memory=96 * 1024 * 1024,
        _node_ip_address="127.0.0.1",
        include_dashboard=False,
        namespace="wattserve-tests",
        log_to_driver=False,
    )
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def tiny_diffusion_dir(tmp_path_factory) -> Path:
    """A tiny random latent diffusion model (UNet, VAE, CLIP text encoder) in diffusers format."""
    from tests.tiny_diffusion import build_diffusion_model

    return build_diffusion_model(tmp_path_factory.mktemp("tiny-diffusion") / "sd")


@pytest.fixture
def real_nvml():
    """The real pynvml, initialised; skips where no NVIDIA driver and GPU are present."""
    import pynvml

    try:
        pynvml.nvmlInit()
    except pynvml.NVMLError as exc:
        pytest.skip(f"no NVIDIA driver: {exc}")
    try:
        if pynvml.nvmlDeviceGetCount() < 1:
            pytest.skip("NVML sees no GPU")
        yield pynvml
    finally:
        pynvml.nvmlShutdown()
