"""Run as a subprocess: evaluation, several batches per call, over a mesh of the first N devices for
each argument N (device count from XLA_FLAGS); print each mesh's logits and sums as JSON."""

import json
import sys

import jax
import numpy as np
from flax import nnx

from cifar_jax import models, sharding, steps
from cifar_jax.data import pipeline


def evaluate(devices: int) -> dict:
    model = models.create("simple_cnn", 10, seed=3)
    model.eval()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, (23, 32, 32, 3), dtype=np.uint8)  # 3 batches of 8, the last padded
    labels = rng.integers(0, 10, 23).astype(np.int32)
    mesh = sharding.make_mesh(jax.devices()[:devices])
    replicated = jax.NamedSharding(mesh, jax.sharding.PartitionSpec())
    params, batch_stats = (jax.device_put(t, replicated) for t in (params, batch_stats))
    x, y = (sharding.replicate(a, mesh) for a in (images, labels))
    options = dict(
        preprocess=pipeline.Preprocess(),
        batch_size=8,
        batches_per_call=2,
        sharding=sharding.batch_sharding(mesh),
    )
    logits = steps.make_predict(graphdef, **options)(params, batch_stats, x)
    sums = steps.make_eval_sums(graphdef, num_classes=10, label_smoothing=0.1, **options)(
        params, batch_stats, x, y
    )
    return {
        "mesh": mesh.size,
        "logits": np.asarray(logits).tolist(),
        "sums": {k: float(v) for k, v in jax.device_get(sums).items()},
    }


if __name__ == "__main__":
    print(json.dumps({"devices": jax.device_count(), **{n: evaluate(int(n)) for n in sys.argv[1:]}}))
