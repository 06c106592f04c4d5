"""Orbax checkpoints of a run: the last `keep` epochs plus the best by validation accuracy.

Layout: `<workdir>/checkpoints/<epoch>/{state,meta}`. Orbax writes each checkpoint to a temporary
directory and renames it when complete, so a killed run never leaves a checkpoint that restores.
`meta` (JSON) holds the epoch, the phase and that epoch's metrics row.
"""

from __future__ import annotations

from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


def abstract(tree):
    """Shapes, dtypes and shardings of `tree`: the target that restores onto the same devices."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    def __init__(self, workdir, keep: int = 3, read_only: bool = False):
        self.directory = Path(workdir).absolute() / "checkpoints"
        preservation = policies.AnyPreservationPolicy(
            [policies.LatestN(keep), policies.BestN(get_metric_fn=lambda m: m["val_acc"], n=1, keep_checkpoints_without_metrics=False)]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation, read_only=read_only, create=not read_only,
            save_interval_steps=0 if read_only else 1,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options)

    def epochs(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def save(self, epoch: int, state, meta: dict) -> None:
        val_acc = meta["row"].get("val_acc")
        args = ocp.args.Composite(state=ocp.args.StandardSave(state), meta=ocp.args.JsonSave(meta))
        self.manager.save(epoch, args=args, metrics={"val_acc": val_acc} if val_acc is not None else None)

    def meta(self, epoch: int) -> dict:
        return self.manager.restore(epoch, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore(self, epoch: int, template):
        """(state, meta) of `epoch`, restored with the structure and shardings of `template`."""
        args = ocp.args.Composite(state=ocp.args.StandardRestore(abstract(template)), meta=ocp.args.JsonRestore())
        restored = self.manager.restore(epoch, args=args)
        return restored["state"], restored["meta"]

    def best_epoch(self) -> int | None:
        """The kept epoch with the highest validation accuracy (the latest if none has one)."""
        scored = [(self.meta(e)["row"].get("val_acc"), e) for e in self.epochs()]
        with_acc = [(acc, e) for acc, e in scored if acc is not None]
        if with_acc:
            return max(with_acc, key=lambda t: (t[0], -t[1]))[1]
        return self.latest_epoch()

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
