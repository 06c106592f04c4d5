"""The command lines as a user runs them: bad input fails fast with one line and writes nothing."""

import importlib.util
import io
import json
import logging
import os
import signal
import subprocess
import sys

import pytest

from cifar_jax import cli, trainer
from cifar_jax import config as config_lib
from cifar_jax.data import DataError
from tests.support.helpers import tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _train(tmp_path, *args):
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        "configs/quickstart.py",
        f"--workdir={tmp_path / 'run'}",
        *args,
    ]
    return subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu")
    )


def _quickstart(**overrides):
    """configs/quickstart.py's config with dotted-key overrides, as train.py's --config.KEY=VALUE."""
    spec = importlib.util.spec_from_file_location(
        "quickstart", os.path.join(ROOT, "configs", "quickstart.py")
    )
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    config = module.get_config()
    for key, value in overrides.items():
        config_lib.set_key(config, key, value)
    return config


def _refused_before_training(tmp_path, **overrides) -> str:
    """The one-line message train.py would print for `overrides` (it prints any of these errors as
    `error: <message>`, status 2: test_a_bad_config_is_one_line_and_status_2), checked to come
    before anything is written."""
    with pytest.raises((ValueError, FileNotFoundError, DataError)) as e:
        trainer.train_and_evaluate(_quickstart(**overrides), tmp_path / "run", progress=False)
    message = str(e.value)
    assert "\n" not in message
    assert (
        not (tmp_path / "run" / "checkpoints").exists() and not (tmp_path / "run" / "metrics.jsonl").exists()
    )
    return message


@pytest.mark.parametrize(
    "key,value,message",
    [
        (
            "data.source",
            "imagenet",
            "config: data.source='imagenet' is not one of: tfds, cifar_python, npz, digits, fake",
        ),
        ("optimizer.name", "lamb", "config: optimizer.name='lamb' is not one of: adam, adamw, sgd"),
        ("schedule.name", "poly", "config: schedule.name='poly' is not one of: constant, step, cosine"),
        ("num_epochs", 0, "config: num_epochs=0 must be a positive integer"),
        ("batch_size", -8, "config: batch_size=-8 must be a positive integer"),
        ("optimizer.lr", 0.0, "config: optimizer.lr=0.0 must be positive"),
        ("model.num_classes", 100, "model.num_classes=100 but data.source='digits' has 10 classes"),
        ("data.image_size", 64, "cannot feed simple_cnn"),
        ("run_ahead_chunks", -1, "config: run_ahead_chunks=-1 must be >= 0 (0 = off)"),
        ("checkpoint.every_epochs", 0, "config: checkpoint.every_epochs=0 must be a positive integer"),
        ("eval_batches_per_call", -1, "config: eval_batches_per_call=-1 must be >= 0 (0 = automatic)"),
        ("model.pretrained", "/nonexistent", "holds no converted weights"),
    ],
)
def test_bad_config_fails_in_one_line_before_training(tmp_path, key, value, message):
    assert message in _refused_before_training(tmp_path, **{key: value})


def test_a_bad_config_is_one_line_and_status_2(tmp_path):
    """The command-line path of the refusals above: status 2, one `error:` line, nothing written."""
    out = _train(tmp_path, "--config.model.name=resnet99")
    assert out.returncode == 2, out.stderr[-2000:]
    lines = [line for line in out.stderr.strip().splitlines() if line.startswith("error:")]
    expected = "config: model.name='resnet99' is not one of: simple_cnn, resnet18, resnet34, resnet50"
    assert len(lines) == 1 and expected in lines[0], out.stderr[-2000:]
    assert not (tmp_path / "run" / "checkpoints").exists()


def _one_error_line(out) -> str:
    lines = [line for line in out.stderr.strip().splitlines() if line.strip()]
    assert out.returncode == 2 and len(lines) == 1 and lines[0].startswith("error: "), out.stderr[-2000:]
    return lines[0]


def test_typo_in_a_config_key_is_one_line(tmp_path):
    line = _one_error_line(_train(tmp_path, "--config.optimizer.learning_rate=0.1"))
    assert "names 'learning_rate', which the config does not have" in line
    assert not (tmp_path / "run").exists()


def test_a_config_file_without_get_config_is_one_line(tmp_path):
    (tmp_path / "cfg.py").write_text("x = 1\n")
    cmd = [sys.executable, "train.py", "--config", str(tmp_path / "cfg.py"), f"--workdir={tmp_path / 'run'}"]
    out = subprocess.run(
        cmd, cwd=ROOT, capture_output=True, text=True, timeout=120, env=dict(os.environ, JAX_PLATFORMS="cpu")
    )
    assert "defines no get_config()" in _one_error_line(out)


def test_labels_beyond_the_class_count_are_counted_not_taken_for_a_class(tmp_path):
    import numpy as np

    rng = np.random.default_rng(0)
    np.savez(
        tmp_path / "d.npz",
        x_train=rng.integers(0, 255, (40, 32, 32, 3), dtype=np.uint8),
        y_train=np.r_[np.arange(39) % 10, 10],
        x_test=rng.integers(0, 255, (10, 32, 32, 3), dtype=np.uint8),
        y_test=np.arange(10),
    )
    line = _refused_before_training(tmp_path, **{"data.source": "npz", "data.path": str(tmp_path / "d.npz")})
    assert (
        "model.num_classes=10 but data.source='npz' has 11 classes (1 example(s) have labels 10..10); fix "
        "those labels" in line
    )


def test_missing_dataset_file_is_explained(tmp_path):
    line = _refused_before_training(
        tmp_path, **{"data.source": "npz", "data.path": str(tmp_path / "cifar100.npz")}
    )
    assert "does not exist: set --config.data.path to a .npz file" in line


def test_eval_without_checkpoint_says_so(tmp_path):
    (tmp_path / "config.json").write_text(tiny_config().to_json())
    out = subprocess.run(
        [sys.executable, "eval.py", f"--workdir={tmp_path}"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert out.returncode == 2 and "holds no complete checkpoint" in out.stderr


def test_batch_not_divisible_by_the_devices(monkeypatch, tmp_path):
    import jax

    from cifar_jax import preflight

    monkeypatch.setattr(jax, "device_count", lambda: 8)
    with pytest.raises(
        ValueError,
        match="batch_size=12 and eval_batch_size=16 must be divisible by the 8 devices; use a multiple of 8",
    ):
        preflight.check_before_start(tiny_config(batch_size=12, eval_batch_size=16), tmp_path)


def test_micro_batches_not_divisible_by_the_devices(monkeypatch, tmp_path):
    import jax

    from cifar_jax import preflight

    monkeypatch.setattr(jax, "device_count", lambda: 8)
    with pytest.raises(
        ValueError,
        match=r"batch_size=16 in optimizer.accumulate_steps=4 micro-batches of 4 does not divide over "
        r"the 8 devices; use micro-batches of a multiple of 8",
    ):
        preflight.check_before_start(
            tiny_config(batch_size=16, eval_batch_size=16, **{"optimizer.accumulate_steps": 4}), tmp_path
        )
    with pytest.raises(
        ValueError,
        match=r"optimizer.accumulate_steps=3 must be a positive integer that divides batch_size=16",
    ):
        preflight.check_before_start(
            tiny_config(batch_size=16, eval_batch_size=16, **{"optimizer.accumulate_steps": 3}), tmp_path
        )


def test_pretrained_weights_of_another_architecture(tmp_path):
    import json

    weights = tmp_path / "weights"
    weights.mkdir()
    (weights / "meta.json").write_text(
        json.dumps({"arch": "resnet50", "num_classes": 1000, "stem": "imagenet"})
    )
    line = _refused_before_training(
        tmp_path, **{"model.name": "resnet18", "model.stem": "imagenet", "model.pretrained": str(weights)}
    )
    assert (
        "model.pretrained holds resnet50 weights but model.name='resnet18'; set --config.model.name=resnet50"
        in line
    )


@pytest.mark.slow
def test_second_run_of_a_config_compiles_nothing(tmp_path):
    """The persistent compilation cache: a second identical run loads every XLA program."""
    import json
    import re

    def run(name):
        cmd = [
            sys.executable,
            "train.py",
            "--config",
            "tests/support/tiny_config.py",
            "--config.num_epochs=1",
            "--noprogress",
            f"--workdir={tmp_path / name}",
            f"--compilation_cache={tmp_path / 'xla'}",
        ]
        out = subprocess.run(
            cmd,
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=300,
            env=dict(os.environ, JAX_PLATFORMS="cpu"),
        )
        assert out.returncode == 0, out.stderr[-3000:]
        counts = re.search(
            r"XLA programs: (\d+) loaded from the compilation cache, (\d+) compiled", out.stderr
        )
        assert counts, out.stderr[-3000:]
        row = json.loads((tmp_path / name / "metrics.jsonl").read_text().splitlines()[0])
        assert row["first_step_s"] >= row["compile_s"] > 0
        return int(counts[1]), int(counts[2])

    assert run("first")[1] > 0  # a new cache directory: everything compiles
    loaded, compiled = run("second")
    assert compiled == 0 and loaded > 0


def test_an_empty_compilation_cache_turns_jaxs_cache_off_though_the_environment_names_one():
    import jax

    assert os.environ["JAX_COMPILATION_CACHE_DIR"]  # named by tests/conftest.py, as a user may name it
    assert jax.config.jax_enable_compilation_cache
    with cli.without_compilation_cache():  # the bench's and the GPU-program tool's block
        assert not jax.config.jax_enable_compilation_cache
    assert jax.config.jax_enable_compilation_cache  # restored after the block
    try:  # --compilation_cache= (train.py, eval.py): off for the process
        assert cli.enable_compilation_cache("") is None
        assert not jax.config.jax_enable_compilation_cache
    finally:
        jax.config.update("jax_enable_compilation_cache", True)


def test_cpu_flags_are_added_once_and_never_over_the_users(monkeypatch):
    from importlib import metadata

    from cifar_jax import cli

    ours = " ".join(f"--{name}={value}" for name, value in cli.CPU_FLAGS.items())
    monkeypatch.setenv("XLA_FLAGS", "--xla_force_host_platform_device_count=2")
    added = cli.tune_xla_cpu()
    assert added == metadata.version("jaxlib").startswith("0.10.")  # only where they were measured
    if added:
        assert os.environ["XLA_FLAGS"] == f"--xla_force_host_platform_device_count=2 {ours}"
    assert not cli.tune_xla_cpu()  # never twice
    monkeypatch.setenv("XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type=")
    assert cli.tune_xla_cpu() == added
    if added:  # the user's setting stays; the other is added
        assert (
            os.environ["XLA_FLAGS"]
            == "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_fusion_emitters=false"
        )
    monkeypatch.setenv(
        "XLA_FLAGS", "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_fusion_emitters=true"
    )
    assert not cli.tune_xla_cpu()
    assert (
        os.environ["XLA_FLAGS"]
        == "--xla_cpu_experimental_ynn_fusion_type= --xla_cpu_use_fusion_emitters=true"
    )


def test_ctrl_c_outside_the_training_loop_is_one_line_and_status_130(capsys, monkeypatch):
    from cifar_jax import cli

    def interrupted(argv):
        raise KeyboardInterrupt

    monkeypatch.setattr(sys, "argv", ["train.py"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(interrupted, "outside the training loop")
    assert exit_info.value.code == 130
    assert (
        capsys.readouterr().err
        == "interrupted (Ctrl-C) outside the training loop; what was already saved is kept: rerun the same "
        "command\n"
    )


@pytest.mark.slow
def test_ctrl_c_in_training_ends_in_one_line_without_a_traceback(tmp_path):
    """A real SIGINT once the first epoch's row is written: status 130, one message, no traceback.
    (Sent during start-up instead, the interrupt was once lost in a full-suite run and the process
    trained on; that path is the in-process test above.)"""
    import time

    workdir = tmp_path / "run"
    cmd = [
        sys.executable,
        "train.py",
        "--config",
        "tests/support/tiny_config.py",
        "--config.num_epochs=50",
        f"--workdir={workdir}",
        "--progress=false",
    ]
    # A shell's background job inherits SIGINT ignored, and Python then keeps it so: restore the default.
    proc = subprocess.Popen(
        cmd,
        cwd=ROOT,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    deadline = time.time() + 180
    while not (workdir / "metrics.jsonl").exists() and proc.poll() is None and time.time() < deadline:
        time.sleep(0.05)
    assert proc.poll() is None, proc.communicate()[1][-2000:]
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=180)
    assert proc.returncode == 130 and "Traceback" not in err, err[-2000:]
    assert "stopped by SIGINT" in err and "rerun the same command" in err.strip().splitlines()[-1]


def test_an_interrupt_that_a_library_swallowed_still_stops_the_run_before_training(tmp_path, monkeypatch):
    """Ctrl-C during start-up once left a run training on: an extension's import turns the
    KeyboardInterrupt into an ImportError, which an optional import ignores. The interrupt is
    remembered: training does not start, and an error it caused is reported as the interrupt."""
    import time

    from cifar_jax import cli, interrupts, trainer

    previous = signal.signal(
        signal.SIGINT, signal.default_int_handler
    )  # Python's own, whatever the worker had
    monkeypatch.setattr(interrupts, "_interrupted", False)
    interrupts.catch()
    try:
        try:
            os.kill(os.getpid(), signal.SIGINT)
            time.sleep(5)  # the KeyboardInterrupt comes at once
        except KeyboardInterrupt:
            pass  # swallowed, as by `except ImportError` around an optional import
        assert interrupts.interrupted()
        with pytest.raises(KeyboardInterrupt):
            trainer.train_and_evaluate(tiny_config(num_epochs=1), tmp_path, progress=False)
        assert not (tmp_path / "metrics.jsonl").exists()
        (session,) = json.loads((tmp_path / "sessions.json").read_text())
        assert (session["status"], session["epochs_done"]) == ("stopped by SIGINT", 0)
        with pytest.raises(KeyboardInterrupt):
            cli.fail(
                "the --config file does not load (ImportError: Encountered an error while initializing the "
                "extension.)"
            )
    finally:
        signal.signal(signal.SIGINT, previous)


def test_a_ctrl_c_during_the_first_imports_is_one_line_and_writes_nothing(tmp_path):
    """A KeyboardInterrupt raised inside an extension module's import crashed the interpreter
    (status -11) or printed a traceback: a SIGINT during an entry point's imports is only
    remembered, then reported in one line once they are done, before anything is written."""
    probe = (
        "import os, runpy, signal, sys\n"
        "from cifar_jax import interrupts\n"
        "interrupts.defer()  # as train.py's first lines do\n"
        "os.kill(os.getpid(), signal.SIGINT)  # lands during the imports\n"
        "import jax, numpy, optax  # heavy extension imports after it\n"
        "sys.argv = ['train.py', '--config', 'tests/support/tiny_config.py', "
        f"'--workdir={tmp_path / 'run'}']\n"
        "runpy.run_path('train.py', run_name='__main__')\n"
    )
    out = subprocess.run(
        [sys.executable, "-c", probe],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu"),
        # A shell's background job inherits SIGINT ignored, and Python then keeps it so: restore the default.
        preexec_fn=lambda: signal.signal(signal.SIGINT, signal.SIG_DFL),
    )
    assert out.returncode == 130, out.stderr[-2000:]
    assert out.stderr.strip().splitlines() == [
        "interrupted (Ctrl-C) outside the training loop; what was already saved is kept: rerun the same "
        "command"
    ]
    assert not (tmp_path / "run").exists()


def test_a_ctrl_c_that_a_garbage_collector_callback_drops_prints_no_traceback(capsys, monkeypatch):
    """JAX's gc callback turns a KeyboardInterrupt into "Exception ignored in ..." and a traceback:
    the interrupt is remembered (runguard) and reported in one line, so that print is noise.
    Other exceptions that Python cannot raise are still printed."""
    from cifar_jax import cli

    class RaisesWhenCollected:
        def __init__(self, exc):
            self.exc = exc

        def __del__(self):
            raise self.exc

    monkeypatch.setattr(sys, "unraisablehook", cli._unraisable)
    for exc in (KeyboardInterrupt(), RuntimeError("Event loop is closed")):
        RaisesWhenCollected(exc)  # collected at once: Python hands the exception to sys.unraisablehook
    assert capsys.readouterr().err == ""
    RaisesWhenCollected(ValueError("a real problem"))
    assert "ValueError: a real problem" in capsys.readouterr().err


def test_wandb_asked_for_but_not_installed_is_one_line_before_any_data_loads(tmp_path, monkeypatch):
    import importlib.util

    from cifar_jax import preflight

    real = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else real(name, *a)
    )
    with pytest.raises(
        ValueError,
        match=r"config: wandb.mode='offline' needs wandb, which is not installed: pip install "
        r"'cifar_jax\[wandb\]', or --config.wandb.mode=disabled",
    ):
        preflight.check_before_start(tiny_config(**{"wandb.mode": "offline"}), tmp_path)
    assert list(tmp_path.iterdir()) == []


def test_log_lines_follow_the_stderr_of_the_moment(monkeypatch):
    """A stream replaced after set-up (a redirect, a test's capture) gets the line, not the old one."""
    from cifar_jax import cli

    logger = logging.getLogger("cifar_jax")
    for attr in ("handlers", "propagate", "level"):
        monkeypatch.setattr(logger, attr, [] if attr == "handlers" else getattr(logger, attr))
    first = io.StringIO()
    monkeypatch.setattr(sys, "stderr", first)
    cli.setup_logging()
    first.close()
    later = io.StringIO()
    monkeypatch.setattr(sys, "stderr", later)
    logger.info("a line")
    assert later.getvalue().endswith("a line\n")


@pytest.mark.slow
def test_every_command_that_reads_a_checkpoint_takes_step_best_latest_or_an_epoch():
    """One `--step` convention: eval.py and export parse it alike, and refuse anything else."""
    assert [cli.checkpoint_step(v) for v in ("best", "latest", "3")] == ["best", "latest", 3]
    for command in (["eval.py"], ["-m", "cifar_jax.export", "--out", "m.pth"]):
        out = subprocess.run(
            [sys.executable, *command, "--workdir", "w", "--step", "last"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=120,
        )
        assert out.returncode == 2, out.stderr
        assert "argument --step: 'last' is not best, latest or an epoch number" in out.stderr.splitlines()[-1]
