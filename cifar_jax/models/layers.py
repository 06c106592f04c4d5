"""Building blocks shared by the models: PyTorch-initialised conv/linear and a PyTorch BatchNorm.

The initialisers reproduce PyTorch's defaults so that a model trained here from scratch starts
from the same distribution as the study's PyTorch model.
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp
from flax import nnx

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


class Conv(nnx.Conv):
    """`nnx.Conv`, except that on CPU two kinds of convolution run as one 2-D matmul of image
    patches by the kernel (same parameters, same result):

    * 1x1 kernels (ResNet-50's bottlenecks and downsampling). XLA:CPU computes their kernel
      gradient as a convolution over transposed activations, and those transposes took 41% of a
      ResNet-50 step at 224 (one of 194 ms for a 8x56x56x256 input); as a matmul the gradient
      is a matmul too. ResNet-50 forward+backward: 629 -> 503 ms at 32x32 (batch 128), 9.6 ->
      6.4 s at 224x224 (batch 32).
    * outputs of at most 2x2 pixels (ResNet-50's last two stages on 32x32 images: 2x2 and 1x1
      maps), which XLA:CPU rewrites into a form it runs 20-80x slower than the same FLOPs on a
      larger map: a 3x3 conv of 100x2x2x256 -> 256 took 112 ms against 5 ms at 4x4x128 -> 128.

    All other convolutions run `conv_nhwc` on CPU (XLA's convolution, with gradients that stay
    fast inside loops), and nnx.Conv's convolution on other backends.
    """

    def __call__(self, x):
        (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = self.kernel_size, self.strides, self.padding
        h, w = x.shape[1] + pt + pb, x.shape[2] + pl + pr
        oh, ow = (h - kh) // sh + 1, (w - kw) // sw + 1
        if jax.default_backend() != "cpu":
            return super().__call__(x)
        dtype = self.dtype or x.dtype
        x, kernel = x.astype(dtype), self.kernel[...].astype(dtype)
        if (kh, kw) != (1, 1) and min(oh, ow) > 2:
            y = conv_nhwc(x, kernel, self.strides, self.padding)
        else:
            x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
            patches = jnp.concatenate(window_slices(x, (kh, kw), (sh, sw)), axis=-1)  # in the kernel's (H, W, I) order
            # As a 2-D matmul: XLA:CPU ran the same product on 4-D patches up to 3x slower.
            y = patches.reshape(-1, patches.shape[-1]) @ kernel.reshape(-1, self.out_features)
            y = y.reshape(*patches.shape[:-1], self.out_features)
        return y + self.bias[...].astype(dtype) if self.use_bias else y


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x, kernel, strides, padding):
    """`lax.conv_general_dilated` of NHWC `x` by an HWIO kernel, with both gradients written as
    convolutions in the one layout XLA:CPU's fast (Eigen) convolution takes (NHWC by HWIO). Autodiff
    gives them other layouts, which XLA:CPU rewrites into that one only in the program's entry
    computation (`xla::cpu::ConvCanonicalization` visits no other): inside a loop (a fori_loop of
    training steps) the rest ran XLA's naive convolution, 16x16x32 -> 64 at batch 128: the kernel
    gradient in 2,157 ms against 30 ms, the input gradient in 34 against 8 ms. Outside loops the
    gradients are bit-identical to autodiff's, and as fast."""
    return _conv(x, kernel, strides, padding)


def _conv(x, kernel, strides, padding, **dilation):
    return jax.lax.conv_general_dilated(x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), **dilation)


def _conv_nhwc_fwd(x, kernel, strides, padding):
    return _conv(x, kernel, strides, padding), (x, kernel)


def _conv_nhwc_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    # Per spatial axis: how far past the input the last window offset reads (at most the forward's
    # high padding; less with a stride that does not divide the padded input).
    reach = [k + s * (o - 1) - size - low
             for k, s, o, size, (low, _) in zip(kernel.shape[:2], strides, dy.shape[1:3], x.shape[1:3], padding)]
    # dX: dy, dilated by the stride, convolved with the kernel flipped in space and transposed (O, I).
    dx = _conv(dy, jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)), (1, 1),
               [(k - 1 - low, k - 1 - r) for k, (low, _), r in zip(kernel.shape[:2], padding, reach)], lhs_dilation=strides)
    # dK[i, j, c, o] = sum over n, h, w of x_padded[n, s*h + i, s*w + j, c] * dy[n, h, w, o]: a
    # convolution of x as (C, H, W, N) by dy as an (Ho, Wo, N, O) kernel dilated by the stride.
    dk = _conv(jnp.transpose(x, (3, 1, 2, 0)), jnp.transpose(dy, (1, 2, 0, 3)), (1, 1),
               [(low, r) for (low, _), r in zip(padding, reach)], rhs_dilation=strides)
    return dx, jnp.transpose(dk, (1, 2, 0, 3))


conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


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


def window_slices(x, window, strides):
    """The strided slices of NHWC `x`, one per window offset (i, j) in row-major order: slice
    (i, j) holds, for every output pixel of a VALID window op, the input pixel at that offset."""
    (kh, kw), (sh, sw) = window, strides
    oh, ow = (x.shape[1] - kh) // sh + 1, (x.shape[2] - kw) // sw + 1
    return [x[:, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw] for i in range(kh) for j in range(kw)]


@functools.partial(jax.custom_vjp, nondiff_argnums=(1, 2, 3))
def max_pool(x, window: int, stride: int, padding: int = 0):
    """`nn.MaxPool2d(window, stride, padding)` (NHWC), gradient included: in each window it goes
    to the first maximum in row-major order, as PyTorch's does (also for tied maxima).

    Forward: the elementwise maximum of the window's strided slices. XLA's own pooling gradient
    (select-and-scatter) took 97 of the 244 ms of a SimpleCNN step on CPU, and the gradient XLA
    derives from the slices scatters every slice back through an interior-padded copy (ResNet's
    3x3/2 stem pool at 224, batch 32: 353 ms); `_max_pool_bwd` adds each slice's share into the
    stride x stride phase grid of the input instead (89 ms; SimpleCNN step 128 -> 112 ms).
    """
    return _max_pool_fwd(x, window, stride, padding)[0]


def _pad_for_pool(x, padding):
    if not padding:
        return x
    return jnp.pad(x, ((0, 0), (padding, padding), (padding, padding), (0, 0)), constant_values=-jnp.inf)


def _max_pool_fwd(x, window, stride, padding):
    y = functools.reduce(jnp.maximum, window_slices(_pad_for_pool(x, padding), (window, window), (stride, stride)))
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
    for (i, j), pixels in zip(offsets, window_slices(padded, (window, window), (stride, stride))):
        first = (pixels == y) & ~taken
        taken = taken | first
        qi, qj = i // stride, j // stride
        share = jnp.pad(jnp.where(first, dy, 0).astype(x.dtype), ((0, 0), (qi, th - ho - qi), (qj, tw - wo - qj), (0, 0)))
        phase = (i % stride, j % stride)
        phases[phase] = phases[phase] + share if phase in phases else share
    zeros = jnp.zeros((n, th, tw, c), x.dtype)
    rows = [jnp.stack([phases.get((a, b), zeros) for b in range(stride)], axis=3) for a in range(stride)]
    grid = jnp.stack(rows, axis=2).reshape(n, th * stride, tw * stride, c)  # interleave the phases
    return (grid[:, padding : padding + x.shape[1], padding : padding + x.shape[2]],)


max_pool.defvjp(_max_pool_fwd, _max_pool_bwd)


@jax.custom_vjp
def materialize(x):
    """`x`, unchanged. Under differentiation on CPU it is first written to memory by an exact
    matmul with an 8x8 identity, an op XLA:CPU does not fuse into its consumers.

    Otherwise XLA:CPU recomputes a residual stage's chain of BatchNorm, add and ReLU inside each
    transposed copy of the activations that a convolution's kernel gradient takes, and that fused
    copy is slow: four residual steps then a transpose of 128x32x32x64 took 331 ms against 15 +
    18 ms apart. On ResNet-34's block outputs: forward+backward 6.69 -> 5.63 s (batch 128).
    (A non-finite value would spread to its group of 8 channels, in a run that has diverged.)
    """
    return x


def _materialize_fwd(x):
    if jax.default_backend() != "cpu":
        return x, None
    block = math.gcd(x.shape[-1], 8)
    eye = jnp.eye(block, dtype=x.dtype)
    return jnp.dot(x.reshape(-1, block), eye, precision=jax.lax.Precision.HIGHEST).reshape(x.shape), None


materialize.defvjp(_materialize_fwd, lambda _, g: (g,))


def stats_dtype(dtype):
    """float32 for low-precision and float32 activations, float64 when computing in float64."""
    return jnp.promote_types(dtype, jnp.float32)


def channel_sum(x):
    """The sum of `x` over all axes but the last (per channel of NHWC activations).

    On CPU as 64 matrix-vector products over consecutive blocks of rows, then a sum of the 64
    partial sums: XLA:CPU's own reduction over the leading axes is 2-7x slower (128x32x32x32
    float32: 2.1 ms against 0.3 ms) and less accurate (3e-6 against 3e-7 relative error), and one
    matrix-vector product over all rows, though fast, accumulates 131,072 terms in a row (1e-5).
    """
    if jax.default_backend() != "cpu":
        return x.sum(tuple(range(x.ndim - 1)))
    channels = x.shape[-1]
    blocks = x.reshape(math.gcd(x.size // channels, 64), -1, channels)
    ones = jnp.ones(blocks.shape[:2], x.dtype)
    partial = jax.lax.dot_general(ones, blocks, (((1,), (1,)), ((0,), (0,))), precision=jax.lax.Precision.HIGHEST)
    return partial.sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, eps):
    """Training-mode BatchNorm of NHWC `x` over all but the last axis, computed in `scale`'s
    dtype: returns (normalised x in x's dtype, batch mean, biased batch variance).

    The gradient is the closed form (two per-channel sums of the incoming gradient, then one
    elementwise pass) rather than autodiff of the forward pass, which reduces and materialises
    more: with `channel_sum` it halves a SimpleCNN block's BatchNorm+ReLU+pool step on CPU.
    """
    return _batch_norm_train_fwd(x, scale, bias, eps)[0]


def _batch_norm_train_fwd(x, scale, bias, eps):
    xf = x.astype(scale.dtype)
    n = x.size // x.shape[-1]
    mean = channel_sum(xf) / n
    centred = xf - mean
    var = channel_sum(jnp.square(centred)) / n
    inv_std = jax.lax.rsqrt(var + eps)
    y = (centred * (scale * inv_std) + bias).astype(x.dtype)
    return (y, mean, var), (x, mean, inv_std, scale)


def _batch_norm_train_bwd(eps, residuals, cotangents):
    x, mean, inv_std, scale = residuals
    dy, dmean, dvar = cotangents
    n = x.size // x.shape[-1]
    centred = x.astype(scale.dtype) - mean
    x_hat = centred * inv_std
    dy = dy.astype(scale.dtype)
    dbias = channel_sum(dy)
    dscale = channel_sum(dy * x_hat)
    dx = (scale * inv_std) * (dy - (dbias + x_hat * dscale) / n) + (dmean + 2 * dvar * centred) / n
    return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)


class BatchNorm(nnx.Module):
    """BatchNorm2d with PyTorch's semantics (NHWC input, statistics over all but the last axis).

    Differences from `nnx.BatchNorm` that matter for matching torchvision:
      * `momentum` is PyTorch's (weight of the new batch, default 0.1 = Flax's 0.9);
      * normalisation uses the biased batch variance, but `var` is updated with the unbiased
        one (n / (n - 1)), exactly like `running_var` in PyTorch.
    Statistics are computed in float32 (float64 for float64 inputs), whatever the compute dtype. Under `jax.jit` with
    the batch sharded over devices, the mean is over the global batch (synchronised BatchNorm).
    Train mode runs `batch_norm_train`, whose gradient is written out rather than derived.
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
            y, mean, var = batch_norm_train(x, self.scale[...].astype(stats), self.bias[...].astype(stats), self.eps)
            n = x.size // x.shape[-1]
            m = self.momentum
            self.mean[...] = (1 - m) * self.mean[...] + m * mean
            self.var[...] = (1 - m) * self.var[...] + m * var * (n / max(n - 1, 1))
            return y.astype(dtype)
        mean, var = self.mean[...], self.var[...]
        mul = self.scale[...] * jax.lax.rsqrt(var + self.eps)
        add = self.bias[...] - mean * mul
        return x.astype(dtype) * mul.astype(dtype) + add.astype(dtype)
