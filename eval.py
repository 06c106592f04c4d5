"""Evaluate a training run:  python eval.py --workdir DIR [--step N | --best] [--split test|val] [--out DIR]

Restores the checkpoint (the best by validation accuracy unless --step is given) with the config
saved in the run directory and writes <out>/report.json (default <workdir>/eval/).
"""

import json
import os
from pathlib import Path

from absl import app, flags

_WORKDIR = flags.DEFINE_string("workdir", None, "run directory written by train.py")
_STEP = flags.DEFINE_integer("step", None, "checkpoint epoch to evaluate (default: the best)")
_BEST = flags.DEFINE_bool("best", True, "evaluate the best checkpoint by validation accuracy (ignored with --step)")
_SPLIT = flags.DEFINE_enum("split", "test", ["test", "val"], "which split to evaluate")
_OUT = flags.DEFINE_string("out", None, "output directory (default: <workdir>/eval)")
_CACHE = flags.DEFINE_string("compilation_cache", None, "persistent XLA cache dir ('' disables)")
flags.mark_flag_as_required("workdir")


def main(argv):
    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    from cifar_jax import cli

    cli.setup_logging()
    cli.enable_compilation_cache(_CACHE.value)
    from cifar_jax import data, evaluate

    try:
        run = evaluate.restore(_WORKDIR.value, _STEP.value if _STEP.value is not None else ("best" if _BEST.value else "latest"))
        splits = data.load_splits(run.config.data)
    except (evaluate.EvalError, data.DataError, ValueError) as e:
        cli.fail(str(e))
    images, labels = getattr(splits, _SPLIT.value)
    logits = evaluate.predict(run, images)
    report = {"split": _SPLIT.value, "step": run.epoch, **evaluate.metrics(logits, labels, run.config.label_smoothing)}
    out = Path(_OUT.value or Path(_WORKDIR.value) / "eval")
    out.mkdir(parents=True, exist_ok=True)
    tmp = out / "report.json.tmp"
    tmp.write_text(json.dumps(report, indent=2) + "\n")
    os.replace(tmp, out / "report.json")
    print(f"{run.config.model.name} epoch {run.epoch}, {_SPLIT.value} split ({report['n_examples']} images)")
    for key in ("top1_acc", "top5_acc", "loss", "ece"):
        print(f"  {key:<9} {report[key]:.4f}")
    print(f"report: {out / 'report.json'}")


if __name__ == "__main__":
    app.run(main)
