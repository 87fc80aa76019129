"""Test-wide setup. The environment is configured at import time, before anything imports JAX."""

import os

# 8 virtual CPU devices, so sharding tests can build every mesh shape on one host.
_DEVICE_FLAG = "--xla_force_host_platform_device_count"
_xla_flags = os.environ.get("XLA_FLAGS", "")
if _DEVICE_FLAG not in _xla_flags:
    os.environ["XLA_FLAGS"] = f"{_xla_flags} {_DEVICE_FLAG}=8".strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pathlib  # noqa: E402

import pytest  # noqa: E402

SLOW_SKIP_REASON = "slow real-checkpoint test: run with --runslow / make test-slow"
SHARED_DATA_SKIP_REASON = (
    "../shared/data not found beside the checkout (real PRAG evaluation subsets)"
)


def pytest_addoption(parser):
    parser.addoption(
        "--runslow", action="store_true", default=False,
        help="also run tests marked slow (real checkpoints)",
    )


def pytest_collection_modifyitems(config, items):
    if config.getoption("--runslow"):
        return
    skip_slow = pytest.mark.skip(reason=SLOW_SKIP_REASON)
    for item in items:
        if "slow" in item.keywords:
            item.add_marker(skip_slow)


@pytest.fixture(scope="session")
def shared_data_dir() -> pathlib.Path:
    """`shared/data` beside the checkout (the real PRAG evaluation subsets), or skip."""
    path = pathlib.Path(__file__).resolve().parents[1].parent / "shared" / "data"
    if not path.is_dir():
        pytest.skip(SHARED_DATA_SKIP_REASON)
    return path
