"""Data for machines without internet: `prepare` writes the npz once; without it, the study's
configs fail at once with one line that says what to run where."""

import os
import subprocess
import sys

import numpy as np
import pytest

from cifar_jax import prepare, trainer
from cifar_jax.data import sources
from tests.support.helpers import ROOT, assert_fails_in_one_line, tiny_config
from tests.test_data_sources import _write_cifar_python

pytest.importorskip("tensorflow_datasets")


@pytest.mark.parametrize("config", ["configs/simple_cnn.py", "configs/resnet34.py"])
def test_a_study_config_without_network_or_prepared_data_fails_at_once_in_one_line(tmp_path, config):
    data_dir = tmp_path / "tensorflow_datasets"
    cmd = [
        sys.executable,
        "tests/support/offline_probe.py",
        "--config",
        config,
        f"--config.data.path={data_dir}",
        f"--workdir={tmp_path / 'run'}",
    ]
    out = subprocess.run(
        cmd,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        env=dict(os.environ, JAX_PLATFORMS="cpu", PROBE_ATTEMPTS_FILE=str(tmp_path / "attempts")),
    )
    assert out.returncode == 2, out.stderr[-2000:]
    (line,) = out.stderr.strip().splitlines()
    assert line.startswith(f"error: tfds cifar100 is not prepared in {data_dir} and its download host "), line
    assert "on a machine with internet run `python -m cifar_jax.prepare --out cifar100.npz`" in line
    assert (tmp_path / "attempts").read_text() == "1"  # one look at the network, no retries
    assert [p.name for p in (tmp_path / "run").iterdir()] == [".lock"]  # nothing saved


@pytest.mark.slow
def test_prepare_from_a_cifar_python_directory_writes_an_npz_that_trains(tmp_path, capsys):
    rng = np.random.default_rng(0)
    x = rng.integers(0, 256, (60, 32, 32, 3), dtype=np.uint8)
    y = np.arange(60) % 5
    _write_cifar_python(tmp_path, x[:40], y[:40], x[40:], y[40:])
    out = tmp_path / "cifar100.npz"
    assert prepare.main(["--from", "cifar_python", "--path", str(tmp_path), "--out", str(out)]) == 0
    assert f"wrote {out}: 40 train and 20 test images, 100 classes" in capsys.readouterr().out
    arrays = sources.load_npz(out)
    np.testing.assert_array_equal(arrays.x_train, x[:40])
    np.testing.assert_array_equal(arrays.y_test, y[40:])
    assert arrays.label_names[:2] == ("fine0", "fine1")
    rows = trainer.train_and_evaluate(
        tiny_config(num_epochs=1, **{"data.source": "npz", "data.path": str(out), "model.num_classes": 100}),
        tmp_path / "run",
        progress=False,
    )
    assert len(rows) == 1 and np.isfinite(rows[0]["train_loss"])
    capsys.readouterr()  # the training's log so far
    assert_fails_in_one_line(  # never replaced silently
        prepare.main,
        ["--from", "cifar_python", "--path", str(tmp_path), "--out", str(out)],
        "exists; pass --overwrite",
        capsys,
    )
