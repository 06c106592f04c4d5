"""The study at smoke scale: each kind of run trained, evaluated, recorded and reported."""

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from cifar_jax.study import report, runs
from tests.support.helpers import assert_fails_in_one_line

pytest.importorskip("torchvision")
pytest.importorskip("sklearn")  # the bundled digits


ROOT = Path(__file__).resolve().parents[1]


def _study(*args):
    return subprocess.run(
        [sys.executable, "-m", "cifar_jax.study", *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=1200,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )


@pytest.mark.slow
def test_smoke_study_trains_each_kind_of_run_records_each_run_and_a_rerun_skips_them(tmp_path):
    # Two cells hold every kind of run the study starts: part 1's simple_cnn a JAX population and a
    # PyTorch reference run, part 3's resnet50_ft a two-phase fine-tune from converted weights. The
    # other cells are of these kinds (a minute of CPU each): their smoke configs are resolved in the
    # plan test below.
    out = tmp_path / "study"
    args = ("--parts", "simple_cnn,3", "--scale", "smoke", "--seeds", "0", "--torch", "--out", str(out))
    first = _study(*args)
    assert first.returncode == 0, first.stdout[-3000:] + first.stderr[-3000:]
    records = {p.stem: json.loads(p.read_text()) for p in (out / "records").glob("*.json")}
    want = {"part1_simple_cnn_seed0", "part1_simple_cnn_seed0_torch", "part3_resnet50_ft_seed0"}
    assert set(records) == want
    for name, rec in records.items():
        beside = out / "records" / name
        assert rec["test_acc"] == json.loads((beside / "report.json").read_text())["top1_acc"]
        rows = [json.loads(line) for line in (beside / "metrics.jsonl").read_text().splitlines()]
        assert rec["epochs"] == len(rows) == 2 and rec["scale"] == "smoke"
        assert rec["commit"] and rec["versions"]["jax"] and rec["device"]["cpu"]
    assert any("random weights" in n for n in records["part3_resnet50_ft_seed0"]["notes"])
    text = (out / "report.md").read_text()
    for part in ("| 1 |", "| 3 |"):
        assert part in text
    assert report.BEGIN in text and "smoke scale" in text

    again = _study(*args)
    assert again.returncode == 0, again.stderr[-3000:]
    assert again.stdout.count("done (seeds 0)") == len(want)
    assert "seed 0: test top-1" not in again.stdout  # nothing trained or evaluated again
    assert (out / "report.md").read_text() == text
    shutil.rmtree(out / "runs")  # checkpoints of ResNets: hundreds of MB that pytest would keep


def test_the_budget_stops_the_run_in_progress_with_sigterm(tmp_path):
    # What train.py does on SIGTERM (saves; the rerun resumes bit-identical) is test_reliability's.
    # The child starts with SIGTERM blocked (a process inherits its signal mask): one sent before
    # its handler is in place waits for it, however slowly the machine starts Python.
    got = tmp_path / "got"
    child = f"""
import pathlib, signal, time
def stop(*_):
    pathlib.Path({str(got)!r}).write_text("SIGTERM")
    raise SystemExit(0)
signal.signal(signal.SIGTERM, stop)
signal.pthread_sigmask(signal.SIG_UNBLOCK, {{signal.SIGTERM}})
time.sleep(120)
"""
    previous = signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGTERM})
    try:
        with pytest.raises(runs.BudgetSpent, match=r"^the time budget ran out during -S -c"):
            runs._call([sys.executable, "-S", "-c", child], tmp_path / "log", deadline=time.monotonic() + 0.5)
    finally:
        signal.pthread_sigmask(signal.SIG_SETMASK, previous)
    assert got.read_text() == "SIGTERM"


def test_a_spent_budget_ends_the_study_after_the_stopped_run(tmp_path, capsys, monkeypatch):
    from cifar_jax.study.__main__ import main

    started = []

    def stopped(job, log):
        started.append((job.framework, job.deadline - time.monotonic()))
        raise runs.BudgetSpent("the time budget ran out during train.py --config=x")

    monkeypatch.setattr(runs, "run_jax", stopped)
    monkeypatch.setattr(runs, "run_torch", stopped)
    argv = "--parts simple_cnn --scale smoke --seeds 0 --torch --budget 3600 --out".split() + [str(tmp_path)]
    assert main(argv) == 0
    assert [framework for framework, _ in started] == ["jax"] and 0 < started[0][1] <= 3600
    out = capsys.readouterr().out
    assert "the time budget ran out during train.py --config=x: what it trained is saved; rerun" in out


def test_the_plan_resolves_every_cell_at_smoke_scale_and_runs_nothing(tmp_path, capsys):
    from cifar_jax.study import cells
    from cifar_jax.study.__main__ import main

    out = tmp_path / "s"
    argv = "--parts 1,2,3,recipes --scale smoke --seeds 0 --torch --plan --out".split() + [str(out)]
    assert main(argv) == 0
    lines = [line.split() for line in capsys.readouterr().out.splitlines()]
    for cell in cells.CELLS:  # each resolved, none missing anything (ResNet-50's weights: random ones)
        assert ["part", cell.part, cell.config, "jax", "to", "run:", "seeds", "0"] in [w[:8] for w in lines]
    assert not out.exists()


def test_a_cell_whose_config_breaks_a_rule_stops_the_study_in_one_line_before_anything_runs(
    tmp_path, capsys, monkeypatch
):
    from cifar_jax.study import runs
    from cifar_jax.study.__main__ import main

    monkeypatch.setattr(runs, "SMOKE", (*runs.SMOKE, "num_epochs=0"))
    out = tmp_path / "s"
    argv = "--parts 1,3 --scale smoke --seeds 0 --out".split() + [str(out)]
    assert_fails_in_one_line(main, argv, "configs/simple_cnn.py at smoke scale: config: num_epochs=0", capsys)
    assert not out.exists()


def test_study_arguments_that_are_wrong_fail_in_one_line_before_anything_runs(tmp_path, capsys):
    from cifar_jax.study.__main__ import main

    for args, says in (
        (("--parts", "4"), "choose from 1, 2, 3, recipes"),
        (("--seeds", "0,0"), "--seeds '0,0' must be distinct"),
        (("--scale", "smoke", "--data", "x.npz"), "--data is for --scale full"),
        (("--data", str(tmp_path / "missing.npz")), "no such file"),
    ):
        assert_fails_in_one_line(main, [*args, "--out", str(tmp_path / "s")], says, capsys)
        assert not (tmp_path / "s").exists()
    assert_fails_in_one_line(
        main,
        ["report", "--records", str(tmp_path / "none"), "--out", str(tmp_path / "R.md")],
        "not a directory of records",
        capsys,
    )
    # The command line's own path, once: status 2 and the one line, from `python -m cifar_jax.study`.
    got = _study("--parts", "4", "--out", str(tmp_path / "s"))
    assert got.returncode == 2 and got.stderr.startswith("error: ") and "choose from 1, 2, 3" in got.stderr
    assert len(got.stderr.strip().splitlines()) == 1 and not (tmp_path / "s").exists()
