"""Evaluate a training run:

    python eval.py --workdir DIR [--step N | --best] [--split test|val] [--out DIR] [--tta] [--ema]
                   [--ood_dir DIR] [--corruptions [--corruption_limit N]]

Restores the checkpoint (the best by validation accuracy unless --step is given) with the config
saved in the run directory. Writes to <out> (default <workdir>/eval/): report.json, per_class.csv,
confusion.png, reliability.png; with --ood_dir, submission_ood.csv; with --corruptions,
corruptions.png and the accuracy per corruption and severity in report.json.
"""

import json
import logging
import shutil
from pathlib import Path

from cifar_jax import runguard

runguard.defer_interrupts()  # a Ctrl-C during the imports is acted on once they are done (cli.run)
from absl import flags  # noqa: E402

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory written by train.py")
_STEP = flags.DEFINE_integer("step", None, "checkpoint epoch to evaluate (default: the best)")
_BEST = flags.DEFINE_bool(
    "best", True, "evaluate the best checkpoint by validation accuracy (ignored with --step)"
)
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "val"], "which split to evaluate")
_OUT = flags.DEFINE_string("out", None, "output directory (default: <workdir>/eval)")
_TTA = flags.DEFINE_bool("tta", False, "average predictions over the image and its horizontal mirror")
_EMA = flags.DEFINE_bool("ema", False, "evaluate the weight average kept in training (config ema_decay > 0)")
_OOD = flags.DEFINE_string("ood_dir", None, "directory of distortionNN.npy files -> submission_ood.csv")
_CORRUPTIONS = flags.DEFINE_bool(
    "corruptions", False, "accuracy under the built-in corruption suite (severities 1..5)"
)
_CORRUPTION_LIMIT = flags.DEFINE_integer(
    "corruption_limit", 0, "use N test images for --corruptions, a fixed random subset (0: all)"
)
_CACHE = flags.DEFINE_string("compilation_cache", None, "persistent XLA cache dir ('' disables)")
flags.mark_flag_as_required("workdir")


def main(argv):
    from cifar_jax import cli

    cli.start(argv, _CACHE.value)
    import numpy as np

    from cifar_jax import config as config_lib
    from cifar_jax import corruptions, data, errors, evaluate
    from cifar_jax import staging as stage

    # Everything that can fail on bad input, before any prediction or file is written.
    out = Path(_OUT.value or Path(_WORKDIR.value) / "eval").absolute()
    try:
        run = evaluate.restore(
            _WORKDIR.value,
            _STEP.value if _STEP.value is not None else ("best" if _BEST.value else "latest"),
            ema=_EMA.value,
        )
        history = config_lib.read_history(_WORKDIR.value)  # what resumes changed (num_epochs, ...)
        splits = data.load_splits(run.config.data)
        if not len(getattr(splits, _SPLIT.value)[0]) and _SPLIT.value == "val":
            raise evaluate.EvalError(
                f"the run has no val split (data.val_fraction={run.config.data.val_fraction}); use --split "
                "test"
            )
        if not len(splits.test[0]) and (_SPLIT.value == "test" or _OOD.value or _CORRUPTIONS.value):
            raise evaluate.EvalError(
                f"the run's data (data.source={run.config.data.source!r} {run.config.data.path}) has no test "
                f"images; evaluate --split val, or add x_test/y_test to the data"
            )
        distortions = evaluate.load_distortions(_OOD.value, splits.test[0].shape[1:]) if _OOD.value else []
        if _CORRUPTION_LIMIT.value < 0:
            raise evaluate.EvalError(
                f"--corruption_limit={_CORRUPTION_LIMIT.value} must be >= 0 (0: the whole test split)"
            )
        staging = evaluate.staging_dir(out)
    except (evaluate.EvalError, data.DataError, ValueError) as e:
        cli.fail(str(e))
    except OSError as e:
        cli.fail(errors.write_failure(f"to --out {out}", e, "--out"))
    if _TTA.value and not run.config.data.augment.flip:
        logging.getLogger("cifar_jax").warning(
            "--tta averages over horizontal mirrors, but this model was trained without flips "
            "(data.augment.flip=False): mirrored images are new to it"
        )

    def logits_of(images):
        return evaluate.tta_logits(run, images) if _TTA.value else evaluate.predict(run, images)

    try:  # a full disk or a file size limit while writing: one line, and the staging directory removed
        images, labels = getattr(splits, _SPLIT.value)
        logits = logits_of(images)
        report = {
            "split": _SPLIT.value,
            "step": run.epoch,
            "weights": "ema" if _EMA.value else "trained",
            "tta": _TTA.value,
            **evaluate.metrics(logits, labels, run.config.label_smoothing),
            "config_changes": history,
        }
        evaluate.per_class_csv(logits, labels, splits.label_names, staging / "per_class.csv")
        evaluate.plot_confusion(logits, labels, splits.label_names, staging / "confusion.png")
        evaluate.plot_reliability(logits, labels, staging / "reliability.png")

        print(
            f"{run.config.model.name} epoch {run.epoch}{' (weight average)' if _EMA.value else ''}, "
            f"{_SPLIT.value} split "
            f"({report['n_examples']} images){' with TTA' if _TTA.value else ''}"
        )
        for change in history:
            print(f"  resumed from epoch {change['from_epoch']} with changed settings: {change['effect']}")
        for key in ("top1_acc", "top5_acc", "loss", "ece"):
            print(f"  {key:<9} {report[key]:.4f}")

        if distortions:
            predictions = logits_of(np.concatenate([x for _, x in distortions])).argmax(
                -1
            )  # one pass over all files
            rows, start = [], 0
            for name, x in distortions:
                rows += evaluate.submission_rows(name, predictions[start : start + len(x)])
                start += len(x)
            evaluate.write_submission(rows, staging / "submission_ood.csv")
            report["ood_rows"] = len(rows)
            print(
                f"submission: {out / 'submission_ood.csv'} ({len(rows)} rows from {len(distortions)} files)"
            )

        if _CORRUPTIONS.value:
            x_clean, y_clean = evaluate.subset(splits.test, _CORRUPTION_LIMIT.value)
            accuracy = {}
            for name in corruptions.NAMES:
                accuracy[name] = [
                    float((logits_of(corruptions.corrupt(x_clean, name, s)).argmax(-1) == y_clean).mean())
                    for s in corruptions.SEVERITIES
                ]
                print(f"  {name:<15} " + " ".join(f"{a:.3f}" for a in accuracy[name]))
            report["corruptions"] = {
                "n_examples": int(len(y_clean)),
                "accuracy": accuracy,
                "mean": float(np.mean(list(accuracy.values()))),
            }
            evaluate.plot_corruption_heatmap(accuracy, staging / "corruptions.png")
            print(f"  mean accuracy under corruption {report['corruptions']['mean']:.4f}")

        stage.write_text(staging / "report.json", json.dumps(report, indent=2) + "\n")
        stage.publish(staging, out)  # all of this run's outputs replace all of the last one's
    except OSError as e:
        shutil.rmtree(staging, ignore_errors=True)
        cli.fail(errors.write_failure(f"the outputs to --out {out}", e, "--out"))
    print(f"report: {out / 'report.json'}")


if __name__ == "__main__":
    from cifar_jax.cli import run

    run(main, "before eval.py finished: its outputs are written whole or not at all")
