"""Evaluate a training run:

    python eval.py --workdir DIR [--member K] [--step best|latest|N] [--split test|val] [--out DIR]
                   [--tta] [--ema] [--ood_dir DIR] [--corruptions [--corruption_limit N]]

Restores the checkpoint (the best by validation accuracy unless --step says otherwise) with the
config saved in the run directory. Writes to <out> (default <workdir>/eval/): report.json,
per_class.csv, confusion.png, reliability.png; with --ood_dir, submission_ood.csv; with
--corruptions, corruptions.png and the accuracy per corruption and severity in report.json.
"""

from cifar_jax import interrupts

if __name__ == "__main__":  # a Ctrl-C during the imports below is acted on once they are done (cli.run)
    interrupts.defer()

import argparse
import shutil
from pathlib import Path

from cifar_jax import cli, data, errors, eval_report, evaluate, population, staging


def parse_args(argv) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python eval.py", description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", required=True, help="run directory written by train.py")
    parser.add_argument(
        "--member", type=int, help="a population's member K: evaluates <workdir>/member_K (population.md)"
    )
    parser.add_argument("--step", type=cli.checkpoint_step, default="best", help=cli.STEP_HELP)
    parser.add_argument("--split", choices=("test", "val"), default="test", help="which split to evaluate")
    parser.add_argument("--out", help="output directory (default: <workdir>/eval)")
    parser.add_argument(
        "--tta", action="store_true", help="average predictions over the image and its horizontal mirror"
    )
    parser.add_argument(
        "--ema", action="store_true", help="the weight average kept in training (config ema_decay > 0)"
    )
    parser.add_argument("--ood_dir", help="directory of distortionNN.npy files -> submission_ood.csv")
    parser.add_argument(
        "--corruptions",
        action="store_true",
        help="accuracy under the built-in corruption suite (severities 1..5)",
    )
    parser.add_argument(
        "--corruption_limit",
        type=int,
        default=0,
        help="use N test images for --corruptions, a fixed random subset (0: all)",
    )
    parser.add_argument("--compilation_cache", help="persistent XLA cache dir ('' disables)")
    return parser.parse_args(argv)


def main(argv=None) -> int:
    args = parse_args(argv)
    cli.start(args.compilation_cache)
    try:
        args.workdir = str(population.member_workdir(args.workdir, args.member))
    except ValueError as e:
        cli.fail(str(e))

    opts = eval_report.Options(
        args.workdir,
        args.step,
        args.split,
        args.tta,
        args.ema,
        args.ood_dir,
        args.corruptions,
        args.corruption_limit,
    )
    out = Path(args.out or Path(args.workdir) / "eval").absolute()
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
    return 0


if __name__ == "__main__":
    cli.run(main, "before eval.py finished: its outputs are written whole or not at all", absl_flags=False)
