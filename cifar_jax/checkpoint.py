"""Orbax checkpoints of a run: the last `keep` epochs plus the best by validation accuracy, and
one mid-epoch checkpoint written when a run is stopped by a signal.

Layout: `<workdir>/checkpoints/<epoch>/` holds one Orbax item per part of the train state,
`params`, `batch_stats`, `opt_state` (and `ema` with a weight average), each a tree of named
arrays that Orbax alone restores (README, "Restoring with Orbax alone"), plus `layout` (each
array's path, dtype and shape) and `meta` (JSON: epoch, phase, that epoch's metrics row, the
run's config, a checksum of every array, and one of the meta itself, whose val_acc picks the
best). The config in the meta is the record that cannot be lost apart from the weights: a resume
or an evaluation whose config.json is gone reads it there (`recorded_config`).
`<workdir>/interrupted/<global step>/` holds the mid-epoch state the
same way. Orbax writes each checkpoint to a temporary directory and renames it when complete, so
a killed run never leaves a half-written checkpoint that restores. A restore checks the layout
(naming the first difference), restores only the items asked for (evaluation needs no
optimizer state), and verifies the checksums: a checkpoint whose files changed on disk is
`DamagedCheckpoint`, moved to `<workdir>/corrupt_checkpoints/` and reported.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import os
import shutil
import time
import zlib
from pathlib import Path

import jax
import jax.numpy as jnp
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as policies

from cifar_jax import errors
from cifar_jax.errors import one_line

log = logging.getLogger("cifar_jax")


class DamagedCheckpoint(ValueError):
    """A checkpoint's arrays do not match the checksums saved with them: its files changed on disk."""


def abstract(tree):
    """Shapes, dtypes and shardings of `tree`: the target that restores onto the same devices."""
    return jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=x.sharding), tree)


def layout(tree) -> list[list]:
    """[path, dtype, shape] of every leaf of `tree`, in flattening order."""
    return [
        [jax.tree_util.keystr(path), jnp.dtype(x.dtype).name, list(x.shape)]
        for path, x in jax.tree_util.tree_flatten_with_path(tree)[0]
    ]


def _as_uint32(x: jax.Array) -> jax.Array:
    """The bits of `x` as a flat uint32 vector (64-bit values as two words, narrower ones widened)."""
    if x.dtype == jnp.bool_:
        return jnp.ravel(x).astype(jnp.uint32)
    width = jnp.dtype(x.dtype).itemsize
    as_unsigned = {1: jnp.uint8, 2: jnp.uint16, 4: jnp.uint32, 8: jnp.uint32}[width]
    return jnp.ravel(jax.lax.bitcast_convert_type(x, as_unsigned)).astype(jnp.uint32)


@jax.jit
def _leaf_checksum(x: jax.Array) -> jax.Array:
    """A uint32: the sum of `x`'s words times odd position weights, mod 2**32. Any change of a single
    bit changes it, and so does swapping two different words."""
    words = _as_uint32(x)
    weights = jnp.arange(words.size, dtype=jnp.uint32) * jnp.uint32(2 * 2654435761 % 2**32) + jnp.uint32(1)
    return jnp.sum(words * weights, dtype=jnp.uint32)


def _leaf_checksums(tree) -> list[jax.Array]:
    """One checksum per leaf, in flattening order. A program per leaf shape, shared by every tree: one
    program for a whole tree took longer to compile than ResNet-50's training step."""
    return [_leaf_checksum(x) for x in jax.tree.leaves(tree)]


def checksums(tree) -> dict[str, int]:
    """{leaf path: checksum} of `tree` (device or host arrays)."""
    paths = [jax.tree_util.keystr(path) for path, _ in jax.tree_util.tree_flatten_with_path(tree)[0]]
    return dict(zip(paths, map(int, jax.device_get(_leaf_checksums(tree)))))


def verify(tree, saved: dict[str, int], where) -> None:
    """Raise DamagedCheckpoint naming the first leaf of `tree` whose checksum is not `saved`'s."""
    for path, value in checksums(tree).items():
        if saved.get(path) != value:
            raise DamagedCheckpoint(
                f"{where}: {path} does not match the checksum saved with it (its files changed on disk)"
            )


@jax.jit
def _copy(tree):
    return jax.tree.map(jnp.copy, tree)


@dataclasses.dataclass(frozen=True)
class Snapshot:
    """A device copy of a state (the state itself may be donated afterwards, as when the trainer
    runs ahead), with the checksums of its leaves (computed on the device, read when saved)."""

    tree: dict
    leaf_checksums: list[jax.Array]  # uint32 scalars, one per leaf in flattening order

    @classmethod
    def of(cls, tree) -> "Snapshot":
        return cls(_copy(tree), _leaf_checksums(tree))

    def checksums(self) -> dict[str, int]:
        paths = (path for path, _, _ in layout(self.tree))
        return dict(zip(paths, map(int, jax.device_get(self.leaf_checksums))))


def check_layout(saved_layout: list, template) -> None:
    """A ValueError naming the first difference between a checkpoint's layout (restricted to the
    items of `template`) and `template`'s."""
    expected = layout(template)
    items = tuple(f"[{k!r}]" for k in template)
    saved_layout = [entry for entry in saved_layout if entry[0].startswith(items)]
    if saved_layout == expected:
        return
    if len(saved_layout) != len(expected):
        raise ValueError(
            f"the checkpoint holds {len(saved_layout)} arrays, the configured state {len(expected)}"
        )
    saved, wanted = next((a, b) for a, b in zip(saved_layout, expected) if a != b)
    raise ValueError(
        f"the checkpoint holds {_describe(saved)} where the configured state has {_describe(wanted)}"
    )


def _describe(entry) -> str:
    path, dtype, shape = entry
    return f"{path} {dtype}{shape}"


# The parts a saved tree may have (not "metrics": CheckpointManager keeps its own item of that name).
ITEMS = ("params", "batch_stats", "opt_state", "ema", "state", "sums")


def _handlers() -> dict:
    """The arrays without zstd: compressed, a ResNet-50 state's background write took longer
    (BENCHMARKS.md)."""
    return {
        **{item: ocp.PyTreeCheckpointHandler(use_compression=False) for item in ITEMS},
        "layout": ocp.JsonCheckpointHandler(),
        "meta": ocp.JsonCheckpointHandler(),
    }


def _save_args(state, meta: dict) -> ocp.args.Composite:
    """One item per top-level part of `state` (a dict, or a `Snapshot` of one), its layout, and
    `meta` sealed with the checksum of every array and its own."""
    tree, sums = (state.tree, state.checksums()) if isinstance(state, Snapshot) else (state, checksums(state))
    return ocp.args.Composite(
        **{k: ocp.args.PyTreeSave(v) for k, v in tree.items()},
        layout=ocp.args.JsonSave(layout(tree)),
        meta=ocp.args.JsonSave(_sealed(meta, sums)),
    )


def _json_checksum(meta: dict) -> int:
    return zlib.crc32(json.dumps(meta, sort_keys=True).encode())


def _sealed(meta: dict, sums: dict) -> dict:
    """`meta` with the arrays' checksums, and a checksum of all that (its val_acc picks "best")."""
    meta = {**meta, "checksums": sums}
    return {**meta, "meta_checksum": _json_checksum(meta)}


def _opened(meta: dict, where) -> dict:
    """A meta that `_sealed` wrote, checked: DamagedCheckpoint if anything in it changed."""
    body = {k: v for k, v in meta.items() if k != "meta_checksum"}
    if "checksums" not in body or meta.get("meta_checksum") != _json_checksum(body):
        raise DamagedCheckpoint(
            f"{where}: its meta (epoch, metrics row, array checksums) does not match the checksum saved "
            f"with it (its files changed on disk)"
        )
    return body


def _read_meta(manager, step: int) -> dict:
    """Checkpoint `step`'s meta, checked, with the arrays' checksums."""
    return _opened(
        manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))["meta"],
        Path(manager.directory) / str(step),
    )


def _recording(meta: dict, config: dict | None) -> dict:
    """`meta` with the run's config (when the caller gave one)."""
    return meta if config is None else {**meta, "config": config}


def _without_checksums(meta: dict) -> dict:
    return {k: v for k, v in meta.items() if k != "checksums"}


def _restore_tree(manager, step: int, template):
    """(tree shaped like `template`, meta) of checkpoint `step` of `manager`: only the items of
    `template` (e.g. params and batch_stats without the optimizer state), checksums verified."""
    where = Path(manager.directory) / str(step)
    meta = _read_meta(manager, step)
    check_layout(
        manager.restore(step, args=ocp.args.Composite(layout=ocp.args.JsonRestore()))["layout"], template
    )
    args = {
        k: ocp.args.PyTreeRestore(
            abstract(v), restore_args=ocp.checkpoint_utils.construct_restore_args(abstract(v))
        )
        for k, v in template.items()
    }
    restored = manager.restore(step, args=ocp.args.Composite(**args))
    tree = {k: restored[k] for k in template}
    verify(tree, meta["checksums"], where)
    return tree, _without_checksums(meta)


class Checkpoints:
    def __init__(self, workdir, keep: int = 3, read_only: bool = False, config=None):
        """`config`: the run's config, recorded in the meta of every checkpoint saved."""
        self.workdir = Path(workdir).absolute()
        self.config = json.loads(config.to_json()) if config is not None else None
        self.directory = self.workdir / "checkpoints"
        preservation = policies.AnyPreservationPolicy(
            [
                policies.LatestN(keep),
                policies.BestN(
                    get_metric_fn=lambda m: m["val_acc"], n=1, keep_checkpoints_without_metrics=False
                ),
            ]
        )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=preservation,
            read_only=read_only,
            create=not read_only,
            save_interval_steps=0 if read_only else 1,
        )
        self.manager = ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())
        self.mid_epoch = MidEpochCheckpoint(self.workdir, self.quarantine, self.config)
        self._unchecked = False

    def epochs(self) -> list[int]:
        return sorted(self.manager.all_steps())

    def latest_epoch(self) -> int | None:
        return self.manager.latest_step()

    def save(self, epoch: int, state, meta: dict) -> None:
        """Save `state` (a dict of the state's parts, or a `Snapshot` of one) and `meta` as checkpoint
        `epoch`, in the background."""
        val_acc = meta["row"].get("val_acc")
        self.manager.save(
            epoch,
            args=_save_args(state, _recording(meta, self.config)),
            metrics={"val_acc": val_acc} if val_acc is not None else None,
        )
        self._unchecked = True  # a background write whose outcome `check` has not seen yet

    def meta(self, epoch: int) -> dict:
        """Checkpoint `epoch`'s meta (epoch, phase, metrics row), checked against its checksum."""
        return _without_checksums(_read_meta(self.manager, epoch))

    def restore(self, epoch: int, template):
        """(state, meta) of `epoch`, restored with the structure and shardings of `template` (a dict
        of some or all of the saved parts)."""
        return _restore_tree(self.manager, epoch, template)

    def by_preference(self, which: str) -> list[int]:
        """The kept epochs, best first: by validation accuracy (then earliest) for 'best', newest
        first for 'latest'. An epoch whose meta does not read (damaged, empty) comes last."""

        def score(epoch):
            try:
                acc = self.meta(epoch)["row"].get("val_acc")
            except Exception as e:  # noqa: BLE001  (a damaged checkpoint raises many types)
                log.warning("checkpoint of epoch %d has no readable meta (%s)", epoch, one_line(e, 400))
                return (0, 0.0, 0)
            if which == "latest" or acc is None:
                return (1, 0.0, epoch)
            return (2, acc, -epoch)

        return sorted(self.epochs(), key=score, reverse=True)

    def restore_latest_good(self, template):
        """(epoch, state, meta) of the newest checkpoint that restores.

        Newer checkpoints that fail while an older one restores are damaged: they are moved to
        `corrupt_checkpoints/` and reported. If none restores, nothing is moved (the config more
        likely changed than every file broke) and a ValueError says so; but a checkpoint whose
        checksums fail is damaged whatever else restores, and is always moved aside.
        """
        failed = []
        for epoch in reversed(self.epochs()):
            try:
                state, meta = self.restore(epoch, template)
            except DamagedCheckpoint as e:
                moved = self.quarantine(self.directory / str(epoch))
                log.warning("checkpoint of epoch %d is damaged (%s); moved it to %s", epoch, e, moved)
                continue
            except Exception as e:  # noqa: BLE001  (Orbax/TensorStore raise many types for damaged files)
                failed.append((epoch, one_line(e)))
                continue
            for bad, why in failed:
                moved = self.quarantine(self.directory / str(bad))
                log.warning(
                    "checkpoint of epoch %d does not restore (%s); moved it to %s and resumed from epoch %d",
                    bad,
                    why,
                    moved,
                    epoch,
                )
            return epoch, state, meta
        if not failed:  # every checkpoint was damaged and moved aside
            raise ValueError(
                f"no checkpoint in {self.directory} is intact (the damaged ones are in "
                f"{self.workdir / 'corrupt_checkpoints'}); "
                f"use another --workdir to train from the start"
            )
        raise ValueError(
            f"no checkpoint in {self.directory} restores into the configured model and optimizer "
            f"({failed[0][1]}); "
            "was the config changed (model, optimizer.name)? Rerun with the run's config.json settings or "
            "another --workdir"
        )

    def quarantine(self, path: Path) -> Path:
        target = self.workdir / "corrupt_checkpoints" / f"{path.parent.name}-{path.name}-{int(time.time())}"
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.move(str(path), target)
        self.manager.reload()
        return target

    def on_disk(self) -> list[int]:
        """The epochs whose checkpoint is complete on disk now (Orbax renames a write into place when
        done)."""
        return (
            sorted(int(p.name) for p in self.directory.iterdir() if p.name.isdigit())
            if self.directory.is_dir()
            else []
        )

    def check(self) -> None:
        """Raise the error of a background write that failed, without waiting for one in progress."""
        if (
            self._unchecked and not self.manager.is_saving_in_progress()
        ):  # per chunk: nothing to do most of the time
            self._finish_writes()
            self._unchecked = False

    def wait(self):
        """Wait for the background write; if it failed, remove its temporary directory (the space a
        rerun needs) and raise its error."""
        self._finish_writes()

    def _finish_writes(self):
        try:
            self.manager.wait_until_finished()
        except BaseException:
            for partial in self.directory.glob("*.orbax-checkpoint-tmp*"):
                shutil.rmtree(partial, ignore_errors=True)
            raise

    def close(self):
        self.manager.close()


class MidEpochCheckpoint:
    """The checkpoint of a run stopped by a signal mid-epoch, in `<workdir>/interrupted/<global
    step>/`: the state and the epoch's metrics sums, and where to go on (epoch, next_step, phase).
    One that does not read is moved aside by `quarantine` and reported: the run then resumes from
    its last epoch checkpoint."""

    def __init__(self, workdir: Path, quarantine, config: dict | None = None):
        self.directory, self.quarantine, self.config = workdir / "interrupted", quarantine, config

    def _manager(self):
        options = ocp.CheckpointManagerOptions(max_to_keep=1, enable_async_checkpointing=False)
        return ocp.CheckpointManager(self.directory, options=options, item_handlers=_handlers())

    def save(self, global_step: int, tree, meta: dict) -> None:
        with self._manager() as manager:
            manager.save(global_step, args=_save_args(tree, _recording(meta, self.config)), force=True)
            manager.wait_until_finished()

    def meta(self) -> dict | None:
        """Its meta, or None: none, or one whose meta is damaged (reported, moved aside)."""
        if not self.directory.is_dir():
            return None
        with self._manager() as manager:
            step = manager.latest_step()
            if step is None:
                return None
            try:
                meta = _without_checksums(_read_meta(manager, step))
                if not {"epoch", "next_step", "phase"} <= set(meta):
                    raise ValueError(f"its meta lacks {sorted({'epoch', 'next_step', 'phase'} - set(meta))}")
                return meta
            except Exception as e:  # noqa: BLE001  (a damaged JSON file raises many types)
                why = one_line(e)
        return self._set_aside(step, why)

    def restore(self, template):
        """The saved tree, or None (reported, moved aside) if it does not restore."""
        with self._manager() as manager:
            step = manager.latest_step()
            try:
                return _restore_tree(manager, step, template)[0]
            except Exception as e:  # noqa: BLE001
                why = one_line(e)
        return self._set_aside(step, why)

    def _set_aside(self, step: int, why: str) -> None:
        moved = self.quarantine(self.directory / str(step))
        log.warning(
            "the interrupted-run checkpoint does not restore (%s); moved it to %s and using the last epoch "
            "checkpoint",
            why,
            moved,
        )

    def clear(self) -> None:
        shutil.rmtree(self.directory, ignore_errors=True)


def recorded_config(workdir) -> tuple[dict, Path] | None:
    """(the config, the checkpoint it is from) recorded in the newest readable checkpoint's meta of
    `workdir` (an epoch's, else the mid-epoch one); None if none records one. Reads only: nothing
    is moved, whatever it finds."""
    workdir = Path(workdir).absolute()
    places = [workdir / "checkpoints", workdir / "interrupted"]
    for directory in (d for d in places if d.is_dir()):
        manager = ocp.CheckpointManager(
            directory,
            options=ocp.CheckpointManagerOptions(read_only=True, create=False),
            item_handlers=_handlers(),
        )
        try:
            for step in sorted(manager.all_steps(), reverse=True):
                try:
                    config = _read_meta(manager, step).get("config")
                except Exception:  # noqa: BLE001  (a damaged meta raises many types; the next one may read)
                    continue
                if isinstance(config, dict):
                    return config, directory / str(step)
        finally:
            manager.close()
    return None


def write_or_fail(write, ckpts: Checkpoints) -> None:
    """Run a checkpoint write (or wait for, or check on, the background ones); turn an OS failure
    (a full disk, a read-only directory, ...) into one TrainingError that says which checkpoints
    remain."""
    try:
        write()
    except Exception as e:  # noqa: BLE001  (Orbax raises ValueError around TensorStore's OS errors)
        code = errors.write_errno(e)
        if code is None:
            raise
        # Orbax's other array writes that failed alike leave futures that nobody retrieves: asyncio
        # would log each one at exit, after the one line that says it all.
        logging.getLogger("asyncio").setLevel(logging.CRITICAL)
        kept = ckpts.on_disk()
        if not kept:
            remain = "no checkpoint remains there"
        elif len(kept) == 1:
            remain = f"the checkpoint of epoch {kept[0]} remains there"
        else:
            remain = f"the checkpoints of epochs {', '.join(map(str, kept))} remain there"
        raise errors.TrainingError(
            f"could not write a checkpoint in {ckpts.directory} ({os.strerror(code)}); {remain}. "
            f"{errors.write_advice(code).capitalize()} and rerun to resume"
        ) from None
