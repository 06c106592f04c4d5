"""Evaluate a training run:

    python eval.py --workdir DIR [--step N | --best] [--split test|val] [--out DIR] [--tta] [--ema]
                   [--ood_dir DIR] [--corruptions [--corruption_limit N]]

Restores the checkpoint (the best by validation accuracy unless --step is given) with the config
saved in the run directory. Writes to <out> (default <workdir>/eval/): report.json, per_class.csv,
confusion.png, reliability.png; with --ood_dir, submission_ood.csv; with --corruptions,
corruptions.png and the accuracy per corruption and severity in report.json.
"""

import shutil
from pathlib import Path

from cifar_jax import interrupts

interrupts.defer()  # a Ctrl-C during the imports is acted on once they are done (cli.run)
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
    from cifar_jax import data, errors, eval_report, evaluate, staging

    step = _STEP.value if _STEP.value is not None else ("best" if _BEST.value else "latest")
    opts = eval_report.Options(
        _WORKDIR.value,
        step,
        _SPLIT.value,
        _TTA.value,
        _EMA.value,
        _OOD.value,
        _CORRUPTIONS.value,
        _CORRUPTION_LIMIT.value,
    )
    out = Path(_OUT.value or Path(_WORKDIR.value) / "eval").absolute()
    try:  # everything that can fail on bad input, before any prediction or file is written
        inputs = eval_report.prepare(opts)
        stage = evaluate.staging_dir(out)
    except (evaluate.EvalError, data.DataError, ValueError) as e:
        cli.fail(str(e))
    except OSError as e:
        cli.fail(errors.write_failure(f"to --out {out}", e, "--out"))
    try:  # a full disk or a file size limit while writing: one line, and the staging directory removed
        eval_report.write_reports(opts, inputs, stage, out)
        staging.publish(stage, out)  # all of this run's outputs replace all of the last one's
    except OSError as e:
        shutil.rmtree(stage, ignore_errors=True)
        cli.fail(errors.write_failure(f"the outputs to --out {out}", e, "--out"))
    print(f"report: {out / 'report.json'}")


if __name__ == "__main__":
    from cifar_jax.cli import run

    run(main, "before eval.py finished: its outputs are written whole or not at all")
