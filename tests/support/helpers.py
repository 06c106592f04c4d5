"""Helpers shared by tests: tiny configs, loading the PyTorch SimpleCNN's weights, one-line errors,
comparing two training runs."""

import json
import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import config as config_lib
from cifar_jax import evaluate

TIMING_KEYS = {
    "epoch_time_s",
    "train_img_per_s",
    "compile_s",
    "first_step_s",
    "val_s",
    "host_s",
    "checkpoint_s",
}  # differ between identical runs


def tiny_config(**overrides):
    """SimpleCNN on 64+16 fake 32x32 images in 5 classes, batch 16: seconds per epoch on a CPU.

    The learning rate halves every epoch (StepLR): it moves, so a resume that lost its place in
    the schedule shows, and unlike a cosine over `num_epochs` its length is not a constant of the
    compiled step, so runs that differ only in their number of epochs share one program."""
    c = config_lib.base()
    c.model.name = "simple_cnn"
    c.model.num_classes = 5
    c.model.dtype = "float32"
    c.data.source = "fake"
    c.data.fake.num_train = 80
    c.data.fake.num_test = 20
    c.data.fake.num_classes = 5
    c.data.val_fraction = 0.2
    c.num_epochs = 2
    c.batch_size = 16
    c.eval_batch_size = 12  # does not divide the 16 val examples: exercises the padded batch
    c.optimizer.name = "adam"
    c.optimizer.lr = 1e-3
    c.schedule.name = "step"
    c.schedule.step_size = 1
    c.schedule.gamma = 0.5
    for key, value in overrides.items():  # dotted keys: tiny_config(**{"optimizer.lr": 0.1})
        config_lib.set_key(c, key, value)
    return c


def load_torch_simple_cnn(model, torch_model):
    """Copy the PyTorch twin's weights and BatchNorm buffers into a Flax SimpleCNN, each in the
    dtype of the variable it replaces."""
    t = {k: v.detach().cpu().numpy() for k, v in torch_model.state_dict().items()}

    def put(variable, value):
        variable[...] = jnp.asarray(value, variable[...].dtype)

    for i, idx in enumerate((0, 4, 8, 12)):
        put(model.convs[i].kernel, t[f"{idx}.weight"].transpose(2, 3, 1, 0))
        put(model.convs[i].bias, t[f"{idx}.bias"])
        put(model.bns[i].scale, t[f"{idx + 1}.weight"])
        put(model.bns[i].bias, t[f"{idx + 1}.bias"])
        put(model.bns[i].mean, t[f"{idx + 1}.running_mean"])
        put(model.bns[i].var, t[f"{idx + 1}.running_var"])
    put(model.fc1.kernel, t["17.weight"].T)
    put(model.fc1.bias, t["17.bias"])
    put(model.fc2.kernel, t["19.weight"].T)
    put(model.fc2.bias, t["19.bias"])


def assert_fails_in_one_line(main, argv, message, capsys):
    """`main(argv)` exits with status 2 and one stderr line, "error: ...", that contains `message`."""
    with pytest.raises(SystemExit) as exit_info:
        main(argv)
    assert exit_info.value.code == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("error: ") and message in err and "\n" not in err, err


def without_timing(rows):
    """Metrics rows without the keys that differ between two identical runs."""
    return [{k: v for k, v in r.items() if k not in TIMING_KEYS} for r in rows]


def checkpoint_arrays(workdir, epoch="latest"):
    """Every parameter and BatchNorm statistic of checkpoint `epoch` of `workdir`, as numpy arrays."""
    restored = evaluate.restore(workdir, epoch)
    return [np.asarray(x) for x in jax.tree.leaves((restored.params, restored.batch_stats))]


ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


def probe_env(devices: int, **extra) -> dict:
    """The environment of a probe subprocess: a CPU backend of `devices` devices (and the suite's other
    XLA flags, tests/conftest.py), plus `extra`."""
    flags = f"{os.environ.get('XLA_FLAGS', '')} --xla_force_host_platform_device_count={devices}"
    return dict(
        os.environ,
        XLA_FLAGS=flags.strip(),
        JAX_PLATFORMS="cpu",
        **extra,
    )


def run_probe(script: str, devices: int, *args) -> dict:
    """Run `tests/<script>` on `devices` CPU devices; the JSON object of its last output line."""
    out = subprocess.run(
        [sys.executable, os.path.join(ROOT, "tests", "support", script), *args],
        env=probe_env(devices),
        cwd=ROOT,
        check=True,
        capture_output=True,
        text=True,
    )
    return json.loads(out.stdout.strip().splitlines()[-1])
