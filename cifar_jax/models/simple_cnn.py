"""The study's SimpleCNN: 4 x [conv3x3 -> BN -> ReLU -> maxpool2], then FC 1024 -> 512 -> classes."""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cifar_jax.models.layers import BatchNorm, conv2d, linear, max_pool2d, stats_dtype

CHANNELS = (32, 64, 128, 256)


class SimpleCNN(nnx.Module):
    """965,476 parameters with 100 classes, like the PyTorch model. Input (N, 32, 32, 3), NHWC."""

    head = "fc2"  # the classifier

    def __init__(self, num_classes: int = 100, *, dtype=jnp.float32, kernels: str = "auto", rngs: nnx.Rngs):
        chans = (3, *CHANNELS)
        self.convs = nnx.List(
            [
                conv2d(i, o, 3, padding=1, bias=True, dtype=dtype, kernels=kernels, rngs=rngs)
                for i, o in zip(chans, chans[1:])
            ]
        )
        self.bns = nnx.List([BatchNorm(c, dtype=dtype, kernels=kernels) for c in CHANNELS])
        self.kernels = kernels
        self.fc1 = linear(CHANNELS[-1] * 2 * 2, 512, dtype=dtype, rngs=rngs)
        self.fc2 = linear(512, num_classes, dtype=dtype, rngs=rngs)

    def conv_bn_pairs(self):
        """Each convolution with the BatchNorm after it (`layers.fold_batchnorm`)."""
        return list(zip(self.convs, self.bns))

    def __call__(self, x):
        if x.shape[1:3] != (32, 32):
            raise ValueError(
                f"SimpleCNN takes 32x32 images (its FC layer expects 256x2x2), got {x.shape[1:3]}"
            )
        for conv, bn in zip(self.convs, self.bns):
            x = jax.nn.relu(bn(conv(x)))
            x = max_pool2d(x, 2, 2, kernels=self.kernels)
        # Flatten in PyTorch's (C, H, W) order so that fc1 lines up with a PyTorch checkpoint.
        x = jnp.transpose(x, (0, 3, 1, 2)).reshape(x.shape[0], -1)
        x = jax.nn.relu(self.fc1(x))
        return self.fc2(x).astype(stats_dtype(x.dtype))
