"""The train state and what makes it: the model, the phases of a run and their optimizers.

The train state is a dict pytree whose keys are the checkpoint's items: `params` (nnx.State of all
parameters), `batch_stats` (BatchNorm running statistics), `opt_state` (optax state of the
parameters the phase trains) and, with a weight average, `ema` ({params, batch_stats}).
`create_train_state` makes it for the trainer, `eval.py` (without an optimizer), the benchmark
and the tests.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cifar_jax import models, optim, pretrained, steps
from cifar_jax.data import pipeline


@dataclasses.dataclass(frozen=True)
class Phase:
    name: str  # 'head_only' or 'all'
    first_epoch: int  # 0-based, inclusive
    end_epoch: int  # exclusive
    lr: float

    @property
    def head_only(self) -> bool:
        return self.name == "head_only"

    @property
    def num_epochs(self) -> int:
        return self.end_epoch - self.first_epoch


def phases(config) -> list[Phase]:
    """Phase 1 trains only the head (`head_only_epochs`), phase 2 everything; each has its own
    optimizer state and schedule, like creating a new PyTorch optimizer for phase 2."""
    out = []
    if config.head_only_epochs:
        out.append(Phase("head_only", 0, config.head_only_epochs, config.head_only_lr))
    out.append(Phase("all", config.head_only_epochs, config.num_epochs, config.optimizer.lr))
    return out


def phase_of(config, epoch: int) -> Phase:
    return next(p for p in phases(config) if p.first_epoch <= epoch < p.end_epoch)


def compute_dtype(config) -> str:
    if config.model.dtype != "auto":
        return config.model.dtype
    return "bfloat16" if jax.default_backend() in ("gpu", "tpu") else "float32"


def build_model(config, num_classes: int | None = None, *, weights: bool = True):
    """The configured model: its converted pretrained weights (`model.pretrained`, when `weights`)
    or freshly initialised ones. Evaluation passes `weights=False`: a checkpoint overwrites them,
    and it must not need the directory that training started from."""
    dtype = compute_dtype(config)
    if weights and config.model.pretrained:
        return pretrained.load(
            config.model.pretrained, num_classes, dtype=dtype, stem=config.model.stem, seed=config.seed
        )
    return models.from_config(config.model, num_classes, dtype=dtype, seed=config.seed)


def make_tx(config, phase: Phase, steps_per_epoch: int):
    """(schedule, optax transformation) of a phase."""
    schedule = optim.make_schedule(config.schedule, phase.lr, phase.num_epochs, steps_per_epoch)
    return schedule, optim.make_optimizer(config.optimizer, schedule)


def epoch_lrs(schedule, phase: Phase, steps_per_epoch: int) -> list[float]:
    """The learning rate at the first step of each epoch of `phase`, for the metrics rows, each the
    shortest decimal of the optimizer's value (0.001, not 0.0010000000474974513 for a float32).
    Computed once per phase, so the host never waits for the device to read one."""
    values = np.asarray(jax.vmap(schedule)(jnp.arange(phase.num_epochs) * steps_per_epoch))
    return [float(str(v)) for v in values]


@dataclasses.dataclass(frozen=True)
class GraphDefs:
    """The model's structure in train mode and in eval mode (BatchNorm's running statistics)."""

    train: nnx.GraphDef
    eval: nnx.GraphDef
    head: str  # the classifier's top-level attribute


def create_train_state(
    config, num_classes: int, mesh, phase: Phase | None = None, tx=None, *, weights: bool = True
):
    """(GraphDefs, train state) of the configured model, replicated on every device of `mesh`.
    With `phase` and its `tx` the state holds the optimizer state of what the phase trains; without,
    only the model's. A weight average (`ema_decay`) starts from the initial model. `weights`: as
    in `build_model`."""
    model = build_model(config, num_classes, weights=weights)
    graphdef_train = nnx.graphdef(model)
    model.eval()
    graphdef_eval, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    graphdefs = GraphDefs(graphdef_train, graphdef_eval, type(model).head)
    params, batch_stats = (
        jax.tree.map(lambda a: pipeline.replicate(np.asarray(a), mesh), t) for t in (params, batch_stats)
    )
    state = {"params": params, "batch_stats": batch_stats}
    if phase is not None:
        state["opt_state"] = init_opt_state(tx, params, graphdefs, phase, mesh)
    if config.ema_decay:  # its own buffers: the state is donated
        state["ema"] = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})
    return graphdefs, state


def init_opt_state(tx, params, graphdefs: GraphDefs, phase: Phase, mesh):
    """Optimizer state of the parameters that `phase` trains, replicated on `mesh`."""
    trainable, _ = steps.partition(params, graphdefs.head if phase.head_only else None)
    return jax.jit(tx.init, out_shardings=jax.NamedSharding(mesh, jax.sharding.PartitionSpec()))(trainable)


def step_config(
    config,
    phase: Phase,
    graphdefs: GraphDefs,
    *,
    preprocess,
    num_classes: int,
    steps_per_epoch: int,
    sharding,
):
    """(StepConfig, schedule) of `phase`. A frozen backbone (phase 1) runs in eval mode, its
    BatchNorm using (and keeping) the pretrained running statistics, unless
    `head_only_batchnorm='train'`: then batch statistics, and the running ones updated."""
    schedule, tx = make_tx(config, phase, steps_per_epoch)
    frozen_bn = phase.head_only and config.head_only_batchnorm == "frozen"
    cfg = steps.StepConfig(
        graphdef=graphdefs.eval if frozen_bn else graphdefs.train,
        tx=tx,
        train_only=graphdefs.head if phase.head_only else None,
        preprocess=preprocess,
        batch_size=config.batch_size,
        num_classes=num_classes,
        label_smoothing=config.label_smoothing,
        seed=config.seed,
        sharding=sharding,
        ema_decay=config.ema_decay,
        mixup_alpha=config.data.augment.mixup_alpha,
        cutmix_alpha=config.data.augment.cutmix_alpha,
        accumulate_steps=config.optimizer.accumulate_steps,
    )
    return cfg, schedule
