"""The PyTorch reference trainer (`cifar_jax.bench.reference`) and the comparison command.

The reference is trusted where it matters for a comparison of whole runs: its float64 steps equal
our train step (which the trajectory tests hold equal to PyTorch's), its schedules equal ours at
every step, its tensor augmentation computes torchvision's operations, and its rows carry the
keys train.py writes."""

import json
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cifar_jax import data, models, optim, steps
from cifar_jax.bench import compare, reference
from cifar_jax.data import pipeline
from tests.support.helpers import assert_fails_in_one_line, load_torch_simple_cnn, tiny_config

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")


def _digits_splits(n_train: int, n_val: int = 16, n_test: int = 16):
    d = data.load("digits")
    x, y = d.x_train, d.y_train
    return data.Splits(
        (x[:n_train], y[:n_train]),
        (x[n_train : n_train + n_val], y[n_train : n_train + n_val]),
        (d.x_test[:n_test], d.y_test[:n_test]),
        d.label_names,
    )


def _digits_config(**overrides):
    return tiny_config(
        **{
            "model.num_classes": 10,
            "data.source": "digits",
            "batch_size": 8,
            "eval_batch_size": 8,
            "data.augment.crop_padding": 0,
            "data.augment.flip": False,
            **overrides,
        }
    )


SCHEDULES = [
    dict(name="step", per="epoch", step_size=2, gamma=0.1),
    dict(name="cosine", per="epoch", warmup_epochs=1),
    dict(name="cosine", per="step", warmup_epochs=1, min_lr=0.004),
    dict(name="linear", per="step", warmup_epochs=2, warmup_start_factor=0.2),
    dict(name="step", per="step", step_size=1, gamma=0.5, warmup_epochs=1),
    dict(name="constant", per="epoch"),
]


@pytest.mark.parametrize("schedule", SCHEDULES, ids=lambda s: "-".join(f"{v}" for v in s.values()))
def test_schedules_step_for_step_like_ours(schedule):
    """torch.optim.lr_scheduler, stepped per epoch or per step, gives the learning rate of every
    optimizer step that `optim.make_schedule` gives (5 epochs of 3 steps)."""
    config = tiny_config(
        num_epochs=5, **{"optimizer.lr": 0.1}, **{f"schedule.{k}": v for k, v in schedule.items()}
    )
    spe = 3
    ours = optim.make_schedule(config.schedule, 0.1, config.num_epochs, spe)
    opt = torch.optim.SGD([torch.nn.Parameter(torch.zeros(1))], lr=0.1)
    sched = reference.make_scheduler(opt, config, spe)
    theirs = []
    for t in range(config.num_epochs * spe):
        theirs.append(opt.param_groups[0]["lr"])
        opt.step()
        if schedule["per"] == "step" or (t + 1) % spe == 0:
            sched.step()
    np.testing.assert_allclose(theirs, [float(ours(t)) for t in range(len(theirs))], rtol=1e-6, atol=1e-9)
    assert len(set(np.round(theirs, 9))) > 1 or schedule["name"] == "constant"  # the schedule moved


@pytest.mark.slow
def test_float64_steps_equal_our_train_step(x64):
    """Six SGD+Nesterov steps through a warmup into a per-step cosine, coupled L2 on kernels only,
    label smoothing: the reference trainer's `step` and our `update_step` from the same weights on
    the same batches agree in every loss, learning rate and final weight."""
    config = _digits_config(
        num_epochs=3,
        label_smoothing=0.1,
        **{
            "optimizer.name": "sgd",
            "optimizer.lr": 0.05,
            "optimizer.momentum": 0.9,
            "optimizer.nesterov": True,
            "optimizer.weight_decay": 5e-3,
            "optimizer.decay_norm_and_bias": False,
            "schedule.name": "cosine",
            "schedule.per": "step",
            "schedule.warmup_epochs": 1,
        },
    )
    splits = _digits_splits(n_train=16)  # 2 steps per epoch: the warmup ends after step 2
    trainer = reference.ReferenceTrainer(config, splits)
    trainer.model.double().train()
    model = models.create("simple_cnn", 10, dtype="float64")
    load_torch_simple_cnn(model, trainer.model)
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model)))
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    schedule = optim.make_schedule(config.schedule, 0.05, 3, 2)
    tx = optim.make_optimizer(config.optimizer, schedule)
    preprocess = pipeline.Preprocess()
    cfg = steps.StepConfig(graphdef, tx, None, preprocess, 8, 10, 0.1, seed=0)
    state, metrics = (
        {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params)},
        steps.zero_metrics(),
    )
    update = jax.jit(lambda s, m, x, y: steps.update_step(cfg, s, m, x, y))
    x_all, y_all = splits.train
    for t in range(6):
        idx = np.arange(8) + 8 * (t % 2)
        x = np.asarray(preprocess.eval(jnp.asarray(x_all[idx])), np.float64)
        assert trainer.lr() == pytest.approx(float(schedule(t)), rel=1e-6)
        before = float(metrics["loss_sum"])
        state, metrics = update(state, metrics, x, jnp.asarray(y_all[idx]))
        loss_sum, _ = trainer.step(
            torch.from_numpy(x).permute(0, 3, 1, 2).contiguous(), torch.from_numpy(y_all[idx]).long()
        )
        assert loss_sum == pytest.approx(
            float(metrics["loss_sum"]) - before, rel=1e-6
        )  # the parity tests' tolerances
    after = models.create("simple_cnn", 10, dtype="float64")
    load_torch_simple_cnn(after, trainer.model)
    theirs = jax.tree.leaves(nnx.split(after, nnx.Param, nnx.BatchStat)[1:])
    ours = jax.tree.leaves((state["params"], state["batch_stats"]))
    assert len(ours) == len(theirs)
    for got, ref in zip(ours, theirs, strict=True):
        # atol: after one step the first kernel already differs by 3e-10 (float64 on both sides, and
        # the same between our step and a plain PyTorch loop); 6 steps grow it to 1e-8, 1e-5 of a move.
        np.testing.assert_allclose(got, ref, rtol=1e-6, atol=3e-8)
    moved = [
        float(jnp.max(jnp.abs(a - b)))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"]))
        if a.ndim > 1
    ]
    assert min(moved) > 1e-3, moved  # real updates were compared


def test_jitter_computes_torchvisions_adjustments():
    """`jitter` with given factors and orders equals torchvision's adjust_brightness /
    adjust_contrast / adjust_saturation applied image by image in that order (float images)."""
    from torchvision.transforms.v2 import functional as F

    g = torch.Generator().manual_seed(0)
    x = torch.randint(0, 256, (6, 8, 8, 3), generator=g).double()
    factors = torch.empty(6, 3, dtype=torch.float64).uniform_(0.5, 1.6, generator=g)
    order = torch.stack([torch.randperm(3, generator=g) for _ in range(6)])
    got = reference.jitter(x, factors, order)
    adjust = (F.adjust_brightness, F.adjust_contrast, F.adjust_saturation)
    for i in range(6):
        img = x[i].permute(2, 0, 1) / 255.0
        for op in order[i].tolist():
            img = adjust[op](img, float(factors[i, op]))
        torch.testing.assert_close(got[i], img.permute(1, 2, 0) * 255.0, rtol=1e-9, atol=1e-9)
    assert not torch.allclose(got, x)


def test_crop_and_flip_are_torchvisions_per_image():
    """Each augmented image is a window of the zero-padded image at an offset within +-padding,
    mirrored or not; offsets and flips differ between images."""
    config = _digits_config(**{"data.augment.crop_padding": 4, "data.augment.flip": True})
    aug = reference.FastAugment(config.data, torch.Generator().manual_seed(0))
    x = torch.randint(1, 256, (32, 32, 32, 3), dtype=torch.uint8)  # no zero pixel: the fill is visible
    out = aug.crop(x)
    padded = torch.nn.functional.pad(x, (0, 0, 4, 4, 4, 4))
    offsets = set()
    for i in range(len(x)):
        found = [
            (dy, dx)
            for dy in range(9)
            for dx in range(9)
            if torch.equal(out[i], padded[i, dy : dy + 32, dx : dx + 32])
        ]
        assert len(found) == 1, i
        offsets.add(found[0])
    assert len(offsets) > 10
    normalized = aug(x)
    assert normalized.shape == (32, 3, 32, 32) and normalized.dtype == torch.float32


@pytest.mark.slow
def test_rows_carry_the_keys_train_py_writes_and_the_run_learns(tmp_path):
    """A run of the reference on the bundled digits (all options of the fast input path) writes
    rows with our keys, a test report, and learns: far above chance (10%) after 3 epochs."""
    config = _digits_config(num_epochs=3, **{"data.val_fraction": 0.2, "optimizer.lr": 3e-3})
    report = reference.main(config, str(tmp_path), input_path="fast", workers=0, threads=0)
    rows = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    ours_first = {
        "epoch",
        "phase",
        "train_loss",
        "train_acc",
        "val_loss",
        "val_acc",
        "lr",
        "epoch_time_s",
        "train_img_per_s",
        "val_s",
        "host_s",
        "checkpoint_s",
        "compile_s",
        "first_step_s",
    }
    assert set(rows[0]) == ours_first and all(
        set(r) == ours_first - {"compile_s", "first_step_s"} for r in rows[1:]
    )
    assert [r["epoch"] for r in rows] == [1, 2, 3]
    assert report["top1_acc"] > 0.5 and rows[-1]["val_acc"] > 0.5, (report, rows[-1])
    assert (
        report["n_examples"] == len(data.load("digits").y_test)
        and json.loads((tmp_path / "report.json").read_text()) == report
    )


@pytest.mark.slow
def test_rows_have_the_keys_of_a_run_here(tmp_path):
    """The same config trained here: every row's keys are the reference's."""
    from cifar_jax.trainer import train_and_evaluate

    config = tiny_config(num_epochs=2)
    ours = train_and_evaluate(config, tmp_path / "jax", progress=False)
    reference.main(config, str(tmp_path / "torch"), input_path="fast", workers=0, threads=0)
    theirs = [json.loads(line) for line in (tmp_path / "torch" / "metrics.jsonl").read_text().splitlines()]
    assert [set(r) for r in theirs] == [set(r) for r in ours]


def test_dataloader_path_with_ema_cutmix_accumulation_and_clipping(tmp_path):
    config = tiny_config(
        num_epochs=1,
        ema_decay=0.9,
        **{
            "data.augment.cutmix_alpha": 1.0,
            "data.augment.mixup_alpha": 0.2,
            "data.augment.color_jitter": (0.2, 0.2, 0.2),
            "optimizer.accumulate_steps": 2,
            "optimizer.clip_norm": 1.0,
        },
    )
    report = reference.main(config, str(tmp_path), input_path="dataloader", workers=0, threads=0)
    row = json.loads((tmp_path / "metrics.jsonl").read_text())
    assert {"ema_val_loss", "ema_val_acc"} <= set(row) and np.isfinite(row["train_loss"])
    assert 0 <= report["ema_top1_acc"] <= 1 and report["input"] == "dataloader"


def test_a_config_it_cannot_train_fails_in_one_line(tmp_path):
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "cifar_jax.bench.reference",
            "--config=tests/support/tiny_config.py",
            f"--workdir={tmp_path / 'run'}",
            "--config.model.pretrained=/nowhere",
        ],
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2, proc.stderr
    assert proc.stderr.strip().splitlines() == [
        "error: the PyTorch reference does not train model.pretrained (converted ImageNet weights); "
        "set --config.model.pretrained=''"
    ]
    assert not (tmp_path / "run").exists()


def test_gap_is_judged_against_two_standard_errors():
    a, b = [0.380, 0.400, 0.390], [0.391, 0.389, 0.396]
    g = compare.gap(a, b)
    se = np.sqrt(np.var(a, ddof=1) / 3 + np.var(b, ddof=1) / 3)
    assert g["difference"] == pytest.approx(np.mean(b) - np.mean(a)) and g["standard_error"] == pytest.approx(
        se
    )
    assert g["beyond_two_se"] is False  # 0.002 against 2 x 0.006
    assert compare.gap([0.50, 0.51, 0.52], [0.55, 0.56, 0.57])["beyond_two_se"] is True
    assert compare.gap([0.5], [0.6])["beyond_two_se"] is None


def test_compare_rejects_a_bad_override_before_any_run(tmp_path):
    with pytest.raises(ValueError, match="no key 'optimizer.lrr'"):
        compare.compare("tests/support/tiny_config.py", ["optimizer.lrr=0.1"], [0], ["jax"], tmp_path, 0)
    with pytest.raises(ValueError, match="not KEY=VALUE"):
        compare.compare("tests/support/tiny_config.py", ["optimizer.lr"], [0], ["jax"], tmp_path, 0)
    assert not any(tmp_path.iterdir())


@pytest.mark.parametrize(
    "argv,message",
    [
        (
            ["--frameworks", "jax,tensorflow"],
            "--frameworks: tensorflow unknown; choose from jax, torch, torch-dataloader",
        ),
        (["--seeds", "0,one"], "--seeds '0,one' is not comma-separated integers, like 0,1,2"),
        (["--set", "optimizer.lrr=0.1"], "--set 'optimizer.lrr=0.1': the config has no key 'optimizer.lrr'"),
    ],
)
def test_the_compare_command_refuses_bad_options_in_one_line(tmp_path, capsys, argv, message):
    argv = ["--config", "tests/support/tiny_config.py", "--out", str(tmp_path / "out"), *argv]
    assert_fails_in_one_line(compare.main, argv, message, capsys)
    assert not (tmp_path / "out").exists()


@pytest.mark.slow
def test_compare_runs_both_frameworks_and_resumes(tmp_path):
    """One seed of a one-epoch config in each framework: the table, the JSON and the plot, each
    run's test accuracy from its own report; a second call reuses the runs."""
    out = tmp_path / "cmp"
    summary = compare.compare(
        "tests/support/tiny_config.py", ["num_epochs=1"], [0], ["jax", "torch"], out, 0, log=lambda m: None
    )
    jax_report = json.loads((out / "jax/seed0/eval/report.json").read_text())
    torch_report = json.loads((out / "torch/seed0/report.json").read_text())
    assert summary["jax"]["test_acc"] == [jax_report["top1_acc"]] and summary["torch"]["test_acc"] == [
        torch_report["top1_acc"]
    ]
    assert jax_report["step"] == 1
    text = (out / "comparison.md").read_text()
    assert (
        "| test top-1, mean ± sd |" in text
        and "torch minus jax" in text
        and (out / "curves.png").stat().st_size > 0
    )
    logged = []
    compare.compare(
        "tests/support/tiny_config.py", ["num_epochs=1"], [0], ["jax", "torch"], out, 0, log=logged.append
    )
    assert all("done before" in m for m in logged) and len(logged) == 2
