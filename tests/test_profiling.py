"""cifar_jax/profiling.py: the device summary of a jax.profiler trace."""

import gzip
import json

import pytest

from cifar_jax import bench, profiling


def _write_trace(path, events):
    meta = [
        {"ph": "M", "name": "process_name", "pid": 1, "args": {"name": "/host:CPU"}},
        {"ph": "M", "name": "process_name", "pid": 2, "args": {"name": "/device:GPU:0"}},
    ]
    with gzip.open(path, "wt") as f:
        json.dump({"traceEvents": meta + events}, f)


def test_busy_time_is_the_union_of_kernels_on_all_streams_and_kernels_rank_by_total_time(tmp_path):
    path = tmp_path / "perfetto_trace.json.gz"
    _write_trace(
        path,
        [
            {"ph": "X", "pid": 2, "tid": 10, "name": "conv", "ts": 0, "dur": 400},
            {
                "ph": "X",
                "pid": 2,
                "tid": 11,
                "name": "copy",
                "ts": 300,
                "dur": 200,
            },  # overlaps conv on another stream
            {"ph": "X", "pid": 2, "tid": 10, "name": "fusion.1", "ts": 700, "dur": 100},
            {
                "ph": "X",
                "pid": 2,
                "tid": 10,
                "name": "fusion.1",
                "ts": 900,
                "dur": 100,
            },  # idle 500-700 and 800-900
            {
                "ph": "X",
                "pid": 1,
                "tid": 1,
                "name": "PjitFunction",
                "ts": 0,
                "dur": 5000,
            },  # host: not device time
        ],
    )
    s = profiling.trace_summary(path)
    assert s["device"] == "/device:GPU:0" and s["events"] == 4
    assert s["span_ms"] == pytest.approx(1.0) and s["busy_ms"] == pytest.approx(
        0.7
    )  # 0-500 and 700-800, 900-1000
    assert [(k["name"], k["count"]) for k in s["kernels"]] == [("conv", 1), ("copy", 1), ("fusion.1", 2)]
    assert s["kernels"][0]["share"] == pytest.approx(400 / 800)
    text = profiling.format_summary(s)
    assert "busy 0.7 of 1.0 ms (70.0%)" in text and "conv" in text.splitlines()[1]


def test_a_trace_without_a_device_says_so(tmp_path):
    path = tmp_path / "perfetto_trace.json.gz"
    _write_trace(path, [{"ph": "X", "pid": 1, "tid": 1, "name": "PjitFunction", "ts": 0, "dur": 10}])
    s = profiling.trace_summary(path)
    assert s["device"] is None and "/host:CPU" in profiling.format_summary(s)
    with pytest.raises(FileNotFoundError, match="no perfetto_trace.json.gz"):
        profiling.latest_trace(tmp_path / "empty")


@pytest.mark.slow
def test_bench_profile_traces_real_training_and_evaluation_windows(tmp_path, capsys):
    rows = bench.main(
        [
            "--cases",
            "simple_cnn@32",
            "--modes",
            "train,eval",
            "--frameworks",
            "jax",
            "--batch_size",
            "8",
            "--eval_batch_size",
            "8",
            "--steps",
            "1",
            "--warmup",
            "1",
            "--profile",
            str(tmp_path),
        ]
    )
    assert [r["mode"] for r in rows] == ["train", "eval"]
    for row in rows:
        trace = profiling.latest_trace(tmp_path / f"simple_cnn_32_{row['mode']}")
        assert trace.stat().st_size > 0
        assert row["profile"]["device"] is None  # JAX on CPU records no device process
    assert capsys.readouterr().err.count("profile: no device activity") == 2


@pytest.mark.slow
def test_a_training_run_traces_a_window_of_an_epoch_and_its_validation(tmp_path, caplog):
    import collections

    from cifar_jax import trainer
    from tests.support.helpers import tiny_config, without_timing

    def events(trace):
        with gzip.open(trace, "rt") as f:
            return collections.Counter(
                e.get("name") for e in json.load(f)["traceEvents"] if e.get("ph") == "X"
            )

    with caplog.at_level("INFO", logger="cifar_jax"):
        rows = trainer.train_and_evaluate(
            tiny_config(num_epochs=2, **{"profile.epoch": 2, "profile.steps": 2}),
            tmp_path / "run",
            progress=False,
        )
    train, val = (profiling.latest_trace(tmp_path / "run" / "profile" / name) for name in ("train", "val"))
    assert events(train)["PjitFunction(jit(chunk))"] >= 1  # the training chunk ran inside the window
    assert events(val)["PjitFunction(add_batches)"] >= 1 and not events(val)["PjitFunction(jit(chunk))"]
    for name in ("train", "val"):
        assert (
            f"profile of epoch 2's {name} (trace in {tmp_path / 'run' / 'profile' / name}):\nprofile: no "
            "device activity" in caplog.text
        )
    plain = trainer.train_and_evaluate(tiny_config(num_epochs=2), tmp_path / "plain", progress=False)
    assert without_timing(rows) == without_timing(plain)  # tracing changes nothing that is computed
