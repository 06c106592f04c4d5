"""Checks before a run starts: everything that can fail without data or compilation, each
raising a ValueError of one line that says what is wrong and what to do."""

from __future__ import annotations

import importlib.util
import logging
import os
from pathlib import Path

import jax

from cifar_jax import config as config_lib

log = logging.getLogger("cifar_jax")


def check_before_start(config, workdir) -> dict[str, tuple]:
    """Everything that can be checked without data or compilation; raises ValueError with one line.
    Returns the config keys that a resume in `workdir` changes (`check_resume`)."""
    config_lib.validate(config)
    if config.wandb.mode != "disabled" and importlib.util.find_spec("wandb") is None:
        raise ValueError(
            f"config: wandb.mode={config.wandb.mode!r} needs wandb, which is not installed: "
            f"pip install 'cifar_jax[wandb]', or --config.wandb.mode=disabled"
        )
    n_dev = jax.device_count()
    micro = config.batch_size // config.optimizer.accumulate_steps
    if config.optimizer.accumulate_steps > 1 and micro % n_dev:
        raise ValueError(
            f"config: batch_size={config.batch_size} in "
            f"optimizer.accumulate_steps={config.optimizer.accumulate_steps} "
            f"micro-batches of {micro} does not divide over the {n_dev} devices; use micro-batches of a "
            f"multiple of {n_dev}"
        )
    if config.batch_size % n_dev or config.eval_batch_size % n_dev:
        raise ValueError(
            f"config: batch_size={config.batch_size} and eval_batch_size={config.eval_batch_size} must be "
            "divisible "
            f"by the {n_dev} devices; use a multiple of {n_dev}"
        )
    if config.model.pretrained:
        from cifar_jax import pretrained  # imports the models: only when weights are asked for

        try:
            meta = pretrained.read_meta(config.model.pretrained)
        except FileNotFoundError:
            raise ValueError(
                f"config: model.pretrained={config.model.pretrained!r} holds no converted weights (no "
                "meta.json); "
                f"make them with `python -m cifar_jax.convert`"
            ) from None
        except pretrained.ConversionError as e:
            raise ValueError(f"config: model.pretrained: {e}") from None
        if meta["arch"] != config.model.name:
            raise ValueError(
                f"config: model.pretrained holds {meta['arch']} weights but "
                f"model.name={config.model.name!r}; set --config.model.name={meta['arch']}"
            )
        if meta["stem"] != config.model.stem:
            raise ValueError(
                f"config: model.pretrained was converted with stem={meta['stem']!r} but "
                f"model.stem={config.model.stem!r}; pretrained weights need "
                f"--config.model.stem={meta['stem']}"
            )
    check_workdir(workdir)
    check_output_directories(config, workdir)
    return check_resume(config, workdir)


def check_resume(config, workdir) -> dict[str, tuple]:
    """The keys a resume in `workdir` changes ({key: (saved, new)}), when it may change them: those
    of `config_lib.FREE_ON_RESUME`, and `num_epochs` down to the epochs already trained (the
    schedule then follows the new length from the next epoch on). Any other change is a ValueError,
    before anything in the workdir is touched. A workdir without checkpoints binds nothing."""
    if not has_checkpoints(workdir):
        return {}
    saved, saved_path = saved_config(workdir)
    changed = config_lib.changes(saved, config)
    refused = {k: v for k, v in changed.items() if k not in config_lib.FREE_ON_RESUME and k != "num_epochs"}
    if refused:
        listed = "; ".join(f"{k}={old!r} there, {new!r} now" for k, (old, new) in list(refused.items())[:3])
        raise ValueError(
            f"workdir {workdir} holds a run trained with other settings ({listed}); a resume may change only "
            "num_epochs "
            f"and how the run is kept ({', '.join(config_lib.FREE_ON_RESUME[:3])}, ...): rerun with the "
            "settings in "
            f"{saved_path}, or use another --workdir for the new settings"
        )
    trained = epochs_trained(workdir)
    if config.num_epochs < trained:
        raise ValueError(
            f"config: num_epochs={config.num_epochs} but workdir {workdir} already holds {trained} trained "
            "epochs; "
            f"use num_epochs >= {trained} (its config.json has {saved.num_epochs})"
        )
    return changed


def saved_config(workdir) -> tuple:
    """(config, where it was read) of the run in `workdir`: its config.json, or when that is gone,
    the config the newest checkpoint records (said in the log; train.py writes config.json again).
    A ValueError in one line when neither is there."""
    path = Path(workdir) / "config.json"
    if path.exists():
        return config_lib.from_json(path), path
    from cifar_jax.checkpoint import recorded_config  # Orbax: only for a workdir that lost its config.json

    found = recorded_config(workdir)
    if found is None:
        raise ValueError(
            f"workdir {workdir} holds checkpoints but no config.json, and no checkpoint records its config: "
            f"put config.json back from a copy, or pass another --workdir"
        )
    tree, checkpoint = found
    log.warning("%s is missing: using the config recorded in checkpoint %s", path, checkpoint)
    return config_lib.from_values(tree, checkpoint, "pass another --workdir"), checkpoint


def epochs_trained(workdir) -> int:
    """The newest epoch with a complete checkpoint in `workdir` (an interrupted epoch counts as begun, not
    trained)."""
    directory = Path(workdir) / "checkpoints"
    return (
        max((int(p.name) for p in directory.iterdir() if p.name.isdigit()), default=0)
        if directory.is_dir()
        else 0
    )


def has_checkpoints(workdir) -> bool:
    """Whether `workdir` holds a checkpoint (complete or not) of an epoch or of an interrupted epoch."""
    return any(
        p.name.split(".")[0].isdigit()
        for d in ("checkpoints", "interrupted")
        if (Path(workdir) / d).is_dir()
        for p in (Path(workdir) / d).iterdir()
    )


def class_count_mismatch(config, splits) -> str:
    """The one-line error for data whose class count is not the configured one; with more classes it
    says how many examples lie beyond, since one stray label also makes a class."""
    wanted, found = config.model.num_classes, splits.num_classes
    message = f"config: model.num_classes={wanted} but data.source={config.data.source!r} has {found} classes"
    if found < wanted:
        return f"{message}; set --config.model.num_classes={found}"
    beyond = sum(int((y >= wanted).sum()) for _, y in (splits.train, splits.val, splits.test))
    return (
        f"{message} ({beyond} example(s) have labels {wanted}..{found - 1}); fix those labels, or set "
        f"--config.model.num_classes={found} if the data really has {found} classes"
    )


def check_workdir(workdir) -> None:
    """A ValueError in one line if `workdir` cannot be created or written."""
    path = Path(workdir).absolute()
    long = [part for part in path.parts if len(os.fsencode(part)) > 255]
    if long:
        raise ValueError(
            f"workdir {path}: the name {long[0][:40]}... is longer than 255 bytes; use a shorter --workdir"
        )
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"workdir {path}: {existing} is a file, not a directory; pass another --workdir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(
            f"workdir {path}: {existing} is not writable; make it writable or pass another --workdir"
        )


def check_output_directories(config, workdir) -> None:
    """A ValueError in one line if a directory the run will write inside `workdir` (the profiler's
    traces, wandb's files) exists and cannot take them."""
    from cifar_jax import staging

    if config.profile.epoch:
        staging.check_directory(
            Path(workdir) / "profile",
            "config: profile.epoch traces to",
            "move it aside, or --config.profile.epoch=0",
            create=False,
        )
    if config.wandb.mode != "disabled":
        staging.check_directory(
            Path(workdir) / "wandb",
            f"config: wandb.mode={config.wandb.mode!r} writes to",
            "move it aside, or --config.wandb.mode=disabled",
            create=False,
        )


def check_cluster(cluster: dict | None) -> None:
    """A ValueError in one line unless `cluster` (coordinator_address, num_processes, process_id) is
    None or complete and consistent."""
    if not cluster:
        return
    missing = [
        k for k in ("coordinator_address", "num_processes", "process_id") if cluster.get(k) in (None, "")
    ]
    if missing:
        raise ValueError(
            "a multi-process run needs --coordinator_address, --num_processes and --process_id; missing: "
            f"--{', --'.join(missing)}"
        )
    if ":" not in cluster["coordinator_address"]:
        raise ValueError(
            f"--coordinator_address={cluster['coordinator_address']} needs a port: HOST:PORT of process 0"
        )
    if not 0 <= cluster["process_id"] < cluster["num_processes"]:
        raise ValueError(
            f"--process_id={cluster['process_id']} must be in [0, --num_processes={cluster['num_processes']})"
        )
