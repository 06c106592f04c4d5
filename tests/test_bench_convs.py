"""`python -m cifar_jax.bench.convs`: which convolutions it finds, and a tiny real run."""

import pytest

from cifar_jax import bench
from cifar_jax.bench import convs as bench_convs
from tests.support.helpers import assert_fails_in_one_line


def test_finds_every_distinct_convolution_with_its_count():
    layers = bench_convs.conv_layers(bench.Case("resnet18", 32))  # CIFAR stem
    described = {bench_convs.describe(layer): layer["count"] for layer in layers}
    assert described == {
        "3x3 3->64 @32": 1,
        "3x3 64->64 @32": 4,
        "3x3/2 64->128 @32": 1,
        "1x1/2 64->128 @32": 1,
        "3x3 128->128 @16": 3,
        "3x3/2 128->256 @16": 1,
        "1x1/2 128->256 @16": 1,
        "3x3 256->256 @8": 3,
        "3x3/2 256->512 @8": 1,
        "1x1/2 256->512 @8": 1,
        "3x3 512->512 @4": 3,
    }
    assert (
        sum(layer["count"] for layer in layers) == 20
    )  # ResNet-18's 17 3x3 convolutions + 3 downsampling 1x1
    assert [layer["reads_image"] for layer in layers] == [True] + [False] * (len(layers) - 1)
    assert all(not layer["bias"] for layer in layers)
    simple = bench_convs.conv_layers(bench.Case("simple_cnn", 32))
    assert [(bench_convs.describe(layer), layer["bias"]) for layer in simple] == [
        ("3x3 3->32 @32", True),
        ("3x3 32->64 @16", True),
        ("3x3 64->128 @8", True),
        ("3x3 128->256 @4", True),
    ]


@pytest.mark.slow
def test_tiny_run_reports_both_sides_and_count_weighted_totals(capsys):
    rows = bench_convs.main(["--case", "simple_cnn@32", "--batch_size", "2", "--reps", "1"])
    assert len(rows) == 4
    for r in rows:
        assert min(r["jax_forward_ms"], r["torch_forward_ms"], r["jax_train_ms"], r["torch_train_ms"]) > 0
    rows[1]["count"] = 3
    t = bench_convs.totals(rows)
    assert t["jax_train_ms"] == pytest.approx(
        sum(r["jax_train_ms"] for r in rows) + 2 * rows[1]["jax_train_ms"]
    )
    out = capsys.readouterr().out
    assert "3x3 32->64 @16" in out and "all convolutions, weighted by count" in out


@pytest.mark.parametrize(
    "argv,message",
    [
        (["--case", "simple_cnn@32,resnet18@32"], "give exactly one model@size"),
        (["--case", "vgg@32"], "unknown model 'vgg'"),
        (["--reps", "0"], "must be at least 1"),
    ],
)
def test_bad_options_fail_in_one_line(argv, message, capsys):
    assert_fails_in_one_line(bench_convs.main, argv, message, capsys)
