"""Interrupted runs, damaged checkpoints, bad numbers: nothing saved is lost, and a rerun resumes."""

import importlib.util
import json
import os
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cifar_jax import evaluate, trainer
from cifar_jax.checkpoint import Checkpoints
from cifar_jax.data import pipeline
from cifar_jax.runguard import WorkdirLock
from tests.helpers import checkpoint_arrays, tiny_config, without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_file_config():
    spec = importlib.util.spec_from_file_location("tiny_config", os.path.join(ROOT, "tests", "tiny_config.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _start(workdir):
    cmd = [sys.executable, "train.py", "--config", "tests/tiny_config.py", f"--workdir={workdir}"]
    return subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
                            env=dict(os.environ, JAX_PLATFORMS="cpu"))


def _wait_for_rows(workdir, n, proc, timeout=180):
    deadline = time.time() + timeout
    path = workdir / "metrics.jsonl"
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) >= n:
            return
        if proc.poll() is not None:
            raise AssertionError(f"train.py ended early: {proc.stderr.read()[-2000:]}")
        time.sleep(0.05)
    raise AssertionError("timed out waiting for training to progress")


def _rows(workdir):
    return without_timing(json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines())


@pytest.fixture(scope="module")
def straight_run(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("straight")
    trainer.train_and_evaluate(_tiny_file_config(), workdir, progress=False)
    return workdir


def _assert_same_run(a, b):
    assert _rows(a) == _rows(b)
    for x, y in zip(checkpoint_arrays(a), checkpoint_arrays(b)):
        np.testing.assert_array_equal(x, y)


def test_sigterm_saves_mid_epoch_and_the_rerun_is_bit_identical(straight_run, tmp_path):
    workdir = tmp_path / "run"
    proc = _start(workdir)
    _wait_for_rows(workdir, 1, proc)
    time.sleep(1.2)  # inside epoch 2 (196 steps, 2.6 s on 2 cores), past the checkpoint of epoch 1
    proc.send_signal(signal.SIGTERM)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM at epoch 2, step" in err and "rerun the same command to resume" in err
    assert (workdir / "interrupted").is_dir()
    trainer.train_and_evaluate(_tiny_file_config(), workdir, progress=False)
    assert not (workdir / "interrupted").exists()
    _assert_same_run(workdir, straight_run)


def test_kill_9_resumes_from_the_last_complete_checkpoint(straight_run, tmp_path):
    """Also the training issue's resume check: 2 epochs, a stop, 2 more == 4 straight, bit for bit."""
    workdir = tmp_path / "run"
    proc = _start(workdir)
    _wait_for_rows(workdir, 2, proc)
    proc.kill()
    proc.communicate(timeout=60)
    # A checkpoint write cut short leaves only Orbax's temporary directory: it must never restore.
    (workdir / "checkpoints" / "3.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    trainer.train_and_evaluate(_tiny_file_config(), workdir, progress=False)
    _assert_same_run(workdir, straight_run)


def test_truncated_latest_checkpoint_is_reported_and_the_previous_one_used(straight_run, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(straight_run, workdir)
    for epoch in (3, 4):
        shutil.rmtree(workdir / "checkpoints" / str(epoch))
    state_dir = workdir / "checkpoints" / "2" / "arrays"
    for f in (p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 1000):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with caplog.at_level("WARNING", logger="cifar_jax"):
        trainer.train_and_evaluate(_tiny_file_config(), workdir, progress=False)
    assert "checkpoint of epoch 2 does not restore" in caplog.text
    assert list((workdir / "corrupt_checkpoints").iterdir())
    _assert_same_run(workdir, straight_run)  # epochs 2 to 4 retrained from epoch 1


def test_nan_loss_stops_within_the_epoch_and_keeps_good_checkpoints(tmp_path):
    trainer.train_and_evaluate(tiny_config(num_epochs=1), tmp_path, progress=False)
    bad = tiny_config(num_epochs=2, **{"optimizer.lr": 1e30, "schedule.name": "constant"})
    with pytest.raises(trainer.TrainingError, match=r"loss became NaN/Inf in epoch 2, steps \d-\d of 4 \(lr 1e\+30\)"):
        trainer.train_and_evaluate(bad, tmp_path, progress=False)
    assert Checkpoints(tmp_path, read_only=True).epochs() == [1]
    assert evaluate.restore(tmp_path, "latest").epoch == 1


def _at_epoch_start(monkeypatch, epoch, action):
    """Run `action` when the trainer starts 0-based `epoch`: with run-ahead, while the previous
    epoch's log and checkpoint still wait behind the new epoch's first chunks."""
    real = pipeline.epoch_order

    def epoch_order(seed, e, n):
        if e == epoch:
            action()
        return real(seed, e, n)

    monkeypatch.setattr(pipeline, "epoch_order", epoch_order)


def test_an_error_while_running_ahead_still_checkpoints_the_finished_epoch(tmp_path, monkeypatch):
    def fail():
        raise RuntimeError("device lost")

    _at_epoch_start(monkeypatch, 1, fail)
    with pytest.raises(RuntimeError, match="device lost"):
        trainer.train_and_evaluate(tiny_config(num_epochs=2, run_ahead_chunks=2), tmp_path, progress=False)
    assert Checkpoints(tmp_path, read_only=True).epochs() == [1]
    assert len(_rows(tmp_path)) == 1


def test_sigterm_while_running_ahead_saves_both_checkpoints_and_the_rerun_is_bit_identical(tmp_path, monkeypatch):
    assert threading.current_thread() is threading.main_thread()  # where the trainer turns SIGTERM into a flag
    # One step per call, so that the 2 chunks run ahead are half of the next epoch's 4 steps.
    config = tiny_config(num_epochs=3, run_ahead_chunks=2, steps_per_call=1)
    _at_epoch_start(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(trainer.Interrupted, match="stopped by SIGTERM at epoch 2, step 1 of 4"):
        trainer.train_and_evaluate(config, tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert Checkpoints(tmp_path / "run", read_only=True).epochs() == [1]
    assert (tmp_path / "run" / "interrupted").is_dir()
    trainer.train_and_evaluate(config, tmp_path / "run", progress=False)
    trainer.train_and_evaluate(config, tmp_path / "straight", progress=False)
    _assert_same_run(tmp_path / "run", tmp_path / "straight")


def test_sigterm_at_an_epoch_without_a_scheduled_checkpoint_saves_it(tmp_path, monkeypatch):
    # Checkpoints every 3 epochs; the signal comes during epoch 2, which is one call (4 steps): the
    # run stops at its end and must save it although the schedule would not.
    config = tiny_config(num_epochs=3, run_ahead_chunks=0, steps_per_call=4, **{"checkpoint.every_epochs": 3})
    _at_epoch_start(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(trainer.Interrupted, match="stopped by SIGTERM at the end of epoch 2"):
        trainer.train_and_evaluate(config, tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert Checkpoints(tmp_path / "run", read_only=True).epochs() == [2]
    trainer.train_and_evaluate(config, tmp_path / "run", progress=False)
    trainer.train_and_evaluate(config, tmp_path / "straight", progress=False)
    assert Checkpoints(tmp_path / "straight", read_only=True).epochs() == [3]
    _assert_same_run(tmp_path / "run", tmp_path / "straight")


def test_a_changed_optimizer_is_not_mistaken_for_damage(tmp_path):
    trainer.train_and_evaluate(tiny_config(num_epochs=1), tmp_path, progress=False)
    with pytest.raises(ValueError, match="no checkpoint .* restores into the configured model and optimizer.*was the config changed"):
        trainer.train_and_evaluate(tiny_config(num_epochs=2, **{"optimizer.name": "sgd"}), tmp_path, progress=False)
    assert Checkpoints(tmp_path, read_only=True).epochs() == [1]  # nothing moved aside
    assert not (tmp_path / "corrupt_checkpoints").exists()


def test_a_second_train_py_on_the_same_workdir_refuses(tmp_path):
    with WorkdirLock(tmp_path):
        proc = _start(tmp_path)
        _, err = proc.communicate(timeout=120)
    assert proc.returncode == 2
    assert f"workdir {tmp_path} is in use by another train.py (pid {os.getpid()})" in err


def test_a_full_disk_is_a_clear_error_and_earlier_checkpoints_stay(tmp_path, monkeypatch):
    trainer.train_and_evaluate(tiny_config(num_epochs=1), tmp_path, progress=False)

    def no_space(self, epoch, state, meta):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(Checkpoints, "save", no_space)
    with pytest.raises(trainer.TrainingError, match="could not write a checkpoint .*No space left on device.*earlier checkpoints .* are intact"):
        trainer.train_and_evaluate(tiny_config(num_epochs=2), tmp_path, progress=False)
    monkeypatch.undo()
    assert evaluate.restore(tmp_path, "latest").epoch == 1
