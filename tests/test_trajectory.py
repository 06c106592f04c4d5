"""Training trajectories against PyTorch, in float64 on both sides (float32 Adam amplifies rounding
until a correct model drifts ~2e-3 by step 20; float64 separates semantics from noise).

Each test asserts what holds on any CPU: the two sides agree step by step and in their final
weights, and those weights moved far from the start (so real updates were compared). Whether the
loss fell in 20 steps of batch 8 is the course of a chaotic trajectory, not asserted."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cifar_jax import config as config_lib
from cifar_jax import data, models, optim, steps
from cifar_jax.data import pipeline
from cifar_jax.models.simple_cnn import torch_simple_cnn
from tests.support.helpers import load_torch_simple_cnn

torch = pytest.importorskip("torch")
torchvision = pytest.importorskip("torchvision")

STEPS, BATCH, CLASSES = 20, 8, 10

pytestmark = pytest.mark.slow  # float64 training of both sides


def _from_torch(arch, ref):
    """Our float64 model holding the weights and BatchNorm buffers of the PyTorch model `ref`."""
    if arch == "simple_cnn":
        model = models.create("simple_cnn", CLASSES, dtype="float64")
        load_torch_simple_cnn(model, ref)
    else:
        from cifar_jax import pretrained

        model = pretrained.from_torchvision("resnet18", ref.state_dict(), dtype="float64")
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model)))
    return model


def _models(arch):
    torch.manual_seed(0)
    ref = (
        torch_simple_cnn(CLASSES)
        if arch == "simple_cnn"
        else torchvision.models.resnet18(num_classes=CLASSES)
    )
    return _from_torch(arch, ref), ref.double().train()


def _train_both(arch, opt_overrides, torch_optimizer, smoothing=0.0, clip_norm=0.0):
    """STEPS steps of our train step and of a PyTorch loop (with clip_grad_norm_ when `clip_norm`)
    from the same weights on the same batches: (our losses, theirs, our state, our initial params,
    the PyTorch model, the gradient norms PyTorch measured)."""
    digits = data.load("digits")  # real, learnable data: the loss must fall, so updates are really compared
    x_train, y_train = digits.x_train[: STEPS * BATCH], digits.y_train[: STEPS * BATCH]
    model, ref = _models(arch)
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    assert {a.dtype for a in jax.tree.leaves(params)} == {jnp.dtype("float64")}

    opt_cfg = config_lib.base().optimizer
    opt_cfg.update(dict(opt_overrides, clip_norm=clip_norm))
    tx = optim.make_optimizer(opt_cfg, opt_cfg.lr)
    # No augmentation: identical batches on both sides. ResNet-18 sees 16x16 (resized on device) to keep it
    # quick.
    preprocess = pipeline.Preprocess(image_size=32 if arch == "simple_cnn" else 16)
    cfg = steps.StepConfig(graphdef, tx, None, preprocess, BATCH, CLASSES, smoothing, seed=0)
    step = jax.jit(functools.partial(steps.train_step, cfg))
    images, labels = jnp.asarray(x_train), jnp.asarray(y_train)
    order = pipeline.epoch_order(0, 0, len(images))
    state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params)}
    metrics = steps.zero_metrics()

    torch_opt = torch_optimizer(ref.parameters())
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)
    ours, theirs, norms = [], [], []
    for s in range(STEPS):
        before = float(metrics["loss_sum"])
        state, metrics = step(state, metrics, images, labels, order, 0, s)
        ours.append((float(metrics["loss_sum"]) - before) / BATCH)

        idx = np.asarray(order)[s * BATCH : (s + 1) * BATCH]
        x = np.asarray(preprocess.eval(images[idx])).transpose(0, 3, 1, 2)
        torch_opt.zero_grad()
        loss = criterion(ref(torch.from_numpy(x.copy()).double()), torch.from_numpy(y_train[idx]).long())
        loss.backward()
        if clip_norm:
            norms.append(float(torch.nn.utils.clip_grad_norm_(ref.parameters(), clip_norm)))
        torch_opt.step()
        theirs.append(loss.item())
    return ours, theirs, state, params, ref, norms


def _assert_same_weights_and_moved(arch, state, params, ref):
    """The final weights and BatchNorm statistics agree, and every kernel moved far beyond the
    tolerance (a convolution's bias just before BatchNorm has no gradient: BatchNorm subtracts it)."""
    _, want_params, want_stats = nnx.split(_from_torch(arch, ref), nnx.Param, nnx.BatchStat)
    final = jax.tree.leaves((state["params"], state["batch_stats"]))
    for got, want in zip(final, jax.tree.leaves((want_params, want_stats)), strict=True):
        np.testing.assert_allclose(got, want, rtol=1e-6, atol=1e-9)
    moved = [
        float(jnp.max(jnp.abs(b - a)))
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(state["params"]), strict=True)
        if a.ndim > 1
    ]
    assert min(moved) > 1e-3, moved  # 1,000x the tolerance above


# As the study trains them: SimpleCNN with Adam (+L2), ResNet with AdamW and label smoothing. The
# optimizer sees only gradients and the model only weights: the crossed pairs would check nothing new.
@pytest.mark.parametrize(
    "arch,optimizer,smoothing", [("simple_cnn", "adam", 0.0), ("resnet18", "adamw", 0.1)]
)
def test_twenty_steps_match_pytorch_in_float64(arch, optimizer, smoothing, x64):
    torch_class = torch.optim.Adam if optimizer == "adam" else torch.optim.AdamW
    ours, theirs, state, params, ref, _ = _train_both(
        arch,
        dict(name=optimizer, lr=1e-3, weight_decay=5e-4),
        lambda p: torch_class(p, lr=1e-3, weight_decay=5e-4),
        smoothing,
    )
    np.testing.assert_allclose(ours, theirs, rtol=1e-4)
    # Adam's steps of about lr (1e-3) each add up over 20 steps, far beyond the comparison's tolerance.
    _assert_same_weights_and_moved(arch, state, params, ref)


def test_gradient_clipping_matches_clip_grad_norm_in_float64(x64):
    """SGD with momentum and coupled L2, gradients clipped to a global norm of 0.5 before the update
    (torch.nn.utils.clip_grad_norm_ before optimizer.step()): SGD follows the gradients' scale, so
    every step whose norm was above 0.5 would differ without the same clipping."""
    ours, theirs, state, params, ref, norms = _train_both(
        "simple_cnn",
        dict(name="sgd", lr=0.05, momentum=0.9, weight_decay=5e-4),
        lambda p: torch.optim.SGD(p, lr=0.05, momentum=0.9, weight_decay=5e-4),
        clip_norm=0.5,
    )
    assert sum(n > 0.5 for n in norms) >= STEPS // 2, norms  # clipping was active in most steps
    np.testing.assert_allclose(ours, theirs, rtol=1e-6)
    _assert_same_weights_and_moved("simple_cnn", state, params, ref)


def test_accumulated_micro_batches_match_pytorchs_accumulation_loop_in_float64(x64):
    """optimizer.accumulate_steps=4 on batches of 32: 4 micro-batches of 8 per update, each a
    train-mode forward (BatchNorm statistics of that micro-batch, running statistics updated in
    turn) and the gradient of its mean loss / 4, as PyTorch's accumulation loop computes them;
    3 updates, AdamW with weight decay."""
    k, micro, updates = 4, 8, 3
    digits = data.load("digits")
    x_train, y_train = digits.x_train[: updates * k * micro], digits.y_train[: updates * k * micro]
    model, ref = _models("simple_cnn")
    graphdef, params, batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    opt_cfg = config_lib.base().optimizer
    opt_cfg.update(dict(name="adamw", lr=1e-3, weight_decay=5e-4, accumulate_steps=k))
    tx = optim.make_optimizer(opt_cfg, 1e-3)
    preprocess = pipeline.Preprocess()
    cfg = steps.StepConfig(
        graphdef, tx, None, preprocess, k * micro, CLASSES, 0.1, seed=0, accumulate_steps=k
    )
    step = jax.jit(functools.partial(steps.train_step, cfg))
    images, labels = jnp.asarray(x_train), jnp.asarray(y_train)
    order = pipeline.epoch_order(0, 0, len(images))
    state = {"params": params, "batch_stats": batch_stats, "opt_state": tx.init(params)}
    metrics = steps.zero_metrics()

    torch_opt = torch.optim.AdamW(ref.parameters(), lr=1e-3, weight_decay=5e-4)
    criterion = torch.nn.CrossEntropyLoss(label_smoothing=0.1)
    loss_sum = 0.0
    for s in range(updates):
        state, metrics = step(state, metrics, images, labels, order, 0, s)
        torch_opt.zero_grad()
        for m in range(k):
            idx = np.asarray(order)[(s * k + m) * micro : (s * k + m + 1) * micro]
            x = np.asarray(preprocess.eval(images[idx])).transpose(0, 3, 1, 2)
            loss = criterion(ref(torch.from_numpy(x.copy()).double()), torch.from_numpy(y_train[idx]).long())
            (loss / k).backward()
            loss_sum += loss.item() * micro
        torch_opt.step()

    # The logged loss is each image's loss once, as without accumulation.
    assert int(metrics["count"]) == updates * k * micro
    np.testing.assert_allclose(float(metrics["loss_sum"]), loss_sum, rtol=1e-9)
    _assert_same_weights_and_moved("simple_cnn", state, params, ref)
