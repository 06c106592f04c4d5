"""Orbax checkpoints of a run: the last `keep` epochs plus the best by validation accuracy, and
one mid-epoch checkpoint written when a run is stopped by a signal.

Layout: `<workdir>/checkpoints/<epoch>/{state,meta}` and `<workdir>/interrupted/<global step>/`.
Orbax writes each checkpoint to a temporary directory and renames it when complete, so a killed
run never leaves a half-written checkpoint that restores. `meta` (JSON) holds the epoch, the
phase and that epoch's metrics row. A checkpoint that exists but does not restore (damaged on
disk) is moved to `<workdir>/corrupt_checkpoints/` and reported, and the previous one is used.
"""

from __future__ import annotations

import logging
import shutil
import time
from pathlib import Path

import jax
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies


log = logging.getLogger("cifar_jax")


def abstract(tree):
    """Shapes, dtypes and shardings of `tree`: the target that restores onto the same devices."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


class Checkpoints:
    def __init__(self, workdir, keep: int = 3, read_only: bool = False):
        self.workdir = Path(workdir).absolute()
        self.directory = self.workdir / "checkpoints"
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

    def restore_latest_good(self, template):
        """(epoch, state, meta) of the newest checkpoint that restores.

        Newer checkpoints that fail while an older one restores are damaged: they are moved to
        `corrupt_checkpoints/` and reported. If none restores, nothing is moved (the config more
        likely changed than every file broke) and a ValueError says so.
        """
        failed = []
        for epoch in reversed(self.epochs()):
            try:
                state, meta = self.restore(epoch, template)
            except Exception as e:  # noqa: BLE001  (Orbax/TensorStore raise many types for damaged files)
                failed.append((epoch, f"{type(e).__name__}: {str(e).splitlines()[0][:160]}"))
                continue
            for bad, why in failed:
                moved = self.quarantine(self.directory / str(bad))
                log.warning("checkpoint of epoch %d does not restore (%s); moved it to %s and resumed from epoch %d", bad, why, moved, epoch)
            return epoch, state, meta
        raise ValueError(
            f"no checkpoint in {self.directory} restores into the configured model and optimizer ({failed[0][1]}); "
            f"was the config changed (model, optimizer.name)? Rerun with the run's config.json settings or another --workdir"
        )

    def quarantine(self, path: Path) -> Path:
        target = self.workdir / "corrupt_checkpoints" / f"{path.parent.name}-{path.name}-{int(time.time())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), target)
        self.manager.reload()
        return target

    # The mid-epoch checkpoint of a run stopped by a signal.

    def _interrupted_manager(self):
        return ocp.CheckpointManager(self.workdir / "interrupted", options=ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False))

    def save_interrupted(self, global_step: int, tree, meta: dict) -> None:
        with self._interrupted_manager() as manager:
            args = ocp.args.Composite(state=ocp.args.StandardSave(tree), meta=ocp.args.JsonSave(meta))
            manager.save(global_step, args=args, force=True)
            manager.wait_until_finished()

    def interrupted_meta(self) -> dict | None:
        if not (self.workdir / "interrupted").is_dir():
            return None
        with self._interrupted_manager() as manager:
            step = manager.latest_step()
            if step is None:
                return None
            return manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"]

    def restore_interrupted(self, template):
        """The saved tree, or None (reported, moved aside) if it does not restore."""
        with self._interrupted_manager() as manager:
            step = manager.latest_step()
            try:
                restored = manager.restore(step, args=ocp.args.Composite(state=ocp.args.StandardRestore(abstract(template))))
                return restored["state"]
            except Exception as e:  # noqa: BLE001
                log.warning("the interrupted-run checkpoint does not restore (%s); using the last epoch checkpoint", type(e).__name__)
        self.quarantine(self.workdir / "interrupted" / str(step))
        return None

    def clear_interrupted(self) -> None:
        shutil.rmtree(self.workdir / "interrupted", ignore_errors=True)

    def wait(self):
        self.manager.wait_until_finished()

    def close(self):
        self.manager.close()
