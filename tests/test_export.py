"""Export to PyTorch against real torch/torchvision models: the exported state_dict loads strictly,
gives our logits, and converts back to our arrays exactly."""

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
safetensors_torch = pytest.importorskip("safetensors.torch")

from cifar_jax import export, models, pretrained, trainer  # noqa: E402
from cifar_jax.data import augment  # noqa: E402
from tests.support.helpers import assert_fails_in_one_line, tiny_config  # noqa: E402


def _trained_looking(name, stem, seed=0):
    """Our model with random weights and BatchNorm statistics far from their initial 0 and 1."""
    model = models.create(name, 10, seed=seed, **({} if name == "simple_cnn" else {"stem": stem}))
    rng = np.random.default_rng(seed)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):
        shape = var[...].shape
        var[...] = jnp.asarray(
            rng.normal(size=shape) * 0.1 if path[-1] == "mean" else rng.uniform(0.5, 1.5, shape), jnp.float32
        )
    model.eval()
    return model


CASES = [
    ("simple_cnn", None),
    *(
        pytest.param(arch, stem, marks=[pytest.mark.slow] if arch == "resnet50" else [])
        for arch in ("resnet18", "resnet34", "resnet50")
        for stem in ("imagenet", "cifar")
    ),
]


@pytest.mark.parametrize("name,stem", CASES)
def test_the_export_loads_strictly_into_the_pytorch_model_and_gives_our_logits(
    name, stem, tmp_path, highest_precision
):
    model = _trained_looking(name, stem)
    images = np.random.default_rng(1).uniform(-2, 2, (2, 32, 32, 3)).astype(np.float32)
    ours = np.asarray(model(jnp.asarray(images)))
    export.write(export.state_dict(model, name), tmp_path / "model.pth")

    ref = models.torch_twin(name, 10, **({"stem": stem} if stem else {})).eval()
    ref.load_state_dict(torch.load(tmp_path / "model.pth", weights_only=True), strict=True)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(images.transpose(0, 3, 1, 2).copy())).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.BatchStat)):  # running statistics equal
        key = models.MODELS[name].torch_key(path)
        np.testing.assert_array_equal(ref.state_dict()[key].numpy(), np.asarray(var[...]))


@pytest.mark.parametrize("arch,stem", [("resnet18", "cifar"), ("resnet50", "imagenet")])
def test_convert_of_the_export_gives_back_our_arrays_exactly(arch, stem, tmp_path):
    model = _trained_looking(arch, stem, seed=3)
    export.write(export.state_dict(model, arch), tmp_path / "model.safetensors")
    back = pretrained.from_torchvision(arch, tmp_path / "model.safetensors", stem=stem)
    for (path, a), (_, b) in zip(
        nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(back)), strict=True
    ):
        np.testing.assert_array_equal(np.asarray(a[...]), np.asarray(b[...]), err_msg=str(path))


@pytest.fixture(scope="module")
def trained_workdir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    trainer.train_and_evaluate(tiny_config(num_epochs=2, ema_decay=0.9), workdir, progress=False)
    return workdir


@pytest.mark.parametrize("suffix,ema", [(".pth", False), (".safetensors", True)])
def test_the_cli_exports_a_trained_run_that_pytorch_evaluates_as_we_do(
    trained_workdir, tmp_path, capsys, suffix, ema, highest_precision
):
    from cifar_jax import evaluate

    out = tmp_path / f"model{suffix}"
    assert (
        export.main(
            [
                "--workdir",
                str(trained_workdir),
                "--step",
                "latest",
                "--out",
                str(out),
                *(["--ema"] if ema else []),
            ]
        )
        == 0
    )
    assert (
        f"exported simple_cnn (5 classes), epoch 2{', weight average' if ema else ''} -> {out}"
        in capsys.readouterr().out
    )
    assert [p.name for p in tmp_path.iterdir()] == [out.name]  # no temporary file left

    restored = evaluate.restore(trained_workdir, "latest", ema=ema)
    images = np.random.default_rng(2).integers(0, 256, (4, 32, 32, 3), dtype=np.uint8)
    ours = evaluate.predict(restored, images)
    tensors = torch.load(out, weights_only=True) if suffix == ".pth" else safetensors_torch.load_file(out)
    ref = models.torch_twin("simple_cnn", 5).eval()
    ref.load_state_dict(tensors, strict=True)
    mean, std = augment.NORMALIZATIONS["cifar"]
    x = (images / 255.0 - np.array(mean)) / np.array(std)  # ToTensor(), Normalize(mean, std)
    with torch.no_grad():
        theirs = ref(torch.from_numpy(x.transpose(0, 3, 1, 2).astype(np.float32))).numpy()
    np.testing.assert_allclose(theirs, ours, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(
    "args,message",
    [
        (["--out", "model.onnx"], "must end in .pth, .pt, .safetensors"),
        (["--out", "EXISTING"], "exists; pass --overwrite to replace that file"),
        (["--step", "9", "--out", "model.pth"], "no checkpoint of epoch 9"),
    ],
)
def test_the_cli_refuses_bad_input_in_one_line(trained_workdir, tmp_path, capsys, args, message):
    (tmp_path / "EXISTING.pth").write_text("keep")
    args = [
        a.replace("EXISTING", str(tmp_path / "EXISTING.pth"))
        if a == "EXISTING"
        else str(tmp_path / a)
        if a.startswith("model")
        else a
        for a in args
    ]
    assert_fails_in_one_line(export.main, ["--workdir", str(trained_workdir), *args], message, capsys)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["EXISTING.pth"]
    assert (tmp_path / "EXISTING.pth").read_text() == "keep"
