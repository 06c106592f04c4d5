"""Interrupted runs, damaged checkpoints, bad numbers: nothing saved is lost, and a rerun resumes."""

import errno
import importlib.util
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import threading
import time

import numpy as np
import pytest

from cifar_jax import evaluate, provenance, staging, steps, trainer
from cifar_jax.checkpoint import Checkpoints
from cifar_jax.data import pipeline
from cifar_jax.runguard import WorkdirLock
from tests.support.helpers import checkpoint_arrays, tiny_config, without_timing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _tiny_file_config():
    spec = importlib.util.spec_from_file_location(
        "tiny_config", os.path.join(ROOT, "tests", "support", "tiny_config.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module.get_config()


def _start(workdir, signal_at: str | None = None, signal_name: str = "TERM"):
    """train.py on tests/support/tiny_config.py; with `signal_at`, the probe that sends itself
    SIG`signal_name` at that moment (tests/support/stop_probe.py)."""
    script = "tests/support/stop_probe.py" if signal_at else "train.py"
    cmd = [sys.executable, script, "--config", "tests/support/tiny_config.py", f"--workdir={workdir}"]
    probe = {"PROBE_SIGNAL_AT": signal_at, "PROBE_SIGNAL": signal_name} if signal_at else {}
    return subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu", **probe),
    )


def _sessions(workdir):
    return json.loads((workdir / "sessions.json").read_text())


def test_an_unreadable_sessions_file_is_kept_aside_and_a_new_one_starts(tmp_path, caplog):
    (tmp_path / "sessions.json").write_text('[{"started": ')  # torn by a full disk, say
    with caplog.at_level("WARNING", logger="cifar_jax"):
        sessions = provenance.Sessions(tmp_path)
    sessions.start(time.perf_counter(), 0, 0)
    (kept,) = tmp_path.glob("sessions.json.unreadable-*")
    assert kept.read_text() == '[{"started": ' and f"kept as {kept.name}" in caplog.text
    assert [s["status"] for s in _sessions(tmp_path)] == ["running"]


def test_a_session_end_that_cannot_be_written_does_not_hide_the_runs_error(tmp_path, monkeypatch, caplog):
    sessions = provenance.Sessions(tmp_path)
    sessions.start(time.perf_counter(), 0, 0)

    def full_disk(path, text):
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(staging, "write_text", full_disk)
    with caplog.at_level("WARNING", logger="cifar_jax"):
        sessions.end("failed: OSError: No space left on device", epochs_done=0)  # returns: no second error
    assert "could not record how this session ended" in caplog.text
    assert [s["status"] for s in _sessions(tmp_path)] == ["running"]  # what the start wrote stays


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


@pytest.mark.slow
def test_sigterm_saves_mid_epoch_and_the_rerun_is_bit_identical(straight_run, tmp_path):
    workdir = tmp_path / "run"
    proc = _start(workdir, signal_at="step:2:4")  # early in epoch 2's 32 steps
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 128 + signal.SIGTERM, err[-2000:]
    assert "stopped by SIGTERM at epoch 2, step" in err and "rerun the same command to resume" in err
    assert (workdir / "interrupted").is_dir()
    trainer.train_and_evaluate(_tiny_file_config(), workdir, progress=False)
    assert not (workdir / "interrupted").exists()
    _assert_same_run(workdir, straight_run)


@pytest.mark.slow
def test_kill_9_resumes_from_the_last_complete_checkpoint(straight_run, tmp_path):
    """Also the training issue's resume check: 2 epochs, a stop, 2 more == 4 straight, bit for bit."""
    workdir = tmp_path / "run"
    proc = _start(workdir, signal_at="row:2", signal_name="KILL")  # epoch 2's checkpoint still being written
    proc.communicate(timeout=120)
    assert proc.returncode == -signal.SIGKILL
    # A checkpoint write cut short leaves only Orbax's temporary directory: it must never restore.
    (workdir / "checkpoints" / "3.orbax-checkpoint-tmp-1234" / "state").mkdir(parents=True)
    trainer.train_and_evaluate(_tiny_file_config(), workdir, progress=False)
    _assert_same_run(workdir, straight_run)


@pytest.mark.slow
def test_truncated_latest_checkpoint_is_reported_and_the_previous_one_used(straight_run, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(straight_run, workdir)
    # Which epochs are kept depends on the best validation epoch: take the two newest, whichever they are.
    *_, previous, latest = Checkpoints(workdir, read_only=True).epochs()
    state_dir = workdir / "checkpoints" / str(latest) / "params"
    for f in (p for p in state_dir.rglob("*") if p.is_file() and p.stat().st_size > 1000):
        f.write_bytes(f.read_bytes()[: f.stat().st_size // 3])
    with caplog.at_level("WARNING", logger="cifar_jax"):
        trainer.train_and_evaluate(_tiny_file_config(), workdir, progress=False)
    assert f"checkpoint of epoch {latest} does not restore" in caplog.text
    assert f"resumed from epoch {previous}" in caplog.text
    assert list((workdir / "corrupt_checkpoints").iterdir())
    _assert_same_run(workdir, straight_run)  # the epochs after `previous` retrained


@pytest.mark.slow
def test_nan_loss_stops_within_the_epoch_and_keeps_good_checkpoints(tmp_path):
    # A warmup per epoch from lr 1e-3 (epoch 1) towards 1e30: epoch 2 trains at 5e29 and diverges.
    bad = tiny_config(
        num_epochs=3,
        **{
            "optimizer.lr": 1e30,
            "schedule.name": "constant",
            "schedule.warmup_epochs": 2,
            "schedule.warmup_start_factor": 1e-33,
        },
    )
    with pytest.raises(
        trainer.TrainingError, match=r"loss became NaN/Inf in epoch 2, steps \d-\d of 4 \(lr 5e\+29\)"
    ) as e:
        trainer.train_and_evaluate(bad, tmp_path, progress=False)
    kept = f"checkpoints up to epoch 1 are kept in {tmp_path / 'checkpoints'}. Lower optimizer.lr?"
    assert str(e.value).endswith(kept)
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
    (session,) = _sessions(tmp_path)
    assert session["status"] == "failed: RuntimeError: device lost" and session["epochs_done"] == 1


@pytest.mark.slow
def test_sigterm_while_running_ahead_saves_both_checkpoints_and_the_rerun_is_bit_identical(
    tmp_path, monkeypatch
):
    # The main thread is where the trainer turns SIGTERM into a flag.
    assert threading.current_thread() is threading.main_thread()
    # One step per call, so that the calls run ahead are part of the next epoch's 4 steps.
    config = tiny_config(num_epochs=3, run_ahead_chunks=2, steps_per_call=1)
    _at_epoch_start(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    # The first chunk carries the stop vote. The host ends epoch 1 once two calls run behind its
    # end, and reads that chunk once two run behind it: when the third chunk is queued.
    with pytest.raises(trainer.Interrupted, match="stopped by SIGTERM at epoch 2, step 3 of 4"):
        trainer.train_and_evaluate(config, tmp_path / "run", progress=False)
    monkeypatch.undo()
    assert Checkpoints(tmp_path / "run", read_only=True).epochs() == [1]
    assert (tmp_path / "run" / "interrupted").is_dir()
    trainer.train_and_evaluate(config, tmp_path / "run", progress=False)
    trainer.train_and_evaluate(config, tmp_path / "straight", progress=False)
    _assert_same_run(tmp_path / "run", tmp_path / "straight")


@pytest.mark.slow
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
    stopped, resumed = _sessions(tmp_path / "run")  # sessions.json: one entry per train.py session
    assert (stopped["status"], stopped["from_epoch"], stopped["epochs_done"]) == ("stopped by SIGTERM", 1, 2)
    assert (resumed["status"], resumed["from_epoch"], resumed["epochs_done"]) == ("finished", 3, 3)
    trainer.train_and_evaluate(config, tmp_path / "straight", progress=False)
    assert Checkpoints(tmp_path / "straight", read_only=True).epochs() == [3]
    _assert_same_run(tmp_path / "run", tmp_path / "straight")


def test_a_changed_optimizer_is_not_mistaken_for_damage(tmp_path):
    trainer.train_and_evaluate(tiny_config(num_epochs=1), tmp_path, progress=False)
    # Without config.json the change is refused by the config every checkpoint records, before any
    # restore (with it, by config.json: test_nothing_lost).
    (tmp_path / "config.json").unlink()
    with pytest.raises(
        ValueError,
        match=r"holds a run trained with other settings \(optimizer.name='adam' there, 'sgd' now\)",
    ):
        trainer.train_and_evaluate(
            tiny_config(num_epochs=2, **{"optimizer.name": "sgd"}), tmp_path, progress=False
        )
    assert Checkpoints(tmp_path, read_only=True).epochs() == [1]  # nothing moved aside
    assert not (tmp_path / "corrupt_checkpoints").exists()


@pytest.mark.slow
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
    with pytest.raises(
        trainer.TrainingError,
        match=r"could not write a checkpoint .*\(No space left on device\); the checkpoint of epoch 1 "
        r"remains there",
    ):
        trainer.train_and_evaluate(tiny_config(num_epochs=2), tmp_path, progress=False)
    monkeypatch.undo()
    assert evaluate.restore(tmp_path, "latest").epoch == 1


# ------------------------------------------------------------- nothing lost, nothing silently wrong


def _flip_bytes_in_arrays(checkpoint_dir):
    """Flip bits in the middle of the largest file of a checkpoint's parameters, leaving its size and
    headers."""
    f = max(
        (p for p in (checkpoint_dir / "params").rglob("*") if p.is_file()), key=lambda p: p.stat().st_size
    )
    data = bytearray(f.read_bytes())
    for i in range(len(data) // 2, len(data) // 2 + 16):
        data[i] ^= 0x10
    f.write_bytes(bytes(data))


@pytest.fixture(scope="module")
def three_epochs(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("three")
    trainer.train_and_evaluate(tiny_config(num_epochs=3, **{"checkpoint.keep": 3}), workdir, progress=False)
    return workdir


def test_flipped_bytes_in_a_checkpoint_fail_its_checksum(three_epochs, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(three_epochs, workdir)
    _flip_bytes_in_arrays(workdir / "checkpoints" / "3")
    with pytest.raises(
        evaluate.EvalError, match=r"checkpoints/3: \[.* does not match the checksum saved with it"
    ):
        evaluate.restore(workdir, 3)
    # The rerun moves it aside and retrains epoch 3 from epoch 2: the same run as before.
    with caplog.at_level("WARNING", logger="cifar_jax"):
        trainer.train_and_evaluate(
            tiny_config(num_epochs=3, **{"checkpoint.keep": 3}), workdir, progress=False
        )
    assert "checkpoint of epoch 3 is damaged" in caplog.text and "does not match the checksum" in caplog.text
    assert [p.name.split("-")[1] for p in (workdir / "corrupt_checkpoints").iterdir()] == ["3"]
    _assert_same_run(workdir, three_epochs)


def test_eval_of_the_best_checkpoint_skips_a_damaged_or_empty_one(three_epochs, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(three_epochs, workdir)
    ckpts = Checkpoints(workdir, read_only=True)
    best, second, third = ckpts.by_preference("best")
    ckpts.close()
    _flip_bytes_in_arrays(workdir / "checkpoints" / str(best))
    shutil.rmtree(workdir / "checkpoints" / str(second))
    (workdir / "checkpoints" / str(second)).mkdir()  # empty
    with caplog.at_level("WARNING", logger="cifar_jax"):
        restored = evaluate.restore(workdir, "best")
    assert restored.epoch == third
    assert f"checkpoints/{best}: " in caplog.text and "does not match the checksum" in caplog.text
    assert f"checkpoint of epoch {second} has no readable meta" in caplog.text


def test_an_edited_val_acc_in_a_checkpoint_meta_does_not_pick_the_best(three_epochs, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(three_epochs, workdir)
    ckpts = Checkpoints(workdir, read_only=True)
    best, *_, worst = ckpts.by_preference("best")
    ckpts.close()
    meta_file = workdir / "checkpoints" / str(worst) / "meta" / "metadata"
    meta = json.loads(meta_file.read_text())
    meta["row"]["val_acc"] = 0.99
    meta_file.write_text(json.dumps(meta))
    with caplog.at_level("WARNING", logger="cifar_jax"):
        assert evaluate.restore(workdir, "best").epoch == best
    assert (
        f"checkpoints/{worst}: its meta (epoch, metrics row, array checksums) does not match the checksum"
        in caplog.text
    )
    with pytest.raises(evaluate.EvalError, match="its meta .* does not match the checksum saved with it"):
        evaluate.restore(workdir, worst)


def test_a_torn_last_metrics_line_is_dropped_and_the_rerun_goes_on(three_epochs, tmp_path, caplog):
    workdir = tmp_path / "run"
    shutil.copytree(three_epochs, workdir)
    shutil.rmtree(workdir / "checkpoints" / "3")
    lines = (workdir / "metrics.jsonl").read_text().splitlines()
    # Killed while writing epoch 2's row (its checkpoint had landed): epoch 3's row never came.
    (workdir / "metrics.jsonl").write_text(lines[0] + "\n" + lines[1][: len(lines[1]) // 2])
    with caplog.at_level("WARNING", logger="cifar_jax"):
        trainer.train_and_evaluate(
            tiny_config(num_epochs=3, **{"checkpoint.keep": 3}), workdir, progress=False
        )
    assert "its last line was cut short" in caplog.text
    assert [r["epoch"] for r in _rows(workdir)] == [1, 2, 3]  # epoch 2's row comes back from its checkpoint
    _assert_same_run(workdir, three_epochs)


@pytest.mark.parametrize(
    "bad,message",
    [
        (b"{oops", "is not JSON"),
        (b"{}", "is no metrics row (no epoch number"),
        (b'{"epoch": 2, "x": "\xff"}', "is not UTF-8 text"),
    ],
)
def test_a_bad_metrics_line_before_the_last_is_one_clear_error(three_epochs, tmp_path, bad, message):
    workdir = tmp_path / "run"
    shutil.copytree(three_epochs, workdir)
    lines = (workdir / "metrics.jsonl").read_bytes().splitlines()
    (workdir / "metrics.jsonl").write_bytes(b"\n".join([lines[0], bad, *lines[1:]]) + b"\n")
    with pytest.raises(ValueError, match=rf"metrics.jsonl line 2 {re.escape(message)}.*move the file aside"):
        trainer.train_and_evaluate(tiny_config(num_epochs=3), workdir, progress=False)
    assert Checkpoints(workdir, read_only=True).epochs() == [1, 2, 3]


@pytest.mark.slow
def test_a_damaged_interrupted_checkpoint_is_set_aside_and_the_run_goes_on(tmp_path, monkeypatch, caplog):
    config = tiny_config(num_epochs=2, run_ahead_chunks=0, steps_per_call=1)
    _at_epoch_start(monkeypatch, 1, lambda: os.kill(os.getpid(), signal.SIGTERM))
    with pytest.raises(trainer.Interrupted):
        trainer.train_and_evaluate(config, tmp_path, progress=False)
    monkeypatch.undo()
    (meta,) = (tmp_path / "interrupted").glob("*/meta/metadata")
    meta.write_text('{"epoch": 1, "next_st')
    with caplog.at_level("WARNING", logger="cifar_jax"):
        rows = trainer.train_and_evaluate(config, tmp_path, progress=False)
    assert "the interrupted-run checkpoint does not restore" in caplog.text
    assert [r["epoch"] for r in rows] == [1, 2]
    assert list((tmp_path / "corrupt_checkpoints").iterdir())


def test_a_failed_write_of_the_last_checkpoint_is_an_error(tmp_path, monkeypatch):
    """The last epoch's checkpoint is written in the background: the run must wait for it and say
    when it failed, never report success (TensorStore's error, as Orbax raises it on a full disk)."""
    real_wait = Checkpoints.wait

    def wait_then_fail(self):
        real_wait(self)
        if self.epochs() and self.epochs()[-1] == 2:
            raise ValueError(
                'RESOURCE_EXHAUSTED: Error writing "float32/0": No space left on device '
                "[os_error_code='28']"
            )

    monkeypatch.setattr(Checkpoints, "wait", wait_then_fail)
    with pytest.raises(
        trainer.TrainingError,
        match=r"could not write a checkpoint in .*\(No space left on device\); the checkpoints of epochs 1, "
        r"2 remain there. Free some space",
    ):
        trainer.train_and_evaluate(tiny_config(num_epochs=2), tmp_path, progress=False)


def test_a_read_only_directory_is_not_told_to_free_space(tmp_path, monkeypatch):
    def read_only(self, epoch, state, meta):
        raise OSError(30, "Read-only file system")

    monkeypatch.setattr(Checkpoints, "save", read_only)
    with pytest.raises(
        trainer.TrainingError, match=r"\(Read-only file system\).*Use a writable --workdir"
    ) as e:
        trainer.train_and_evaluate(tiny_config(num_epochs=1), tmp_path, progress=False)
    assert "free" not in str(e.value).lower()


@pytest.mark.parametrize(
    "make_workdir,message",
    [
        (lambda tmp: tmp / ("x" * 300) / "run", "is longer than 255 bytes; use a shorter --workdir"),
        (lambda tmp: tmp / "a_file" / "run", "is a file, not a directory"),
    ],
)
def test_a_workdir_that_cannot_be_made_fails_at_once(tmp_path, make_workdir, message):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=message):
        trainer.train_and_evaluate(tiny_config(num_epochs=1), make_workdir(tmp_path), progress=False)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a_file"]


def test_a_start_that_saved_nothing_does_not_bind_the_workdir_to_its_config(tmp_path, monkeypatch):
    def fail(*args, **kwargs):
        raise RuntimeError("compilation failed")

    monkeypatch.setattr(steps, "make_train_chunk", fail)
    with pytest.raises(RuntimeError, match="compilation failed"):
        trainer.train_and_evaluate(tiny_config(num_epochs=1), tmp_path, progress=False)
    monkeypatch.undo()
    # A change a resume refuses (test_nothing_lost): nothing was saved, so it is a new run.
    rows = trainer.train_and_evaluate(
        tiny_config(num_epochs=1, **{"optimizer.lr": 0.1}), tmp_path, progress=False
    )
    assert len(rows) == 1
