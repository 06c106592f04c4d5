"""torchvision -> Flax conversion against real torchvision models (random weights, no download)."""

import os
import subprocess

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

import safetensors.numpy  # noqa: E402

from cifar_jax import convert, models, pretrained  # noqa: E402
from tests.support.helpers import assert_fails_in_one_line  # noqa: E402


def _randomised_torchvision(arch, num_classes=1000, seed=0):
    """A torchvision model whose BatchNorm affine parameters and running statistics are random too."""
    torch.manual_seed(seed)
    model = getattr(torchvision.models, arch)(num_classes=num_classes)
    with torch.no_grad():
        for mod in model.modules():
            if isinstance(mod, torch.nn.BatchNorm2d):
                mod.weight.uniform_(0.5, 1.5)
                mod.bias.normal_(0.0, 0.2)
                mod.running_mean.normal_(0.0, 0.2)
                mod.running_var.uniform_(0.5, 2.0)
    return model


def _nhwc(x):
    return jnp.asarray(x.transpose(0, 2, 3, 1))


def _tol(ref, factor):
    return factor * max(1.0, float(np.abs(ref).max()))


@nnx.jit
def _forward(model, x):
    return model(x)


@pytest.mark.parametrize(
    "arch",
    [
        "resnet18",
        pytest.param("resnet34", marks=pytest.mark.slow),
        pytest.param("resnet50", marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("size", [32, 64])
def test_logits_and_running_stats_match_torchvision(arch, size, highest_precision):
    ref = _randomised_torchvision(arch)
    model = pretrained.from_torchvision(arch, ref.state_dict())
    x = np.random.RandomState(size).randn(16, 3, size, size).astype(np.float32)

    ref.eval(), model.eval()
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_forward(model, _nhwc(x)), expected, rtol=0, atol=_tol(expected, 1e-4))

    # Train mode: batch statistics, and running buffers updated (PyTorch: unbiased running_var).
    ref.train(), model.train()
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_forward(model, _nhwc(x)), expected, rtol=0, atol=_tol(expected, 2e-4))
    updated = {k: v.numpy() for k, v in ref.state_dict().items() if "running" in k}
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
        np.testing.assert_allclose(
            var[...], updated[models.MODELS[arch].torch_key(path)], rtol=1e-4, atol=1e-5
        )

    ref.eval(), model.eval()
    with torch.no_grad():
        expected = ref(torch.from_numpy(x)).numpy()
    np.testing.assert_allclose(_forward(model, _nhwc(x)), expected, rtol=0, atol=_tol(expected, 1e-4))


def _arrays(model):
    return {p: np.asarray(v[...]) for p, v in nnx.to_flat_state(nnx.state(model))}


def _assert_same_arrays(a, b):
    assert a.keys() == b.keys()
    for k in a:
        np.testing.assert_array_equal(a[k], b[k], err_msg=str(k))


def test_pth_and_safetensors_round_trips_are_identical(tmp_path):
    from safetensors.torch import save_file

    sd = _randomised_torchvision("resnet18", num_classes=10).state_dict()
    torch.save(sd, tmp_path / "w.pth")
    save_file({k: v.contiguous() for k, v in sd.items()}, tmp_path / "w.safetensors")
    from_dict = _arrays(pretrained.from_torchvision("resnet18", sd))
    _assert_same_arrays(from_dict, _arrays(pretrained.from_torchvision("resnet18", tmp_path / "w.pth")))
    _assert_same_arrays(
        from_dict, _arrays(pretrained.from_torchvision("resnet18", str(tmp_path / "w.safetensors")))
    )
    # And the values are torchvision's, in Flax layout.
    np.testing.assert_array_equal(
        from_dict[("conv1", "kernel")], sd["conv1.weight"].numpy().transpose(2, 3, 1, 0)
    )
    np.testing.assert_array_equal(
        from_dict[("layer2", 0, "downsample", "layers", 1, "var")],
        sd["layer2.0.downsample.1.running_var"].numpy(),
    )


def test_training_checkpoint_wrappers_are_unwrapped():
    sd = torchvision.models.resnet18(num_classes=5).state_dict()
    wrapped = {"state_dict": {f"module.{k}": v for k, v in sd.items()}, "epoch": 3}
    _assert_same_arrays(
        _arrays(pretrained.from_torchvision("resnet18", sd)),
        _arrays(pretrained.from_torchvision("resnet18", wrapped)),
    )


def test_missing_key_is_named():
    sd = torchvision.models.resnet18().state_dict()
    del sd["layer3.1.bn2.running_var"]
    with pytest.raises(
        pretrained.ConversionError, match=r"'layer3\.1\.bn2\.running_var' missing.*torchvision resnet18"
    ):
        pretrained.from_torchvision("resnet18", sd)


def test_extra_key_is_named():
    sd = torchvision.models.resnet18().state_dict()
    sd["layer5.0.conv1.weight"] = torch.zeros(3)
    with pytest.raises(
        pretrained.ConversionError, match=r"not used by resnet18.*'layer5\.0\.conv1\.weight'.*wrong --arch"
    ):
        pretrained.from_torchvision("resnet18", sd)


def test_wrong_shape_names_key_and_both_shapes():
    sd = torchvision.models.resnet18().state_dict()
    sd["layer1.0.conv1.weight"] = torch.zeros(64, 64, 5, 5)
    with pytest.raises(
        pretrained.ConversionError,
        match=r"'layer1\.0\.conv1\.weight': source \(64, 64, 5, 5\), resnet18 expects \(64, 64, 3, 3\)",
    ):
        pretrained.from_torchvision("resnet18", sd)


def test_weights_of_another_architecture_are_refused():
    with pytest.raises(pretrained.ConversionError, match="missing from the source weights"):
        pretrained.from_torchvision("resnet34", torchvision.models.resnet18().state_dict())
    with pytest.raises(
        pretrained.ConversionError, match="convertible architectures: resnet18, resnet34, resnet50"
    ):
        pretrained.from_torchvision("simple_cnn", {})


def test_head_replacement_keeps_backbone_and_reinitialises_fc():
    sd = _randomised_torchvision("resnet18").state_dict()
    model = pretrained.from_torchvision("resnet18", sd, num_classes=7)
    assert model.fc.kernel.shape == (512, 7) and model.fc.bias.shape == (7,)
    np.testing.assert_array_equal(model.layer4[1].bn2.scale[...], sd["layer4.1.bn2.weight"].numpy())
    # Fresh head, PyTorch's default init range U(-1/sqrt(512), 1/sqrt(512)): models.create's own.
    assert 0 < float(jnp.abs(model.fc.kernel[...]).max()) <= 1 / 512**0.5
    _assert_same_arrays(_arrays(model.fc), _arrays(models.create("resnet18", 7, stem="imagenet").fc))


def _convert_resnet18(state_dict, out, *flags) -> int:
    """`python -m cifar_jax.convert --arch resnet18` of the file `state_dict` into `out`: its status."""
    return convert.main(["--arch", "resnet18", "--state-dict", str(state_dict), "--out", str(out), *flags])


def test_convert_cli_writes_weights_that_load_back(tmp_path, capsys):
    sd = _randomised_torchvision("resnet18", num_classes=10).state_dict()
    torch.save(sd, tmp_path / "r18.pth")
    assert _convert_resnet18(tmp_path / "r18.pth", tmp_path / "out") == 0
    assert "10 classes" in capsys.readouterr().out
    loaded = pretrained.load(tmp_path / "out")
    _assert_same_arrays(_arrays(loaded), _arrays(pretrained.from_torchvision("resnet18", sd)))
    with_head = pretrained.load(tmp_path / "out", num_classes=100, seed=3)
    assert with_head.fc.kernel.shape == (512, 100)
    _assert_same_arrays(
        _arrays(with_head.fc), _arrays(models.create("resnet18", 100, seed=3, stem="imagenet").fc)
    )
    np.testing.assert_array_equal(with_head.conv1.kernel[...], loaded.conv1.kernel[...])


def test_convert_cli_reports_bad_input_in_one_line(tmp_path, capsys):
    argv = ["--arch", "resnet18", "--state-dict", str(tmp_path / "nope.pth"), "--out", str(tmp_path / "o")]
    assert_fails_in_one_line(convert.main, argv, "error: no such weights file", capsys)
    assert not (tmp_path / "o").exists()


def test_load_without_converted_weights_says_how_to_make_them(tmp_path):
    with pytest.raises(FileNotFoundError, match="python -m cifar_jax.convert"):
        pretrained.load(tmp_path)


@pytest.fixture(scope="module")
def convert_inputs(tmp_path_factory):
    """What the refusals below are given, made once: weights, noise, a training run, converted weights."""
    tmp_path = tmp_path_factory.mktemp("convert_inputs")
    torch.save(_randomised_torchvision("resnet18", num_classes=10).state_dict(), tmp_path / "r18.pth")
    (tmp_path / "noise.pth").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "noise.safetensors").write_bytes(bytes(range(256)) * 10)
    (tmp_path / "a_file").write_text("keep")
    workdir = tmp_path / "workdir"  # a training run: never replaced, --overwrite or not
    (workdir / "checkpoints" / "1").mkdir(parents=True)
    (workdir / "config.json").write_text("{}")
    (workdir / "meta.json").write_text("{}")
    safetensors.numpy.save_file(
        {k: v.numpy().astype(np.int64) for k, v in _randomised_torchvision("resnet18").state_dict().items()},
        str(tmp_path / "int64.safetensors"),
    )
    safetensors.numpy.save_file(
        {k: np.asarray(v.numpy() > 0) for k, v in _randomised_torchvision("resnet18").state_dict().items()},
        str(tmp_path / "bool.safetensors"),
    )
    assert _convert_resnet18(tmp_path / "r18.pth", tmp_path / "converted") == 0
    return tmp_path


@pytest.mark.parametrize(
    "case",
    [
        "random_pth",
        "random_safetensors",
        "out_is_a_file",
        "negative_classes",
        "out_not_empty",
        "out_is_a_workdir",
        "int64_tensors",
        "bool_tensors",
    ],
)
def test_convert_cli_refuses_bad_input_in_one_line_and_keeps_what_exists(convert_inputs, capsys, case):
    # Every case refuses and writes nothing, so they share their inputs (each checks that whole directory).
    tmp_path, workdir, existing = convert_inputs, convert_inputs / "workdir", convert_inputs / "converted"
    args, message = {
        "random_pth": (
            ["--state-dict", str(tmp_path / "noise.pth"), "--out", str(tmp_path / "o")],
            "noise.pth is not a readable PyTorch state_dict",
        ),
        "random_safetensors": (
            ["--state-dict", str(tmp_path / "noise.safetensors"), "--out", str(tmp_path / "o")],
            "is not a readable .safetensors file",
        ),
        "out_is_a_file": (
            ["--state-dict", str(tmp_path / "r18.pth"), "--out", str(tmp_path / "a_file")],
            "a_file is a file; pass a directory",
        ),
        "negative_classes": (
            ["--state-dict", str(tmp_path / "r18.pth"), "--out", str(tmp_path / "o"), "--num_classes=-3"],
            "--num_classes=-3 must be a positive integer",
        ),
        "out_not_empty": (
            ["--state-dict", str(tmp_path / "r18.pth"), "--out", str(existing), "--num_classes=7"],
            "holds converted weights; pass --overwrite to replace them",
        ),
        "out_is_a_workdir": (
            ["--state-dict", str(tmp_path / "r18.pth"), "--out", str(workdir), "--overwrite"],
            "holds other files than converted weights; it is never replaced",
        ),
        "int64_tensors": (
            ["--state-dict", str(tmp_path / "int64.safetensors"), "--out", str(tmp_path / "o")],
            "source tensor 'bn1.bias' is int64, not floating point",
        ),
        "bool_tensors": (
            ["--state-dict", str(tmp_path / "bool.safetensors"), "--out", str(tmp_path / "o")],
            "source tensor 'bn1.bias' is bool, not floating point",
        ),
    }[case]
    before = {p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert_fails_in_one_line(convert.main, ["--arch", "resnet18", *args], message, capsys)
    assert {
        p: p.read_bytes() for p in tmp_path.rglob("*") if p.is_file()
    } == before  # nothing written, nothing lost


def test_convert_overwrite_replaces_the_directory_whole(tmp_path):
    torch.save(_randomised_torchvision("resnet18", num_classes=10).state_dict(), tmp_path / "r18.pth")
    out = tmp_path / "converted"
    assert _convert_resnet18(tmp_path / "r18.pth", out) == 0
    assert _convert_resnet18(tmp_path / "r18.pth", out, "--num_classes=7", "--overwrite") == 0
    assert pretrained.load(out).fc.kernel.shape == (512, 7)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["converted", "r18.pth"]


def test_convert_removes_the_staging_directories_of_dead_processes_only(tmp_path):
    torch.save(_randomised_torchvision("resnet18", num_classes=10).state_dict(), tmp_path / "r18.pth")
    dead = subprocess.Popen(["true"])
    dead.wait()
    for pid in (dead.pid, os.getppid()):  # a convert killed mid-write, and one still writing
        (tmp_path / f".converted.partial-{pid}" / "state").mkdir(parents=True)
    assert _convert_resnet18(tmp_path / "r18.pth", tmp_path / "converted") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(
        [f".converted.partial-{os.getppid()}", "converted", "r18.pth"]
    )


def test_converted_weights_do_not_share_memory_with_the_torch_model():
    """Tensor.numpy() shares memory, and a CPU jax.Array made from it may too: a train-mode forward of
    the torch model would then change the converted BatchNorm statistics in place."""
    ref = _randomised_torchvision("resnet18", num_classes=10)
    model = pretrained.from_torchvision("resnet18", ref.state_dict())
    before = np.array(model.bn1.mean[...])
    ref.train()
    ref(torch.randn(4, 3, 32, 32))
    assert not np.allclose(ref.bn1.running_mean.numpy(), before)  # the torch buffers did move
    np.testing.assert_array_equal(np.asarray(model.bn1.mean[...]), before)
