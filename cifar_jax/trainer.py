"""`train_and_evaluate(config, workdir)`: the whole training run, resumable.

Order of work: validate the config and everything cheap to check (devices, pretrained weights,
the workdir) -> load data -> put it on the devices -> restore the latest checkpoint if any ->
per epoch: train (jitted chunks of steps), evaluate on val, log, checkpoint.

The host stays ahead of the device: it reads a chunk's metrics while the next chunk runs, queues
validation before it reads the epoch's last chunk, and queues the next epoch's first
`run_ahead_chunks` chunks before it logs and checkpoints the epoch (a device copy of its
state), so that this work does not leave the device idle between epochs. Each metrics row says
what the host's work between epochs cost (`host_s`, `checkpoint_s`; see `end_epoch`).
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import gc
import json
import logging
import os
import re
import signal
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cifar_jax import config as config_lib
from cifar_jax import data, models, optim, pretrained, steps
from cifar_jax.checkpoint import Checkpoints, Snapshot
from cifar_jax.data import pipeline
from cifar_jax.runguard import StopSignals, WorkdirLock
from cifar_jax.tracking import CurvesPlotter, MetricsLog, Wandb

log = logging.getLogger("cifar_jax")


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, ...); earlier checkpoints are kept."""


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


def steps_per_call(config, steps_per_epoch: int, backend: str | None = None) -> int:
    """Steps fused into one jitted call (a fori_loop), as configured or automatically.

    Automatic: the largest divisor of an epoch up to 16 on accelerators, to hide dispatch latency,
    and up to 4 on CPU (a divisor, so every call has the same shape and nothing compiles twice).
    On CPU, 4 steps per call ran 0-14% faster than 1 (interleaved, bit-identical results: SimpleCNN
    and ResNet-50 @32 at batch 128, 144 -> 125 and 545 -> 480 ms a step; ResNet-50 @224 at batch 32,
    6.58 -> 5.97 s; ResNet-34 @32 unchanged) and 12 no faster than 4; the cap keeps a call short
    enough (ResNet-34 at batch 128: 25 s) for a stop signal to be honoured soon. (Before
    `layers.conv_nhwc`, XLA:CPU ran a step inside a loop 20-60x slower.)
    """
    wanted = config.steps_per_call or (4 if (backend or jax.default_backend()) == "cpu" else 16)
    return max(d for d in range(1, min(wanted, steps_per_epoch) + 1) if steps_per_epoch % d == 0)


def eval_batches_per_call(config) -> int:
    """Evaluation batches fused into one jitted call (a fori_loop), as configured or automatically:
    a whole split (`steps.eval_calls` makes the calls equal). Unlike training steps, evaluation
    runs faster in a loop even on CPU: 10,000 images, batch 500, 20 batches per call against 1,
    SimpleCNN 3,847 -> 4,846 img/s, ResNet-50 @32 848 -> 1,035 img/s."""
    return config.get("eval_batches_per_call", 0) or 2**31 - 1  # the key is absent from configs saved before it


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


def build_model(config, num_classes: int):
    dtype = compute_dtype(config)
    if config.model.pretrained:
        return pretrained.load(config.model.pretrained, num_classes, dtype=dtype, stem=config.model.stem, seed=config.seed)
    options = {} if config.model.name == "simple_cnn" else {"stem": config.model.stem}
    return models.create(config.model.name, num_classes, dtype=dtype, seed=config.seed, **options)


def make_tx(config, phase: Phase, steps_per_epoch: int):
    """(schedule, optax transformation) of a phase."""
    schedule = optim.make_schedule(config.schedule, phase.lr, phase.num_epochs, steps_per_epoch)
    return schedule, optim.make_optimizer(config.optimizer, schedule)


def replicated_model(config, num_classes: int, mesh):
    """(graphdef in train mode, graphdef in eval mode, params, batch_stats) of the configured model
    (new, or converted weights), its state replicated on every device of `mesh`."""
    model = build_model(config, num_classes)
    graphdef_train = nnx.graphdef(model)
    model.eval()
    graphdef_eval, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = (jax.tree.map(lambda a: pipeline.replicate(np.asarray(a), mesh), t) for t in (params, batch_stats))
    return graphdef_train, graphdef_eval, params, batch_stats


def epoch_lrs(schedule, phase: Phase, steps_per_epoch: int) -> list[float]:
    """The learning rate at the first step of each epoch of `phase`, for the metrics rows, each the
    shortest decimal of the optimizer's value (0.001, not 0.0010000000474974513 for a float32).
    Computed once per phase: evaluating the schedule on the device at each epoch's start, then
    reading it, made the host wait for the device's queue (the previous epoch's validation) before
    it could queue the epoch's first steps."""
    values = np.asarray(jax.vmap(schedule)(jnp.arange(phase.num_epochs) * steps_per_epoch))
    return [float(str(v)) for v in values]


def step_config(config, phase: Phase, graphdefs, *, preprocess, num_classes: int, steps_per_epoch: int, sharding):
    """(StepConfig, schedule) of `phase`. A frozen backbone (phase 1) runs in eval mode, its
    BatchNorm using (and keeping) the pretrained running statistics, unless
    `head_only_batchnorm='train'`: then batch statistics, and the running ones updated."""
    graphdef_train, graphdef_eval = graphdefs
    schedule, tx = make_tx(config, phase, steps_per_epoch)
    frozen_bn = phase.head_only and config.get("head_only_batchnorm", "frozen") == "frozen"
    cfg = steps.StepConfig(
        graphdef=graphdef_eval if frozen_bn else graphdef_train, tx=tx, head_only=phase.head_only,
        preprocess=preprocess, batch_size=config.batch_size, num_classes=num_classes,
        label_smoothing=config.label_smoothing, seed=config.seed, sharding=sharding, ema_decay=config.get("ema_decay", 0.0),
        mixup_alpha=config.data.augment.get("mixup_alpha", 0.0), cutmix_alpha=config.data.augment.get("cutmix_alpha", 0.0),
    )
    return cfg, schedule


def init_opt_state(tx, params, phase: Phase, sharding):
    """Optimizer state of the parameters that `phase` trains, placed with `sharding`."""
    trainable, _ = steps.partition(params, phase.head_only)
    return jax.jit(tx.init, out_shardings=sharding)(trainable)


def _to_host(tree):
    return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def _epoch_row(epoch, phase, train_sums, val_sums, lr, epoch_time, img_per_s, val_s, host_s, checkpoint_s):
    def mean(sums, key):
        return float(sums[key]) / max(int(sums["count"]), 1)

    def seconds(t):
        return None if t is None else round(t, 3)

    validation = {}  # val_loss, val_acc, and ema_val_loss, ema_val_acc for the weight average
    for prefix, sums in sorted((val_sums or {"val": None}).items(), key=lambda kv: kv[0] != "val"):
        validation[f"{prefix}_loss"] = mean(sums, "loss_sum") if sums is not None else None
        validation[f"{prefix}_acc"] = mean(sums, "correct") if sums is not None else None
    return {
        "epoch": epoch + 1,
        "phase": phase.name,
        "train_loss": mean(train_sums, "loss_sum"),
        "train_acc": mean(train_sums, "correct"),
        **validation,
        "lr": lr,
        "epoch_time_s": round(epoch_time, 3),
        "train_img_per_s": round(img_per_s, 1),
        "val_s": seconds(val_s),
        "host_s": seconds(host_s),
        "checkpoint_s": seconds(checkpoint_s),
    }


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


def train_and_evaluate(config, workdir, *, progress: bool = True, cluster: dict | None = None) -> list[dict]:
    """Train `config` in `workdir` (resuming from its latest checkpoint); returns the metrics rows.
    `cluster` (coordinator_address, num_processes, process_id) joins a multi-process run explicitly;
    `config.distributed` alone relies on jax.distributed's auto-detection (SLURM, TPU pods, ...)."""
    t_start = time.perf_counter()
    workdir = Path(workdir).absolute()
    config = config.copy_and_resolve_references()
    for section, key in (("data", "path"), ("model", "pretrained")):
        if config[section][key]:  # saved absolute, so that eval.py works from any directory
            config[section][key] = str(Path(config[section][key]).expanduser().absolute())
    check_cluster(cluster)
    if cluster or config.distributed:
        jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU processes' collectives
        jax.distributed.initialize(**(cluster or {}))  # without `cluster`: auto-detection
    check_before_start(config, workdir)
    is_main = jax.process_index() == 0
    if not is_main:  # one lock per run: process 0 holds it for all
        return _train(config, workdir, is_main, progress, t_start)
    with WorkdirLock(workdir):
        return _train(config, workdir, is_main, progress, t_start)


def _train(config, workdir: Path, is_main: bool, progress: bool, t_start: float) -> list[dict]:
    splits = data.load_splits(config.data)
    if splits.num_classes != config.model.num_classes:
        raise ValueError(class_count_mismatch(config, splits))
    n_train = len(splits.train[0])
    if n_train < config.batch_size:
        raise ValueError(f"config: batch_size={config.batch_size} exceeds the {n_train} training examples")

    workdir.mkdir(parents=True, exist_ok=True)
    if is_main:
        (workdir / "config.json").write_text(config.to_json_best_effort(indent=2) + "\n")

    mesh = pipeline.make_mesh()
    sharding = pipeline.batch_sharding(mesh)
    train_x, train_y = (pipeline.replicate(a, mesh) for a in splits.train)
    val_x, val_y = (pipeline.replicate(a, mesh) for a in splits.val) if len(splits.val[0]) else (None, None)
    preprocess = pipeline.Preprocess.from_config(config.data)
    steps_per_epoch = pipeline.steps_per_epoch(n_train, config.batch_size)
    chunk = steps_per_call(config, steps_per_epoch)

    graphdef_train, graphdef_eval, params, batch_stats = replicated_model(config, splits.num_classes, mesh)
    replicated = jax.NamedSharding(mesh, jax.sharding.PartitionSpec())
    eval_sums = steps.make_eval_sums(
        graphdef_eval, preprocess=preprocess, batch_size=config.eval_batch_size, num_classes=splits.num_classes,
        label_smoothing=config.label_smoothing, batches_per_call=eval_batches_per_call(config), sharding=sharding,
    )

    def phase_setup(phase: Phase, params):
        cfg, schedule = step_config(config, phase, (graphdef_train, graphdef_eval), preprocess=preprocess,
                                    num_classes=splits.num_classes, steps_per_epoch=steps_per_epoch, sharding=sharding)
        return cfg, epoch_lrs(schedule, phase, steps_per_epoch), init_opt_state(cfg.tx, params, phase, replicated)

    ckpts = Checkpoints(workdir, keep=config.checkpoint.keep)
    # Where to start: the newest checkpoint that restores (epoch end, or a signal's mid-epoch one).
    start_epoch, start_step, resumed_metrics, resumed_row = 0, 0, None, None
    latest = ckpts.latest_epoch()

    def phase_after(epochs_done):  # the phase whose optimizer state a checkpoint after `epochs_done` epochs holds
        return phase_of(config, max(min(epochs_done, config.num_epochs) - 1, 0))

    phase = phase_after(latest or 0)
    step_cfg, lrs, opt_state = phase_setup(phase, params)
    state = {"params": params, "batch_stats": batch_stats, "opt_state": opt_state}
    if config.get("ema_decay", 0.0):  # the weight average starts from the initial model (its own buffers: the state is donated)
        state["ema"] = jax.tree.map(jnp.copy, {"params": params, "batch_stats": batch_stats})
    fresh_state = state
    if latest is not None:
        start_epoch, state, meta = ckpts.restore_latest_good(state)  # restores only into `phase`'s structure
        resumed_row = meta["row"]
        log.info("resumed from %s (epoch %d, val_acc %s)", ckpts.directory / str(start_epoch), start_epoch, _fmt(meta["row"].get("val_acc")))
    interrupted = ckpts.interrupted_meta()
    if interrupted is not None and interrupted["epoch"] >= start_epoch:
        phase = phase_of(config, interrupted["epoch"])
        step_cfg, lrs, opt_state = phase_setup(phase, params)
        template = {"state": {**fresh_state, "opt_state": opt_state}, "sums": jax.device_put(steps.zero_metrics(), replicated)}
        restored = ckpts.restore_interrupted(template)
        if restored is not None:
            state, resumed_metrics = restored["state"], restored["sums"]
            start_epoch, start_step = interrupted["epoch"], interrupted["next_step"]
            log.info("resumed the interrupted epoch %d at step %d of %d", start_epoch + 1, start_step, steps_per_epoch)
        elif phase_after(start_epoch) != phase:  # back to the epoch checkpoint's phase
            phase = phase_after(start_epoch)
            step_cfg, lrs, _ = phase_setup(phase, params)
    if start_epoch >= config.num_epochs:
        log.info("workdir %s already holds all %d epochs; nothing to train", workdir, config.num_epochs)

    metrics_log = MetricsLog(workdir, resume_epoch=start_epoch, resume_row=resumed_row) if is_main else None
    tracker = Wandb(config, workdir, resume=latest is not None) if is_main else None
    plotter = CurvesPlotter(workdir / "curves.png") if is_main else None
    compiled = {}
    compile_s = first_step_s = None
    ahead = config.run_ahead_chunks
    stop = StopSignals()

    def checkpoint_due(epoch) -> bool:
        """Whether `epoch` ends with a checkpoint on schedule: every `checkpoint.every_epochs`, the
        last epoch, and the epoch a mid-epoch checkpoint resumed (which that one makes obsolete)."""
        return ((epoch + 1) % config.checkpoint.every_epochs == 0 or epoch + 1 == config.num_epochs
                or (epoch == start_epoch and start_step > 0))

    def kept_checkpoints(epoch) -> str:
        """What an error in `epoch` leaves: the checkpoints of the epochs before it that were due."""
        last = max([e + 1 for e in range(start_epoch, epoch) if checkpoint_due(e)] + [latest or 0])
        return f"checkpoints up to epoch {last} are kept in {ckpts.directory}." if last else "no checkpoint was saved yet."

    # The host's work of checkpointing and logging an epoch, reported in the next epoch's row (done
    # within that epoch's time, but for the copy of the state when running ahead).
    host_times = {"host_s": None, "checkpoint_s": None}
    saved = {"epoch": None, "meta": None}  # the last finished epoch: saved or not, and its checkpoint meta

    def end_epoch(epoch, phase, first_step, sums, val_sums, t_val, lr, t_epoch, train_time, seen_before, state, copy_s) -> float:
        """The host's work after an epoch: read validation, log, plot, and checkpoint `state` (the
        state at the end of `epoch`, or None; a `Snapshot` copy made in `copy_s` seconds when running
        ahead) if the schedule says so. Returns the time validation was read: the epoch's end."""
        val = _to_host(val_sums) if val_sums is not None else None
        t_end = time.perf_counter()
        row = _epoch_row(epoch, phase, sums, val, lr, t_end - t_epoch, (sums["count"] - seen_before) / train_time,
                         val_s=t_end - t_val if val is not None else None, **host_times)
        if epoch == start_epoch and compile_s is not None:
            row["compile_s"] = round(compile_s, 2)
            row["first_step_s"] = round(first_step_s, 2)
        if is_main:
            metrics_log.append(row)
            plotter.update(metrics_log.rows)
            tracker.log(row)
            log.info(
                "epoch %d/%d  train loss %.4f acc %.4f | val loss %s acc %s | lr %.3g | %.1f s, %.0f img/s",
                epoch + 1, config.num_epochs, row["train_loss"], row["train_acc"],
                _fmt(row["val_loss"]), _fmt(row["val_acc"]), lr, row["epoch_time_s"], row["train_img_per_s"],
            )
        meta = {"epoch": epoch + 1, "phase": phase.name, "row": row}
        t_save = time.perf_counter()
        save = state is not None and checkpoint_due(epoch)
        if save:
            _save_or_fail(lambda: ckpts.save(epoch + 1, state, meta), ckpts)
            if epoch == start_epoch and first_step:
                _save_or_fail(ckpts.wait, ckpts)  # the epoch checkpoint is complete: the mid-epoch one is obsolete
                ckpts.clear_interrupted()
        t_done = time.perf_counter()
        host_times.update(host_s=copy_s + t_done - t_end, checkpoint_s=copy_s + t_done - t_save if save else None)
        saved.update(epoch=epoch if save else None, meta=meta)
        return t_end

    # The previous epoch's `end_epoch`, while its run-ahead chunks of the next epoch are queued.
    deferred = None
    t_last_end = None  # when the previous epoch ended (its validation was read): the next one starts
    # Everything built so far lives until the end of the run: out of the collector's way, a
    # ResNet-50 checkpoint's save() blocks 0.13 s instead of 0.23 s (CPU, median of 4).
    gc.freeze()
    try:
        with stop:
            for epoch in range(start_epoch, config.num_epochs):
                if phase_of(config, epoch) != phase:
                    phase = phase_of(config, epoch)
                    step_cfg, lrs, state["opt_state"] = phase_setup(phase, state["params"])
                    log.info("epoch %d: phase %r starts (lr %g)", epoch + 1, phase.name, phase.lr)
                t_epoch = t_last_end or time.perf_counter()
                order = pipeline.epoch_order(config.seed, epoch, n_train)
                first_step = start_step if epoch == start_epoch else 0
                metrics = resumed_metrics if first_step else jax.device_put(steps.zero_metrics(), replicated)
                this_chunk = chunk if first_step % chunk == 0 else 1
                args = (train_x, train_y, order, jnp.int32(epoch))
                if (phase.name, this_chunk) not in compiled:
                    t0 = time.perf_counter()
                    fn = steps.make_train_chunk(step_cfg, this_chunk)
                    compiled[phase.name, this_chunk] = fn.lower(state, metrics, *args, jnp.int32(0)).compile()
                    compile_s = time.perf_counter() - t0
                    log.info("compiled the %s train step (%d steps per call) in %.1f s", phase.name, this_chunk, compile_s)
                run_chunk = compiled[phase.name, this_chunk]
                lr = lrs[epoch - phase.first_epoch]
                bar = _progress(progress and is_main, steps_per_epoch, f"epoch {epoch + 1}/{config.num_epochs}", first_step)
                t_train = time.perf_counter()
                seen_before = int(_to_host(metrics)["count"]) if first_step else 0

                def check(chunk_metrics, first):
                    """Host side of a finished chunk: NaN check and progress bar."""
                    sums = _to_host(chunk_metrics)
                    if sums["nonfinite_steps"]:
                        raise TrainingError(
                            f"loss became NaN/Inf in epoch {epoch + 1}, steps {first + 1}-{first + this_chunk} of {steps_per_epoch} "
                            f"(lr {lr:g}); {kept_checkpoints(epoch)} Lower optimizer.lr?"
                        )
                    if bar is not None:
                        bar.update(this_chunk)
                        bar.set_postfix(loss=f"{sums['loss_sum'] / sums['count']:.4f}", acc=f"{sums['correct'] / sums['count']:.4f}",
                                        img_s=f"{(sums['count'] - seen_before) / (time.perf_counter() - t_train):.0f}")
                    return sums

                pending = []  # dispatched chunks' (metrics, first step), read while later chunks run
                for i, first in enumerate(range(first_step, steps_per_epoch, this_chunk)):
                    state, metrics = run_chunk(state, metrics, *args, jnp.int32(first))
                    if first_step_s is None:  # one wait, once per run: how long until training really runs
                        jax.block_until_ready(metrics)
                        first_step_s = time.perf_counter() - t_start
                        log.info("first training step done %.1f s after the start (data, model, compilation)", first_step_s)
                    pending.append((metrics, first))
                    next_step = first + this_chunk
                    if deferred is not None and (i + 1 == ahead or next_step >= steps_per_epoch or stop.requested):
                        finish, deferred = deferred, None
                        t_epoch = t_train = finish()  # the device went on from that validation to this epoch
                    while deferred is None and len(pending) > 1:  # the device is busy with a later chunk: no stall
                        check(*pending.pop(0))
                    if stop.requested and next_step < steps_per_epoch:
                        while pending:
                            check(*pending.pop(0))
                        _save_or_fail(lambda: ckpts.save_interrupted(
                            epoch * steps_per_epoch + next_step, {"state": state, "sums": metrics},
                            {"epoch": epoch, "next_step": next_step, "phase": phase.name}), ckpts)
                        raise Interrupted(stop.signum, f"epoch {epoch + 1}, step {next_step} of {steps_per_epoch}", workdir)
                # Validation is queued behind the last chunk before the host waits for that chunk: the
                # device goes on from one to the other without waiting for the host.
                val_sums = None
                if val_x is not None:
                    val_sums = {"val": eval_sums(state["params"], state["batch_stats"], val_x, val_y)}
                    if "ema" in state:
                        val_sums["ema_val"] = eval_sums(state["ema"]["params"], state["ema"]["batch_stats"], val_x, val_y)
                sums = check(*pending.pop(0))
                t_val = time.perf_counter()  # training is done: validation runs from here
                train_time = t_val - t_train
                if bar is not None:
                    bar.close()
                # Run ahead: queue the next epoch's first chunks before this epoch's host work, which then
                # saves a device copy of the state (the next chunk takes `state` over), if one is due.
                run_ahead = (ahead and epoch + 1 < config.num_epochs and not stop.requested
                             and phase_of(config, epoch + 1) == phase and (phase.name, chunk) in compiled)
                t_copy = time.perf_counter()
                if run_ahead:
                    epoch_state = Snapshot.of(state) if checkpoint_due(epoch) else None  # a stop in the next epoch saves mid-epoch
                else:
                    epoch_state = state
                copy_s = time.perf_counter() - t_copy  # on a CPU the copy is made during the call: part of the checkpoint's time
                finish = functools.partial(end_epoch, epoch, phase, first_step, sums, val_sums, t_val, lr, t_epoch,
                                           train_time, seen_before, epoch_state, copy_s)
                if run_ahead:
                    deferred, t_last_end = finish, None
                    continue
                t_last_end = finish()
                if stop.requested and epoch + 1 < config.num_epochs:
                    if saved["epoch"] != epoch:  # not on the checkpoint schedule: saved for the rerun
                        _save_or_fail(lambda: ckpts.save(epoch + 1, state, saved["meta"]), ckpts)
                    _save_or_fail(ckpts.wait, ckpts)
                    raise Interrupted(stop.signum, f"the end of epoch {epoch + 1}", workdir)
        _save_or_fail(ckpts.wait, ckpts)  # the last checkpoints are written in the background: a run ends when they are
    except BaseException:
        if deferred is not None:  # keep the finished epoch: write its checkpoint before giving up
            try:
                deferred()
            except Exception:  # noqa: BLE001  (the first error is the one to report)
                log.exception("could not log and checkpoint epoch %d after the error below", epoch)
        raise
    finally:
        gc.unfreeze()
        try:
            ckpts.wait()
        except Exception:  # noqa: BLE001  (reported by _save_or_fail where it matters)
            pass
        ckpts.close()
        if plotter is not None:
            plotter.close()
        if tracker is not None:
            tracker.finish()
    rows = metrics_log.rows if metrics_log is not None else []
    if is_main and rows:
        best = max((r for r in rows if r["val_acc"] is not None), key=lambda r: r["val_acc"], default=rows[-1])
        log.info("best epoch %d (val_acc %s); checkpoints in %s; curves %s; metrics %s",
                 best["epoch"], _fmt(best["val_acc"]), ckpts.directory, workdir / "curves.png", workdir / "metrics.jsonl")
    return rows


class Interrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; rerunning resumes."""

    def __init__(self, signum: int, where: str, workdir):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(f"stopped by {name} at {where}; checkpoint saved in {workdir}; rerun the same command to resume")


_WRITE_ADVICE = {
    errno.ENOSPC: "free some space", errno.EDQUOT: "free some space (disk quota)",
    errno.EACCES: "make it writable", errno.EPERM: "make it writable", errno.EROFS: "use a writable --workdir",
    errno.ENAMETOOLONG: "use a shorter --workdir",
}


def write_errno(e: BaseException) -> int | None:
    """The OS error number behind a failed write: an OSError anywhere in the chain, or the
    `[os_error_code='N']` of TensorStore's messages (how Orbax reports a full disk)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = re.search(r"os_error_code='?(\d+)", str(e))
        if found:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None


def _save_or_fail(save, ckpts: Checkpoints) -> None:
    """Run a checkpoint write (or wait for the background ones); turn an OS failure (a full disk, a
    read-only directory, ...) into one clear TrainingError."""
    try:
        save()
    except Exception as e:  # noqa: BLE001  (Orbax raises ValueError around TensorStore's OS errors)
        code = write_errno(e)
        if code is None:
            raise
        raise TrainingError(
            f"could not write a checkpoint in {ckpts.directory} ({os.strerror(code)}); earlier checkpoints there are intact. "
            f"{_WRITE_ADVICE.get(code, 'fix that').capitalize()} and rerun to resume"
        ) from None


def _fmt(x):
    return "n/a" if x is None else f"{x:.4f}"


def _progress(enabled: bool, total: int, desc: str, initial: int = 0):
    if not enabled:
        return None
    from tqdm import tqdm

    # disable=None: no bar when stderr is not a terminal (logs stay clean).
    return tqdm(total=total, initial=initial, desc=desc, unit="step", leave=False, dynamic_ncols=True, disable=None)
