"""Checks before a run starts: everything that can fail without data or compilation, each
raising a ValueError of one line that says what is wrong and what to do."""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax

from cifar_jax import config as config_lib


def check_before_start(config, workdir) -> None:
    """Everything that can be checked without data or compilation; raises ValueError with one line."""
    config_lib.validate(config)
    n_dev = jax.device_count()
    if config.batch_size % n_dev or config.eval_batch_size % n_dev:
        raise ValueError(
            f"config: batch_size={config.batch_size} and eval_batch_size={config.eval_batch_size} must be divisible "
            f"by the {n_dev} devices; use a multiple of {n_dev}"
        )
    if config.model.pretrained:
        meta_path = Path(config.model.pretrained) / "meta.json"
        if not meta_path.is_file():
            raise ValueError(f"config: model.pretrained={config.model.pretrained!r} holds no converted weights (no meta.json); make them with `python -m cifar_jax.convert`")
        meta = json.loads(meta_path.read_text())
        if meta["arch"] != config.model.name:
            raise ValueError(f"config: model.pretrained holds {meta['arch']} weights but model.name={config.model.name!r}; set --config.model.name={meta['arch']}")
        if meta.get("stem", "imagenet") != config.model.stem:
            raise ValueError(f"config: model.pretrained was converted with stem={meta.get('stem')!r} but model.stem={config.model.stem!r}; pretrained weights need --config.model.stem={meta.get('stem')}")
    check_workdir(workdir)
    saved = Path(workdir) / "config.json"
    if saved.exists() and has_checkpoints(workdir):  # a run that saved nothing binds nothing
        old = json.loads(saved.read_text())
        for key in ("name", "num_classes", "stem"):
            if old["model"][key] != config.model[key]:
                raise ValueError(
                    f"workdir {workdir} holds a run with model.{key}={old['model'][key]!r}, not {config.model[key]!r}; "
                    f"use another --workdir to start a new run"
                )



def has_checkpoints(workdir) -> bool:
    """Whether `workdir` holds a checkpoint (complete or not) of an epoch or of an interrupted epoch."""
    return any(p.name.split(".")[0].isdigit() for d in ("checkpoints", "interrupted") if (Path(workdir) / d).is_dir()
               for p in (Path(workdir) / d).iterdir())



def class_count_mismatch(config, splits) -> str:
    """The one-line error for data whose class count is not the configured one; with more classes it
    says how many examples lie beyond, since one stray label also makes a class."""
    wanted, found = config.model.num_classes, splits.num_classes
    message = f"config: model.num_classes={wanted} but data.source={config.data.source!r} has {found} classes"
    if found < wanted:
        return f"{message}; set --config.model.num_classes={found}"
    beyond = sum(int((y >= wanted).sum()) for _, y in (splits.train, splits.val, splits.test))
    return (f"{message} ({beyond} example(s) have labels {wanted}..{found - 1}); fix those labels, or set "
            f"--config.model.num_classes={found} if the data really has {found} classes")



def check_workdir(workdir) -> None:
    """A ValueError in one line if `workdir` cannot be created or written."""
    path = Path(workdir).absolute()
    long = [part for part in path.parts if len(os.fsencode(part)) > 255]
    if long:
        raise ValueError(f"workdir {path}: the name {long[0][:40]}... is longer than 255 bytes; use a shorter --workdir")
    existing = next(p for p in (path, *path.parents) if p.exists())
    if not existing.is_dir():
        raise ValueError(f"workdir {path}: {existing} is a file, not a directory; pass another --workdir")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise ValueError(f"workdir {path}: {existing} is not writable; make it writable or pass another --workdir")



def check_cluster(cluster: dict | None) -> None:
    """A ValueError in one line unless `cluster` (coordinator_address, num_processes, process_id) is
    None or complete and consistent."""
    if not cluster:
        return
    missing = [k for k in ("coordinator_address", "num_processes", "process_id") if cluster.get(k) in (None, "")]
    if missing:
        raise ValueError(f"a multi-process run needs --coordinator_address, --num_processes and --process_id; missing: --{', --'.join(missing)}")
    if ":" not in cluster["coordinator_address"]:
        raise ValueError(f"--coordinator_address={cluster['coordinator_address']} needs a port: HOST:PORT of process 0")
    if not 0 <= cluster["process_id"] < cluster["num_processes"]:
        raise ValueError(f"--process_id={cluster['process_id']} must be in [0, --num_processes={cluster['num_processes']})")
