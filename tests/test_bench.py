"""`python -m cifar_jax.bench`: options, the table's arithmetic, and a tiny real run of both sides."""

import dataclasses
import json
import os
import subprocess
import sys

import jax.numpy as jnp
import pytest

from cifar_jax import bench
from cifar_jax.bench import jax_modes
from cifar_jax.data import pipeline
from tests.support.helpers import ROOT, assert_fails_in_one_line

REQUIRED = {"model", "image_size", "batch_size", "framework", "mode", "device", "img_per_s", "compile_s"}


def test_default_cases_and_filters():
    cases = bench.parse_cases(bench.DEFAULT_CASES, None, None)
    assert [(c.model, c.image_size) for c in cases] == [
        ("simple_cnn", 32),
        ("resnet34", 32),
        ("resnet50", 32),
        ("resnet50", 224),
    ]
    assert [c.stem for c in cases] == [None, "cifar", "imagenet", "imagenet"]
    assert bench.parse_cases(bench.DEFAULT_CASES, "resnet50", "224") == [bench.Case("resnet50", 224)]
    assert bench.parse_cases(bench.DEFAULT_CASES, "simple_cnn,resnet18", None) == [
        bench.Case("simple_cnn", 32),
        bench.Case("resnet18", 32),
    ]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--models", "vgg16"], "--models: unknown model 'vgg16'"),
        (["--cases", "simple_cnn@224"], "simple_cnn takes 32x32 images only"),
        (["--cases", "resnet50@big"], "needs an image size of at least 32"),
        (["--modes", "train,speed"], "--modes: unknown value 'speed'"),
        (["--frameworks", "tensorflow"], "--frameworks: unknown value 'tensorflow'"),
        (["--jax_layers", "custom"], "--jax_layers: unknown value 'custom'"),
        (["--torch_modes", "jit"], "--torch_modes: unknown value 'jit'"),
        (["--torch_modes", "eager,cudagraphs"], "--torch_modes cudagraphs needs a CUDA GPU"),
        (["--modes", "epoch", "--data", "/nonexistent/cifar100.npz"], "no such file"),
        (["--steps", "0"], "--steps=0 must be at least 1"),
        (["--sizes", "64"], "no case left to measure"),
        (["--modes", "epoch", "--profile", "prof"], "--profile traces JAX training and evaluation"),
    ],
)
def test_bad_options_fail_in_one_line_before_measuring(argv, message, capsys):
    assert_fails_in_one_line(bench.main, argv, message, capsys)


def test_table_compares_jax_with_the_faster_pytorch_variant():
    case, opts = bench.Case("resnet50", 32), bench.parse_args([])
    rows = [
        bench.row(case, opts, "jax", "train", "float32, 1 steps/call", "cpu", 300.0, 2.0),
        bench.row(case, opts, "torch", "train", "eager, channels_last", "cpu", 100.0, None),
        bench.row(case, opts, "torch", "train", "compile, channels_last", "cpu", 200.0, 30.0),
        bench.row(
            case,
            opts,
            "jax",
            "pipeline",
            "on device",
            "cpu",
            6000.0,
            0.5,
            in_step_ms=0.083,
            in_step_share=0.025,
            step_ms_with_pipeline=3.32,
            step_ms_prepared_batches=3.237,
        ),
    ]
    lines = bench.table(rows).splitlines()
    train = next(line for line in lines if line.startswith("| resnet50 (imagenet) | 32 | 128 | train"))
    assert "| 300.0 | 200.0 (compile) | 1.50x | 2.0 | compile 30.0 |" in train
    # alone: 1/6000 of 1/300 s
    assert (
        "Input pipeline share of a JAX training step, resnet50 @32: 5.00% alone (an upper bound); "
        "2.50% in the step (median 3.320 ms a step with it, 3.237 ms fed prepared batches)"
    ) in lines


def test_the_bench_compiles_what_it_times_even_where_a_persistent_cache_is_named(tmp_path):
    # JAX decides at a process's first compilation whether it uses its persistent cache; the bench
    # turns the cache off before that, so its compile times are compilations. (In this suite's
    # workers the cache is on for good, tests/conftest.py: hence a process of its own.)
    cache, out = tmp_path / "xla", tmp_path / "bench.json"
    argv = "--cases simple_cnn@32 --modes eval --frameworks jax --eval_batch_size 4 --steps 1 --warmup 1"
    run = subprocess.run(
        [sys.executable, "-m", "cifar_jax.bench", *argv.split(), "--out", str(out)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=dict(os.environ, JAX_COMPILATION_CACHE_DIR=str(cache)),
        timeout=300,
    )
    assert run.returncode == 0, run.stderr[-2000:]
    (row,) = json.loads(out.read_text())
    assert row["framework"] == "jax" and row["compile_s"] > 0
    assert not cache.exists() or not any(cache.iterdir())  # nothing written to it, nothing read


@pytest.mark.slow
def test_tiny_run_of_every_mode_on_both_frameworks(tmp_path):
    out = tmp_path / "bench.json"
    rows = bench.main(
        [
            "--cases",
            "simple_cnn@32",
            "--modes",
            "train,eval,epoch,pipeline",
            "--batch_size",
            "8",
            "--eval_batch_size",
            "8",
            "--steps",
            "2",
            "--warmup",
            "1",
            "--epoch_images",
            "24",
            "--workers",
            "0",
            "--out",
            str(out),
        ]
    )
    assert json.loads(out.read_text()) == rows
    assert sorted((r["framework"], r["mode"]) for r in rows) == sorted(
        [
            ("torch", "train"),
            ("torch", "eval"),
            ("torch", "epoch"),
            ("jax", "train"),
            ("jax", "eval"),
            ("jax", "epoch"),
            ("jax", "pipeline"),
        ]
    )
    for r in rows:
        assert (
            REQUIRED <= r.keys()
            and r["img_per_s"] > 0
            and r["image_size"] == 32
            and r["model"] == "simple_cnn"
        )
    by = {(r["framework"], r["mode"]): r for r in rows}
    assert by["jax", "epoch"]["images"] == by["torch", "epoch"]["images"] == 24  # 3 full batches of 8
    assert by["jax", "train"]["compile_s"] > 0  # the first call's time beyond a timed one's
    assert by["torch", "train"]["compile_s"] is None  # eager PyTorch compiles nothing
    assert by["jax", "eval"]["batch_size"] == 8
    # Eval fuses batches per call like the trainer (a whole split), at most the --steps timed.
    assert by["jax", "eval"]["variant"].endswith("2 batches/call")
    # A JAX row says what XLA was told beyond its defaults (here the CPU flag the CLIs add)
    assert by["jax", "train"].get("xla_flags") == (os.environ.get("XLA_FLAGS") or None)
    assert "xla_flags" not in by["torch", "train"]


@pytest.mark.slow
def test_out_keeps_the_measurements_made_before_a_run_is_cut_short(tmp_path, monkeypatch):
    """On the GPU each bench command runs under a time cap: what it measured before must survive."""
    out = tmp_path / "bench.json"

    def cut_short(self, opts, case):
        raise KeyboardInterrupt  # stands in for the cap's SIGTERM/timeout

    monkeypatch.setattr(bench.JaxSide, "eval", cut_short)
    with pytest.raises(KeyboardInterrupt):
        bench.main(
            [
                "--cases",
                "simple_cnn@32",
                "--modes",
                "train,eval",
                "--batch_size",
                "8",
                "--eval_batch_size",
                "8",
                "--steps",
                "1",
                "--warmup",
                "1",
                "--out",
                str(out),
            ]
        )
    kept = json.loads(out.read_text())
    assert [(r["framework"], r["mode"]) for r in kept] == [
        ("torch", "train"),
        ("torch", "eval"),
        ("jax", "train"),
    ]
    assert all(r["img_per_s"] > 0 for r in kept)


@pytest.mark.slow
def test_pipeline_runs_as_many_batches_per_call_as_the_training_step():
    """Timed one batch per call, the pipeline's share measures dispatch (on an H100 it read 169% of a
    SimpleCNN step); fused like the step, it compares like with like."""
    rows = bench.main(
        [
            "--cases",
            "simple_cnn@32",
            "--modes",
            "train,pipeline",
            "--frameworks",
            "jax",
            "--steps_per_call",
            "2",
            "--batch_size",
            "8",
            "--steps",
            "4",
            "--warmup",
            "1",
        ]
    )
    by = {r["mode"]: r for r in rows}
    assert by["train"]["variant"].endswith("2 steps/call") and by["pipeline"]["variant"].endswith(
        "2 batches/call"
    )
    assert (
        by["pipeline"]["img_per_s"] > by["train"]["img_per_s"] > 0
    )  # the step contains the pipeline and more
    assert {"in_step_ms", "in_step_share"} <= set(by["pipeline"])


@pytest.mark.parametrize("layers", ["auto", "stock"])
@pytest.mark.slow
def test_jax_layers_choose_the_cpu_kernels_or_xlas_stock_operations(monkeypatch, layers):
    """`--jax_layers stock` traces no CPU kernel, even on the CPU (where `auto` takes them): how a
    GPU run compares the two with `--jax_layers cpu_kernels`."""
    from cifar_jax.models import layers as model_layers

    traced = []
    real = model_layers.CPU_KERNELS.batch_norm_train
    spy = dataclasses.replace(
        model_layers.CPU_KERNELS, batch_norm_train=lambda *a: traced.append(1) or real(*a)
    )
    monkeypatch.setitem(model_layers.OPS, "auto", model_layers.per_platform(spy, model_layers.STOCK))
    monkeypatch.setitem(model_layers.OPS, "cpu_kernels", spy)
    rows = bench.main(
        [
            "--cases",
            "simple_cnn@32",
            "--modes",
            "train",
            "--frameworks",
            "jax",
            "--steps_per_call",
            "1",
            "--batch_size",
            "4",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--jax_layers",
            layers,
        ]
    )
    assert bool(traced) == (layers == "auto")
    assert rows[0]["variant"].endswith("1 steps/call" if layers == "auto" else "stock layers")


@pytest.mark.slow
def test_the_in_step_baseline_trains_on_the_batches_the_step_draws():
    """The pipeline's share in the step is the training chunk against the same chunk fed batches
    prepared beforehand: both must train on the same batches, step for step (a baseline that fed
    one batch to every step once let XLA hoist work out of the loop), to the same state."""
    import dataclasses
    import functools

    import jax
    import numpy as np
    import optax

    from cifar_jax import steps

    opts = bench.parse_args(
        ["--cases", "simple_cnn@32", "--frameworks", "jax", "--steps_per_call", "2", "--batch_size", "4"]
    )
    side = bench.JaxSide(bench.Case("simple_cnn", 32), opts, num_train=8)
    # Plain SGD: Adam's first steps are about sign(gradient), so rounding in a near-zero gradient
    # (the two programs fuse differently) would move a weight by up to 2 lr; SGD keeps it smooth.
    side.step_cfg = dataclasses.replace(side.step_cfg, tx=optax.sgd(0.01))
    side.state["opt_state"] = side.step_cfg.tx.init(side.state["params"])
    side.train_chunk = steps.make_train_chunk(side.step_cfg, side.steps_per_call)
    x, y = (side.put(a) for a in bench.random_uint8(8))
    draw = functools.partial(
        pipeline.train_batch, seed=0, batch_size=4, preprocess=side.preprocess, sharding=side.sharding
    )
    chunk, batches = jax_modes.prepared_chunk(side, x, y, draw)
    copy = lambda tree: jax.tree.map(jnp.copy, tree)  # both chunks donate their state
    order = jnp.arange(8)
    drawn = side.train_chunk(
        copy(side.state), side.zero_metrics(), x, y, order, jnp.int32(0), jnp.int32(0), side.no_stop
    )[:2]
    prepared = chunk(copy(side.state), side.zero_metrics(), batches)
    assert int(prepared[1]["count"]) == 8
    for a, b in zip(jax.tree.leaves(drawn), jax.tree.leaves(prepared), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-5, atol=1e-6)
    # Two different batches: a batch repeated for both steps would train to another state.
    assert not np.array_equal(np.asarray(batches[0][0]), np.asarray(batches[0][1]))


class _SimulatedDevice:
    """A clock and a one-queue "device": each window costs the host `host_s`, then queues `device_s`
    of work that starts when both the host has queued it and the device is free. Deterministic,
    whatever the machine's load: timed_windows reads this clock instead of the wall clock."""

    def __init__(self, host_s, device_s):
        self.now, self.device_free, self.host_s, self.device_s = 0.0, 0.0, host_s, device_s

    def perf_counter(self):
        return self.now

    def window(self):
        self.now += self.host_s
        self.device_free = max(self.now, self.device_free) + self.device_s
        return self.device_free  # the handle: when this window's work is done

    def wait(self, done):
        self.now = max(self.now, done)


def test_timed_windows_overlap_the_host_with_the_device_only_when_asked(monkeypatch):
    """A synced window adds the host's time to the device's; a loop without host syncs hides it."""
    import statistics

    device = _SimulatedDevice(host_s=0.04, device_s=0.09)
    monkeypatch.setattr(bench.timing, "time", device)
    first, times = bench.timed_windows(device.window, device.wait, warmup=1, windows=5)
    assert len(times) == 5 and first == pytest.approx(0.13)
    assert statistics.median(times) == pytest.approx(0.09)  # the device's 90 ms: the host's 40 ms overlap it
    _, times = bench.timed_windows(device.window, device.wait, warmup=1, windows=5, overlap=False)
    assert times == pytest.approx([0.13] * 5)  # 40 + 90 ms, one after the other
