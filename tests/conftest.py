"""Shared test setup: CPU, float32 matmuls at full precision (PyTorch parity needs it)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


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
