"""Model registry: `create(name, num_classes=100, **options)`, `from_config(config.model)`, and each
model's `Architecture` (its options, image sizes, PyTorch twin) in `MODELS`.

Options: `dtype` (compute dtype, e.g. 'bfloat16'; parameters stay float32), `seed` or `rngs`
(initialisation), `ops` (the implementation of the operations, `layers.Ops`), and the model's own
(`Architecture.options`: a ResNet's `stem`, 'imagenet' or 'cifar'). Input is NHWC, normalised.
Each model class names its classifier head (`head`: the top-level attribute that phase 1 of a
fine-tune trains alone). A new model: its file (module, `Architecture`) and one line below.
"""

from __future__ import annotations

import dataclasses

import jax
import jax.numpy as jnp
from flax import nnx

from cifar_jax.models import layers, resnet, simple_cnn
from cifar_jax.models.architecture import Architecture
from cifar_jax.models.resnet import ResNet
from cifar_jax.models.simple_cnn import SimpleCNN

MODELS: dict[str, Architecture] = {
    arch.name: arch
    for arch in (
        simple_cnn.ARCHITECTURE,
        *resnet.ARCHITECTURES,  # resnet18, resnet34, resnet50
    )
}


def architecture(name: str) -> Architecture:
    """`MODELS[name]`, or a ValueError naming the valid models."""
    if name not in MODELS:
        raise ValueError(f"unknown model {name!r}; valid names: {', '.join(MODELS)}")
    return MODELS[name]


def _checked_options(arch: Architecture, options: dict) -> dict:
    unknown = sorted(set(options) - set(arch.options))
    if unknown:
        raise ValueError(f"{arch.name} takes no options {unknown}; it takes {list(arch.options) or 'none'}")
    return options


def create(
    name: str,
    num_classes: int = 100,
    *,
    dtype="float32",
    seed: int = 0,
    rngs: nnx.Rngs | None = None,
    ops: layers.Ops = layers.PER_PLATFORM,
    **options,
):
    """Build model `name` with freshly initialised parameters (PyTorch's init distributions)."""
    arch = architecture(name)
    return arch.build(
        num_classes,
        dtype=jnp.dtype(dtype),
        ops=ops,
        rngs=rngs or nnx.Rngs(seed),
        **_checked_options(arch, options),
    )


def options_of(model_config) -> dict:
    """The options of `config.model` that its architecture takes (a SimpleCNN has no stem)."""
    return {key: model_config[key] for key in architecture(model_config.name).options}


def from_config(
    model_config, num_classes: int | None = None, *, dtype="float32", seed: int = 0, ops=layers.PER_PLATFORM
):
    """`create` with the options of `config.model`, for `num_classes` (default: the config's)."""
    num_classes = num_classes or model_config.num_classes
    return create(model_config.name, num_classes, dtype=dtype, seed=seed, ops=ops, **options_of(model_config))


def torch_twin(name: str, num_classes: int = 100, **options):
    """The PyTorch model matching `create(name, num_classes, **options)` (needs torch)."""
    arch = architecture(name)
    return arch.torch_twin(num_classes, **_checked_options(arch, options))


def for_evaluation(model: nnx.Module, image_size: int) -> nnx.Module:
    """`model` (in eval mode, merged inside the jitted evaluation) as evaluation computes it on
    square images of `image_size`: every BatchNorm folded into the convolution before it, the
    convolutions of inputs of at most 2x2 pixels as the linear maps they are there, and the linear
    layers' weights in the compute dtype, each prepared once per call instead of once per batch
    (`layers.fold_batchnorm`, `layers.fit_to_input`). Changes `model` in place; returns it."""
    for conv, bn in model.conv_bn_pairs():
        layers.fold_batchnorm(conv, bn)
    for conv, size in conv_input_sizes(model, image_size).items():
        layers.fit_to_input(conv, size)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, nnx.Linear):
            layers.cast_linear(module)
    return model


def conv_input_sizes(model: nnx.Module, image_size: int) -> dict:
    """{convolution: (H, W) of its input} for square images of `image_size`, read from the model
    run on shapes alone (`jax.eval_shape`, nothing computed)."""
    sizes, convs = {}, [m for _, m in nnx.iter_modules(model) if isinstance(m, layers.Conv2d)]

    def recording(conv, op):
        def conv_op(x, *args):
            sizes[conv] = x.shape[1:3]
            return op(x, *args)

        return conv_op

    kept = [conv.ops for conv in convs]
    try:
        for conv in convs:
            conv.ops = dataclasses.replace(conv.ops, conv=recording(conv, conv.ops.conv))
        jax.eval_shape(lambda x: model(x), jax.ShapeDtypeStruct((1, image_size, image_size, 3), jnp.float32))
    finally:
        for conv, ops in zip(convs, kept):
            conv.ops = ops
    return sizes


def count_params(model: nnx.Module) -> int:
    """Number of trainable parameters (like `sum(p.numel() for p in torch_model.parameters())`)."""
    return sum(x.size for x in jax.tree.leaves(nnx.state(model, nnx.Param)))


__all__ = [
    "MODELS",
    "Architecture",
    "ResNet",
    "SimpleCNN",
    "architecture",
    "count_params",
    "create",
    "for_evaluation",
    "from_config",
    "options_of",
    "torch_twin",
]
