"""Train one config here and in its PyTorch twin (`bench.reference`), N seeds each, and compare:

    python -m cifar_jax.bench.compare --config configs/simple_cnn.py --seeds 0,1,2 \\
        --set data.source=npz --set data.path=../shared/data/cifar100/cifar100.npz \\
        [--frameworks jax,torch,torch-dataloader] [--out results/compare/simple_cnn]

Runs go in turn (seed 0 in every framework, then seed 1, ...), each a fresh process timed from
its start to its test accuracy: `train.py` then `eval.py --step <last epoch>` here (the persistent
compilation cache off, so every run compiles), the reference loop there (`torch`: augmentation on
batched tensors; `torch-dataloader`: the study's DataLoader loop). A run whose `run.json` exists
is not run again, so an interrupted comparison resumes. Writes to --out: comparison.md (per-epoch
validation and final test accuracy as mean +- sd, the gap and whether it exceeds two standard
errors, the wall time to the final accuracy), comparison.json, and curves.png (each framework's
mean +- sd band per epoch).
"""

from __future__ import annotations

from cifar_jax import interrupts

if __name__ == "__main__":  # a Ctrl-C during the imports below is acted on once they are done (cli.run)
    interrupts.defer()

import argparse
import ast
import importlib.util
import json
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

FRAMEWORKS = ("jax", "torch", "torch-dataloader")
ROOT = Path(__file__).resolve().parents[2]  # train.py and eval.py live there


def commands(
    framework: str, config_file: str, sets: list[str], seed: int, workdir: Path, num_epochs: int, workers: int
) -> list[list[str]]:
    """The processes of one run, in order."""
    overrides = [f"--config.{s}" for s in sets] + [f"--config.seed={seed}"]
    py = sys.executable
    if framework == "jax":
        return [
            [
                py,
                str(ROOT / "train.py"),
                f"--config={config_file}",
                *overrides,
                f"--workdir={workdir}",
                "--compilation_cache=",
                "--noprogress",
            ],
            [
                py,
                str(ROOT / "eval.py"),
                f"--workdir={workdir}",
                f"--step={num_epochs}",
                f"--out={workdir / 'eval'}",
                "--compilation_cache=",
            ],
        ]
    path = "dataloader" if framework == "torch-dataloader" else "fast"
    return [
        [
            py,
            "-m",
            "cifar_jax.bench.reference",
            f"--config={config_file}",
            *overrides,
            f"--workdir={workdir}",
            f"--input={path}",
            f"--workers={workers}",
        ]
    ]


def run_one(framework: str, seed: int, workdir: Path, cmds: list[list[str]], log) -> dict:
    """Run (or reuse) one run: {framework, seed, wall_s, test_acc, rows}."""
    done = workdir / "run.json"
    if done.exists():
        log(f"{framework} seed {seed}: done before ({done})")
        return json.loads(done.read_text())
    workdir.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with open(workdir / "output.log", "w") as out:
        for cmd in cmds:
            log(f"{framework} seed {seed}: {' '.join(cmd[1:])}")
            if subprocess.run(cmd, cwd=ROOT, stdout=out, stderr=subprocess.STDOUT).returncode:
                raise SystemExit(f"error: {framework} seed {seed} failed; see {workdir / 'output.log'}")
    wall = time.perf_counter() - t0
    report = json.loads((workdir / ("eval/report.json" if framework == "jax" else "report.json")).read_text())
    rows = [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines() if line.strip()]
    result = {
        "framework": framework,
        "seed": seed,
        "wall_s": round(wall, 1),
        "test_acc": report["top1_acc"],
        "rows": rows,
    }
    done.write_text(json.dumps(result) + "\n")
    log(f"{framework} seed {seed}: test top-1 {result['test_acc']:.4f}, {wall:.0f} s")
    return result


def mean_sd(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else float("nan"))


def gap(a: list[float], b: list[float]) -> dict:
    """b's mean minus a's, its standard error (Welch), and whether it exceeds two of them."""
    (ma, sa), (mb, sb) = mean_sd(a), mean_sd(b)
    se = math.sqrt(sa**2 / len(a) + sb**2 / len(b)) if len(a) > 1 and len(b) > 1 else float("nan")
    return {
        "difference": mb - ma,
        "standard_error": se,
        "beyond_two_se": bool(abs(mb - ma) > 2 * se) if se == se else None,
    }


def summarize(results: list[dict]) -> dict:
    """Per framework: test accuracy, each epoch's validation (or training) accuracy, wall time."""
    out = {}
    for fw in dict.fromkeys(r["framework"] for r in results):
        runs = [r for r in results if r["framework"] == fw]
        key = "val_acc" if runs[0]["rows"][0]["val_acc"] is not None else "train_acc"
        epochs = [[row[key] for row in r["rows"]] for r in runs]
        out[fw] = {
            "seeds": [r["seed"] for r in runs],
            "test_acc": [r["test_acc"] for r in runs],
            "wall_s": [r["wall_s"] for r in runs],
            "curve_key": key,
            "curve": [mean_sd(list(values)) for values in zip(*epochs)],
        }
    return out


def _pm(values: list[float], digits: int = 4) -> str:
    m, s = mean_sd(values)
    return f"{m:.{digits}f}" if s != s else f"{m:.{digits}f} ± {s:.{digits}f}"


def markdown(config_file: str, sets: list[str], summary: dict) -> str:
    names = list(summary)
    lines = [
        f"# `{config_file}`" + (f" with {', '.join(sets)}" if sets else ""),
        "",
        "| | " + " | ".join(names) + " |",
        "| --- |" + " --- |" * len(names),
        "| seeds | " + " | ".join(", ".join(map(str, summary[n]["seeds"])) for n in names) + " |",
        "| test top-1, mean ± sd | " + " | ".join(_pm(summary[n]["test_acc"]) for n in names) + " |",
        "| test top-1, each seed | "
        + " | ".join(", ".join(f"{a:.4f}" for a in summary[n]["test_acc"]) for n in names)
        + " |",
        "| wall time to it, median (each) | "
        + " | ".join(
            f"{statistics.median(summary[n]['wall_s']):.0f} s "
            f"({', '.join(f'{w:.0f}' for w in summary[n]['wall_s'])})"
            for n in names
        )
        + " |",
    ]
    key = summary[names[0]]["curve_key"]
    for e in range(min(len(summary[n]["curve"]) for n in names)):
        cells = [
            f"{summary[n]['curve'][e][0]:.4f}"
            + (
                ""
                if summary[n]["curve"][e][1] != summary[n]["curve"][e][1]
                else f" ± {summary[n]['curve'][e][1]:.4f}"
            )
            for n in names
        ]
        lines.append(f"| epoch {e + 1} {key} | " + " | ".join(cells) + " |")
    lines.append("")
    for other in names[1:]:
        g = gap(summary[names[0]]["test_acc"], summary[other]["test_acc"])
        verdict = (
            "not measurable (one seed)"
            if g["beyond_two_se"] is None
            else "beyond two standard errors"
            if g["beyond_two_se"]
            else "within two standard errors: seed noise"
        )
        lines.append(
            f"- {other} minus {names[0]}, test top-1: {g['difference']:+.4f} (standard error "
            f"{g['standard_error']:.4f}): "
            f"{verdict}"
        )
    return "\n".join(lines) + "\n"


def plot(summary: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for fw, s in summary.items():
        epochs = range(1, len(s["curve"]) + 1)
        means = [m for m, _ in s["curve"]]
        sds = [0.0 if sd != sd else sd for _, sd in s["curve"]]
        ax.plot(epochs, means, marker="o", label=f"{fw} ({len(s['seeds'])} seeds)")
        ax.fill_between(
            epochs, [m - d for m, d in zip(means, sds)], [m + d for m, d in zip(means, sds)], alpha=0.25
        )
    ax.set_xlabel("epoch")
    ax.xaxis.get_major_locator().set_params(integer=True)
    ax.set_ylabel(next(iter(summary.values()))["curve_key"] + " (mean ± sd)")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def load_config(config_file: str, sets: list[str]):
    """The config file's ConfigDict with the KEY=VALUE overrides applied (what the runs receive as
    --config.KEY=VALUE; values read as Python literals, else strings)."""
    from cifar_jax import config as config_lib

    path = Path(config_file)
    if not path.is_file():
        raise ValueError(f"--config {config_file} is not a file; pass a config such as configs/simple_cnn.py")
    sys.path.insert(0, str(ROOT))  # configs import each other as `configs.NAME`
    spec = importlib.util.spec_from_file_location(path.stem, path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for item in sets:
        key, sep, text = item.partition("=")
        if not sep:
            raise ValueError(f"--set {item!r} is not KEY=VALUE, e.g. --set data.source=npz")
        try:
            value = ast.literal_eval(text)
        except (ValueError, SyntaxError):
            value = text
        try:
            config_lib.set_key(config, key, value)
        except KeyError:
            raise ValueError(f"--set {item!r}: the config has no key {key!r}") from None
    return config


def compare(
    config_file: str,
    sets: list[str],
    seeds: list[int],
    frameworks: list[str],
    out: Path,
    workers: int,
    log=print,
) -> dict:
    from cifar_jax.bench.reference import unsupported

    config = load_config(config_file, sets)
    reason = unsupported(config) if any(f != "jax" for f in frameworks) else None
    if reason:
        raise ValueError(f"the PyTorch reference does not train {reason}")
    results = []
    for seed in seeds:  # in turn: a slower spell of the machine falls on every framework alike
        for fw in frameworks:
            cmds = commands(fw, config_file, sets, seed, out / fw / f"seed{seed}", config.num_epochs, workers)
            results.append(run_one(fw, seed, out / fw / f"seed{seed}", cmds, log))
    summary = summarize(results)
    out.mkdir(parents=True, exist_ok=True)
    (out / "comparison.json").write_text(
        json.dumps({"config": config_file, "set": sets, "summary": summary}, indent=2) + "\n"
    )
    (out / "comparison.md").write_text(markdown(config_file, sets, summary))
    plot(summary, out / "curves.png")
    return summary


def parse_args(argv) -> argparse.Namespace:
    p = argparse.ArgumentParser(
        prog="python -m cifar_jax.bench.compare", description=__doc__.split("\n\n")[0]
    )
    p.add_argument("--config", required=True, help="configs/NAME.py")
    p.add_argument(
        "--set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a --config.KEY=VALUE override for every run (repeat)",
    )
    p.add_argument(
        "--seeds", default="0,1,2", help="comma-separated seeds (config.seed), each run in every framework"
    )
    p.add_argument("--frameworks", default="jax,torch", help=f"comma-separated, of: {', '.join(FRAMEWORKS)}")
    p.add_argument("--out", help="output directory (default results/compare/<config name>)")
    p.add_argument(
        "--workers", type=int, default=os.cpu_count() or 1, help="DataLoader workers of torch-dataloader runs"
    )
    return p.parse_args(argv)


def main(argv=None) -> int:
    from cifar_jax import cli

    args = parse_args(argv)
    frameworks = args.frameworks.split(",")
    unknown = [fw for fw in frameworks if fw not in FRAMEWORKS]
    if unknown:
        cli.fail(f"--frameworks: {', '.join(unknown)} unknown; choose from {', '.join(FRAMEWORKS)}")
    try:
        seeds = [int(s) for s in args.seeds.split(",")]
    except ValueError:
        cli.fail(f"--seeds {args.seeds!r} is not comma-separated integers, like 0,1,2")
    out = Path(args.out or Path("results/compare") / Path(args.config).stem)
    try:
        compare(
            args.config,
            args.set,
            seeds,
            frameworks,
            out,
            args.workers,
            log=lambda m: print(f"{time.strftime('%H:%M:%S')} {m}", flush=True),
        )
    except ValueError as e:
        cli.fail(str(e))
    print((out / "comparison.md").read_text())
    print(f"written: {out / 'comparison.md'}, {out / 'comparison.json'}, {out / 'curves.png'}")
    return 0


if __name__ == "__main__":
    from cifar_jax import cli

    cli.run(main, "during the comparison: finished runs are kept, a rerun resumes", absl_flags=False)
