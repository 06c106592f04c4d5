"""eval.py and the evaluation module on a tiny run trained here."""

import json
import os
import re
import shutil
import subprocess
import sys

import numpy as np
import pytest

from cifar_jax import corruptions, data, evaluate, trainer
from tests.support.helpers import assert_fails_in_one_line, tiny_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory):
    workdir = tmp_path_factory.mktemp("run")
    rows = trainer.train_and_evaluate(tiny_config(num_epochs=2), workdir, progress=False)
    return workdir, rows


def _eval(*args):
    return subprocess.run(
        [sys.executable, "eval.py", *args], cwd=ROOT, capture_output=True, text=True, timeout=300
    )


@pytest.mark.slow
def test_report_on_val_matches_the_logged_val_acc(run_dir, tmp_path):
    workdir, rows = run_dir
    out = _eval(f"--workdir={workdir}", "--step=2", "--split=val", f"--out={tmp_path}")
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["step"] == 2 and report["split"] == "val"
    assert report["top1_acc"] == pytest.approx(rows[1]["val_acc"], abs=1e-9)
    assert report["n_examples"] == 16  # eval_batch_size 12 does not divide it
    assert report["top5_acc"] >= report["top1_acc"] and 0 <= report["ece"] <= 1
    per_class = (tmp_path / "per_class.csv").read_text().splitlines()
    assert per_class[0] == "class_index,class_name,n_examples,accuracy" and len(per_class) == 1 + 5
    assert sum(int(line.split(",")[2]) for line in per_class[1:]) == 16
    for png in ("confusion.png", "reliability.png"):
        assert (tmp_path / png).stat().st_size > 1000


def test_tta_mirrors_the_images(run_dir):
    workdir, _ = run_dir
    restored = evaluate.restore(workdir, "latest")
    x = data.load_splits(restored.config.data).test[0]
    plain, mirrored = evaluate.predict(restored, x), evaluate.predict(restored, x[:, :, ::-1])
    both = evaluate.tta_logits(restored, x)

    def softmax(z):
        e = np.exp(z - z.max(-1, keepdims=True))
        return e / e.sum(-1, keepdims=True)

    np.testing.assert_allclose(both, np.log((softmax(plain) + softmax(mirrored)) / 2), rtol=1e-5, atol=1e-6)
    assert not np.allclose(plain, mirrored)  # the mirror really is another input


@pytest.mark.slow
def test_submission_and_corruption_suite(run_dir, tmp_path):
    """One eval.py run (it is slow to start) checks both the submission file and --corruptions."""
    workdir, _ = run_dir
    n = 7
    ood = tmp_path / "ood"
    ood.mkdir()
    rng = np.random.default_rng(0)
    files = {}
    for d in range(19):
        files[d] = rng.integers(0, 256, (5 * n, 32, 32, 3), dtype=np.uint8)
        np.save(ood / f"distortion{d:02d}.npy", files[d])
    out = _eval(
        f"--workdir={workdir}",
        f"--ood_dir={ood}",
        "--corruptions",
        "--corruption_limit=8",
        f"--out={tmp_path / 'eval'}",
    )
    assert out.returncode == 0, out.stderr[-2000:]
    report = json.loads((tmp_path / "eval" / "report.json").read_text())["corruptions"]
    assert report["n_examples"] == 8 and set(report["accuracy"]) == set(corruptions.NAMES)
    assert all(len(v) == 5 and all(0 <= a <= 1 for a in v) for v in report["accuracy"].values())
    assert report["mean"] == pytest.approx(np.mean(list(report["accuracy"].values())))
    assert (tmp_path / "eval" / "corruptions.png").stat().st_size > 1000

    lines = (tmp_path / "eval" / "submission_ood.csv").read_text().splitlines()
    assert lines[0] == "id,label" and len(lines) == 1 + 19 * 5 * n
    restored = evaluate.restore(workdir)
    pred = (
        evaluate.predict(restored, np.concatenate([files[d] for d in range(19)])).argmax(-1).reshape(19, 5, n)
    )
    expected = [
        f"distortion{d:02d}_{s}_{i},{pred[d, s - 1, i]}"
        for d in range(19)
        for s in range(1, 6)
        for i in range(n)
    ]
    assert lines[1:] == expected


@pytest.mark.parametrize(
    "bad,message",
    [
        (np.zeros((35, 32, 32, 3), np.float32), "float32 (35, 32, 32, 3); expected uint8"),
        (np.zeros((34, 32, 32, 3), np.uint8), "(34, 32, 32, 3); expected uint8 (5*n, 32, 32, 3)"),
        (np.zeros((35, 16, 16, 3), np.uint8), "(35, 16, 16, 3)"),
    ],
)
def test_bad_distortion_files_are_named(tmp_path, bad, message):
    np.save(tmp_path / "distortion00.npy", np.zeros((35, 32, 32, 3), np.uint8))
    np.save(tmp_path / "distortion01.npy", bad)
    with pytest.raises(evaluate.EvalError, match=r"distortion01\.npy has .*" + re.escape(message)):
        evaluate.load_distortions(tmp_path)


@pytest.mark.parametrize(
    "names,message",
    [
        (["distortion00", "distortion1"], r"holds distortion1\.npy, not named distortionNN\.npy"),
        (["distortion00", "distortion100"], r"holds distortion100\.npy, not named distortionNN\.npy"),
        (["distortion00", "distortion02"], r"lacks distortion01\.npy .*without gaps"),
        (["distortion01"], r"lacks distortion00\.npy"),
    ],
)
def test_every_distortion_file_is_covered_or_named(tmp_path, names, message):
    for name in names:
        np.save(tmp_path / f"{name}.npy", np.zeros((5, 32, 32, 3), np.uint8))
    with pytest.raises(evaluate.EvalError, match=message):
        evaluate.load_distortions(tmp_path)


def test_an_empty_or_zero_byte_distortion_file_is_named(tmp_path):
    np.save(tmp_path / "distortion00.npy", np.zeros((0, 32, 32, 3), np.uint8))
    with pytest.raises(evaluate.EvalError, match=r"distortion00\.npy holds no images"):
        evaluate.load_distortions(tmp_path)
    (tmp_path / "distortion00.npy").write_bytes(b"")
    with pytest.raises(evaluate.EvalError, match=r"distortion00\.npy is not a readable \.npy array"):
        evaluate.load_distortions(tmp_path)


def test_the_corruption_subset_covers_the_classes_of_a_sorted_split():
    y = np.repeat(np.arange(100), 100)  # sorted by class, as the real test split is
    x = np.arange(len(y))
    xs, ys = evaluate.subset((x, y), 500)
    assert len(ys) == 500 and len(set(ys.tolist())) > 90
    np.testing.assert_array_equal(y[xs], ys)  # images and labels stay paired, in their order
    assert np.all(np.diff(xs) > 0)
    np.testing.assert_array_equal(evaluate.subset((x, y), 500)[0], xs)  # a fixed subset
    assert evaluate.subset((x, y), 0)[0] is x


@pytest.mark.parametrize(
    "case", ["val_without_split", "out_under_a_file", "out_name_too_long", "out_with_foreign_files"]
)
def test_eval_input_errors_are_one_line_before_anything_is_written(run_dir, tmp_path, case, capsys):
    """In process (eval.py's main); the command line's own path is
    test_eval_with_bad_distortions_fails_before_anything_is_written's."""
    import eval as eval_cli

    workdir, _ = run_dir
    args, message = {
        "val_without_split": ([f"--workdir={tmp_path / 'noval'}", "--split=val"], "the run has no val split"),
        "out_under_a_file": (
            [f"--workdir={workdir}", f"--out={tmp_path / 'a_file' / 'eval'}"],
            "a_file is a file, not a directory",
        ),
        "out_name_too_long": (
            [f"--workdir={workdir}", f"--out={tmp_path / ('y' * 300) / 'eval'}"],
            "cannot write to --out",
        ),
        "out_with_foreign_files": (
            [f"--workdir={workdir}", f"--out={tmp_path / 'mine'}"],
            "holds files that eval.py did not write (notes.txt)",
        ),
    }[case]
    (tmp_path / "a_file").write_text("")
    (tmp_path / "mine").mkdir()
    (tmp_path / "mine" / "notes.txt").write_text("keep me")
    if case == "val_without_split":
        trainer.train_and_evaluate(
            tiny_config(num_epochs=1, **{"data.val_fraction": 0.0}), tmp_path / "noval", progress=False
        )
    before = sorted(str(p) for p in tmp_path.rglob("*"))
    capsys.readouterr()  # what training printed
    assert_fails_in_one_line(eval_cli.main, args, message, capsys)
    assert sorted(str(p) for p in tmp_path.rglob("*")) == before


@pytest.mark.slow
def test_eval_outputs_replace_the_last_ones_whole(run_dir, tmp_path):
    """A new evaluation replaces all of the last one's files at once: none of a stopped run's
    partial outputs (here: the old submission, which the new run does not write) is left beside them."""
    workdir, _ = run_dir
    ood = tmp_path / "ood"
    ood.mkdir()
    np.save(ood / "distortion00.npy", np.zeros((5, 32, 32, 3), np.uint8))
    out = tmp_path / "eval"
    assert _eval(f"--workdir={workdir}", "--step=2", f"--ood_dir={ood}", f"--out={out}").returncode == 0
    assert (out / "submission_ood.csv").exists()
    first = json.loads((out / "report.json").read_text())
    (tmp_path / ".eval.partial-99999").mkdir()  # left by a killed run
    done = _eval(f"--workdir={workdir}", "--step=1", f"--out={out}")
    assert done.returncode == 0, done.stderr[-1500:]
    assert sorted(p.name for p in out.iterdir()) == [
        "confusion.png",
        "per_class.csv",
        "reliability.png",
        "report.json",
    ]
    assert first["step"] == 2 and json.loads((out / "report.json").read_text())["step"] == 1
    assert sorted(p.name for p in tmp_path.iterdir()) == ["eval", "ood"]


def test_eval_with_bad_distortions_fails_before_anything_is_written(run_dir, tmp_path):
    workdir, _ = run_dir
    ood = tmp_path / "ood"
    ood.mkdir()
    np.save(ood / "distortion00.npy", np.zeros((34, 32, 32, 3), np.uint8))
    out = _eval(f"--workdir={workdir}", f"--ood_dir={ood}", f"--out={tmp_path / 'eval'}")
    errors = [line for line in out.stderr.splitlines() if line.startswith("error:")]
    assert (
        out.returncode == 2 and len(errors) == 1 and "distortion00.npy has uint8 (34, 32, 32, 3)" in errors[0]
    ), out.stderr[-1500:]
    assert not (tmp_path / "eval").exists()


def test_workdir_without_checkpoint(tmp_path):
    (tmp_path / "config.json").write_text(tiny_config().to_json())
    with pytest.raises(evaluate.EvalError, match="holds no complete checkpoint"):
        evaluate.restore(tmp_path)


def test_truncated_checkpoint_is_reported(run_dir, tmp_path):
    workdir, _ = run_dir
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    state_dir = copy / "checkpoints" / "2" / "params"
    biggest = max((p for p in state_dir.rglob("*") if p.is_file()), key=lambda p: p.stat().st_size)
    with open(biggest, "r+b") as f:
        f.truncate(biggest.stat().st_size // 3)
    with pytest.raises(evaluate.EvalError, match="does not restore"):
        evaluate.restore(copy, 2)


def test_config_that_no_longer_matches_the_checkpoint(run_dir, tmp_path):
    workdir, _ = run_dir
    copy = tmp_path / "run"
    shutil.copytree(workdir, copy)
    config = json.loads((copy / "config.json").read_text())
    config["model"]["num_classes"] = 7
    (copy / "config.json").write_text(json.dumps(config))
    with pytest.raises(evaluate.EvalError, match="does not restore into simple_cnn as configured"):
        evaluate.restore(copy)


def _smooth_color_images(n=16, seed=0):
    """Natural-looking test images: smooth colour gradients (bilinear from 4x4) plus fine texture."""
    import jax

    rng = np.random.default_rng(seed)
    small = rng.uniform(30, 220, (n, 4, 4, 3))
    smooth = np.asarray(jax.image.resize(small, (n, 32, 32, 3), "bilinear"))
    return np.clip(smooth + rng.normal(0, 8, smooth.shape), 0, 255).astype(np.uint8)


def _psnr(a: np.ndarray, b: np.ndarray) -> float:
    """Peak signal-to-noise ratio of uint8 images in dB (inf when identical)."""
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float("inf") if mse == 0 else float(10 * np.log10(255.0**2 / mse))


@pytest.mark.parametrize("name", corruptions.NAMES)
def test_corruption_identity_at_zero_and_monotone_in_severity(name):
    x = _smooth_color_images()
    np.testing.assert_array_equal(corruptions.corrupt(x, name, 0), x)
    psnrs = [_psnr(x, corruptions.corrupt(x, name, s)) for s in corruptions.SEVERITIES]
    assert all(a > b for a, b in zip(psnrs, psnrs[1:])), psnrs
    y = corruptions.corrupt(x, name, 3)
    assert y.dtype == np.uint8 and y.shape == x.shape
    np.testing.assert_array_equal(y, corruptions.corrupt(x, name, 3))  # deterministic
