"""Data parallelism: the same losses on 1 device, 8 devices, and 2 processes x 2 devices; checkpoints
saved and restored by 2 processes; a stop signal to one process stops all of them at one step."""

import json
import signal
import socket
import subprocess
import sys

import numpy as np
import pytest

from tests.support.helpers import ROOT, probe_env, run_probe

pytestmark = pytest.mark.slow  # every test runs subprocesses of several devices


def _run(devices, archs):
    return run_probe("train_probe.py", devices, *archs)


def _free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _two_processes(script, *args) -> list[dict]:
    """Run `tests/support/<script>` as 2 processes x 2 CPU devices joined through jax.distributed; the last
    JSON line of each process that printed one, in process order (Gloo logs to stdout too)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = [
        subprocess.Popen(
            [sys.executable, f"tests/support/{script}", *args],
            cwd=ROOT,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
            env=probe_env(2, PROBE_COORDINATOR=coordinator, PROBE_NUM_PROCESSES="2", PROBE_PROCESS_ID=str(i)),
        )
        for i in range(2)
    ]
    outputs = [p.communicate(timeout=240) for p in procs]
    for p, (_, err) in zip(procs, outputs):
        assert p.returncode == 0, err[-2000:]
    results = []
    for out, _ in outputs:
        lines = [line for line in out.splitlines() if line.startswith("{")]
        results += [json.loads(lines[-1])] if lines else []
    return results


def test_losses_do_not_depend_on_device_count():
    # In float64, where the runs on 1 and 8 devices agree to 1e-15: that shows the data parallelism
    # itself is exact. In float32 the rounding differences of the reduction order (and of the
    # convolutions' algorithms for other batch shapes) are amplified by training: SimpleCNN's losses
    # drift apart by 1e-5..2e-3 within 5 steps, ResNet-18's by 1e-4..1e-3 (measured).
    # Accumulated micro-batches (2 of 8, one image per device on 8) are sharded like batches.
    # ResNet-18 (BatchNorm over the devices' batches, residuals, downsampling) on 2 devices: each
    # device updates its replica of the 11M parameters, so 8 devices would cost 7x the optimizer's
    # work of one on this CPU (measured: 2.8 s a step against 0.4).
    # One process of 8 devices runs each spec over a mesh of 1 device and of several: one start-up.
    simple = ["simple_cnn:adamw:float64", "simple_cnn:adamw:float64:acc2"]
    resnet = "resnet18:adamw:float64"
    one = {spec: f"{spec}@1" for spec in [*simple, resnet]}
    many = {**{spec: f"{spec}@8" for spec in simple}, resnet: f"{resnet}@2"}
    got = _run(8, [*one.values(), *many.values()])
    assert got["devices"] == 8
    assert [got["mesh"][s] for s in one.values()] == [1, 1, 1]
    assert [got["mesh"][s] for s in many.values()] == [8, 8, 2]
    for spec in [*simple, resnet]:
        np.testing.assert_allclose(got[many[spec]], got[one[spec]], rtol=1e-10, err_msg=spec)
        assert len(set(np.round(got[one[spec]], 6))) == 5  # five different batches, really trained
    assert not np.allclose(
        got[one["simple_cnn:adamw:float64:acc2"]], got[one["simple_cnn:adamw:float64"]], rtol=1e-3
    )  # really accumulated


def test_two_processes_match_one_process_with_four_devices():
    # In float64, as above: float32's rounding differences would be amplified by the training steps.
    spec = "simple_cnn:adamw:float64"
    (multi,) = _two_processes("train_probe.py", spec)  # process 0 prints the losses
    assert multi["processes"] == 2 and multi["devices"] == 4
    single = _run(4, [spec])
    np.testing.assert_allclose(multi[spec], single[spec], rtol=1e-10)


def test_two_processes_save_and_restore_a_checkpoint(tmp_path):
    # Every process takes part in Orbax's save (one writes the replicated arrays) and restores the
    # whole arrays onto its own devices.
    assert (
        _two_processes("checkpoint_probe.py", str(tmp_path))
        == [{"processes": 2, "devices": 4, "equal": True, "epoch": 1}] * 2
    )


def _train_py(workdir, *flags, num_epochs: int, script: str = "train.py") -> list[str]:
    return [
        sys.executable,
        script,
        "--config",
        "tests/support/tiny_config.py",
        f"--config.num_epochs={num_epochs}",
        "--progress=false",
        f"--workdir={workdir}",
        *flags,
    ]


def _start_two_processes(
    workdir, num_epochs: int, stop_process_1_at: str | None = None
) -> list[subprocess.Popen]:
    """train.py as 2 processes x 1 device, joined through the explicit flags (no auto-detection);
    with `stop_process_1_at`, process 1 sends itself SIGTERM then (tests/support/stop_probe.py)."""
    coordinator = f"127.0.0.1:{_free_port()}"
    procs = []
    for i in range(2):
        probe = i == 1 and stop_process_1_at is not None
        cmd = _train_py(
            workdir,
            f"--coordinator_address={coordinator}",
            "--num_processes=2",
            f"--process_id={i}",
            num_epochs=num_epochs,
            script="tests/support/stop_probe.py" if probe else "train.py",
        )
        env = probe_env(1, **({"PROBE_SIGNAL_AT": stop_process_1_at} if probe else {}))
        procs.append(
            subprocess.Popen(
                cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env
            )
        )
    return procs


def _rows(workdir) -> list[dict]:
    from tests.support.helpers import without_timing

    return without_timing(json.loads(line) for line in (workdir / "metrics.jsonl").read_text().splitlines())


def _assert_rows_match_one_process_with_two_devices(tmp_path, multi_rows, num_epochs: int):
    single = subprocess.run(
        _train_py(tmp_path / "single", num_epochs=num_epochs),
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=probe_env(2),
    )
    assert single.returncode == 0, single.stderr[-2000:]
    single_rows = _rows(tmp_path / "single")
    assert len(multi_rows) == len(single_rows) == num_epochs
    for multi, one in zip(multi_rows, single_rows):
        for key in ("train_loss", "val_loss"):
            assert multi[key] == pytest.approx(one[key], rel=1e-5)


def test_a_signal_to_one_process_stops_both_at_the_same_step(tmp_path):
    """train.py as 2 processes x 1 device joined through --coordinator_address, --num_processes and
    --process_id (no auto-detection). SIGTERM to process 1 alone, early in the epoch: both processes
    stop at the same step (the vote travels with the training chunks), one mid-epoch checkpoint is
    written, and rerunning both finishes the run as one process with 2 devices trains it."""
    workdir = tmp_path / "multi"
    stops = []
    for p in _start_two_processes(workdir, num_epochs=1, stop_process_1_at="step:1:4"):
        _, err = p.communicate(timeout=240)
        assert p.returncode == 128 + signal.SIGTERM, err[-2000:]
        stops += [
            line for line in err.splitlines() if line.startswith("stopped by SIGTERM at epoch 1, step ")
        ]
    assert len(stops) == 2 and stops[0] == stops[1], stops
    assert len(list((workdir / "interrupted").iterdir())) == 1
    for p in _start_two_processes(workdir, num_epochs=1):
        _, err = p.communicate(timeout=240)
        assert p.returncode == 0, err[-2000:]
    assert not (workdir / "interrupted").exists()
    _assert_rows_match_one_process_with_two_devices(tmp_path, _rows(workdir), num_epochs=1)


def test_incomplete_multi_process_flags_fail_in_one_line(tmp_path):
    out = subprocess.run(
        [
            sys.executable,
            "train.py",
            "--config",
            "tests/support/tiny_config.py",
            f"--workdir={tmp_path}",
            "--coordinator_address=127.0.0.1:1234",
            "--num_processes=2",
        ],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=probe_env(1),
        timeout=120,
    )
    assert out.returncode == 2 and out.stderr.strip().splitlines()[-1] == (
        "error: a multi-process run needs --coordinator_address, --num_processes and --process_id; missing: "
        "--process_id"
    )


def test_a_population_does_not_depend_on_the_device_count(tmp_path):
    """A population's state is replicated and each member's batch sharded over the devices, as a
    run's: each member's losses on 2 devices are those on 1, to float32 rounding. Trained with SGD,
    which carries a rounding difference forward at about its size (measured: at most 7e-6 relative
    after 32 steps; the two seeds' losses differ by 3e-3). Adam is no reference here: its first steps
    are lr * sign(gradient), so the rounding of a gradient near 0 moves a weight by 2 lr, and the
    runs' losses came 9e-5 apart on one machine and 1.2e-3 on another (an AMD EPYC with AVX2)."""
    sgd = ("--config.optimizer.name=sgd", "--config.optimizer.lr=0.01", "--config.optimizer.momentum=0.9")
    rows = {}
    for devices in (1, 2):
        workdir = tmp_path / f"devices{devices}"
        out = subprocess.run(
            _train_py(workdir, "--config.population.seeds=0,1", *sgd, num_epochs=1),
            cwd=ROOT,
            capture_output=True,
            text=True,
            env=probe_env(devices),
        )
        assert out.returncode == 0, out.stderr[-2000:]
        rows[devices] = [_rows(workdir / f"member_{k}") for k in range(2)]
    for one, two in zip(rows[1], rows[2]):
        for key in ("train_loss", "val_loss"):
            assert two[0][key] == pytest.approx(one[0][key], rel=1e-4)
    seeds_apart = abs(rows[1][0][0]["val_loss"] / rows[1][1][0]["val_loss"] - 1)
    assert seeds_apart > 1e-3, seeds_apart  # two seeds, two runs: far apart beyond that tolerance
