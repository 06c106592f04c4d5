"""Data parallelism: the same losses on 1 device, 8 devices, and 2 processes x 2 devices."""

import json
import os
import socket
import subprocess
import sys

import numpy as np

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROBE = os.path.join(ROOT, "tests", "train_probe.py")


def _env(devices, **extra):
    return dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}", JAX_PLATFORMS="cpu", **extra)


def _run(devices, archs):
    out = subprocess.run([sys.executable, PROBE, *archs], env=_env(devices), cwd=ROOT, check=True, capture_output=True, text=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def test_losses_do_not_depend_on_device_count():
    # ResNet-18 with SGD: in float32, Adam's first steps are ~lr * sign(g), so gradient entries
    # below rounding noise (which depends on the reduction order, hence on the device count)
    # flip sign and move by a full lr; for ResNet-18 that shows as 1e-3 loss differences by
    # step 3 (measured) although data parallelism is exact. SGD keeps rounding at rounding size.
    specs = ["simple_cnn:adamw", "resnet18:sgd"]
    one, eight = _run(1, specs), _run(8, specs)
    assert one["devices"] == 1 and eight["devices"] == 8
    for spec in specs:
        np.testing.assert_allclose(eight[spec], one[spec], rtol=1e-5)
        assert len(set(np.round(one[spec], 6))) == 5  # five different batches, really trained


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_two_processes_match_one_process_with_four_devices():
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, PROBE, "simple_cnn:adamw"], cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
            env=_env(2, PROBE_COORDINATOR=coordinator, PROBE_NUM_PROCESSES="2", PROBE_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    multi = json.loads(outputs[0][0].strip().splitlines()[-1])
    assert multi["processes"] == 2 and multi["devices"] == 4
    single = _run(4, ["simple_cnn:adamw"])
    np.testing.assert_allclose(multi["simple_cnn:adamw"], single["simple_cnn:adamw"], rtol=1e-5)
