"""Evaluation of a trained run: restore a checkpoint with the config saved beside it, predict
data-parallel over all devices, and report: metrics, per-class accuracy, confusion matrix,
reliability diagram, the distorted-set submission and a built-in corruption suite.

Every file is written atomically (a temporary name, then a rename): nothing is left half-written.
"""

from __future__ import annotations

import dataclasses
import logging
import re
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cifar_jax import preflight, sharding, staging, steps
from cifar_jax.checkpoint import Checkpoints, DamagedCheckpoint
from cifar_jax.data import pipeline
from cifar_jax.errors import one_line
from cifar_jax.train_state import state_shapes

ECE_BINS = 15
log = logging.getLogger("cifar_jax")


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
    """The run's config.json, or the config its checkpoints record when that file is gone."""
    if not (Path(workdir) / "config.json").is_file() and not preflight.has_checkpoints(workdir):
        raise EvalError(
            f"{workdir} is not a training run directory (no config.json); pass the --workdir that train.py "
            "wrote"
        )
    try:
        return preflight.saved_config(workdir)[0]
    except ValueError as e:
        raise EvalError(str(e)) from None


def restore(workdir, epoch: int | str = "best", mesh=None, ema: bool = False) -> Restored:
    """The model of checkpoint `epoch` (an int, 'best' by validation accuracy, or 'latest'): its
    trained weights, or with `ema` the weight average that training kept (`ema_decay` > 0).
    A checkpoint that a train.py still running in `workdir` deletes while it is read (it keeps only
    the last `checkpoint.keep`) is reported, and 'best' or 'latest' chosen again among those left."""
    workdir = Path(workdir)
    config = load_config(workdir)
    if ema and not config.ema_decay:
        raise EvalError(
            f"{workdir} was trained without a weight average (ema_decay=0); evaluate it without --ema"
        )
    # Only the weights and statistics (or their average): evaluation builds no optimizer.
    graphdefs, shapes = state_shapes(config, config.model.num_classes, mesh or sharding.make_mesh())
    template = (
        {"ema": shapes["ema"]} if ema else {"params": shapes["params"], "batch_stats": shapes["batch_stats"]}
    )
    while True:
        ckpts = Checkpoints(workdir, read_only=True)
        try:
            found, state, meta = _restore_one_of(ckpts, _candidates(ckpts, epoch, workdir), template, config)
        finally:
            ckpts.close()
        if state is not None:
            break
        if epoch not in ("best", "latest"):
            raise EvalError(
                f"checkpoint of epoch {found} in {workdir} was deleted while eval.py read it (a train.py "
                "running "
                f"there keeps only the last checkpoint.keep={config.checkpoint.keep}); pass another --step"
            )
        log.warning(
            "checkpoint of epoch %d was deleted while eval.py read it (a train.py running in %s keeps only "
            "the last "
            "checkpoint.keep=%d); choosing the %s checkpoint again",
            found,
            workdir,
            config.checkpoint.keep,
            epoch,
        )
    weights = state["ema"] if ema else state
    return Restored(config, graphdefs.eval, weights["params"], weights["batch_stats"], found, meta)


def _candidates(ckpts: Checkpoints, epoch: int | str, workdir) -> list[int]:
    """The checkpoints to try, in order: the one asked for, or all kept ones best (or newest) first."""
    available = ckpts.epochs()
    if not available:
        raise EvalError(
            f"{workdir} holds no complete checkpoint; train first (python train.py --config ... --workdir "
            f"{workdir})"
        )
    if epoch in ("best", "latest"):
        return ckpts.by_preference(epoch)  # a damaged one is skipped (reported) for the next
    if epoch in available:
        return [epoch]
    raise EvalError(
        f"no checkpoint of epoch {epoch} in {workdir}; available: {', '.join(map(str, available))}"
    )


def _restore_one_of(ckpts: Checkpoints, candidates: list[int], template, config):
    """(epoch, state, meta) of the first candidate that restores; (epoch, None, None) when one was
    deleted while it was read (the caller chooses again). An EvalError when none restores."""
    failures = []
    for epoch in candidates:
        try:
            return epoch, *ckpts.restore(epoch, template)
        except Exception as e:  # noqa: BLE001  (Orbax raises many types for damaged or mismatched files)
            if not (ckpts.directory / str(epoch)).exists():
                return epoch, None, None
            failures.append(
                f"checkpoint {e}"
                if isinstance(e, DamagedCheckpoint)
                else f"checkpoint {ckpts.directory / str(epoch)} does not restore into {config.model.name} "
                "as configured "
                f"in config.json ({one_line(e, 200)})"
            )
        if len(candidates) > 1:
            log.warning("%s; trying the next one", failures[-1])
    raise EvalError(
        failures[0]
        if len(failures) == 1
        else f"none of the {len(failures)} checkpoints restores; {failures[0]}"
    )


def predict(restored: Restored, images: np.ndarray, batch_size: int | None = None, mesh=None) -> np.ndarray:
    """float32 logits of every image (uint8 NHWC), preprocessed as in training (without augmentation)."""
    mesh = mesh or sharding.make_mesh()
    batch_size = batch_size or pipeline.eval_batch_size(
        restored.config.eval_batch_size, len(images), mesh.size
    )
    run = steps.make_predict(
        restored.graphdef,
        preprocess=pipeline.Preprocess.from_config(restored.config.data),
        batch_size=batch_size,
        batches_per_call=steps.eval_batches_per_call(restored.config),
        sharding=sharding.batch_sharding(mesh),
    )
    return np.asarray(run(restored.params, restored.batch_stats, sharding.replicate(images, mesh)))


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


def tta_logits(restored: Restored, images: np.ndarray, mesh=None) -> np.ndarray:
    """Horizontal-flip test-time augmentation: log of the mean softmax over image and mirror."""
    probs = [jax.nn.softmax(predict(restored, x, mesh=mesh), axis=-1) for x in (images, images[:, :, ::-1])]
    return np.asarray(jnp.log((probs[0] + probs[1]) / 2))


OUTPUT_FILES = (
    "report.json",
    "per_class.csv",
    "confusion.png",
    "reliability.png",
    "submission_ood.csv",
    "corruptions.png",
)


def staging_dir(out: Path) -> Path:
    """A new empty directory beside `out` where eval.py writes its outputs; `publish` then puts it in
    `out`'s place, so that `out` never mixes two runs' files. An OSError if it cannot be made."""
    existing = next(p for p in (out, *out.parents) if p.exists())
    if not existing.is_dir():
        raise EvalError(f"--out {out}: {existing} is a file, not a directory; pass another --out")
    if out.is_dir():
        foreign = sorted(p.name for p in out.iterdir() if p.name not in OUTPUT_FILES)
        if foreign:
            raise EvalError(
                f"--out {out} holds files that eval.py did not write ({', '.join(foreign[:3])}); "
                f"pass a new or empty directory"
            )
    return staging.new(out)


def _atomic_savefig(fig, path: Path) -> None:
    staging.write_file(path, lambda tmp: fig.savefig(tmp, dpi=100, format=path.suffix[1:]))


def _figure(size):
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=size)
    FigureCanvasAgg(fig)
    return fig


def per_class_csv(logits: np.ndarray, labels: np.ndarray, names, path: Path) -> None:
    """class_index,class_name,n_examples,accuracy for every class."""
    pred = logits.argmax(-1)
    lines = ["class_index,class_name,n_examples,accuracy"]
    for c, name in enumerate(names):
        mask = labels == c
        acc = float((pred[mask] == c).mean()) if mask.any() else float("nan")
        lines.append(f"{c},{name},{int(mask.sum())},{acc:.6f}")
    staging.write_text(path, "\n".join(lines) + "\n")


def plot_confusion(logits: np.ndarray, labels: np.ndarray, names, path: Path) -> None:
    """Row-normalised confusion matrix (true class per row)."""
    k = len(names)
    cm = np.zeros((k, k))
    np.add.at(cm, (labels, logits.argmax(-1)), 1)
    cm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    fig = _figure((10, 9))
    ax = fig.subplots()
    im = ax.imshow(cm, cmap="viridis", vmin=0, vmax=1)
    fig.colorbar(im, ax=ax, fraction=0.046)
    (
        ax.set_xlabel("predicted class"),
        ax.set_ylabel("true class"),
        ax.set_title("confusion matrix (rows sum to 1)"),
    )
    if k <= 20:
        ax.set_xticks(range(k), names, rotation=90), ax.set_yticks(range(k), names)
    fig.tight_layout()
    _atomic_savefig(fig, path)


def plot_reliability(logits: np.ndarray, labels: np.ndarray, path: Path, bins: int = ECE_BINS) -> None:
    """Accuracy against confidence per bin, with the diagonal of perfect calibration."""
    probs = np.asarray(jax.nn.softmax(logits, axis=-1))
    conf, correct = probs.max(-1), probs.argmax(-1) == labels
    edges = np.linspace(0, 1, bins + 1)
    which = np.clip(np.digitize(conf, edges[1:-1], right=True), 0, bins - 1)
    acc = [correct[which == b].mean() if (which == b).any() else 0.0 for b in range(bins)]
    fig = _figure((5, 5))
    ax = fig.subplots()
    ax.bar(edges[:-1], acc, width=1 / bins, align="edge", edgecolor="black", label="accuracy")
    ax.plot([0, 1], [0, 1], "--", color="gray", label="perfect calibration")
    ax.set_xlabel("confidence"), ax.set_ylabel("accuracy"), ax.legend(loc="upper left")
    ax.set_title(f"reliability (ECE {expected_calibration_error(probs, labels, bins):.3f})")
    fig.tight_layout()
    _atomic_savefig(fig, path)


_DISTORTION_FILE = re.compile(r"^distortion(\d{2})\.npy$")


def load_distortions(ood_dir, image_shape=(32, 32, 3)) -> list[tuple[str, np.ndarray]]:
    """The files distortionNN.npy of `ood_dir`, each uint8 (5 * n, H, W, 3): severities 1..5 in
    equal consecutive blocks. Every file is checked before anything is predicted or written."""
    ood_dir = Path(ood_dir)
    if not ood_dir.is_dir():
        raise EvalError(f"--ood_dir {ood_dir} is not a directory")
    arrays = sorted(p for p in ood_dir.iterdir() if p.suffix == ".npy")
    misnamed = [p.name for p in arrays if not _DISTORTION_FILE.match(p.name)]
    if misnamed:
        raise EvalError(
            f"--ood_dir {ood_dir} holds {', '.join(misnamed)}, not named distortionNN.npy (two digits); "
            f"rename or remove it: the submission must cover every file"
        )
    files = sorted(arrays, key=lambda p: int(p.stem[len("distortion") :]))
    if not files:
        raise EvalError(f"--ood_dir {ood_dir} holds no distortionNN.npy files")
    numbers = [int(p.stem[len("distortion") :]) for p in files]
    if numbers != list(range(len(numbers))):
        missing = sorted(set(range(max(numbers) + 1)) - set(numbers))
        raise EvalError(
            f"--ood_dir {ood_dir} lacks distortion{missing[0]:02d}.npy (the files must be distortion00 ... "
            f"distortion{max(numbers):02d} without gaps)"
        )
    out = []
    for path in files:
        try:
            x = np.load(path, mmap_mode="r", allow_pickle=False)
        except (OSError, ValueError, EOFError) as e:
            raise EvalError(f"{path} is not a readable .npy array ({e or type(e).__name__})") from None
        if len(x) == 0:
            raise EvalError(
                f"{path} holds no images; expected uint8 (5*n, {', '.join(map(str, image_shape))}) with n > 0"
            )
        if x.dtype != np.uint8 or x.ndim != 4 or tuple(x.shape[1:]) != tuple(image_shape) or len(x) % 5:
            raise EvalError(
                f"{path} has {x.dtype} {tuple(x.shape)}; expected uint8 (5*n, "
                f"{', '.join(map(str, image_shape))}) "
                f"with severities 1..5 in equal consecutive blocks"
            )
        out.append((path.stem, np.asarray(x)))
    return out


def subset(split: tuple[np.ndarray, np.ndarray], n: int, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """`n` examples of (images, labels) drawn at random without replacement (fixed `seed`, kept in
    their order), or all for n = 0: the first n of a test split sorted by class would cover n/100
    of its classes."""
    x, y = split
    if not n or n >= len(y):
        return x, y
    keep = np.sort(np.random.default_rng(seed).permutation(len(y))[:n])
    return x[keep], y[keep]


def submission_rows(name: str, predictions: np.ndarray) -> list[str]:
    """Rows `distortionNN_S_i,label` in the study's order: severity 1..5, then index 0..n-1."""
    n = len(predictions) // 5
    return [f"{name}_{s + 1}_{i},{int(predictions[s * n + i])}" for s in range(5) for i in range(n)]


def write_submission(rows: list[str], path: Path) -> None:
    staging.write_text(path, "id,label\n" + "\n".join(rows) + "\n")


def plot_corruption_heatmap(accuracy: dict, path: Path) -> None:
    """Accuracy per corruption (rows) and severity (columns)."""
    names = list(accuracy)
    grid = np.array([accuracy[n] for n in names])
    fig = _figure((7, 0.45 * len(names) + 1.5))
    ax = fig.subplots()
    im = ax.imshow(grid, cmap="magma", vmin=0, vmax=max(1e-6, float(grid.max())), aspect="auto")
    for (i, j), v in np.ndenumerate(grid):
        ax.text(
            j,
            i,
            f"{v:.2f}",
            ha="center",
            va="center",
            color="white" if v < grid.max() / 2 else "black",
            fontsize=8,
        )
    (
        ax.set_xticks(range(grid.shape[1]), [str(s) for s in range(1, grid.shape[1] + 1)]),
        ax.set_yticks(range(len(names)), names),
    )
    ax.set_xlabel("severity"), ax.set_title(f"accuracy under corruption (mean {grid.mean():.3f})")
    fig.colorbar(im, ax=ax)
    fig.tight_layout()
    _atomic_savefig(fig, path)
