"""Evaluation of a trained run: restore a checkpoint with the config saved beside it, predict a
split data-parallel over all devices, and report metrics (`report.json`)."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from cifar_jax import steps, trainer
from cifar_jax.checkpoint import Checkpoints
from cifar_jax.data import pipeline

ECE_BINS = 15


class EvalError(ValueError):
    """The run directory cannot be evaluated as asked; the message says why and what to do."""


@dataclasses.dataclass
class Restored:
    config: ml_collections.ConfigDict
    graphdef: object  # eval-mode graphdef
    params: object
    batch_stats: object
    epoch: int
    meta: dict


def load_config(workdir) -> ml_collections.ConfigDict:
    path = Path(workdir) / "config.json"
    if not path.is_file():
        raise EvalError(f"{workdir} is not a training run directory (no config.json); pass the --workdir that train.py wrote")
    return ml_collections.ConfigDict(json.loads(path.read_text()))


def restore(workdir, epoch: int | str = "best", mesh=None) -> Restored:
    """The model of checkpoint `epoch` (an int, 'best' by validation accuracy, or 'latest')."""
    workdir = Path(workdir)
    config = load_config(workdir)
    ckpts = Checkpoints(workdir, read_only=True)
    available = ckpts.epochs()
    if not available:
        raise EvalError(f"{workdir} holds no complete checkpoint; train first (python train.py --config ... --workdir {workdir})")
    if epoch == "best":
        epoch = ckpts.best_epoch()
    elif epoch == "latest":
        epoch = ckpts.latest_epoch()
    elif epoch not in available:
        raise EvalError(f"no checkpoint of epoch {epoch} in {workdir}; available: {', '.join(map(str, available))}")
    mesh = mesh or pipeline.make_mesh()
    replicated = jax.NamedSharding(mesh, jax.sharding.PartitionSpec())
    model = _fresh(config)
    model.eval()
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    params, batch_stats = (jax.device_put(t, replicated) for t in (params, batch_stats))
    phase = trainer.phase_of(config, min(epoch, config.num_epochs) - 1)
    _, tx = trainer.make_tx(config, phase, 1)
    template = {"params": params, "batch_stats": batch_stats, "opt_state": trainer.init_opt_state(tx, params, phase, replicated)}
    try:
        state, meta = ckpts.restore(epoch, template)
    except Exception as e:  # noqa: BLE001  (Orbax raises many types for damaged or mismatched files)
        raise EvalError(
            f"checkpoint {ckpts.directory / str(epoch)} does not restore into {config.model.name} as configured in "
            f"config.json ({type(e).__name__}: {str(e).splitlines()[0][:200]})"
        ) from None
    finally:
        ckpts.close()
    return Restored(config, graphdef, state["params"], state["batch_stats"], epoch, meta)


def _fresh(config):
    """The configured architecture with random weights (the checkpoint overwrites them): evaluation
    must not need the pretrained weights directory that training started from."""
    from cifar_jax import models

    options = {} if config.model.name == "simple_cnn" else {"stem": config.model.stem}
    return models.create(config.model.name, config.model.num_classes, dtype=trainer.compute_dtype(config), **options)


def predict(restored: Restored, images: np.ndarray, batch_size: int | None = None, mesh=None) -> np.ndarray:
    """float32 logits of every image (uint8 NHWC), preprocessed as in training (without augmentation)."""
    mesh = mesh or pipeline.make_mesh()
    batch_size = batch_size or restored.config.eval_batch_size
    run = steps.make_predict(
        restored.graphdef, preprocess=pipeline.Preprocess.from_config(restored.config.data),
        batch_size=batch_size, sharding=pipeline.batch_sharding(mesh),
    )
    return np.asarray(run(restored.params, restored.batch_stats, pipeline.replicate(images, mesh)))


def expected_calibration_error(probs: np.ndarray, labels: np.ndarray, bins: int = ECE_BINS) -> float:
    """ECE with equal-width confidence bins: sum_b |acc_b - conf_b| * n_b / N."""
    conf = probs.max(-1)
    correct = probs.argmax(-1) == labels
    edges = np.linspace(0.0, 1.0, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    ece = 0.0
    for b in range(bins):
        in_bin = which == b
        if in_bin.any():
            ece += abs(correct[in_bin].mean() - conf[in_bin].mean()) * in_bin.mean()
    return float(ece)


def metrics(logits: np.ndarray, labels: np.ndarray, label_smoothing: float = 0.0) -> dict:
    """loss (the training criterion), top-1/top-5 accuracy and ECE of float32 logits."""
    num_classes = logits.shape[-1]
    loss = np.asarray(steps.cross_entropy(logits, labels, num_classes, label_smoothing)).mean()
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    k = min(5, num_classes)
    top5 = np.argsort(-logits, axis=-1)[:, :k]
    return {
        "n_examples": int(len(labels)),
        "loss": float(loss),
        "top1_acc": float((logits.argmax(-1) == labels).mean()),
        "top5_acc": float((top5 == labels[:, None]).any(-1).mean()),
        "ece": expected_calibration_error(probs, labels),
    }
