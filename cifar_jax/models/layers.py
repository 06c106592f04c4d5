"""Building blocks shared by the models: PyTorch-initialised conv/linear, PyTorch's max-pool and
BatchNorm.

The initialisers reproduce PyTorch's defaults so that a model trained here from scratch starts
from the same distribution as the study's PyTorch model. Each operation is XLA's stock one, except
in programs compiled for the CPU, where `cpu_kernels` computes the same in forms XLA:CPU runs
faster (`jax.lax.platform_dependent` chooses when the program is lowered).
"""

from __future__ import annotations

import contextlib

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


_forced = None  # 'stock' or 'cpu_kernels' on every backend, inside `forced`


@contextlib.contextmanager
def forced(which: str):
    """Trace models with XLA's stock operations ('stock') or the CPU kernels ('cpu_kernels') on
    every backend: how the benchmark compares the two on one device."""
    global _forced
    if which not in ("stock", "cpu_kernels"):
        raise ValueError(f"unknown layers {which!r}; valid: stock, cpu_kernels")
    previous, _forced = _forced, which
    try:
        yield
    finally:
        _forced = previous


def _on_cpu(cpu, stock, *args):
    """`cpu(*args)` in programs compiled for the CPU, `stock(*args)` elsewhere (or as `forced`)."""
    if _forced is not None:
        return cpu(*args) if _forced == "cpu_kernels" else stock(*args)
    return jax.lax.platform_dependent(*args, cpu=cpu, default=stock)


class Conv(nnx.Conv):
    """`nnx.Conv` (NHWC, HWIO kernel, explicit padding), whose convolution on CPU is `cpu_kernels.conv`."""

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), self.kernel[...].astype(dtype)

        y = _on_cpu(
            lambda x, k: cpu_kernels.conv(x, k, self.strides, self.padding),
            lambda x, k: cpu_kernels.xla_conv(x, k, self.strides, self.padding),
            x,
            kernel,
        )
        return y + self.bias[...].astype(dtype) if self.use_bias else y


def conv(in_ch, out_ch, kernel, *, stride=1, padding=0, bias=False, kernel_init=None, dtype, rngs):
    """A Conv2d with PyTorch's (symmetric, explicit) padding, NHWC, HWIO kernel."""
    fan_in = in_ch * kernel * kernel
    return Conv(
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


def max_pool(x, window: int, stride: int, padding: int = 0):
    """`nn.MaxPool2d(window, stride, padding)` of NHWC `x` (padding with -inf)."""

    def stock(x):
        pads = ((0, 0), (padding, padding), (padding, padding), (0, 0))
        return jax.lax.reduce_window(
            x, -jnp.inf, jax.lax.max, (1, window, window, 1), (1, stride, stride, 1), pads
        )

    return _on_cpu(lambda x: cpu_kernels.max_pool(x, window, stride, padding), stock, x)


def materialize(x):
    """`x`, unchanged; on CPU written to memory under differentiation (`cpu_kernels.materialize`)."""
    return _on_cpu(cpu_kernels.materialize, lambda x: x, x)


def stats_dtype(dtype):
    """float32 for low-precision and float32 activations, float64 when computing in float64."""
    return jnp.promote_types(dtype, jnp.float32)


def batch_norm_train(x, scale, bias, eps):
    """Training-mode BatchNorm of NHWC `x` over all but the last axis, computed in `scale`'s
    dtype: returns (normalised x in x's dtype, batch mean, biased batch variance)."""

    def stock(x, scale, bias):
        xf = x.astype(scale.dtype)
        axes = tuple(range(x.ndim - 1))
        mean = xf.mean(axes)
        centred = xf - mean
        var = jnp.square(centred).mean(axes)
        return (centred * (scale * jax.lax.rsqrt(var + eps)) + bias).astype(x.dtype), mean, var

    return _on_cpu(
        lambda x, scale, bias: cpu_kernels.batch_norm_train(x, scale, bias, eps), stock, x, scale, bias
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

    def __init__(self, num_features: int, *, momentum: float = 0.1, eps: float = 1e-5, dtype=None):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum = momentum
        self.eps = eps
        self.dtype = dtype
        self.use_running_average = False

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        if not self.use_running_average:
            stats = stats_dtype(x.dtype)
            y, mean, var = batch_norm_train(
                x, self.scale[...].astype(stats), self.bias[...].astype(stats), self.eps
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
