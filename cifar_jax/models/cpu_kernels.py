"""XLA:CPU kernels: the math of the stock operations in `layers.py`, written in the forms XLA:CPU
runs fast (`layers.CPU_KERNELS`, chosen by `layers.PER_PLATFORM` when a program is compiled for the
CPU). Same results as the stock operations (tested in float64); what each one gained is in
BENCHMARKS.md ("Why XLA:CPU's convolutions bound the CPU figures", "Things measured while building").
"""

from __future__ import annotations

import functools
import math

import jax
import jax.numpy as jnp


def conv2d(x, kernel, strides, padding):
    """The convolution of `layers.Conv2d` on CPU. XLA:CPU's fast convolution (Eigen) takes float16
    and float32; a float64 one runs XLA's generic loop (SimpleCNN's float64 training step 11x slower
    than as patch matmuls), so float64 convolutions are patch matmuls; others as `conv2d_by_shape`."""
    if x.dtype == jnp.float64:
        return patch_matmul(x, kernel, strides, padding)
    return conv2d_by_shape(x, kernel, strides, padding)


def conv2d_by_shape(x, kernel, strides, padding):
    """1x1 kernels (ResNet-50's bottlenecks and downsampling) and outputs of at most 2x2 pixels
    (ResNet-50's last stages at 32x32) as one 2-D matmul of image patches by the kernel, where
    XLA:CPU's convolution and its kernel gradient were slow; all others as `conv_nhwc`."""
    if kernel.shape[:2] == (1, 1) or has_tiny_output(x, kernel, strides, padding):
        return patch_matmul(x, kernel, strides, padding)
    return conv_nhwc(x, kernel, strides, padding)


def output_size(size, window, strides, padding) -> tuple[int, int]:
    """(H, W) of a convolution's or pooling's output from its input's `size` (H, W), `window` (kh,
    kw), strides and explicit padding ((top, bottom), (left, right))."""
    (h, w), (kh, kw), (sh, sw), ((pt, pb), (pl, pr)) = size, window, strides, padding
    return (h + pt + pb - kh) // sh + 1, (w + pl + pr - kw) // sw + 1


def has_tiny_output(x, kernel, strides, padding) -> bool:
    """Whether the convolution of NHWC `x` by an HWIO `kernel` has an output of at most 2 pixels
    along a side (ResNet-50's last stages at 32x32): one a patch matmul computes best."""
    return min(output_size(x.shape[1:3], kernel.shape[:2], strides, padding)) <= 2


def patch_matmul(x, kernel, strides, padding):
    """The convolution of NHWC `x` by an HWIO kernel as one 2-D matmul of the image patches by the
    kernel (exact; the padding's zeros take part in the product)."""
    (kh, kw, _, out_features), (sh, sw), ((pt, pb), (pl, pr)) = kernel.shape, strides, padding
    if x.shape[1:3] == (kh, kw) and pt == pb == pl == pr == 0:  # one window, the whole image
        patches = x.reshape(x.shape[0], 1, 1, -1)
    else:
        x = jnp.pad(x, ((0, 0), (pt, pb), (pl, pr), (0, 0)))
        # In the kernel's (H, W, I) order.
        patches = jnp.concatenate(window_slices(x, (kh, kw), (sh, sw)), axis=-1)
    # As a 2-D matmul: XLA:CPU ran the same product on 4-D patches slower.
    y = patches.reshape(-1, patches.shape[-1]) @ kernel.reshape(-1, out_features)
    return y.reshape(*patches.shape[:-1], out_features)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3))
def conv_nhwc(x, kernel, strides, padding):
    """`lax.conv_general_dilated` of NHWC `x` by an HWIO kernel, with both gradients written as
    convolutions in the one layout XLA:CPU's fast (Eigen) convolution takes (NHWC by HWIO). Autodiff
    gives them other layouts, which XLA:CPU rewrites into that one only outside loops; inside a
    fori_loop of training steps they ran XLA's naive convolution. Outside loops the gradients are
    bit-identical to autodiff's."""
    return _xla_conv(x, kernel, strides, padding)


def _xla_conv(x, kernel, strides, padding, **dilation):
    """XLA's convolution of NHWC `x` by an HWIO kernel (`layers.stock_conv2d`, with dilations)."""
    return jax.lax.conv_general_dilated(
        x, kernel, strides, padding, dimension_numbers=("NHWC", "HWIO", "NHWC"), **dilation
    )


def _conv_nhwc_fwd(x, kernel, strides, padding):
    return _xla_conv(x, kernel, strides, padding), (x, kernel)


def _conv_nhwc_bwd(strides, padding, residuals, dy):
    x, kernel = residuals
    # Per spatial axis: how far past the input the last window offset reads (at most the forward's
    # high padding; less with a stride that does not divide the padded input).
    reach = [
        k + s * (o - 1) - size - low
        for k, s, o, size, (low, _) in zip(kernel.shape[:2], strides, dy.shape[1:3], x.shape[1:3], padding)
    ]
    # dX: dy, dilated by the stride, convolved with the kernel flipped in space and transposed (O, I).
    dx = _xla_conv(
        dy,
        jnp.transpose(kernel[::-1, ::-1], (0, 1, 3, 2)),
        (1, 1),
        [(k - 1 - low, k - 1 - r) for k, (low, _), r in zip(kernel.shape[:2], padding, reach)],
        lhs_dilation=strides,
    )
    # dK[i, j, c, o] = sum over n, h, w of x_padded[n, s*h + i, s*w + j, c] * dy[n, h, w, o]: a
    # convolution of x as (C, H, W, N) by dy as an (Ho, Wo, N, O) kernel dilated by the stride.
    dk = _xla_conv(
        jnp.transpose(x, (3, 1, 2, 0)),
        jnp.transpose(dy, (1, 2, 0, 3)),
        (1, 1),
        [(low, r) for (low, _), r in zip(padding, reach)],
        rhs_dilation=strides,
    )
    return dx, jnp.transpose(dk, (1, 2, 0, 3))


conv_nhwc.defvjp(_conv_nhwc_fwd, _conv_nhwc_bwd)


def window_slices(x, window, strides):
    """The strided slices of NHWC `x`, one per window offset (i, j) in row-major order: slice
    (i, j) holds, for every output pixel of a VALID window op, the input pixel at that offset."""
    (kh, kw), (sh, sw) = window, strides
    oh, ow = output_size(x.shape[1:3], window, strides, ((0, 0), (0, 0)))
    return [
        x[:, i : i + (oh - 1) * sh + 1 : sh, j : j + (ow - 1) * sw + 1 : sw]
        for i in range(kh)
        for j in range(kw)
    ]


@jax.custom_vjp
def materialize(x):
    """`x`, unchanged. Under differentiation it is first written to memory by an exact matmul
    with an 8x8 identity, an op XLA:CPU does not fuse into its consumers: otherwise XLA:CPU
    recomputes a residual stage's BatchNorm, add and ReLU inside each transposed copy of the
    activations that a convolution's kernel gradient takes, a slow fusion. (A non-finite value
    would spread to its group of 8 channels, in a run that has diverged.)
    """
    return x


def _materialize_fwd(x):
    block = math.gcd(x.shape[-1], 8)
    eye = jnp.eye(block, dtype=x.dtype)
    return jnp.dot(x.reshape(-1, block), eye, precision=jax.lax.Precision.HIGHEST).reshape(x.shape), None


materialize.defvjp(_materialize_fwd, lambda _, g: (g,))


def channel_sum(x):
    """The sum of `x` over all axes but the last (per channel of NHWC activations), as 64
    matrix-vector products over consecutive blocks of rows, then a sum of the 64 partial sums:
    faster on XLA:CPU than its reduction over the leading axes, and more accurate than one
    matrix-vector product over all rows."""
    channels = x.shape[-1]
    blocks = x.reshape(math.gcd(x.size // channels, 64), -1, channels)
    ones = jnp.ones(blocks.shape[:2], x.dtype)
    partial = jax.lax.dot_general(
        ones, blocks, (((1,), (1,)), ((0,), (0,))), precision=jax.lax.Precision.HIGHEST
    )
    return partial.sum(0)


@functools.partial(jax.custom_vjp, nondiff_argnums=(3,))
def batch_norm_train(x, scale, bias, eps):
    """Training-mode BatchNorm of NHWC `x` over all but the last axis, computed in `scale`'s
    dtype: returns (normalised x in x's dtype, batch mean, biased batch variance).

    The gradient is the closed form (two per-channel sums of the incoming gradient, then one
    elementwise pass) rather than autodiff of the forward pass, which reduces and materialises
    more.
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
    return batch_norm_grad(residuals, cotangents, lambda a, b: (channel_sum(a), channel_sum(b)))


def batch_norm_grad(residuals, cotangents, totals):
    """The gradient of training-mode BatchNorm, (dx, dscale, dbias), in closed form: two
    per-channel sums of the incoming gradient (`totals(a, b)`: both), then one elementwise pass.
    `residuals`: (x, batch mean, 1 / sqrt(var + eps), scale); `cotangents`: those of (y, mean, var)."""
    x, mean, inv_std, scale = residuals
    dy, dmean, dvar = cotangents
    n = x.size // x.shape[-1]
    centred = x.astype(scale.dtype) - mean
    x_hat = centred * inv_std
    dy = dy.astype(scale.dtype)
    dbias, dscale = totals(dy, dy * x_hat)
    dx = (scale * inv_std) * (dy - (dbias + x_hat * dscale) / n) + (dmean + 2 * dvar * centred) / n
    return dx.astype(x.dtype), dscale, dbias


batch_norm_train.defvjp(_batch_norm_train_fwd, _batch_norm_train_bwd)
