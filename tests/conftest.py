"""Test-wide JAX settings: 8 virtual CPU devices, fast compiles, a persistent cache.

These must be set before jax is imported anywhere, so they live here.
"""

import os
import pathlib

_ROOT = pathlib.Path(__file__).resolve().parents[1]

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in _flags:
    _flags += " --xla_force_host_platform_device_count=8"
if "xla_backend_optimization_level" not in _flags:
    # CPU compile time dominates the suite; tiny test shapes do not need optimised code.
    _flags += " --xla_backend_optimization_level=0"
os.environ["XLA_FLAGS"] = _flags.strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", str(_ROOT / ".jax_cache"))
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")

import pytest  # noqa: E402

from tests import golden_parity  # noqa: E402

GOLDEN_DIR = pathlib.Path(
    os.environ.get("CSWIN_GOLDEN_DIR", _ROOT.parent / "shared" / "reference" / "golden")
)


@pytest.fixture(scope="session")
def golden_dir() -> pathlib.Path:
    """Folder of the original's golden `.npz` files; skips the test when it is absent."""
    if not GOLDEN_DIR.is_dir():
        pytest.skip(f"golden data not found at {GOLDEN_DIR} (set CSWIN_GOLDEN_DIR)")
    return GOLDEN_DIR


# The files that compile whole training steps (minutes each on 2 CPU cores), heaviest first.
# Collected first, so that `pytest -n 2 --dist loadfile --no-loadscope-reorder` hands them
# out before the quick files: one worker takes test_train.py, the other
# test_train_recipes.py, and the quick files fill in behind them.
_SLOW_FILES_FIRST = ("test_train.py", "test_train_recipes.py")


def pytest_collection_modifyitems(config, items):
    del config
    rank = {name: i for i, name in enumerate(_SLOW_FILES_FIRST)}
    items.sort(key=lambda item: rank.get(item.path.name, len(rank)))  # stable


@pytest.fixture(autouse=True)
def _collect_golden_parity(request):
    """Moves this test's golden-parity records onto its report (they reach the xdist
    controller that way)."""
    golden_parity.take()
    yield
    for item in golden_parity.take():
        request.node.user_properties.append(("golden_parity", item))


_PARITY_RECORDS: list = []


def pytest_runtest_logreport(report):
    if report.when == "teardown":
        _PARITY_RECORDS.extend(v for k, v in report.user_properties if k == "golden_parity")


def pytest_terminal_summary(terminalreporter):
    if _PARITY_RECORDS:
        terminalreporter.section("golden parity (worst per file)")
        for line in golden_parity.summary_lines(_PARITY_RECORDS):
            terminalreporter.write_line(line)
