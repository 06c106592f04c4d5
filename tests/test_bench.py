"""`python -m cifar_jax.bench`: options, the table's arithmetic, and a tiny real run of both sides."""

import json

import jax.numpy as jnp
import pytest

from cifar_jax import bench
from cifar_jax.data import pipeline
from tests.helpers import assert_fails_in_one_line

REQUIRED = {"model", "image_size", "batch_size", "framework", "mode", "device", "img_per_s", "compile_s"}


def test_default_cases_and_filters():
    cases = bench.parse_cases(bench.DEFAULT_CASES, None, None)
    assert [(c.model, c.image_size) for c in cases] == [("simple_cnn", 32), ("resnet34", 32), ("resnet50", 32), ("resnet50", 224)]
    assert [c.stem for c in cases] == [None, "cifar", "imagenet", "imagenet"]
    assert bench.parse_cases(bench.DEFAULT_CASES, "resnet50", "224") == [bench.Case("resnet50", 224)]
    assert bench.parse_cases(bench.DEFAULT_CASES, "simple_cnn,resnet18", None) == [bench.Case("simple_cnn", 32), bench.Case("resnet18", 32)]


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--models", "vgg16"], "--models: unknown model 'vgg16'"),
        (["--cases", "simple_cnn@224"], "SimpleCNN takes 32x32 images only"),
        (["--cases", "resnet50@big"], "needs an image size of at least 32"),
        (["--modes", "train,speed"], "--modes: unknown value 'speed'"),
        (["--frameworks", "tensorflow"], "--frameworks: unknown value 'tensorflow'"),
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
        bench._row(case, opts, "jax", "train", "float32, 1 steps/call", "cpu", 300.0, 2.0),
        bench._row(case, opts, "torch", "train", "eager, channels_last", "cpu", 100.0, None),
        bench._row(case, opts, "torch", "train", "compile, channels_last", "cpu", 200.0, 30.0),
        bench._row(case, opts, "jax", "pipeline", "on device", "cpu", 6000.0, 0.5, in_step_ms=0.083, in_step_share=0.025,
                   step_ms_with_pipeline=3.32, step_ms_prepared_batches=3.237),
    ]
    lines = bench.table(rows).splitlines()
    train = next(line for line in lines if line.startswith("| resnet50 (imagenet) | 32 | 128 | train"))
    assert "| 300.0 | 200.0 (compile) | 1.50x | 2.0 | compile 30.0 |" in train
    # alone: 1/6000 of 1/300 s
    assert ("Input pipeline share of a JAX training step, resnet50 @32: 5.00% alone (an upper bound); "
            "2.50% in the step (median 3.320 ms a step with it, 3.237 ms fed prepared batches)") in lines


def test_tiny_run_of_every_mode_on_both_frameworks(tmp_path):
    out = tmp_path / "bench.json"
    rows = bench.main([
        "--cases", "simple_cnn@32", "--modes", "train,eval,epoch,pipeline", "--batch_size", "8", "--eval_batch_size", "8",
        "--steps", "2", "--warmup", "1", "--epoch_images", "24", "--workers", "0", "--out", str(out),
    ])
    assert json.loads(out.read_text()) == rows
    assert sorted((r["framework"], r["mode"]) for r in rows) == sorted(
        [("torch", "train"), ("torch", "eval"), ("torch", "epoch"), ("jax", "train"), ("jax", "eval"), ("jax", "epoch"), ("jax", "pipeline")]
    )
    for r in rows:
        assert REQUIRED <= r.keys() and r["img_per_s"] > 0 and r["image_size"] == 32 and r["model"] == "simple_cnn"
    by = {(r["framework"], r["mode"]): r for r in rows}
    assert by["jax", "epoch"]["images"] == by["torch", "epoch"]["images"] == 24  # 3 full batches of 8
    assert by["jax", "train"]["compile_s"] > 0  # compiled in this run: the bench bypasses the persistent cache
    assert by["torch", "train"]["compile_s"] is None  # eager PyTorch compiles nothing
    assert by["jax", "eval"]["batch_size"] == 8
    # Eval fuses batches per call like the trainer (a whole split), at most the --steps timed.
    assert by["jax", "eval"]["variant"].endswith("2 batches/call")


def test_out_keeps_the_measurements_made_before_a_run_is_cut_short(tmp_path, monkeypatch):
    """On the GPU each bench command runs under a time cap: what it measured before must survive."""
    out = tmp_path / "bench.json"

    def cut_short(self, opts, case):
        raise KeyboardInterrupt  # stands in for the cap's SIGTERM/timeout

    monkeypatch.setattr(bench.JaxSide, "eval", cut_short)
    with pytest.raises(KeyboardInterrupt):
        bench.main(["--cases", "simple_cnn@32", "--modes", "train,eval", "--batch_size", "8", "--eval_batch_size", "8",
                    "--steps", "1", "--warmup", "1", "--out", str(out)])
    kept = json.loads(out.read_text())
    assert [(r["framework"], r["mode"]) for r in kept] == [("torch", "train"), ("torch", "eval"), ("jax", "train")]
    assert all(r["img_per_s"] > 0 for r in kept)


def test_pipeline_runs_as_many_batches_per_call_as_the_training_step():
    """Timed one batch per call, the pipeline's share measures dispatch (on an H100 it read 169% of a
    SimpleCNN step); fused like the step, it compares like with like."""
    rows = bench.main(["--cases", "simple_cnn@32", "--modes", "train,pipeline", "--frameworks", "jax", "--steps_per_call", "2",
                       "--batch_size", "8", "--steps", "4", "--warmup", "1"])
    by = {r["mode"]: r for r in rows}
    assert by["train"]["variant"].endswith("2 steps/call") and by["pipeline"]["variant"].endswith("2 batches/call")
    assert by["pipeline"]["img_per_s"] > by["train"]["img_per_s"] > 0  # the step contains the pipeline and more
    assert {"in_step_ms", "in_step_share"} <= set(by["pipeline"])


def test_the_in_step_share_sees_what_the_pipeline_costs(monkeypatch):
    # A pipeline made costly on purpose (16 extra 384x384 matmuls per batch, on values of the batch
    # so that XLA can neither fold nor hoist them; the batch unchanged) must show as most of a tiny
    # SimpleCNN step: the measurement times the step with its pipeline against the step fed
    # batches prepared beforehand.
    real = pipeline.Preprocess.train

    def costly(self, key, images):
        x = real(self, key, images)
        v = x.reshape(-1)[:384]
        m = jnp.outer(v, v) / 384.0
        for _ in range(16):
            m = jnp.tanh(m @ m)
        return x + 0.0 * m[0, 0]

    monkeypatch.setattr(pipeline.Preprocess, "train", costly)
    rows = bench.main(["--cases", "simple_cnn@32", "--modes", "pipeline", "--frameworks", "jax", "--steps_per_call", "2",
                       "--batch_size", "4", "--steps", "8", "--warmup", "1"])
    assert rows[0]["in_step_share"] > 0.4, rows[0]


def _queued_work(host_s, device_s):
    """A stand-in for asynchronous work: each window costs the host `host_s`, then queues
    `device_s` on a one-worker "device" and returns its future."""
    import concurrent.futures
    import time

    device = concurrent.futures.ThreadPoolExecutor(max_workers=1)

    def window():
        time.sleep(host_s)
        return device.submit(time.sleep, device_s)

    return window, lambda future: future.result()


def test_timed_windows_overlap_the_host_with_the_device_only_when_asked():
    """A synced window adds the host's time to the device's; a loop without host syncs hides it."""
    import statistics

    window, wait = _queued_work(host_s=0.04, device_s=0.09)
    first, times = bench.timed_windows(window, wait, warmup=1, windows=5)
    assert len(times) == 5 and first >= 0.13
    assert 0.085 < statistics.median(times) < 0.115  # the device's 90 ms: the host's 40 ms overlap it
    _, times = bench.timed_windows(window, wait, warmup=1, windows=5, overlap=False)
    assert statistics.median(times) >= 0.129  # 40 + 90 ms, one after the other
