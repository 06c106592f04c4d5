"""Run as a subprocess: save a replicated state as a checkpoint over a mesh of all devices,
restore it into a template, and print whether every process got the saved values back.

Argument: the workdir (shared by the processes). With PROBE_PROCESS_ID / PROBE_NUM_PROCESSES /
PROBE_COORDINATOR set, it joins a multi-process run through jax.distributed.
"""

import json
import sys

from probe_env import join_distributed_from_env  # this script's directory

join_distributed_from_env()

import jax  # noqa: E402
import numpy as np  # noqa: E402

from cifar_jax import sharding  # noqa: E402
from cifar_jax.checkpoint import Checkpoints  # noqa: E402

if __name__ == "__main__":
    mesh = sharding.make_mesh()
    rng = np.random.default_rng(0)
    host = {
        "params": {
            "w": rng.normal(size=(3, 5)).astype(np.float32),
            "b": rng.normal(size=(5,)).astype(np.float32),
        },
        "opt_state": {"count": np.asarray(9, np.int32)},
    }
    state = jax.tree.map(lambda v: sharding.replicate(v, mesh), host)
    ckpts = Checkpoints(sys.argv[1])
    ckpts.save(1, state, {"epoch": 1, "phase": "all", "row": {"val_acc": 0.5}})
    ckpts.wait()
    template = jax.tree.map(lambda v: sharding.replicate(np.zeros_like(v), mesh), host)
    restored, meta = ckpts.restore(1, template)
    ckpts.close()
    pairs = zip(jax.tree.leaves(host), jax.tree.leaves(restored), jax.tree.leaves(template))
    equal = all(
        np.array_equal(np.asarray(shard.data), want) and got.sharding == like.sharding
        for want, got, like in pairs
        for shard in got.addressable_shards
    )
    print(
        json.dumps(
            {
                "processes": jax.process_count(),
                "devices": jax.device_count(),
                "equal": bool(equal),
                "epoch": meta["epoch"],
            }
        )
    )
