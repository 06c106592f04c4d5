"""The device mesh and where arrays lie on it: a 1-D mesh 'data' over all devices (of all
processes); the dataset and the train state replicated on every device, each batch split over
'data'. XLA inserts the gradient all-reduce that this layout implies."""

from __future__ import annotations

import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

DATA_AXIS = "data"


def make_mesh(devices=None) -> Mesh:
    """A 1-D mesh over all devices (of all processes), axis 'data'."""
    return Mesh(np.asarray(devices if devices is not None else jax.devices()), (DATA_AXIS,))


def replicated(mesh: Mesh) -> NamedSharding:
    """Whole on every device of `mesh`."""
    return NamedSharding(mesh, P())


def replicate(x: np.ndarray, mesh: Mesh) -> jax.Array:
    """Put a host array on every device of `mesh` (works across processes too)."""
    return jax.make_array_from_callback(x.shape, replicated(mesh), lambda index: x[index])


def batch_sharding(mesh: Mesh) -> NamedSharding:
    """Leading (batch) axis split over 'data', the rest whole."""
    return NamedSharding(mesh, P(DATA_AXIS))


def to_host(tree):
    """`tree`'s arrays as NumPy arrays on the host: every read of device values by the trainer."""
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)
