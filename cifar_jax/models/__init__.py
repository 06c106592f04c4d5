"""Model registry: `create(name, num_classes=100, **options)` and `from_config(config.model)`.

Options: `dtype` (compute dtype, e.g. 'bfloat16'; parameters stay float32), `seed` or `rngs`
(initialisation), and for ResNets `stem` ('imagenet' or 'cifar'). Input is NHWC, normalised.
Each model class names its classifier head (`head`: the top-level attribute that phase 1 of a
fine-tune trains alone).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cifar_jax.models import layers
from cifar_jax.models.resnet import ResNet, resnet18, resnet34, resnet50
from cifar_jax.models.simple_cnn import SimpleCNN

MODELS = {
    "simple_cnn": SimpleCNN,
    "resnet18": resnet18,
    "resnet34": resnet34,
    "resnet50": resnet50,
}
OPTIONS = {
    "simple_cnn": (),
    "resnet18": ("stem",),
    "resnet34": ("stem",),
    "resnet50": ("stem",),
}  # from config.model


def check_name(name: str) -> None:
    """Raise a ValueError naming the valid models if `name` is not one of them."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")


def create(
    name: str,
    num_classes: int = 100,
    *,
    dtype="float32",
    seed: int = 0,
    rngs: nnx.Rngs | None = None,
    kernels: str = "auto",
    **options,
):
    """Build model `name` with freshly initialised parameters (PyTorch's init distributions).
    `kernels`: which implementation of its operations runs where (`layers.per_platform`)."""
    check_name(name)
    unknown = sorted(set(options) - set(OPTIONS[name]))
    if unknown:
        raise ValueError(f"{name} takes no options {unknown}; it takes {list(OPTIONS[name]) or 'none'}")
    rngs = rngs or nnx.Rngs(seed)
    return MODELS[name](num_classes, dtype=jnp.dtype(dtype), kernels=kernels, rngs=rngs, **options)


def from_config(
    model_config, num_classes: int | None = None, *, dtype="float32", seed: int = 0, kernels="auto"
):
    """`create` with the options of `config.model` that the architecture takes (a SimpleCNN has no
    stem), for `num_classes` (default: the config's)."""
    options = {key: model_config[key] for key in OPTIONS[model_config.name]}
    num_classes = num_classes or model_config.num_classes
    return create(model_config.name, num_classes, dtype=dtype, seed=seed, kernels=kernels, **options)


def for_evaluation(model: nnx.Module) -> nnx.Module:
    """`model` (in eval mode, merged inside the jitted evaluation) as evaluation computes it: every
    BatchNorm folded into the convolution before it, and the linear layers' weights in the compute
    dtype, each cast once per call instead of once per batch (`layers.fold_batchnorm`). Changes
    `model` in place; returns it."""
    for conv, bn in model.conv_bn_pairs():
        layers.fold_batchnorm(conv, bn)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Linear):
            layers.cast_linear(module)
    return model


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (like `sum(p.numel() for p in torch_model.parameters())`)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = [
    "MODELS",
    "ResNet",
    "SimpleCNN",
    "check_name",
    "count_params",
    "create",
    "for_evaluation",
    "from_config",
]
