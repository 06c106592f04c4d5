"""What `eval.py` does, after its flags: check the inputs (`prepare`, every bad input one line
before any prediction), then write the reports into a staging directory (`write_reports`): the
split's metrics and plots, the OOD submission, the corruption suite."""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import numpy as np

from cifar_jax import config as config_lib
from cifar_jax import corruptions, data, evaluate, staging


@dataclasses.dataclass(frozen=True)
class Options:
    workdir: str
    step: object  # an epoch, 'best' or 'latest'
    split: str  # 'test' or 'val'
    tta: bool
    ema: bool
    ood_dir: str | None
    corruptions: bool
    corruption_limit: int


@dataclasses.dataclass
class Inputs:
    run: evaluate.Restored
    history: list
    splits: data.Splits
    distortions: list


def prepare(opts: Options) -> Inputs:
    """Restore the run and load its data; an EvalError, DataError or ValueError says what is wrong."""
    run = evaluate.restore(opts.workdir, opts.step, ema=opts.ema)
    history = config_lib.read_history(opts.workdir)  # what resumes changed (num_epochs, ...)
    splits = data.load_splits(run.config.data, f"data.path in {Path(opts.workdir) / 'config.json'}")
    if not len(splits.val[0]) and opts.split == "val":
        raise evaluate.EvalError(
            f"the run has no val split (data.val_fraction={run.config.data.val_fraction}); use --split test"
        )
    if not len(splits.test[0]) and (opts.split == "test" or opts.ood_dir or opts.corruptions):
        raise evaluate.EvalError(
            f"the run's data (data.source={run.config.data.source!r} {run.config.data.path}) has no test "
            f"images; evaluate --split val, or add x_test/y_test to the data"
        )
    distortions = evaluate.load_distortions(opts.ood_dir, splits.test[0].shape[1:]) if opts.ood_dir else []
    if opts.corruption_limit < 0:
        raise evaluate.EvalError(
            f"--corruption_limit={opts.corruption_limit} must be >= 0 (0: the whole test split)"
        )
    if opts.tta and not run.config.data.augment.flip:
        logging.getLogger("cifar_jax").warning(
            "--tta averages over horizontal mirrors, but this model was trained without flips "
            "(data.augment.flip=False): mirrored images are new to it"
        )
    return Inputs(run, history, splits, distortions)


def write_reports(opts: Options, inputs: Inputs, stage: Path, out: Path) -> None:
    """The reports in `stage` (published to `out` by the caller); what they say, printed."""
    run, splits = inputs.run, inputs.splits

    def logits_of(images):
        return evaluate.tta_logits(run, images) if opts.tta else evaluate.predict(run, images)

    images, labels = getattr(splits, opts.split)
    logits = logits_of(images)
    report = {
        "split": opts.split,
        "step": run.epoch,
        "weights": "ema" if opts.ema else "trained",
        "tta": opts.tta,
        **evaluate.metrics(logits, labels, run.config.label_smoothing),
        "config_changes": inputs.history,
    }
    evaluate.per_class_csv(logits, labels, splits.label_names, stage / "per_class.csv")
    evaluate.plot_confusion(logits, labels, splits.label_names, stage / "confusion.png")
    evaluate.plot_reliability(logits, labels, stage / "reliability.png")
    weights, tta = " (weight average)" if opts.ema else "", " with TTA" if opts.tta else ""
    print(
        f"{run.config.model.name} epoch {run.epoch}{weights}, {opts.split} split ({report['n_examples']} "
        f"images){tta}"
    )
    for change in inputs.history:
        print(f"  resumed from epoch {change['from_epoch']} with changed settings: {change['effect']}")
    for key in ("top1_acc", "top5_acc", "loss", "ece"):
        print(f"  {key:<9} {report[key]:.4f}")
    if inputs.distortions:
        report["ood_rows"] = ood_submission(logits_of, inputs.distortions, stage, out)
    if opts.corruptions:
        report["corruptions"] = corruption_suite(logits_of, splits.test, opts.corruption_limit, stage)
    staging.write_text(stage / "report.json", json.dumps(report, indent=2) + "\n")


def ood_submission(logits_of, distortions: list, stage: Path, out: Path) -> int:
    """submission_ood.csv: a prediction for every image of every distortion file; its row count."""
    predictions = logits_of(np.concatenate([x for _, x in distortions])).argmax(-1)  # one pass over all
    rows, start = [], 0
    for name, x in distortions:
        rows += evaluate.submission_rows(name, predictions[start : start + len(x)])
        start += len(x)
    evaluate.write_submission(rows, stage / "submission_ood.csv")
    print(f"submission: {out / 'submission_ood.csv'} ({len(rows)} rows from {len(distortions)} files)")
    return len(rows)


def corruption_suite(logits_of, test, limit: int, stage: Path) -> dict:
    """Accuracy under each corruption and severity (a fixed subset of `limit` test images; 0: all),
    and corruptions.png."""
    x_clean, y_clean = evaluate.subset(test, limit)
    accuracy = {}
    for name in corruptions.NAMES:
        accuracy[name] = [
            float((logits_of(corruptions.corrupt(x_clean, name, s)).argmax(-1) == y_clean).mean())
            for s in corruptions.SEVERITIES
        ]
        print(f"  {name:<15} " + " ".join(f"{a:.3f}" for a in accuracy[name]))
    result = {
        "n_examples": int(len(y_clean)),
        "accuracy": accuracy,
        "mean": float(np.mean(list(accuracy.values()))),
    }
    evaluate.plot_corruption_heatmap(accuracy, stage / "corruptions.png")
    print(f"  mean accuracy under corruption {result['mean']:.4f}")
    return result
