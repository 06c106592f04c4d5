"""Every failure of every command: a wrong number refused before anything runs, one line (not a
traceback) for a known failure or a Ctrl-C, and nothing left behind. One test per case that once
failed (issue "Reliability IV")."""

import logging
import math
import os
import shutil
import subprocess
import sys

import ml_collections
import numpy as np
import pytest

from cifar_jax import cli, evaluate, preflight, prepare, staging, tracking, trainer
from cifar_jax import config as config_lib
from cifar_jax.data import DataError, sources
from cifar_jax.errors import TrainingError
from cifar_jax.profiling import EpochProfile
from tests.support.helpers import ROOT, assert_fails_in_one_line, tiny_config


def _dead_pid() -> int:
    proc = subprocess.Popen([sys.executable, "-c", "pass"])
    proc.wait()
    return proc.pid


class _Records(logging.Handler):
    """The records logged to "cifar_jax" (its own handler: the logger may not propagate)."""

    def __init__(self):
        super().__init__(logging.DEBUG)
        self.records = []

    def emit(self, record):
        self.records.append(record)


@pytest.fixture
def cifar_jax_log():
    handler, logger = _Records(), logging.getLogger("cifar_jax")
    logger.addHandler(handler)
    try:
        yield handler.records
    finally:
        logger.removeHandler(handler)


# --- success reported, result wrong ------------------------------------------------------------


@pytest.fixture(scope="module")
def npz_run(tmp_path_factory):
    """One epoch of the tiny config on an npz file: (workdir, the npz)."""
    root = tmp_path_factory.mktemp("npz_run")
    arrays = sources.load_fake(None, num_train=80, num_test=20, num_classes=5, image_size=32)
    npz = sources.save_npz(arrays, root / "data.npz")
    config = tiny_config(num_epochs=1, **{"data.source": "npz", "data.path": str(npz)})
    trainer.train_and_evaluate(config, root / "run", progress=False)
    return root / "run", npz


def _config_of(npz, **overrides):
    return tiny_config(**{"data.source": "npz", "data.path": str(npz), **overrides})


def test_a_workdir_that_lost_its_config_json_is_checked_against_its_checkpoints(npz_run, tmp_path):
    """Once the resume check was skipped without config.json: a changed learning rate resumed."""
    workdir = tmp_path / "run"
    shutil.copytree(npz_run[0], workdir)
    (workdir / "config.json").unlink()
    changed = _config_of(npz_run[1], num_epochs=2, **{"optimizer.lr": 0.05})
    with pytest.raises(ValueError, match=r"optimizer.lr=0.001 there, 0.05 now.*checkpoints/1"):
        trainer.train_and_evaluate(changed, workdir, progress=False)
    assert not (workdir / "config.json").exists()  # a refused resume writes nothing
    assert evaluate.load_config(workdir).optimizer.lr == 0.001  # eval.py reads the record too
    rows = trainer.train_and_evaluate(_config_of(npz_run[1], num_epochs=2), workdir, progress=False)
    assert [r["epoch"] for r in rows] == [1, 2]
    assert config_lib.from_json(workdir / "config.json").num_epochs == 2


def test_checkpoints_without_config_json_or_a_record_of_it_are_refused(tmp_path):
    (tmp_path / "checkpoints" / "1").mkdir(parents=True)  # checkpoints whose meta says nothing
    with pytest.raises(ValueError, match="holds checkpoints but no config.json, and no checkpoint records"):
        preflight.check_resume(tiny_config(), tmp_path)


@pytest.mark.parametrize(
    "key,value,message",
    [
        ("schedule.min_lr", -0.01, "schedule.min_lr=-0.01 must be a finite number >= 0"),
        ("schedule.min_lr", 0.01, "schedule.min_lr=0.01 must be in [0, optimizer.lr=0.001]"),
        ("data.augment.mixup_alpha", math.nan, "data.augment.mixup_alpha=nan must be a finite number >= 0"),
        ("data.augment.cutmix_alpha", math.inf, "data.augment.cutmix_alpha=inf must be a finite number >= 0"),
        ("optimizer.weight_decay", math.nan, "optimizer.weight_decay=nan must be a finite number >= 0"),
        ("optimizer.lr", math.nan, "optimizer.lr=nan must be positive and finite"),
        ("label_smoothing", math.nan, "label_smoothing=nan must be in [0, 1)"),
        ("ema_decay", math.nan, "ema_decay=nan must be in [0, 1)"),
        ("optimizer.b2", 1.0, "optimizer.b2=1.0 must be in [0, 1)"),
        ("early_stop.min_delta", math.nan, "early_stop.min_delta=nan must be a finite number >= 0"),
        (
            "data.augment.color_jitter",
            (0.4, math.nan, 0.4),
            "data.augment.color_jitter=(0.4, nan, 0.4) must be 3",
        ),
        ("data.val_fraction", 1.0, "data.val_fraction=1.0 must be in [0, 1)"),
    ],
)
def test_a_number_out_of_range_or_not_finite_is_refused(key, value, message):
    with pytest.raises(ValueError) as error:
        config_lib.validate(tiny_config(**{key: value}))
    assert str(error.value) == f"config: {message}" or str(error.value).startswith(f"config: {message}")


def test_every_config_key_has_a_rule_and_a_key_without_one_is_refused():
    assert set(config_lib.flat(config_lib.base())) == set(config_lib.RULES)
    c = config_lib.base()
    c.unlock()
    c.new_key = 1
    with pytest.raises(AssertionError, match="config keys without a rule in config.RULES: new_key"):
        config_lib.validate(c)


# --- tracebacks where one line is due ----------------------------------------------------------


def test_a_nan_loss_stop_is_one_error_and_no_traceback_in_the_log(tmp_path, cifar_jax_log):
    """The salvage after the error once read the chunks after the bad one and logged their
    error's chained traceback."""
    config = tiny_config(num_epochs=2, steps_per_call=1, **{"optimizer.name": "sgd", "optimizer.lr": 1e30})
    with pytest.raises(TrainingError, match="loss became NaN/Inf in epoch 1") as e:
        trainer.train_and_evaluate(config, tmp_path, progress=False)
    assert str(e.value).endswith("; no checkpoint was saved yet. Lower optimizer.lr?")
    assert [r for r in cifar_jax_log if r.exc_info or r.levelno >= logging.WARNING] == []


@pytest.mark.parametrize("what", ["profile", "wandb"])
def test_a_directory_the_run_writes_that_is_a_file_is_one_line_before_any_data_loads(tmp_path, what):
    if what == "wandb":
        pytest.importorskip("wandb")
    (tmp_path / what).write_text("not a directory")
    config = tiny_config(**({"profile.epoch": 1} if what == "profile" else {"wandb.mode": "offline"}))
    with pytest.raises(ValueError, match=rf"{tmp_path / what} is a file, not a directory; move it aside"):
        preflight.check_before_start(config, tmp_path)


def test_a_trace_or_a_wandb_run_that_cannot_be_written_is_a_training_error(tmp_path):
    profile = EpochProfile(tiny_config(**{"profile.epoch": 1}).profile, tmp_path / "missing" / "run", True)
    (tmp_path / "missing").write_text("a file where the workdir's parent should be")
    with pytest.raises(TrainingError, match=r"cannot write the profile trace in .*profile.epoch=0"):
        profile.start("train")
        profile.stop(None)
    pytest.importorskip("wandb")
    (tmp_path / "wandb").write_text("not a directory")
    with pytest.raises(TrainingError, match=r"wandb could not start its run in .*wandb.mode=disabled"):
        tracking.Wandb(tiny_config(**{"wandb.mode": "offline"}), tmp_path, resume=False)


def test_a_compilation_cache_that_cannot_be_used_is_one_line(tmp_path):
    (tmp_path / "a_file").write_text("")
    with pytest.raises(ValueError, match=r"--compilation_cache .*a_file is a file, not a directory"):
        cli.enable_compilation_cache(str(tmp_path / "a_file"))
    with pytest.raises(ValueError, match=r"--compilation_cache .*a_file/under cannot be made"):
        cli.enable_compilation_cache(str(tmp_path / "a_file" / "under"))


def test_a_config_file_whose_get_config_raises_is_one_line_naming_its_line(tmp_path):
    (tmp_path / "cfg.py").write_text("def get_config():\n    return 1 / 0\n")
    cmd = [sys.executable, "train.py", "--config", str(tmp_path / "cfg.py"), f"--workdir={tmp_path / 'run'}"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 2 and out.stderr.strip().splitlines() == [
        f"error: the --config file's get_config() raised ZeroDivisionError: division by zero "
        f"({tmp_path / 'cfg.py'}, line 2)"
    ], out.stderr[-2000:]


def test_a_bug_is_its_traceback_and_a_line_that_says_so(capsys, monkeypatch):
    def broken(argv):
        raise RuntimeError("an invariant broke")

    monkeypatch.setattr(sys, "argv", ["cmd"])
    with pytest.raises(SystemExit) as exit_info:
        cli.run(broken, "in a test", absl_flags=False)
    err = capsys.readouterr().err
    assert exit_info.value.code == 1
    assert "Traceback" in err and "RuntimeError: an invariant broke" in err
    assert err.strip().splitlines()[-1] == cli.BUG


def _with_sigint_at_import(module: str, *command: str):
    """`command` with SIGINT's default handler (as a shell leaves it), pressed as `module` starts
    to import (tests/support/sigint_at_import)."""
    env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        PYTHONPATH=os.path.join(ROOT, "tests", "support", "sigint_at_import"),
        SIGINT_AT_IMPORT=module,
    )
    return subprocess.run(
        [sys.executable, *command], cwd=ROOT, env=env, capture_output=True, text=True, timeout=180
    )


@pytest.mark.parametrize(
    "module,command,what",
    [
        ("numpy", ["train.py", "--config", "tests/support/tiny_config.py"], "outside the training loop"),
        ("optax", ["train.py", "--config", "tests/support/tiny_config.py"], "outside the training loop"),
        ("jax", ["eval.py", "--workdir", "nowhere"], "before eval.py finished"),
        ("numpy", ["-m", "cifar_jax.export", "--workdir", "w", "--out", "m.pth"], "during export"),
        ("numpy", ["-m", "cifar_jax.prepare", "--out", "c.npz"], "during prepare"),
        (
            "numpy",
            ["-m", "cifar_jax.convert", "--arch", "resnet18", "--weights", "x", "--out", "o"],
            "during convert",
        ),
        ("numpy", ["-m", "cifar_jax.bench", "--help"], "during the benchmark"),
        (
            "numpy",
            ["-m", "cifar_jax.study", "--plan", "--scale", "smoke", "--out", "nowhere"],
            "during the study",
        ),
    ],
)
def test_ctrl_c_during_any_command_is_one_line_and_status_130(tmp_path, module, command, what):
    command = [a.replace("nowhere", str(tmp_path)) for a in command] + (
        [f"--workdir={tmp_path / 'run'}"] if command[0] == "train.py" else []
    )
    out = _with_sigint_at_import(module, *command)
    lines = out.stderr.strip().splitlines()
    assert out.returncode == 130 and len(lines) == 1, out.stderr[-3000:]
    assert lines[0].startswith(f"interrupted (Ctrl-C) {what}") and lines[0].endswith("rerun the same command")
    assert not (tmp_path / "run").exists()


# --- errors that point the wrong way -----------------------------------------------------------


def test_an_out_that_is_a_directory_says_so_also_with_overwrite(tmp_path, capsys):
    (tmp_path / "c.npz").mkdir()
    argv = [
        "--from",
        "cifar_python",
        "--path",
        str(tmp_path),
        "--out",
        str(tmp_path / "c.npz"),
        "--overwrite",
    ]
    assert_fails_in_one_line(prepare.main, argv, f"--out {tmp_path / 'c.npz'} is a directory", capsys)


def test_a_missing_data_path_names_the_flag_of_the_command_at_hand(tmp_path, capsys, npz_run):
    assert_fails_in_one_line(
        prepare.main, ["--from", "cifar_python", "--out", str(tmp_path / "c.npz")], "--path is empty", capsys
    )
    argv = ["--from", "cifar_python", "--path", str(tmp_path / "gone"), "--out", str(tmp_path / "c.npz")]
    assert_fails_in_one_line(prepare.main, argv, "gone does not exist: set --path to", capsys)
    workdir, npz = tmp_path / "run", tmp_path / "data.npz"
    shutil.copytree(npz_run[0], workdir)
    shutil.copy(npz_run[1], npz)
    from cifar_jax import eval_report

    config = config_lib.from_json(workdir / "config.json")
    config.data.path = str(npz)
    (workdir / "config.json").write_text(config.to_json())
    npz.unlink()  # the data file moved after training
    opts = eval_report.Options(str(workdir), "best", "test", False, False, None, False, 0)
    with pytest.raises(DataError, match=rf"does not exist: set data.path in {workdir / 'config.json'} to"):
        eval_report.prepare(opts)


def test_a_mistyped_config_key_with_a_near_one_is_named_plainly():
    with pytest.raises(AttributeError) as error:
        ml_collections.ConfigDict({"lr": 0.1}).lrr
    assert cli._unknown_key(error.value) == (
        "a --config override names 'lrr', which the config does not have (did you mean 'lr'?): check its "
        "spelling against the config file and cifar_jax/config.py"
    )


# --- left behind -------------------------------------------------------------------------------


def test_a_killed_writers_partial_file_is_removed_and_outputs_take_one_mode(tmp_path, monkeypatch):
    out = tmp_path / "cifar100.npz"
    dead = tmp_path / f".cifar100.npz.partial-{_dead_pid()}"
    alive = tmp_path / f".cifar100.npz.partial-{os.getppid()}"  # a writer still running: left to it
    dead.write_bytes(b"half")
    alive.write_bytes(b"half")
    arrays = sources.load_fake(None, num_train=4, num_test=2, num_classes=2, image_size=8)
    sources.save_npz(arrays, out)
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([out.name, alive.name])
    np.testing.assert_array_equal(np.load(out)["x_train"], arrays.x_train)

    def private(path):  # as safetensors writes: mode 0600
        os.close(os.open(path, os.O_WRONLY | os.O_CREAT, 0o600))

    previous = os.umask(0o022)
    try:
        assert staging._new_file_mode() == 0o644  # what the umask gives a new file
    finally:
        os.umask(previous)
    monkeypatch.setattr(staging, "_NEW_FILE_MODE", 0o644)  # as read at import under that umask
    staging.write_file(tmp_path / "model.safetensors", private)
    staging.write_text(tmp_path / "config.json", "{}")
    assert {oct((tmp_path / n).stat().st_mode & 0o777) for n in ("model.safetensors", "config.json")} == {
        "0o644"
    }
