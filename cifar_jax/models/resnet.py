"""ResNet-18/34/50 with torchvision's topology and parameter names (NHWC).

Names mirror torchvision (`conv1`, `bn1`, `layer1[0].conv2`, `downsample`, `fc`) so that
converting ImageNet weights is a rename plus layout transposes (see `cifar_jax.pretrained`).
`downsample` is an `nnx.Sequential(conv, bn)`: torchvision's `downsample.0` / `downsample.1`
are `downsample.layers[0]` / `downsample.layers[1]` here.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cifar_jax.models.layers import (
    BatchNorm,
    add_relu,
    conv2d,
    kaiming_fan_out_init,
    linear,
    max_pool2d,
    stats_dtype,
)

STEMS = ("imagenet", "cifar")


def conv_kxk(in_ch, out_ch, kernel, stride, dtype, kernels, rngs):
    """torchvision's ResNet convolution: no bias, padding kernel // 2, kaiming_normal(fan_out)."""
    return conv2d(
        in_ch,
        out_ch,
        kernel,
        stride=stride,
        padding=kernel // 2,
        kernel_init=kaiming_fan_out_init,
        dtype=dtype,
        kernels=kernels,
        rngs=rngs,
    )


def conv3x3(in_ch, out_ch, stride, dtype, kernels, rngs):
    return conv_kxk(in_ch, out_ch, 3, stride, dtype, kernels, rngs)


def conv1x1(in_ch, out_ch, stride, dtype, kernels, rngs):
    return conv_kxk(in_ch, out_ch, 1, stride, dtype, kernels, rngs)


def _downsample(in_ch, out_ch, stride, dtype, kernels, rngs):
    conv = conv1x1(in_ch, out_ch, stride, dtype, kernels, rngs)
    return nnx.Sequential(conv, BatchNorm(out_ch, dtype=dtype, kernels=kernels))


def _downsample_pair(downsample) -> list:
    return [] if downsample is None else [(downsample.layers[0], downsample.layers[1])]


class BasicBlock(nnx.Module):
    expansion = 1

    def __init__(self, inplanes, planes, stride, *, dtype, kernels="auto", rngs):
        self.conv1 = conv3x3(inplanes, planes, stride, dtype, kernels, rngs)
        self.bn1 = BatchNorm(planes, dtype=dtype, kernels=kernels)
        self.conv2 = conv3x3(planes, planes, 1, dtype, kernels, rngs)
        self.bn2 = BatchNorm(planes, dtype=dtype, kernels=kernels)
        self.kernels = kernels
        needs_ds = stride != 1 or inplanes != planes * self.expansion
        self.downsample = (
            _downsample(inplanes, planes * self.expansion, stride, dtype, kernels, rngs)
            if needs_ds
            else nnx.data(None)
        )

    def conv_bn_pairs(self):
        """Each convolution with the BatchNorm after it (`layers.fold_batchnorm`)."""
        return [(self.conv1, self.bn1), (self.conv2, self.bn2), *_downsample_pair(self.downsample)]

    def __call__(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = self.bn2(self.conv2(out))
        return add_relu(out, identity, kernels=self.kernels)


class Bottleneck(nnx.Module):
    """ResNet v1.5 bottleneck: the stride sits on the 3x3 conv, as in torchvision."""

    expansion = 4

    def __init__(self, inplanes, planes, stride, *, dtype, kernels="auto", rngs):
        out = planes * self.expansion
        self.conv1 = conv1x1(inplanes, planes, 1, dtype, kernels, rngs)
        self.bn1 = BatchNorm(planes, dtype=dtype, kernels=kernels)
        self.conv2 = conv3x3(planes, planes, stride, dtype, kernels, rngs)
        self.bn2 = BatchNorm(planes, dtype=dtype, kernels=kernels)
        self.conv3 = conv1x1(planes, out, 1, dtype, kernels, rngs)
        self.bn3 = BatchNorm(out, dtype=dtype, kernels=kernels)
        needs_ds = stride != 1 or inplanes != out
        self.downsample = (
            _downsample(inplanes, out, stride, dtype, kernels, rngs) if needs_ds else nnx.data(None)
        )

    def conv_bn_pairs(self):
        """Each convolution with the BatchNorm after it (`layers.fold_batchnorm`)."""
        pairs = [(self.conv1, self.bn1), (self.conv2, self.bn2), (self.conv3, self.bn3)]
        return pairs + _downsample_pair(self.downsample)

    def __call__(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = jax.nn.relu(self.bn1(self.conv1(x)))
        out = jax.nn.relu(self.bn2(self.conv2(out)))
        out = self.bn3(self.conv3(out))
        return jax.nn.relu(out + identity)


class ResNet(nnx.Module):
    """torchvision's ResNet. `stem='imagenet'`: 7x7/2 conv + 3x3/2 max-pool (for pretrained
    weights and large images); `stem='cifar'`: 3x3/1 conv and no max-pool (for 32x32 from scratch)."""

    head = "fc"  # the classifier, replaced when fine-tuning to other classes

    def __init__(
        self,
        block,
        layers,
        num_classes=1000,
        *,
        stem="imagenet",
        dtype=jnp.float32,
        kernels="auto",
        rngs: nnx.Rngs,
    ):
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; valid stems: {', '.join(STEMS)}")
        self.stem, self.kernels = stem, kernels
        kernel, stride = (7, 2) if stem == "imagenet" else (3, 1)
        self.conv1 = conv_kxk(3, 64, kernel, stride, dtype, kernels, rngs)
        self.bn1 = BatchNorm(64, dtype=dtype, kernels=kernels)
        inplanes = 64
        stages = []
        for i, (planes, blocks) in enumerate(zip((64, 128, 256, 512), layers)):
            stride = 1 if i == 0 else 2
            stage = []
            for j in range(blocks):
                first = stride if j == 0 else 1
                stage.append(block(inplanes, planes, first, dtype=dtype, kernels=kernels, rngs=rngs))
                inplanes = planes * block.expansion
            stages.append(nnx.List(stage))
        self.layer1, self.layer2, self.layer3, self.layer4 = stages
        self.fc = linear(inplanes, num_classes, dtype=dtype, rngs=rngs)

    def conv_bn_pairs(self):
        """Each convolution with the BatchNorm after it (`layers.fold_batchnorm`), stem first."""
        blocks = [blk for stage in (self.layer1, self.layer2, self.layer3, self.layer4) for blk in stage]
        return [(self.conv1, self.bn1), *(pair for blk in blocks for pair in blk.conv_bn_pairs())]

    def __call__(self, x):
        x = jax.nn.relu(self.bn1(self.conv1(x)))
        if self.stem == "imagenet":
            x = max_pool2d(x, 3, 2, padding=1, kernels=self.kernels)
        for stage in (self.layer1, self.layer2, self.layer3, self.layer4):
            for blk in stage:
                x = blk(x)
        x = x.mean(axis=(1, 2))
        return self.fc(x).astype(stats_dtype(x.dtype))


def resnet18(num_classes=1000, **kw):
    return ResNet(BasicBlock, (2, 2, 2, 2), num_classes, **kw)


def resnet34(num_classes=1000, **kw):
    return ResNet(BasicBlock, (3, 4, 6, 3), num_classes, **kw)


def resnet50(num_classes=1000, **kw):
    return ResNet(Bottleneck, (3, 4, 6, 3), num_classes, **kw)
