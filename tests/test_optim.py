"""Schedules, loss and optimizers against PyTorch's own implementations."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from cifar_jax import config as config_lib
from cifar_jax import optim, steps

torch = pytest.importorskip("torch")


def _schedule_cfg(**kw):
    c = config_lib.base().schedule
    c.update(kw)
    return c


def _torch_lrs(make_scheduler, n_steps, steps_per_epoch, per):
    p = torch.nn.Parameter(torch.zeros(1))
    opt = torch.optim.SGD([p], lr=0.1)
    sched = make_scheduler(opt)
    lrs = []
    for i in range(n_steps):
        lrs.append(opt.param_groups[0]["lr"])
        opt.step()
        if per == "step" or (i + 1) % steps_per_epoch == 0:
            sched.step()
    return np.array(lrs)


def _ours(cfg, epochs, steps_per_epoch):
    sched = optim.make_schedule(cfg, 0.1, epochs, steps_per_epoch)
    return np.array([float(sched(i)) for i in range(epochs * steps_per_epoch)])


def test_step_lr_per_epoch_matches_torch():
    expected = _torch_lrs(
        lambda o: torch.optim.lr_scheduler.StepLR(o, step_size=2, gamma=0.1), 15, 3, "epoch"
    )
    np.testing.assert_allclose(
        _ours(_schedule_cfg(name="step", step_size=2, gamma=0.1), 5, 3), expected, rtol=1e-6
    )
    assert len(set(np.round(expected, 8))) == 3  # 0.1, 0.01, 0.001: the test sees the decays


def _torch_main(name, opt, length, end_lr):
    """PyTorch's scheduler for our schedule `name` over `length` steps, ending at `end_lr` (of 0.1)."""
    if name == "cosine":
        return torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=length, eta_min=end_lr)
    return torch.optim.lr_scheduler.LinearLR(
        opt, start_factor=1.0, end_factor=end_lr / 0.1, total_iters=length
    )


@pytest.mark.parametrize("name", ["cosine", "linear"])
@pytest.mark.parametrize("per", ["epoch", "step"])
@pytest.mark.parametrize("warmup", [0, 2])
def test_decay_with_warmup_matches_torch(name, per, warmup):
    epochs, spe, end_lr = 7, 4, 1e-3
    unit = 1 if per == "epoch" else spe
    total, w = epochs * unit, warmup * unit

    def make(opt):
        main = _torch_main(name, opt, total - w, end_lr)
        if not w:
            return main
        ramp = torch.optim.lr_scheduler.LinearLR(opt, start_factor=0.1, total_iters=w)
        return torch.optim.lr_scheduler.SequentialLR(opt, [ramp, main], milestones=[w])

    expected = _torch_lrs(make, epochs * spe, spe, per)
    cfg = _schedule_cfg(name=name, per=per, warmup_epochs=warmup, warmup_start_factor=0.1, min_lr=end_lr)
    np.testing.assert_allclose(_ours(cfg, epochs, spe), expected, rtol=1e-5, atol=1e-9)
    assert len(set(np.round(expected, 8))) > epochs // 2  # the decay is seen, not a constant


def test_label_smoothed_loss_matches_torch():
    rng = np.random.default_rng(0)
    logits = rng.normal(size=(32, 100)).astype(np.float32) * 3
    labels = rng.integers(0, 100, 32)
    for smoothing in (0.0, 0.1):
        expected = torch.nn.CrossEntropyLoss(label_smoothing=smoothing)(
            torch.from_numpy(logits), torch.from_numpy(labels)
        ).item()
        got = float(steps.cross_entropy(jnp.asarray(logits), jnp.asarray(labels), 100, smoothing).mean())
        assert got == pytest.approx(expected, rel=1e-6)


def _opt_cfg(name, **kw):
    c = config_lib.base().optimizer
    c.update(dict(name=name, lr=0.1, weight_decay=0.1, **kw))
    return c


@pytest.mark.parametrize(
    "name,torch_opt",
    [
        ("adam", lambda p: torch.optim.Adam(p, lr=0.1, weight_decay=0.1)),
        ("adamw", lambda p: torch.optim.AdamW(p, lr=0.1, weight_decay=0.1)),
        ("sgd", lambda p: torch.optim.SGD(p, lr=0.1, momentum=0.9, weight_decay=0.1)),
    ],
)
def test_optimizer_updates_match_torch_for_three_steps(name, torch_opt, x64):
    rng = np.random.default_rng(1)
    w0 = rng.normal(size=(4, 3))
    grads = [rng.normal(size=(4, 3)) for _ in range(3)]
    tp = torch.nn.Parameter(torch.tensor(w0))
    topt = torch_opt([tp])
    tx = optim.make_optimizer(_opt_cfg(name), 0.1)  # a constant learning rate
    params = {"w": jnp.asarray(w0)}
    state = tx.init(params)
    for g in grads:
        tp.grad = torch.tensor(g)
        topt.step()
        updates, state = tx.update({"w": jnp.asarray(g)}, state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        np.testing.assert_allclose(np.asarray(params["w"]), tp.detach().numpy(), rtol=1e-10, atol=1e-12)


def test_coupled_and_decoupled_decay_differ():
    """The test above could not tell Adam+L2 from AdamW if the decay were too small to matter."""
    params = {"w": jnp.ones((3,))}
    g = {"w": jnp.full((3,), 0.5)}
    out = {}
    for name in ("adam", "adamw"):
        tx = optim.make_optimizer(_opt_cfg(name), 0.1)
        state = tx.init(params)
        for _ in range(3):
            u, state = tx.update(g, state, params)
        out[name] = np.asarray(u["w"])
    assert not np.allclose(out["adam"], out["adamw"], rtol=1e-3)


@pytest.mark.parametrize(
    "name,torch_opt",
    [
        ("adamw", lambda groups: torch.optim.AdamW(groups, lr=0.1, weight_decay=0.1)),
        ("sgd", lambda groups: torch.optim.SGD(groups, lr=0.1, momentum=0.9, weight_decay=0.1)),
    ],
)
def test_no_decay_on_norm_and_bias_matches_torch_parameter_groups(name, torch_opt, x64):
    rng = np.random.default_rng(2)
    w0 = {
        "conv": {"kernel": rng.normal(size=(3, 3, 2, 4)), "bias": rng.normal(size=(4,))},
        "bn": {"scale": rng.normal(size=(4,))},
    }
    grads = [jax.tree.map(lambda a: rng.normal(size=a.shape), w0) for _ in range(3)]
    torch_params = {k: {n: torch.nn.Parameter(torch.tensor(v)) for n, v in d.items()} for k, d in w0.items()}
    kernels = [torch_params["conv"]["kernel"]]
    rest = [torch_params["conv"]["bias"], torch_params["bn"]["scale"]]
    topt = torch_opt([{"params": kernels}, {"params": rest, "weight_decay": 0.0}])
    tx = optim.make_optimizer(_opt_cfg(name, decay_norm_and_bias=False), 0.1)
    params = jax.tree.map(jnp.asarray, w0)
    state = tx.init(params)
    for g in grads:
        for k, d in g.items():
            for n, v in d.items():
                torch_params[k][n].grad = torch.tensor(v)
        topt.step()
        updates, state = tx.update(jax.tree.map(jnp.asarray, g), state, params)
        params = jax.tree.map(lambda p, u: p + u, params, updates)
        for k, d in torch_params.items():
            for n, v in d.items():
                np.testing.assert_allclose(
                    np.asarray(params[k][n]), v.detach().numpy(), rtol=1e-10, atol=1e-12
                )
    # The same optimizer with decay everywhere moves the biases elsewhere: the exemption is seen.
    everywhere = optim.make_optimizer(_opt_cfg(name), 0.1)
    u, _ = everywhere.update(
        jax.tree.map(jnp.asarray, grads[0]),
        everywhere.init(jax.tree.map(jnp.asarray, w0)),
        jax.tree.map(jnp.asarray, w0),
    )
    u_exempt, _ = tx.update(
        jax.tree.map(jnp.asarray, grads[0]),
        tx.init(jax.tree.map(jnp.asarray, w0)),
        jax.tree.map(jnp.asarray, w0),
    )
    assert not np.allclose(u["conv"]["bias"], u_exempt["conv"]["bias"])
    np.testing.assert_allclose(u["conv"]["kernel"], u_exempt["conv"]["kernel"])


def test_the_decay_mask_sees_kernels_only_in_a_real_model():
    from flax import nnx

    from cifar_jax import models

    params = nnx.state(models.create("resnet18", 10, stem="cifar"), nnx.Param)
    mask = optim.decayed(params)
    flags = {jax.tree_util.keystr(p): m for p, m in jax.tree_util.tree_flatten_with_path(mask)[0]}
    assert flags and all(m == ("kernel" in path) for path, m in flags.items()), flags
