"""The train state and what makes it: the model, its weights and its optimizer state on the mesh.

The train state is a dict pytree whose keys are the checkpoint's items: `params` (nnx.State of all
parameters), `batch_stats` (BatchNorm running statistics), `opt_state` (optax state of the
parameters the phase trains) and, with a weight average, `ema` ({params, batch_stats}).
`create_train_state` makes it for the trainer, the benchmark and the tests; `state_shapes` its
shapes alone, for eval.py (which restores the weights) and the GPU program compiled without a GPU.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cifar_jax import models, pretrained, sharding, steps
from cifar_jax.models import layers
from cifar_jax.phases import Phase


def compute_dtype(config) -> str:
    if config.model.dtype != "auto":
        return config.model.dtype
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


def build_model(config, num_classes: int | None = None, *, weights: bool = True, ops=layers.PER_PLATFORM):
    """The configured model: its converted pretrained weights (`model.pretrained`, when `weights`)
    or freshly initialised ones. `state_shapes` passes `weights=False`: a checkpoint overwrites them,
    and evaluation must not need the directory that training started from. `ops`: as in `models.create`
    (the benchmark's choice)."""
    dtype = compute_dtype(config)
    if weights and config.model.pretrained:
        return pretrained.load(
            config.model.pretrained,
            num_classes,
            dtype=dtype,
            stem=config.model.stem,
            seed=config.seed,
            ops=ops,
        )
    return models.from_config(config.model, num_classes, dtype=dtype, seed=config.seed, ops=ops)


@dataclasses.dataclass(frozen=True)
class GraphDefs:
    """The model's structure in train mode and in eval mode (BatchNorm's running statistics)."""

    train: nnx.GraphDef
    eval: nnx.GraphDef
    head: str  # the classifier's top-level attribute


def mesh_ops(mesh) -> layers.Ops:
    """The layer operations of programs for `mesh`'s devices (`layers.for_platforms`)."""
    return layers.for_platforms({d.platform for d in mesh.devices.flat})


def create_train_state(
    config,
    num_classes: int,
    mesh,
    phase: Phase | None = None,
    tx=None,
    *,
    ops=None,
):
    """(GraphDefs, train state) of the configured model, replicated on every device of `mesh`.
    With `phase` and its `tx` the state holds the optimizer state of what the phase trains; without,
    only the model's. A weight average (`ema_decay`) starts from the initial model. `ops`: the model's
    layer operations, by default those of `mesh`'s platform."""
    ops = ops or mesh_ops(mesh)
    graphdefs, params, batch_stats = _split(build_model(config, num_classes, ops=ops))
    params, batch_stats = (
        jax.tree.map(lambda a: sharding.replicate(np.asarray(a), mesh), t) for t in (params, batch_stats)
    )
    state = {"params": params, "batch_stats": batch_stats}
    if phase is not None:
        state["opt_state"] = init_opt_state(tx, params, graphdefs, phase, mesh)
    if config.ema_decay:  # its own buffers: the state is donated
        state["ema"] = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})
    return graphdefs, state


def state_shapes(config, num_classes: int, mesh, *, ops=None) -> tuple[GraphDefs, dict]:
    """(GraphDefs, the train state of `create_train_state` without an optimizer, as shapes and dtypes
    replicated on `mesh`): what a checkpoint's weights restore into (eval.py) and what a program is
    lowered for (bench.gpu_program), with nothing initialised or copied. `ops`: as there."""
    ops = ops or mesh_ops(mesh)
    model = nnx.eval_shape(lambda: build_model(config, num_classes, weights=False, ops=ops))
    graphdefs, params, batch_stats = _split(model)
    on_mesh = lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding.replicated(mesh))
    state = jax.tree.map(on_mesh, {"params": params, "batch_stats": batch_stats})
    if config.ema_decay:
        state["ema"] = dict(state)
    return graphdefs, state


def _split(model) -> tuple[GraphDefs, nnx.State, nnx.State]:
    """(GraphDefs, params, batch_stats) of `model`, which is left in evaluation mode."""
    graphdef_train = nnx.graphdef(model)
    model.eval()
    graphdef_eval, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    return GraphDefs(graphdef_train, graphdef_eval, type(model).head), params, batch_stats


def init_opt_state(tx, params, graphdefs: GraphDefs, phase: Phase, mesh, members: bool = False):
    """Optimizer state of the parameters that `phase` trains, replicated on `mesh` (each member's,
    for the `members` of a population: `params` with a leading member axis)."""
    trainable, _ = steps.partition(params, graphdefs.head if phase.head_only else None)
    init = jax.vmap(tx.init) if members else tx.init
    return jax.jit(init, out_shardings=jax.NamedSharding(mesh, jax.sharding.PartitionSpec()))(trainable)
