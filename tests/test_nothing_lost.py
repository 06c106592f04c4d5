"""Stops and failures at the worst moments: every checkpoint whose metrics row was written stays,
the workdir and its config.json are never destroyed, and the run says what really remains."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cifar_jax import config as config_lib
from cifar_jax import evaluate, staging, trainer
from cifar_jax.checkpoint import Checkpoints
from cifar_jax.data import pipeline
from tests.support.helpers import ROOT, assert_fails_in_one_line, tiny_config


def _train(workdir, *flags, env=None, file_size_kb=None, script="train.py"):
    """train.py (or a probe that runs it) on tests/support/tiny_config.py; with `file_size_kb`, under that
    limit of the size of any file it writes (a write past it fails with EFBIG, as on a full disk)."""
    cmd = [
        sys.executable,
        os.path.join(ROOT, "tests", "support", script) if script != "train.py" else "train.py",
        "--config",
        "tests/support/tiny_config.py",
        f"--workdir={workdir}",
        "--progress=false",
        *flags,
    ]
    if file_size_kb is not None:  # SIGXFSZ ignored: the write fails instead of killing the process
        cmd = ["bash", "-c", f"trap '' XFSZ; ulimit -f {file_size_kb}; exec \"$@\"", "bash", *cmd]
    return subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **(env or {})),
    )


def _rows(workdir):
    return [json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines()]


@pytest.mark.slow
@pytest.mark.parametrize("moment", ["row:2", "final_wait"])
def test_a_sigterm_after_the_last_row_waits_for_the_last_checkpoint(tmp_path, moment):
    """The signal lands as the last epoch's row is written, or while the trainer waits for that
    epoch's background checkpoint: the run completes it and ends as a finished run."""
    out = _train(tmp_path, "--config.num_epochs=2", script="stop_probe.py", env={"PROBE_SIGNAL_AT": moment})
    assert out.returncode == 0, out.stderr[-2000:]
    assert "SIGTERM arrived after the last epoch: its checkpoint was written first" in out.stderr
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == [
        "1",
        "2",
    ]  # no temporary directory left
    assert evaluate.restore(tmp_path, "latest").epoch == 2
    assert [r["epoch"] for r in _rows(tmp_path)] == [1, 2]


@pytest.mark.slow
def test_a_background_checkpoint_write_that_fails_stops_the_run_at_once(tmp_path):
    """The OS refuses the arrays of epoch 1's checkpoint (files over 2 MB, as on a full disk), in
    Orbax's background write: the run stops in epoch 2 with one line, logs no epoch twice, says
    that no checkpoint remains, and leaves no temporary directory taking the space."""
    # Epochs of 196 steps: epoch 1's background write fails long before epoch 2's last chunk is read.
    long_epochs = "--config.data.fake.num_train=3200"
    out = _train(tmp_path, "--config.num_epochs=3", long_epochs, file_size_kb=2000)
    assert out.returncode == 2, out.stderr[-2000:]
    last = out.stderr.strip().splitlines()[-1]
    assert last == (
        f"error: could not write a checkpoint in {tmp_path / 'checkpoints'} (File too large); no checkpoint "
        f"remains there. Raise the file size limit (ulimit -f) and rerun to resume"
    ), out.stderr[-2000:]
    assert "Traceback" not in out.stderr and "epoch 2/3" not in out.stderr
    assert [r["epoch"] for r in _rows(tmp_path)] == [1]
    assert list((tmp_path / "checkpoints").iterdir()) == []
    # With the space back, a run in the same workdir trains from the start (the failed one saved
    # nothing, so it does not bind the workdir to its config: a shorter run will do).
    assert _train(tmp_path, "--config.num_epochs=1").returncode == 0
    assert Checkpoints(tmp_path, read_only=True).epochs() == [1]


# ------------------------------------------------------------------ config.json and changed keys


def _train_in_process(workdir, **overrides):
    return trainer.train_and_evaluate(tiny_config(**overrides), workdir, progress=False)


@pytest.fixture(scope="module")
def two_epochs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("two")
    _train_in_process(workdir, num_epochs=2)
    return workdir


@pytest.mark.parametrize("key,value", [("optimizer.name", "sgd"), ("ema_decay", 0.9), ("optimizer.lr", 0.1)])
def test_a_refused_change_on_resume_touches_nothing_in_the_workdir(two_epochs, tmp_path, key, value):
    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    before = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    with pytest.raises(
        ValueError,
        match=rf"holds a run trained with other settings \({re.escape(key)}=.* there, "
        rf"{re.escape(repr(value))} now\).*rerun with the settings in .*config.json",
    ):
        _train_in_process(workdir, num_epochs=3, **{key: value})
    after = {p.relative_to(workdir): p.read_bytes() for p in workdir.rglob("*") if p.is_file()}
    assert after == before


@pytest.mark.slow
def test_extending_num_epochs_is_said_recorded_and_follows_the_new_schedule(tmp_path, caplog):
    workdir = tmp_path / "run"
    cosine = {"schedule.name": "cosine"}  # its length is num_epochs: extending the run changes it
    first = _train_in_process(workdir, num_epochs=2, **cosine)
    with caplog.at_level("INFO", logger="cifar_jax"):
        rows = _train_in_process(workdir, num_epochs=4, **cosine)
    straight = _train_in_process(tmp_path / "straight", num_epochs=4, **cosine)
    # Epochs 1-2 ran under the 2-epoch cosine; 3-4 follow the 4-epoch one, as a straight 4-epoch run does.
    assert [r["lr"] for r in rows] == [r["lr"] for r in first] + [r["lr"] for r in straight[2:]]
    effect = (
        "num_epochs 2 -> 4: the cosine schedule now spans 4 epochs; epoch 3 trains at lr "
        f"{straight[2]['lr']:.3g} "
        f"(epoch 2 trained at lr {rows[1]['lr']:.3g})"
    )
    assert f"resumed with changed settings from epoch 3: {effect}" in caplog.text
    assert json.loads((workdir / "config.json").read_text())["num_epochs"] == 4
    (record,) = config_lib.read_history(workdir)
    assert (record["from_epoch"], record["from_step"], record["changed"], record["effect"]) == (
        3,
        0,
        {"num_epochs": [2, 4]},
        effect,
    )
    out = subprocess.run(
        [sys.executable, "eval.py", f"--workdir={workdir}", f"--out={tmp_path / 'eval'}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 0, out.stderr[-2000:]
    assert f"resumed from epoch 3 with changed settings: {effect}" in out.stdout
    assert json.loads((tmp_path / "eval" / "report.json").read_text())["config_changes"] == [record]


def test_fewer_epochs_than_trained_are_refused(two_epochs):
    with pytest.raises(
        ValueError, match=r"num_epochs=1 but workdir .* already holds 2 trained epochs; use num_epochs >= 2"
    ):
        trainer.train_and_evaluate(tiny_config(num_epochs=1), two_epochs, progress=False)


def test_how_a_run_is_kept_may_change_on_resume_and_is_recorded(two_epochs, tmp_path):
    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    _train_in_process(workdir, num_epochs=2, **{"checkpoint.keep": 1})
    (record,) = config_lib.read_history(workdir)
    assert (
        record["changed"] == {"checkpoint.keep": [3, 1]}
        and "what is computed stays the same" in record["effect"]
    )


@pytest.mark.parametrize(
    "content,message",
    [
        (
            b"{}",
            "lacks model.name, model.num_classes, data.source, num_epochs: it is not a config.json that "
            "train.py wrote",
        ),
        (
            b'{"model": {"name": "simple_cnn",\n',
            "is not valid JSON (Expecting property name enclosed in double quotes, line 2",
        ),
        (b'{"model": "\xff"}', "is not UTF-8 text (byte 11)"),
        (b"[1, 2]", "holds a JSON list, not an object"),
    ],
)
def test_a_damaged_config_json_is_one_line_that_names_it(two_epochs, tmp_path, content, message):
    workdir = tmp_path / "run"
    shutil.copytree(two_epochs, workdir)
    (workdir / "config.json").write_bytes(content)
    with pytest.raises(ValueError, match=re.escape(f"{workdir / 'config.json'} {message}")):
        trainer.train_and_evaluate(tiny_config(num_epochs=2), workdir, progress=False)
    with pytest.raises(evaluate.EvalError, match=re.escape(f"{workdir / 'config.json'} {message}")):
        evaluate.restore(workdir)


# ------------------------------------------------------------------ eval.py beside other processes


@pytest.fixture(scope="module")
def three_kept(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("three")
    _train_in_process(workdir, num_epochs=3, **{"checkpoint.keep": 3})
    return workdir


def _deleted_on_first_read(monkeypatch):
    """Checkpoints.restore as a train.py with a small checkpoint.keep meets it: the first checkpoint
    read is deleted under it."""
    real, deleted = Checkpoints.restore, []

    def restore(self, epoch, template):
        if not deleted:
            shutil.rmtree(self.directory / str(epoch))
            deleted.append(epoch)
        return real(self, epoch, template)

    monkeypatch.setattr(Checkpoints, "restore", restore)
    return deleted


@pytest.mark.parametrize("which", ["best", "latest"])
def test_eval_chooses_again_when_a_running_train_deletes_its_checkpoint(
    three_kept, tmp_path, monkeypatch, caplog, which
):
    workdir = tmp_path / "run"
    shutil.copytree(three_kept, workdir)
    ckpts = Checkpoints(workdir, read_only=True)
    first, second, _ = ckpts.by_preference(which)
    ckpts.close()
    deleted = _deleted_on_first_read(monkeypatch)
    with caplog.at_level("WARNING", logger="cifar_jax"):
        assert evaluate.restore(workdir, which).epoch == second
    assert deleted == [first]
    assert f"checkpoint of epoch {first} was deleted while eval.py read it" in caplog.text
    assert "config.json" not in caplog.text


def test_eval_of_a_named_checkpoint_deleted_while_read_says_so(three_kept, tmp_path, monkeypatch):
    workdir = tmp_path / "run"
    shutil.copytree(three_kept, workdir)
    _deleted_on_first_read(monkeypatch)
    with pytest.raises(
        evaluate.EvalError,
        match=r"checkpoint of epoch 2 .* was deleted while eval.py read it .*pass another --step",
    ):
        evaluate.restore(workdir, 2)


def test_concurrent_writers_of_one_out_keep_each_others_staging(tmp_path):
    """A second eval.py (or convert) with the same --out leaves a live writer's staging directory
    alone, removes a dead one's, and each publish replaces the target whole."""
    out = tmp_path / "eval"
    dead = subprocess.Popen(["true"])
    dead.wait()
    live = tmp_path / f".eval.partial-{os.getppid()}"
    live.mkdir()
    (live / "report.json").write_text("theirs")
    (tmp_path / f".eval.partial-{dead.pid}").mkdir()
    mine = evaluate.staging_dir(out)  # what eval.py makes before it writes
    (mine / "report.json").write_text("mine")
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([live.name, mine.name])
    staging.publish(mine, out)
    staging.publish(live, out)  # the other writer finishes last: its outputs replace these whole
    assert (out / "report.json").read_text() == "theirs"
    assert [p.name for p in tmp_path.iterdir()] == ["eval"]


@pytest.mark.slow
def test_eval_of_data_without_test_images_says_so(tmp_path, capsys):
    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        x_train=rng.integers(0, 256, (40, 32, 32, 3), dtype=np.uint8),
        y_train=np.arange(40) % 5,
        x_test=np.zeros((0, 32, 32, 3), np.uint8),
        y_test=np.zeros((0,), np.int64),
    )
    _train_in_process(
        tmp_path / "run", num_epochs=1, **{"data.source": "npz", "data.path": str(tmp_path / "d.npz")}
    )
    import eval as eval_cli

    capsys.readouterr()  # what training printed
    message = (
        f"the run's data (data.source='npz' {tmp_path / 'd.npz'}) has no test "
        f"images; evaluate --split val, or add x_test/y_test to the data"
    )
    assert_fails_in_one_line(eval_cli.main, [f"--workdir={tmp_path / 'run'}"], message, capsys)


# ------------------------------------------------------------------ one line, naming the file


def _limited(cmd, file_size_kb):
    """`cmd` under a limit of the size of any file it writes (SIGXFSZ ignored: the write fails with EFBIG)."""
    return subprocess.run(
        ["bash", "-c", f"trap '' XFSZ; ulimit -f {file_size_kb}; exec \"$@\"", "bash", *cmd],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=300,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )


def test_a_workdir_that_cannot_be_written_at_start_up_is_one_line(tmp_path):
    out = _limited(
        [sys.executable, "train.py", "--config", "tests/support/tiny_config.py", f"--workdir={tmp_path}"], 0
    )
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        f"error: cannot write the workdir's lock {tmp_path / '.lock'} (File too large); raise the file size "
        "limit (ulimit -f)"
    ]


def test_eval_outputs_that_cannot_be_written_are_one_line_and_leave_nothing(two_epochs, tmp_path):
    out = _limited([sys.executable, "eval.py", f"--workdir={two_epochs}", f"--out={tmp_path / 'eval'}"], 0)
    assert out.returncode == 2, out.stderr[-2000:]
    assert out.stderr.strip().splitlines()[-1] == (
        f"error: cannot write the outputs to --out {tmp_path / 'eval'} (File too large); "
        f"raise the file size limit (ulimit -f)"
    )
    assert "Traceback" not in out.stderr
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "data.augment.crop_padding",
            -2,
            "config: data.augment.crop_padding=-2 must be an integer in [0, data.image_size=32)",
        ),
        (
            "data.augment.color_jitter",
            (0.4, 0.4),
            "config: data.augment.color_jitter=(0.4, 0.4) must be 3 numbers >= 0",
        ),
        ("num_epochs", 10**12, "config: num_epochs=1000000000000 is past any schedule; use at most 100,000"),
        ("early_stop.patience", -1, "config: early_stop.patience=-1 must be an integer >= 0 (0 = off)"),
        ("optimizer.clip_norm", -1.0, "config: optimizer.clip_norm=-1.0 must be >= 0 (0 = no clipping)"),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key_and_the_workdir_is_not_made(tmp_path, key, value, message):
    # train.py prints this error as `error: <message>`, status 2 (the subprocess test below).
    with pytest.raises(ValueError) as e:
        trainer.train_and_evaluate(tiny_config(**{key: value}), tmp_path / "run", progress=False)
    assert str(e.value).startswith(message) and "\n" not in str(e.value), str(e.value)
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize(
    "override,message",
    [
        (
            "--config.data.augment.color_jitter=(0.4,0.4)",
            "config: data.augment.color_jitter=(0.4, 0.4) must be 3 numbers >= 0",
        ),
        (
            "--config=configs/nope.py",
            "the --config file does not load ([Errno 2] No such file or directory: 'configs/nope.py')",
        ),
    ],
)
def test_a_bad_value_is_one_line_naming_the_key_or_file(tmp_path, override, message):
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "tests/support/tiny_config.py",
            override,
            f"--workdir={tmp_path / 'run'}",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
    )
    assert out.returncode == 2
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: {message}"), line
    assert not (tmp_path / "run").exists()


def test_an_eval_batch_larger_than_the_split_is_one_batch_of_the_split():
    """eval_batch_size=2,000,000 ran out of memory after a whole epoch: a batch is never larger than
    the split it evaluates (padded to the devices), which is all of it in one batch."""
    assert pipeline.eval_batch_size(2_000_000, 10_000, 8) == 10_000
    assert pipeline.eval_batch_size(2_000_000, 13, 8) == 16
    assert pipeline.eval_batch_size(500, 10_000, 8) == 500
    assert pipeline.eval_batch_size(500, 0, 8) == 8


def test_a_pretrained_meta_json_that_lacks_arch_is_one_line(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "meta.json").write_text('{"num_classes": 1000, "stem": "imagenet"}')
    config = tiny_config(**{"model.name": "resnet18", "model.pretrained": str(weights)})
    with pytest.raises(
        ValueError, match=re.escape(f"config: model.pretrained: {weights / 'meta.json'} lacks arch; convert")
    ):
        trainer.train_and_evaluate(config, tmp_path / "run", progress=False)
    (weights / "meta.json").write_text('{"arch": "resnet18",\n')
    with pytest.raises(
        ValueError, match=re.escape(f"{weights / 'meta.json'} is not valid JSON (Expecting property name")
    ):
        trainer.train_and_evaluate(config, tmp_path / "run", progress=False)
