"""Run as a subprocess: 5 data-parallel training steps over a mesh of devices; print the losses.

Arguments: specs 'ARCH:OPTIMIZER[:DTYPE[:accK]][@N]', each trained over a mesh of the first N
devices (all without @N). Device count comes from XLA_FLAGS. With PROBE_PROCESS_ID /
PROBE_NUM_PROCESSES / PROBE_COORDINATOR set, it joins a multi-process run (tests/support/probe_env.py).
"""

import functools
import json
import sys

import jax
from probe_env import join_distributed_from_env  # this script's directory

if any(":float64" in spec for spec in sys.argv[1:]):
    jax.config.update("jax_enable_x64", True)
join_distributed_from_env()

import numpy as np  # noqa: E402
from flax import nnx  # noqa: E402

from cifar_jax import config as config_lib  # noqa: E402
from cifar_jax import (  # noqa: E402
    data,
    models,
    optim,
    sharding,  # noqa: E402
    steps,
)
from cifar_jax.data import pipeline  # noqa: E402

BATCH, STEPS = 16, 5


def losses(spec):
    """`spec` is 'ARCH:OPTIMIZER[:DTYPE[:accK]][@N]', e.g. 'resnet18:adamw:float64@2' on 2 devices, or
    'simple_cnn:adamw:float32:acc2' for 2 accumulated micro-batches per step on all devices."""
    spec, _, devices = spec.partition("@")
    arch, optimizer, *rest = spec.split(":")
    dtype = rest[0] if rest else "float32"
    accumulate = int(rest[1].removeprefix("acc")) if len(rest) > 1 else 1
    size = (
        32 if arch == "simple_cnn" else 16
    )  # ResNet at 16x16 (float64 needs no well-conditioned BatchNorm): 4x cheaper
    arrays = data.load("fake", num_train=BATCH * STEPS, num_test=1, num_classes=10, image_size=size, seed=1)
    mesh = sharding.make_mesh(jax.devices()[: int(devices)] if devices else None)
    replicated = jax.NamedSharding(mesh, jax.sharding.PartitionSpec())
    options = {} if arch == "simple_cnn" else {"stem": "imagenet"}
    model = models.create(arch, 10, seed=0, dtype=dtype, **options)
    nnx.update(model, jax.tree.map(lambda a: a.astype(dtype), nnx.state(model)))
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    to_mesh = lambda t: jax.tree.map(lambda a: sharding.replicate(np.asarray(a), mesh), t)
    opt_cfg = config_lib.base().optimizer
    opt_cfg.update(dict(name=optimizer, lr=1e-3, weight_decay=5e-4, accumulate_steps=accumulate))
    tx = optim.make_optimizer(opt_cfg, opt_cfg.lr)
    pre = pipeline.Preprocess(crop_padding=4, flip=True, image_size=size)
    cfg = steps.StepConfig(
        graphdef,
        tx,
        None,
        pre,
        BATCH,
        10,
        0.1,
        seed=0,
        sharding=sharding.batch_sharding(mesh),
        accumulate_steps=accumulate,
    )
    params, stats = to_mesh(params), to_mesh(stats)
    state = {
        "params": params,
        "batch_stats": stats,
        "opt_state": jax.jit(tx.init, out_shardings=replicated)(params),
    }
    metrics = jax.device_put(steps.zero_metrics(), replicated)
    images, labels = sharding.replicate(arrays.x_train, mesh), sharding.replicate(arrays.y_train, mesh)
    order = pipeline.epoch_order(0, 0, BATCH * STEPS)
    step = jax.jit(functools.partial(steps.train_step, cfg), donate_argnums=(0, 1))
    out, before = [], 0.0
    for s in range(STEPS):
        state, metrics = step(state, metrics, images, labels, order, 0, s)
        total = float(np.asarray(metrics["loss_sum"].addressable_data(0)))
        out.append((total - before) / BATCH)
        before = total
    return out, mesh.size


if __name__ == "__main__":
    result = {"devices": jax.device_count(), "processes": jax.process_count(), "mesh": {}}
    for spec in sys.argv[1:]:
        result[spec], result["mesh"][spec] = losses(spec)
    if jax.process_index() == 0:
        print(json.dumps(result))
