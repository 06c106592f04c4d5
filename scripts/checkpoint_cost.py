"""What a checkpoint of a ResNet-50 train state (AdamW, 591 arrays) costs on this machine: the time
save() holds the host, then the background write (wait), over 6 saves; medians leave out the first.

    PYTHONPATH=. python scripts/checkpoint_cost.py /tmp/checkpoint_cost
"""

import json
import shutil
import statistics
import sys
import time

import jax

from cifar_jax import config as config_lib
from cifar_jax import phases, sharding, train_state
from cifar_jax.checkpoint import Checkpoints


def main(workdir):
    c = config_lib.base()
    c.model.name, c.model.stem, c.model.dtype = "resnet50", "imagenet", "float32"
    mesh = sharding.make_mesh()
    phase = phases.phases(c)[0]
    _, tx = phases.make_tx(c, phase, 10)
    _, state = train_state.create_train_state(c, 100, mesh, phase, tx)
    shutil.rmtree(workdir, ignore_errors=True)
    ckpts = Checkpoints(workdir, keep=2)
    held, written = [], []
    for epoch in range(1, 7):
        t0 = time.perf_counter()
        ckpts.save(epoch, state, {"epoch": epoch, "phase": "all", "row": {"val_acc": 0.1 * epoch}})
        t1 = time.perf_counter()
        ckpts.wait()
        t2 = time.perf_counter()
        held.append(t1 - t0)
        written.append(t2 - t1)
    ckpts.close()
    print(
        json.dumps(
            {
                "arrays": len(jax.tree.leaves(state)),
                "held_median_s": round(statistics.median(held[1:]), 3),
                "write_median_s": round(statistics.median(written[1:]), 3),
                "held_s": [round(x, 3) for x in held],
                "write_s": [round(x, 3) for x in written],
            }
        )
    )


if __name__ == "__main__":
    main(sys.argv[1])
