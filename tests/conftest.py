"""Shared test setup: CPU, float32 matmuls at full precision (PyTorch parity needs it)."""

import gc
import importlib
import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
# Many tests (and the train.py/eval.py subprocesses they start, which inherit these variables)
# compile the same tiny programs: share them through JAX's persistent cache inside the repo.
_CACHE = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), ".pytest_cache", "jax")
os.environ.setdefault("JAX_COMPILATION_CACHE_DIR", _CACHE)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0")
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES", "0")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # Several workers share the cores: one thread each for PyTorch/OpenMP, whose spinning
    # threads otherwise oversubscribe the machine (measured: ResNet-18 tests 4x slower).
    os.environ.setdefault("OMP_NUM_THREADS", "1")

# The suite compiles hundreds of programs and runs each for a few steps: LLVM at optimisation level 1
# (XLA's default is 3) cuts XLA:CPU's compile time by a third. The programs themselves (HLO) are those
# users run; the machine code rounds differently, as another CPU's does (measured, the train probe's
# first-step losses: 4e-8 relative in float32, 2e-16 in float64), so the suite's assertions hold for
# any rounding, as they must for AVX2 and AVX-512. Subprocesses inherit it through $XLA_FLAGS.
TEST_XLA_FLAGS = "--xla_backend_optimization_level=1"
if "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = f"{os.environ.get('XLA_FLAGS', '')} {TEST_XLA_FLAGS}".strip()

# A worker keeps what JAX caches (traced and compiled programs) all session: at Python's default
# thresholds the cyclic collector's scans took a tenth of a fast-tier worker's time (8.5 of 80 s,
# timed with gc.callbacks), at these 4 s.
gc.set_threshold(10_000, 20, 20)

from cifar_jax.cli import tune_xla_cpu  # noqa: E402

tune_xla_cpu()  # the XLA:CPU settings train.py and eval.py run with
import jax  # noqa: E402
import pytest  # noqa: E402

# JAX decides at a process's first compilation whether it uses the persistent cache, for good: decided
# here, the cache stays on in a worker that later runs the bench, which turns it off before it compiles.
jax.jit(lambda x: x + 1)(0)

if os.environ.get("CI") or os.environ.get("CIFAR_JAX_REQUIRE_EXTRAS"):
    # `make test` installed every extra (torch, tfds, wandb, ...): one that is missing is an error
    # there, not a silently skipped file.
    pytest.importorskip = lambda modname, *args, **kwargs: importlib.import_module(modname)


def pytest_configure(config):
    if os.environ.get("PYTEST_XDIST_WORKER"):
        try:
            import torch

            torch.set_num_threads(1)
        except ImportError:
            pass


@pytest.fixture
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield


@pytest.fixture
def x64():
    """float64 everywhere for the duration of a test (PyTorch trajectory parity)."""
    previous = jax.config.jax_enable_x64
    jax.config.update("jax_enable_x64", True)
    try:
        with jax.default_matmul_precision("highest"):
            yield
    finally:
        jax.config.update("jax_enable_x64", previous)


def pytest_collection_modifyitems(config, items):
    # The slow tests first: under xdist the workers then end together, the short tests filling in.
    items.sort(key=lambda item: item.get_closest_marker("slow") is None)
