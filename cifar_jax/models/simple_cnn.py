"""The study's SimpleCNN: 4 x [conv3x3 -> BN -> ReLU -> maxpool2], then FC 1024 -> 512 -> classes;
its PyTorch twin, the study's nn.Sequential."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cifar_jax.models import layers
from cifar_jax.models.architecture import Architecture

CHANNELS = (32, 64, 128, 256)


class SimpleCNN(nnx.Module):
    """965,476 parameters with 100 classes, like the PyTorch model. Input (N, 32, 32, 3), NHWC."""

    head = "fc2"  # the classifier

    def __init__(self, num_classes: int = 100, *, dtype=jnp.float32, ops=layers.PER_PLATFORM, rngs: nnx.Rngs):
        make = layers.LayerMaker(dtype, rngs, ops)
        chans = (3, *CHANNELS)
        self.convs = nnx.List([make.conv(i, o, 3, padding=1, bias=True) for i, o in zip(chans, chans[1:])])
        self.bns = nnx.List([make.norm(c) for c in CHANNELS])
        self.pool = make.max_pool(2, 2)
        self.fc1 = make.linear(CHANNELS[-1] * 2 * 2, 512)
        self.fc2 = make.linear(512, num_classes)

    def conv_bn_pairs(self):
        """Each convolution with the BatchNorm after it (`layers.fold_batchnorm`)."""
        return list(zip(self.convs, self.bns))

    def __call__(self, x):
        if x.shape[1:3] != (32, 32):
            raise ValueError(
                f"SimpleCNN takes 32x32 images (its FC layer expects 256x2x2), got {x.shape[1:3]}"
            )
        for conv, bn in zip(self.convs, self.bns):
            x = self.pool(jax.nn.relu(bn(conv(x))))
        # Flatten in PyTorch's (C, H, W) order so that fc1 lines up with a PyTorch checkpoint.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(x))
        return self.fc2(x).astype(layers.stats_dtype(x.dtype))


def torch_simple_cnn(num_classes: int = 100):
    """The study's SimpleCNN in PyTorch (nn.Sequential, so its state_dict keys are indices)."""
    import torch.nn as nn

    def block(i, o):
        return [nn.Conv2d(i, o, 3, padding=1), nn.BatchNorm2d(o), nn.ReLU(), nn.MaxPool2d(2)]

    return nn.Sequential(
        *block(3, 32),
        *block(32, 64),
        *block(64, 128),
        *block(128, 256),
        nn.Flatten(),
        nn.Linear(1024, 512),
        nn.ReLU(),
        nn.Linear(512, num_classes),
    )


_TORCH_INDEX = {
    "convs": (0, 4, 8, 12),
    "bns": (1, 5, 9, 13),
    "fc1": (17,),
    "fc2": (19,),
}  # in the nn.Sequential


def torch_key(path: tuple) -> str:
    """('convs', 1, 'kernel') -> '4.weight': the study's nn.Sequential numbers its layers."""
    module, *index, leaf = path
    return f"{_TORCH_INDEX[module][index[0] if index else 0]}.{layers.TORCH_LEAF[leaf]}"


ARCHITECTURE = Architecture(
    "simple_cnn",
    SimpleCNN,
    torch_simple_cnn,
    torch_key,
    min_image_size=32,
    max_image_size=32,  # its FC layer is sized for 256 channels of 2x2
)
