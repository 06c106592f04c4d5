"""Optimizers and learning-rate schedules with PyTorch's semantics, built from optax.

    adam   = torch.optim.Adam(weight_decay=wd): L2 added to the gradient before Adam (coupled)
    adamw  = torch.optim.AdamW(weight_decay=wd): decoupled decay
    sgd    = torch.optim.SGD(momentum, nesterov, weight_decay=wd): coupled L2
    step   = StepLR(step_size, gamma);  cosine = CosineAnnealingLR(T_max=phase length, eta_min)
    linear = LinearLR(start_factor=1, end_factor=eta_min/lr, total_iters=phase length): a straight
             decay to min_lr, which suits short runs (with warmup: a one-cycle-like triangle)
    warmup = LinearLR(start_factor, total_iters=warmup) followed by the schedule (SequentialLR)

`clip_norm` > 0 first scales the gradients as torch.nn.utils.clip_grad_norm_(max_norm=clip_norm)
does before `optimizer.step()` (before the coupled L2 is added).

`decay_norm_and_bias=False` exempts BatchNorm scales and biases and all biases (every parameter
of one dimension) from weight decay, as PyTorch parameter groups with weight_decay=0 do.

Schedules are stepped per epoch (PyTorch's usual `scheduler.step()` after each epoch) or per step.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from cifar_jax import flat


def _epoch_schedule(cfg, base_lr: float, length: int):
    """lr as a function of t = epochs (or steps) done in this phase, `length` of them in all."""
    warmup = cfg.warmup_epochs
    if cfg.name == "constant":
        main = optax.constant_schedule(base_lr)
    elif cfg.name == "step":
        main = lambda t: base_lr * cfg.gamma ** (t // cfg.step_size)
    elif cfg.name == "linear":
        main = optax.linear_schedule(base_lr, cfg.min_lr, max(length - warmup, 1))
    else:  # cosine
        main = optax.cosine_decay_schedule(base_lr, max(length - warmup, 1), alpha=cfg.min_lr / base_lr)
    if not warmup:
        return main
    ramp = optax.linear_schedule(base_lr * cfg.warmup_start_factor, base_lr, warmup)
    return optax.join_schedules([ramp, main], [warmup])


def make_schedule(cfg, base_lr: float, num_epochs: int, steps_per_epoch: int):
    """A schedule over optimizer steps for a phase of `num_epochs` epochs."""
    if cfg.per == "step":
        scale = steps_per_epoch  # StepLR step_size and warmup stay in epochs: convert them to steps
        per_step = cfg.copy_and_resolve_references()
        per_step.warmup_epochs = cfg.warmup_epochs * scale
        per_step.step_size = cfg.step_size * scale
        return _epoch_schedule(per_step, base_lr, num_epochs * scale)
    sched = _epoch_schedule(cfg, base_lr, num_epochs)
    return lambda count: sched(jnp.asarray(count) // steps_per_epoch)


def is_off(value) -> bool:
    """Whether a setting turns its computation off: a Python 0. A traced value (a population's
    members, each its own) keeps it in the program, where 0 computes what leaving it out does."""
    return isinstance(value, (int, float)) and value == 0


def decayed(params):
    """True for the parameters that weight decay applies to when norms and biases are exempt: those
    of more than one dimension (convolution and linear kernels); in the training loop's vectors
    (`flat.Flat`), the group of kernels."""
    if isinstance(params, flat.Flat):
        return flat.Flat((True, False), params.layout)  # its groups: (KERNELS, REST)
    return jax.tree.map(lambda p: jnp.ndim(p) > 1, params)


def clip_grad_norm(max_norm: float) -> optax.GradientTransformation:
    """torch.nn.utils.clip_grad_norm_: the gradients times min(1, max_norm / (global norm + 1e-6))."""

    def update(updates, state, params=None):
        scale = jnp.minimum(1.0, max_norm / (optax.tree.norm(updates) + 1e-6))
        return jax.tree.map(lambda g: g * scale.astype(g.dtype), updates), state

    return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(cfg, schedule, *, weight_decay=None, momentum=None) -> optax.GradientTransformation:
    """The optimizer of config section `cfg` at learning rate `schedule`; `weight_decay` and
    `momentum`, when given, replace the config's (a population member's traced values)."""
    wd = cfg.weight_decay if weight_decay is None else weight_decay
    momentum = cfg.momentum if momentum is None else momentum
    mask = None if cfg.decay_norm_and_bias else decayed
    if cfg.name == "adamw":
        tx = optax.adamw(schedule, b1=cfg.b1, b2=cfg.b2, eps=cfg.eps, weight_decay=wd, mask=mask)
    else:
        if cfg.name == "adam":
            core = optax.scale_by_adam(b1=cfg.b1, b2=cfg.b2, eps=cfg.eps)
        else:  # sgd
            core = (
                optax.identity() if is_off(momentum) else optax.trace(decay=momentum, nesterov=cfg.nesterov)
            )
        decay = optax.identity() if is_off(wd) else optax.add_decayed_weights(wd, mask=mask)
        tx = optax.chain(decay, core, optax.scale_by_learning_rate(schedule))
    return optax.chain(clip_grad_norm(cfg.clip_norm), tx) if cfg.clip_norm else tx
