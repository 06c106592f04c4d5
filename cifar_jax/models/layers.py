"""The layers the models are built from: PyTorch-initialised convolution and linear layers,
PyTorch's BatchNorm and max-pool, a residual merge. The convolution, BatchNorm and the residual's
write to memory are each computed by an implementation (`Ops`); the max-pool is one everywhere.

The initialisers reproduce PyTorch's defaults so that a model trained here from scratch starts
from the same distribution as the study's PyTorch model. Every operation is XLA's stock one
(`STOCK`; a convolution with an output of at most 2x2 pixels as a matmul), except in programs
compiled for the CPU, where `cpu_kernels` computes the same in forms XLA:CPU runs faster
(`PER_PLATFORM`, the default: `jax.lax.platform_dependent` chooses when the program is lowered).
A model builds its layers with one `LayerMaker`, which holds the implementation: a model built
with `ops=STOCK` or `ops=CPU_KERNELS` runs that one everywhere (how the benchmark compares the two
on one device, and how training and evaluation build theirs: `for_platforms` of the devices they
compile for).
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from cifar_jax.models import cpu_kernels

# PyTorch's default for Conv2d/Linear weights: kaiming_uniform(a=sqrt(5)) = U(-1/sqrt(fan_in), ..).
torch_default_kernel_init = nnx.initializers.variance_scaling(1 / 3, "fan_in", "uniform")
# torchvision's ResNet conv init: kaiming_normal(mode='fan_out', nonlinearity='relu').
kaiming_fan_out_init = nnx.initializers.variance_scaling(2.0, "fan_out", "normal")


# Our layers' variable names -> PyTorch's (Conv2d, Linear, BatchNorm2d).
TORCH_LEAF = {
    "kernel": "weight",
    "scale": "weight",
    "bias": "bias",
    "mean": "running_mean",
    "var": "running_var",
}


def torch_default_bias_init(fan_in: int):
    """PyTorch's default bias init, U(-1/sqrt(fan_in), 1/sqrt(fan_in)); needs the layer's fan-in."""
    bound = 1.0 / fan_in**0.5

    def init(key, shape, dtype=jnp.float32):
        return jax.random.uniform(key, shape, dtype, -bound, bound)

    return init


# --- the implementations -------------------------------------------------------------------------


def stock_conv2d(x, kernel, strides, padding):
    """XLA's convolution of NHWC `x` by an HWIO kernel, except a kxk kernel whose output is at most
    2x2 pixels (ResNet-50's last stages at 32x32): that one is a matmul of the image patches by the
    kernel, because XLA's GPU compiler runs it with image and kernel swapped, which adds a reverse
    and transposes per layer inside the loops (BENCHMARKS.md, "The GPU program")."""
    if kernel.shape[:2] != (1, 1) and cpu_kernels.has_tiny_output(x, kernel, strides, padding):
        return cpu_kernels.patch_matmul(x, kernel, strides, padding)
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: int, stride: int, padding: int = 0):
    """`nn.MaxPool2d(window, stride, padding)` (NHWC), gradient included: in each window it goes
    to the first maximum in row-major order, as PyTorch's does (also for tied maxima).

    Forward: the elementwise maximum of the window's strided slices. Backward: each slice's share
    added into the stride x stride phase grid of the input, elementwise work that fuses with its
    neighbours, on every platform. XLA's select-and-scatter was slow on XLA:CPU, and on a GPU
    scattered into a zeroed copy of the input per pool (BENCHMARKS.md, "The GPU program").
    """
    return _max_pool_fwd(x, window, stride, padding)[0]


def _pad_for_pool(x, padding):
    if not padding:
        return x
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)


def _max_pool_fwd(x, window, stride, padding):
    y = functools.reduce(
        jnp.maximum, cpu_kernels.window_slices(_pad_for_pool(x, padding), (window, window), (stride, stride))
    )
    return y, (x, y)


def _max_pool_bwd(window, stride, padding, residuals, dy):
    x, y = residuals
    padded = _pad_for_pool(x, padding)
    n, hp, wp, c = padded.shape
    ho, wo = y.shape[1:3]
    # Padded-input pixel (s*t + a, s*u + b) is pixel (t, u) of phase (a, b). Window offset (i, j)
    # of output (h, w) lands on phase (i % s, j % s) at (h + i // s, w + j // s): an edge pad.
    th, tw = -(-hp // stride), -(-wp // stride)
    phases, taken = {}, jnp.zeros(y.shape, bool)
    offsets = [(i, j) for i in range(window) for j in range(window)]
    for (i, j), pixels in zip(offsets, cpu_kernels.window_slices(padded, (window, window), (stride, stride))):
        first = (pixels == y) & ~taken
        taken = taken | first
        qi, qj = i // stride, j // stride
        share = jnp.pad(
            jnp.where(first, dy, 0).astype(x.dtype), ((0, 0), (qi, th - ho - qi), (qj, tw - wo - qj), (0, 0))
        )
        phase = (i % stride, j % stride)
        phases[phase] = phases[phase] + share if phase in phases else share
    zeros = jnp.zeros((n, th, tw, c), x.dtype)
    rows = [jnp.stack([phases.get((a, b), zeros) for b in range(stride)], axis=3) for a in range(stride)]
    grid = jnp.stack(rows, axis=2).reshape(n, th * stride, tw * stride, c)  # interleave the phases
    return (grid[:, padding : padding + x.shape[1], padding : padding + x.shape[2]],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@functools.partial(jax.custom_vjp, nondiff_argnums=(4,))
def stock_batch_norm_train(x, scale, bias, shift, eps):
    """Training-mode BatchNorm of NHWC `x` over all but the last axis, computed in `scale`'s dtype:
    (normalised x in x's dtype, batch mean, biased batch variance). Mean and variance come from
    one pass over `x`, the sums of d and d^2 for d = x - `shift` (the running mean), and the
    gradient is the closed form (`cpu_kernels.batch_norm_grad`): a GPU step reads each activation
    once for its statistics instead of twice, and once for their gradient (BENCHMARKS.md, "The GPU
    program"). The shift keeps E[d^2] - E[d]^2 free of cancellation once the running mean is near
    the batch's (flax's BatchNorm takes the same sums unshifted by default)."""
    return _stock_batch_norm_train_fwd(x, scale, bias, shift, eps)[0]


def channel_sums(a, b):
    """The per-channel sums of NHWC `a` and `b` as one reduction with two results (XLA's variadic
    reduce). Two sums of one input fuse into one kernel too, but XLA splits a reduction over many
    rows into partial sums and their sum, and the second stage of a fusion with two results is a
    kernel per result; of a variadic reduce, one."""

    def add(x, y):
        return x[0] + y[0], x[1] + y[1]

    zero = jnp.zeros((), a.dtype)
    return jax.lax.reduce((a, b), (zero, zero), add, tuple(range(a.ndim - 1)))


def _stock_batch_norm_train_fwd(x, scale, bias, shift, eps):
    xf = x.astype(scale.dtype)
    n = x.size // x.shape[-1]
    d = xf - shift
    d_sum, d2_sum = channel_sums(d, jnp.square(d))
    d_mean, d2_mean = d_sum / n, d2_sum / n
    mean, var = shift + d_mean, jnp.maximum(d2_mean - jnp.square(d_mean), 0.0)
    inv_std = jax.lax.rsqrt(var + eps)
    y = ((xf - mean) * (scale * inv_std) + bias).astype(x.dtype)
    # The gradient reads `mean` as computed here. Without the barrier XLA recomputes mean = shift +
    # d_mean inside the gradient's fusions, so the shift (the running mean, updated in place in a
    # training loop's carry) had to be copied first: a GPU kernel per layer.
    return (y, mean, var), (x, jax.lax.optimization_barrier(mean), inv_std, scale)


def _stock_batch_norm_train_bwd(eps, residuals, cotangents):
    dx, dscale, dbias = cpu_kernels.batch_norm_grad(residuals, cotangents, channel_sums)
    return dx, dscale, dbias, jnp.zeros_like(dbias)  # the result does not depend on the shift


stock_batch_norm_train.defvjp(_stock_batch_norm_train_fwd, _stock_batch_norm_train_bwd)


def _cpu_batch_norm_train(x, scale, bias, shift, eps):
    """`cpu_kernels.batch_norm_train`: two passes with a closed-form gradient, which need no shift."""
    return cpu_kernels.batch_norm_train(x, scale, bias, eps)


@dataclasses.dataclass(frozen=True)
class Ops:
    """One implementation of the operations the layers compute. Each takes its arrays first, then
    its static settings, positionally: `conv(x, kernel, strides, padding)`,
    `batch_norm_train(x, scale, bias, shift, eps)` (as `stock_batch_norm_train`), and
    `materialize(x)`, the identity, which may write `x` to memory (`cpu_kernels.materialize`)."""

    conv: Callable
    batch_norm_train: Callable
    materialize: Callable


def _identity(x):
    return x


def per_platform(cpu: Ops, other: Ops) -> Ops:
    """Operations that are `cpu`'s in programs compiled for the CPU and `other`'s elsewhere."""

    def op(name: str, num_arrays: int) -> Callable:
        on_cpu, elsewhere = getattr(cpu, name), getattr(other, name)

        def chosen(*args):
            arrays, static = args[:num_arrays], args[num_arrays:]
            return jax.lax.platform_dependent(
                *arrays, cpu=lambda *a: on_cpu(*a, *static), default=lambda *a: elsewhere(*a, *static)
            )

        return chosen

    return Ops(op("conv", 2), op("batch_norm_train", 4), op("materialize", 1))


STOCK = Ops(stock_conv2d, stock_batch_norm_train, _identity)
CPU_KERNELS = Ops(cpu_kernels.conv2d, _cpu_batch_norm_train, cpu_kernels.materialize)
PER_PLATFORM = per_platform(CPU_KERNELS, STOCK)
OPS = {"auto": PER_PLATFORM, "stock": STOCK, "cpu_kernels": CPU_KERNELS}  # by the benchmark's names


def for_platforms(platforms) -> Ops:
    """The operations `PER_PLATFORM` computes in programs lowered for `platforms` (JAX's names), chosen
    when the model is built: the same compiled programs, traced in half the time (both sides of every
    `platform_dependent` are traced, one is lowered)."""
    kinds = {p == "cpu" for p in platforms}
    return PER_PLATFORM if len(kinds) != 1 else CPU_KERNELS if kinds == {True} else STOCK


# --- the layers ----------------------------------------------------------------------------------


class Conv2d(nnx.Conv):
    """`nnx.Conv` (NHWC, HWIO kernel, explicit padding) computed by `ops.conv`."""

    def __init__(self, *args, ops: Ops = PER_PLATFORM, **kwargs):
        super().__init__(*args, **kwargs)
        self.ops = ops
        self.output_size = None  # (H, W) once `fit_to_input` made it one kernel over its whole input

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        y = self.ops.conv(x.astype(dtype), self.kernel[...].astype(dtype), self.strides, self.padding)
        if self.output_size:  # the output pixels came out as channels
            y = y.reshape(y.shape[0], *self.output_size, -1)
        return y + self.bias[...].astype(dtype) if self.use_bias else y


def stats_dtype(dtype):
    """float32 for low-precision and float32 activations, float64 when computing in float64."""
    return jnp.promote_types(dtype, jnp.float32)


class BatchNorm(nnx.Module):
    """BatchNorm2d with PyTorch's semantics (NHWC input, statistics over all but the last axis).

    Differences from `nnx.BatchNorm` that matter for matching torchvision:
      * `momentum` is PyTorch's (weight of the new batch, default 0.1 = Flax's 0.9);
      * normalisation uses the biased batch variance, but `var` is updated with the unbiased
        one (n / (n - 1)), exactly like `running_var` in PyTorch.
    Statistics are computed in float32 (float64 for float64 inputs), whatever the compute dtype.
    Under `jax.jit` with the batch sharded over devices, the mean is over the global batch
    (synchronised BatchNorm).
    """

    def __init__(self, num_features: int, *, momentum=0.1, eps=1e-5, dtype=None, ops: Ops = PER_PLATFORM):
        self.scale = nnx.Param(jnp.ones((num_features,), jnp.float32))
        self.bias = nnx.Param(jnp.zeros((num_features,), jnp.float32))
        self.mean = nnx.BatchStat(jnp.zeros((num_features,), jnp.float32))
        self.var = nnx.BatchStat(jnp.ones((num_features,), jnp.float32))
        self.momentum = momentum
        self.eps = eps
        self.dtype = dtype
        self.ops = ops
        self.use_running_average = False
        self.folded = False  # evaluation: folded into the convolution before it (`fold_batchnorm`)

    def __call__(self, x):
        dtype = self.dtype or x.dtype
        if self.folded:
            return x.astype(dtype)
        if not self.use_running_average:
            stats = stats_dtype(x.dtype)
            y, mean, var = self.ops.batch_norm_train(
                x,
                self.scale[...].astype(stats),
                self.bias[...].astype(stats),
                self.mean[...].astype(stats),
                self.eps,
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


class MaxPool2d(nnx.Module):
    """`nn.MaxPool2d(window, stride, padding)` of NHWC input (padding with -inf): `max_pool`."""

    def __init__(self, window: int, stride: int, padding: int = 0):
        self.window, self.stride, self.padding = window, stride, padding

    def __call__(self, x):
        return max_pool(x, self.window, self.stride, self.padding)


class AddReLU(nnx.Module):
    """relu(x + residual), a residual block's output, passed through `materialize` (the identity,
    or an implementation's `Ops.materialize`, which may write it to memory)."""

    def __init__(self, materialize: Callable = _identity):
        self.materialize = materialize

    def __call__(self, x, residual):
        return self.materialize(jax.nn.relu(x + residual))


class Identity(nnx.Module):
    """`nn.Identity`: where a variant of a model has no layer (the CIFAR stem's max-pool)."""

    def __call__(self, x):
        return x


@dataclasses.dataclass(frozen=True, eq=False)
class LayerMaker:
    """Makes a model's layers, all with one compute dtype (parameters stay float32), one source of
    initial parameters and one implementation (`ops`); flax's examples pass `conv` and `norm`
    partials to their blocks for the same reason. Layers are initialised as PyTorch's."""

    dtype: jnp.dtype
    rngs: nnx.Rngs
    ops: Ops = PER_PLATFORM

    def conv(self, in_ch, out_ch, kernel, *, stride=1, padding=0, bias=False, kernel_init=None) -> Conv2d:
        """nn.Conv2d: PyTorch's (symmetric, explicit) padding and initialisation, NHWC, HWIO kernel."""
        return Conv2d(
            in_ch,
            out_ch,
            kernel_size=(kernel, kernel),
            strides=(stride, stride),
            padding=((padding, padding), (padding, padding)),
            use_bias=bias,
            kernel_init=kernel_init or torch_default_kernel_init,
            bias_init=torch_default_bias_init(in_ch * kernel * kernel),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            ops=self.ops,
            rngs=self.rngs,
        )

    def norm(self, num_features: int) -> BatchNorm:
        """nn.BatchNorm2d(num_features)."""
        return BatchNorm(num_features, dtype=self.dtype, ops=self.ops)

    def linear(self, in_features: int, out_features: int) -> nnx.Linear:
        """nn.Linear."""
        return nnx.Linear(
            in_features,
            out_features,
            kernel_init=torch_default_kernel_init,
            bias_init=torch_default_bias_init(in_features),
            dtype=self.dtype,
            param_dtype=jnp.float32,
            rngs=self.rngs,
        )

    def max_pool(self, window: int, stride: int, padding: int = 0) -> MaxPool2d:
        """nn.MaxPool2d(window, stride, padding)."""
        return MaxPool2d(window, stride, padding)

    def add_relu(self, *, materialized: bool) -> AddReLU:
        """A residual merge; `materialized`: its output written to memory where the implementation
        asks for it (`Ops.materialize`)."""
        return AddReLU(self.ops.materialize if materialized else _identity)


# --- evaluation ----------------------------------------------------------------------------------


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


def fit_to_input(conv: Conv2d, size: tuple[int, int]) -> None:
    """For evaluation (after `fold_batchnorm`, outside the loop over batches): a kxk convolution of
    an input of at most 2x2 pixels (ResNets' last stages at 32x32) becomes the linear map it is on
    that input, one kernel over the whole input whose output channels are the output's pixels and
    channels; taps that meet only padding drop out. Exact. On a 1x1 input it is the centre tap, a
    1x1 convolution that cuDNN runs with its bias and ReLU; on 2x2 one matmul, no patches to build
    inside the loop and fewer products (BENCHMARKS.md, "The GPU program")."""
    (h, w), (kh, kw, in_features, out_features) = size, conv.kernel[...].shape
    (sh, sw), ((pt, _), (pl, _)) = conv.strides, conv.padding
    if (kh, kw) == (1, 1) or h * w > 4 or conv.output_size:
        return
    oh, ow = cpu_kernels.output_size(size, (kh, kw), conv.strides, conv.padding)
    if oh < 1 or ow < 1:
        return
    tap = np.full((h, w, oh, ow), kh * kw)  # which tap joins input pixel (i, j) to output (p, q): none
    for i, j, p, q in np.ndindex(h, w, oh, ow):
        a, b = i - p * sh + pt, j - q * sw + pl
        if 0 <= a < kh and 0 <= b < kw:
            tap[i, j, p, q] = a * kw + b
    kernel = conv.kernel[...]
    taps = jnp.concatenate(
        [kernel.reshape(kh * kw, in_features, out_features), jnp.zeros_like(kernel[:1, 0])]
    )
    fitted = taps[tap].transpose(0, 1, 4, 2, 3, 5).reshape(h, w, in_features, oh * ow * out_features)
    conv.kernel = nnx.Param(fitted)
    conv.strides, conv.padding, conv.output_size = (1, 1), ((0, 0), (0, 0)), (oh, ow)


def cast_linear(layer: nnx.Linear) -> None:
    """For evaluation: `layer`'s weights in its compute dtype once per call (nnx.Linear casts them at
    every call otherwise)."""
    if layer.dtype is not None:
        layer.kernel = nnx.Param(layer.kernel[...].astype(layer.dtype))
        layer.bias = nnx.Param(layer.bias[...].astype(layer.dtype))
