"""Shared test setup: CPU, float32 matmuls at full precision (PyTorch parity needs it)."""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture
def highest_precision():
    with jax.default_matmul_precision("highest"):
        yield
