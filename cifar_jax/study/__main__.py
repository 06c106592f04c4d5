"""python -m cifar_jax.study [--parts 1,2,3] [--seeds 0,1,2] [--scale full|smoke] [--out DIR]
[--data PATH] [--torch] [--plan];  python -m cifar_jax.study report --records DIR... --out FILE"""

from cifar_jax import interrupts

if __name__ == "__main__":  # a Ctrl-C during the imports below is acted on once they are done (cli.run)
    interrupts.defer()

import argparse  # noqa: E402
import shlex  # noqa: E402
import statistics  # noqa: E402
import sys  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

from cifar_jax import cli, population  # noqa: E402
from cifar_jax.study import cells, report, runs  # noqa: E402


def _log(message: str) -> None:
    print(f"{time.strftime('%H:%M:%S')} {message}", flush=True)


def parse_run(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cifar_jax.study", description=sys.modules["cifar_jax.study"].__doc__
    )
    p.add_argument(
        "--parts",
        default="1,2,3",
        help=f"comma-separated, of: {', '.join(cells.PARTS)}, or a cell's config (e.g. resnet50_ft)",
    )
    p.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds; ours train them as one population"
    )
    p.add_argument(
        "--scale",
        choices=("full", "smoke"),
        default="full",
        help="smoke: 256 of the bundled digits, 2 epochs",
    )
    p.add_argument("--out", help="where runs, records and report.md go (default: studies/<scale>)")
    p.add_argument(
        "--data", help="full scale: the CIFAR-100 .npz, or a TFDS data_dir (default: each config's)"
    )
    p.add_argument(
        "--torch", action="store_true", help="also the PyTorch reference, where it can train the config"
    )
    p.add_argument("--plan", action="store_true", help="print the plan and stop")
    p.add_argument(
        "--budget",
        type=float,
        help="seconds: then the run in progress is stopped (saved) and the study ends; rerun to go on",
    )
    return p.parse_args(argv)


def parse_report(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m cifar_jax.study report", description=report.__doc__)
    p.add_argument("--records", nargs="+", required=True, help="records directories (or a study's --out)")
    p.add_argument("--out", required=True, help="the file whose generated section is rewritten (RESULTS.md)")
    return p.parse_args(argv)


def this_device() -> str:
    """This machine's device as the records name it (report.device_label)."""
    from cifar_jax import provenance

    d = provenance.describe()
    return report.device_label({"device": d})


def estimate(job: runs.Job, earlier: list[dict], device: str) -> str:
    """Seconds for the job's pending seeds from earlier records of its config on this device."""
    same = [
        r
        for r in earlier
        if r["config"] == job.cell.config_file
        and r["framework"] == job.framework
        and r["scale"] == job.scale
        and report.device_label(r) == device
    ]
    if not same:
        return "no earlier record on this device"
    per_seed = statistics.median(r["train_wall_s"] / r.get("members", 1) + r.get("eval_s", 0) for r in same)
    return f"about {per_seed * len(job.pending()) / 60:.0f} min ({len(same)} earlier records)"


def plan(jobs: list[runs.Job], earlier: list[dict], device: str) -> list[str]:
    lines = []
    for job in jobs:
        pending = job.pending()
        what = f"part {job.cell.part:<3}{job.cell.config:<20}{job.framework:<6}"
        if job.missing:
            lines.append(f"  {what}missing {job.missing}")
        elif not pending:
            lines.append(f"  {what}done (seeds {', '.join(map(str, job.seeds))})")
        else:
            how = "one population" if job.framework == "jax" and len(pending) > 1 else "in turn"
            seeds = ", ".join(map(str, pending))
            lines.append(f"  {what}to run: seeds {seeds} ({how}); {estimate(job, earlier, device)}")
    return lines


def main_run(argv) -> int:
    args = parse_run(argv)
    try:
        chosen = cells.selected(args.parts)
    except ValueError as e:
        cli.fail(str(e))
    try:
        seeds = population.parse_seeds(args.seeds)
    except ValueError as e:
        cli.fail(f"--seeds {args.seeds!r} {e}")
    if args.scale == "smoke" and args.data:
        cli.fail("--data is for --scale full; the smoke scale trains on the bundled digits")
    out = Path(args.out or Path("studies") / args.scale).resolve()
    records = out / "records"
    try:
        jobs = runs.jobs(chosen, seeds, args.scale, out, args.data, args.torch)
    except ValueError as e:
        cli.fail(str(e))
    earlier = []
    for folder in (records, runs.ROOT / "results" / "records"):
        if folder.is_dir():
            earlier += report.load([folder])
    device = this_device()
    print(f"study: parts {args.parts}, {args.scale} scale, seeds {args.seeds}, in {out}, on {device}")
    print("\n".join(plan(jobs, earlier, device)), flush=True)
    if args.plan:
        return 0
    if args.budget is not None:
        deadline = time.monotonic() + args.budget
        for job in jobs:
            job.deadline = deadline
    failed = []
    for job in jobs:
        if job.missing or not job.pending():
            continue
        try:
            (runs.run_jax if job.framework == "jax" else runs.run_torch)(job, _log)
        except runs.BudgetSpent as e:
            _log(f"{e}: what it trained is saved; rerun the same command to go on")
            break
        except (RuntimeError, OSError) as e:
            failed.append(f"part {job.cell.part} {job.cell.config} ({job.framework}): {e}")
            _log(f"FAILED {failed[-1]}")
    if records.is_dir() and any(records.glob("*.json")):
        command = f"python -m cifar_jax.study report --records {shlex.quote(str(records))} --out report.md"
        report.write(report.load([records]), out / "report.md", command)
        print((out / "report.md").read_text())
        print(f"written: {out / 'report.md'}; records in {records}")
    missing = [j for j in jobs if j.missing]
    for job in missing:
        print(f"not run: part {job.cell.part} {job.cell.config}: missing {job.missing}")
    for line in failed:
        print(f"error: {line}", file=sys.stderr)
    return 1 if failed else 0


def main_report(argv) -> int:
    args = parse_report(argv)
    out = Path(args.out)
    command = f"python -m cifar_jax.study report --records {' '.join(args.records)} --out {args.out}"
    try:
        report.write(report.load(args.records), out, command)
    except ValueError as e:
        cli.fail(str(e))
    print(f"written: {out}")
    return 0


def main(argv) -> int:
    if argv and argv[0] == "report":
        return main_report(argv[1:])
    return main_run(argv)


if __name__ == "__main__":
    cli.run(main, "during the study", absl_flags=False)
