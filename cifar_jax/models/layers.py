"""Building blocks shared by the models: PyTorch-initialised conv/linear, PyTorch's max-pool and
BatchNorm.

The initialisers reproduce PyTorch's defaults so that a model trained here from scratch starts
from the same distribution as the study's PyTorch model. Each operation is XLA's stock one, except
in programs compiled for the CPU, where `cpu_kernels` computes the same in forms XLA:CPU runs
faster (`kernels='auto'`: `jax.lax.platform_dependent` chooses when the program is lowered). A
model built with `kernels='stock'` or `'cpu_kernels'` runs that one everywhere: how the benchmark
compares the two on one device.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from cifar_jax.models import cpu_kernels

# PyTorch's default for Conv2d/Linear weights: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ..).
torch_default_kernel_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# torchvision's ResNet conv init: kaiming_normal(mode='fan_out', nonlinearity='relu').
kaiming_fan_out_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


def torch_default_bias_init(fan_in: int):
    """PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); needs the layer's fan-in."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


KERNELS = ("auto", "stock", "cpu_kernels")


def per_platform(kernels: str, cpu, stock, *args):
    """`cpu(*args)` in programs compiled for the CPU and `stock(*args)` elsewhere (`kernels='auto'`),
    or the one that `kernels` names on every platform."""
    if kernels == "auto":
        return jax.lax.platform_dependent(*args, cpu=cpu, default=stock)
    if kernels not in KERNELS:
        raise ValueError(f"unknown kernels {kernels!r}; valid: {', '.join(KERNELS)}")
    return (cpu if kernels == "cpu_kernels" else stock)(*args)


def stock_conv2d(x, kernel, strides, padding):
    """XLA's convolution of NHWC `x` by an HWIO kernel."""
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


class Conv2d(nnx.Conv):
    """`nnx.Conv` (NHWC, HWIO kernel, explicit padding) computed by `conv2d` below: on CPU by
    `cpu_kernels.conv2d` (`kernels` as in `per_platform`)."""

    def __init__(self, *args, kernels: str = "auto", **kwargs):
        super().__init__(*args, **kwargs)
        self.kernels = kernels

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), self.kernel[...].astype(dtype)
        y = per_platform(
            self.kernels,
            lambda x, k: cpu_kernels.conv2d(x, k, self.strides, self.padding),
            lambda x, k: stock_conv2d(x, k, self.strides, self.padding),
            x,
            kernel,
        )
        return y + self.bias[...].astype(dtype) if self.use_bias else y


def conv2d(
    in_ch, out_ch, kernel, *, stride=1, padding=0, bias=False, kernel_init=None, dtype, kernels="auto", rngs
):
    """nn.Conv2d: PyTorch's (symmetric, explicit) padding and initialisation, NHWC, HWIO kernel."""
    fan_in = in_ch * kernel * kernel
    return Conv2d(
        in_ch,
        out_ch,
        kernel_size=(kernel, kernel),
        strides=(stride, stride),
        padding=((padding, padding), (padding, padding)),
        use_bias=bias,
        kernel_init=kernel_init or torch_default_kernel_init,
        bias_init=torch_default_bias_init(fan_in),
        dtype=dtype,
        param_dtype=jnp.float32,
        kernels=kernels,
        rngs=rngs,
    )


def linear(in_features, out_features, *, dtype, rngs):
    """An nn.Linear with PyTorch's default init."""
    return nnx.Linear(
        in_features,
        out_features,
        kernel_init=torch_default_kernel_init,
        bias_init=torch_default_bias_init(in_features),
        dtype=dtype,
        param_dtype=jnp.float32,
        rngs=rngs,
    )


def max_pool2d(x, window: int, stride: int, padding: int = 0, *, kernels: str = "auto"):
    """`nn.MaxPool2d(window, stride, padding)` of NHWC `x` (padding with -inf)."""

    def stock(x):
        pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
        return jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pads
        )

    return per_platform(kernels, lambda x: cpu_kernels.max_pool(x, window, stride, padding), stock, x)


def add_relu(x, residual, *, kernels: str = "auto"):
    """relu(x + residual), a basic block's output; on CPU written to memory under differentiation
    (`cpu_kernels.materialize`), since the next block's 3x3 convolution takes its gradient."""
    return per_platform(kernels, cpu_kernels.materialize, lambda y: y, jax.nn.relu(x + residual))


def fold_batchnorm(conv: Conv2d, bn: BatchNorm) -> None:
    """For evaluation (inside a jitted call, on a model merged there): `bn(conv(x))` becomes one
    convolution with a bias, `bn`'s running statistics and affine folded into `conv`'s kernel and
    bias, both cast to the compute dtype here, once per call rather than once per batch; `bn`
    becomes the identity. On a GPU the convolution, its bias and a ReLU after it are then one cuDNN
    call. Same maths as `bn(conv(x))` up to rounding: (x * W) * s + b = x * (W * s) + b."""
    if not bn.use_running_average:
        raise ValueError("fold_batchnorm: the BatchNorm is in training mode (call model.eval() first)")
    mul = bn.scale[...] * jax.lax.rsqrt(bn.var[...] + bn.eps)
    add = bn.bias[...] - bn.mean[...] * mul
    if conv.use_bias:
        add = add + conv.bias[...] * mul
    dtype = conv.dtype or conv.kernel[...].dtype
    conv.kernel = nnx.Param((conv.kernel[...] * mul).astype(dtype))  # HWIO: `mul` is per output channel
    conv.bias = nnx.Param(add.astype(dtype))
    conv.use_bias = True
    bn.folded = True


def cast_linear(layer: nnx.Linear) -> None:
    """For evaluation: `layer`'s weights in its compute dtype once per call (nnx.Linear casts them at
    every call otherwise)."""
    if layer.dtype is not None:
        layer.kernel = nnx.Param(layer.kernel[...].astype(layer.dtype))
        layer.bias = nnx.Param(layer.bias[...].astype(layer.dtype))


def stats_dtype(dtype):
    """float32 for low-precision and float32 activations, float64 when computing in float64."""
    return jnp.promote_types(dtype, jnp.float32)


def batch_norm_train(x, scale, bias, eps, kernels: str = "auto"):
    """Training-mode BatchNorm of NHWC `x` over all but the last axis, computed in `scale`'s
    dtype: returns (normalised x in x's dtype, batch mean, biased batch variance)."""

    def stock(x, scale, bias):
        xf = x.astype(scale.dtype)
        axes = tuple(range(x.ndim - 1))
        mean = xf.mean(axes)
        centred = xf - mean
        var = jnp.square(centred).mean(axes)
        return (centred * (scale * jax.lax.rsqrt(var + eps)) + bias).astype(x.dtype), mean, var

    return per_platform(
        kernels,
        lambda x, scale, bias: cpu_kernels.batch_norm_train(x, scale, bias, eps),
        stock,
        x,
        scale,
        bias,
    )


class BatchNorm(nnx.Module):
    """BatchNorm2d with PyTorch's semantics (NHWC input, statistics over all but the last axis).

    Differences from `nnx.BatchNorm` that matter for matching torchvision:
      * `momentum` is PyTorch's (weight of the new batch, default 0.1 = Flax's 0.9);
      * normalisation uses the biased batch variance, but `var` is updated with the unbiased
        one (n / (n - 1)), exactly like `running_var` in PyTorch.
    Statistics are computed in float32 (float64 for float64 inputs), whatever the compute dtype. Under
    `jax.jit` with
    the batch sharded over devices, the mean is over the global batch (synchronised BatchNorm).
    """

    def __init__(
        self,
        num_features: int,
        *,
        momentum: float = 0.1,
        eps: float = 1e-5,
        dtype=None,
        kernels: str = "auto",
    ):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum = momentum
        self.eps = eps
        self.dtype = dtype
        self.kernels = kernels
        self.use_running_average = False
        self.folded = False  # evaluation: folded into the convolution before it (`fold_batchnorm`)

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        if self.folded:
            return x.astype(dtype)
        if not self.use_running_average:
            stats = stats_dtype(x.dtype)
            y, mean, var = batch_norm_train(
                x, self.scale[...].astype(stats), self.bias[...].astype(stats), self.eps, self.kernels
            )
            n = x.size // x.shape[-1]
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * mean
            self.var[...] = (1 - m) * self.var[...] + m * var * (n / max(n - 1, 1))
            return y.astype(dtype)
        mean, var = self.mean[...], self.var[...]
        mul = self.scale[...] * jax.lax.rsqrt(var + self.eps)
        add = self.bias[...] - mean * mul
        return x.astype(dtype) * mul.astype(dtype) + add.astype(dtype)
