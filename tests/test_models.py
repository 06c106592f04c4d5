import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from cifar_jax import models
from cifar_jax.models import layers


def _abstract(name, num_classes, **kw):
    return nnx.eval_shape(lambda: models.create(name, num_classes, **kw))


@pytest.mark.parametrize(
    "name,num_classes,expected",
    [
        ("simple_cnn", 100, 965_476),
        ("resnet18", 1000, 11_689_512),
        ("resnet34", 1000, 21_797_672),
        ("resnet50", 1000, 25_557_032),
        ("resnet18", 100, 11_227_812),
        ("resnet34", 100, 21_335_972),
        ("resnet50", 100, 23_712_932),
    ],
)
def test_parameter_counts_match_pytorch(name, num_classes, expected):
    assert models.count_params(_abstract(name, num_classes)) == expected


@pytest.mark.slow
def test_cifar_stem_replaces_7x7_conv_and_drops_maxpool():
    cifar, imagenet = models.create("resnet18", 10, stem="cifar"), models.create("resnet18", 10)
    assert cifar.conv1.kernel.shape == (3, 3, 3, 64)
    assert models.count_params(cifar) == models.count_params(imagenet) - 64 * 3 * (7 * 7 - 3 * 3)
    x = jnp.zeros((1, 32, 32, 3))
    # layer1 sees 32x32 with the CIFAR stem, 8x8 after the ImageNet stem's two stride-2 steps.
    assert nnx.relu(cifar.bn1(cifar.conv1(x))).shape == (1, 32, 32, 64)
    assert imagenet.conv1(x).shape == (1, 16, 16, 64)


def test_simple_cnn_maps_batch_to_logits():
    m = models.create("simple_cnn")
    out = m(jnp.zeros((2, 32, 32, 3)))
    assert out.shape == (2, 100) and out.dtype == jnp.float32


def test_simple_cnn_rejects_other_sizes():
    with pytest.raises(ValueError, match="32x32"):
        models.create("simple_cnn")(jnp.zeros((1, 64, 64, 3)))


def test_unknown_name_lists_valid_names():
    with pytest.raises(
        ValueError, match="unknown model 'resnet99'.*simple_cnn, resnet18, resnet34, resnet50"
    ):
        models.create("resnet99")


def test_unknown_stem_is_rejected():
    with pytest.raises(ValueError, match="valid stems: imagenet, cifar"):
        models.create("resnet18", stem="tiny")


@pytest.mark.slow
def test_bfloat16_compute_keeps_float32_params_and_logits():
    m32 = models.create("resnet18", 10, stem="cifar", seed=1)
    m16 = models.create("resnet18", 10, stem="cifar", seed=1, dtype="bfloat16")
    assert {x.dtype for x in jax.tree.leaves(nnx.state(m16))} == {jnp.dtype("float32")}
    x = jax.random.normal(jax.random.key(0), (4, 32, 32, 3))
    m32.eval(), m16.eval()
    assert m16.conv1(x).dtype == jnp.bfloat16 and m16.bn1(m16.conv1(x)).dtype == jnp.bfloat16
    y32, y16 = m32(x), m16(x)
    assert y16.dtype == jnp.float32
    np.testing.assert_allclose(y16, y32, atol=0.1 * float(jnp.abs(y32).max()))
    assert not np.array_equal(np.asarray(y16), np.asarray(y32))


def test_train_and_eval_switch_batchnorm_statistics():
    m = models.create("simple_cnn", seed=0)
    x = jax.random.normal(jax.random.key(1), (8, 32, 32, 3)) * 3 + 1
    before = np.asarray(m.bns[0].mean[...])
    m.eval()
    y_eval_1 = m(x)
    np.testing.assert_array_equal(m.bns[0].mean[...], before)  # eval: running stats untouched
    m.train()
    y_train = m(x)
    assert not np.allclose(m.bns[0].mean[...], before)  # train: running stats updated
    m.eval()
    assert not np.allclose(m(x), y_eval_1)  # eval now uses the updated statistics
    assert not np.allclose(y_train, y_eval_1)


def test_simple_cnn_matches_the_study_pytorch_model(highest_precision):
    torch = pytest.importorskip("torch")
    from cifar_jax.models.simple_cnn import torch_simple_cnn
    from tests.support.helpers import load_torch_simple_cnn

    ref = torch_simple_cnn(100)
    assert sum(p.numel() for p in ref.parameters()) == 965_476
    m = models.create("simple_cnn")
    load_torch_simple_cnn(m, ref)
    x = np.random.RandomState(0).randn(8, 3, 32, 32).astype(np.float32)
    with torch.no_grad():
        expected = ref.train()(torch.from_numpy(x)).numpy()
    got = m(jnp.asarray(x.transpose(0, 2, 3, 1)))
    np.testing.assert_allclose(got, expected, atol=1e-4 * max(1, np.abs(expected).max()))


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize(
    "window,stride,padding,size", [(2, 2, 0, 8), (2, 2, 0, 9), (3, 2, 1, 16), (3, 2, 1, 15)]
)
def test_max_pool_and_its_gradient_equal_xlas_reduce_window(window, stride, padding, size, dtype):
    # XLA's gradient (select-and-scatter) also goes to the first of tied maxima: small integers
    # tie often, and integer weights keep every sum exact whatever its order.
    x = jnp.asarray(np.random.default_rng(0).integers(0, 3, size=(2, size, size + 1, 5)), dtype)
    pads = ((padding, padding), (padding, padding))

    def reference(x):
        return nnx.max_pool(x, (window, window), strides=(stride, stride), padding=pads)

    np.testing.assert_array_equal(layers.max_pool(x, window, stride, padding), reference(x))
    weights = jnp.arange(5.0, dtype=dtype)
    grads = [
        jax.grad(lambda x: (pool(x) * weights).sum())(x)
        for pool in (lambda x: layers.max_pool(x, window, stride, padding), reference)
    ]
    np.testing.assert_array_equal(*grads)


def _assert_convolution_and_gradients_equal_xla(conv, kernel, stride, padding, size, in_ch, out_ch):
    """`conv(x, k, strides, pads)` against XLA's convolution and its autodiff gradients, float64."""
    rng = np.random.default_rng(0)
    x, k = (
        jnp.asarray(rng.normal(size=(3, size, size, in_ch))),
        jnp.asarray(rng.normal(size=(kernel, kernel, in_ch, out_ch))),
    )
    strides, pads = (stride, stride), ((padding, padding), (padding, padding))
    ref = lambda x, k: jax.lax.conv_general_dilated(
        x, k, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC")
    )
    ours = lambda x, k: conv(x, k, strides, pads)
    assert ours(x, k).shape == ref(x, k).shape
    np.testing.assert_allclose(ours(x, k), ref(x, k), rtol=1e-12, atol=1e-12)
    dy = jnp.asarray(rng.normal(size=ref(x, k).shape))
    for got, want in zip(jax.vjp(ours, x, k)[1](dy), jax.vjp(ref, x, k)[1](dy)):
        np.testing.assert_allclose(got, want, rtol=1e-12, atol=1e-12)
    return ours, x, k


@pytest.mark.parametrize(
    "kernel,stride,padding,size",
    [
        (3, 1, 1, 2),
        (3, 2, 1, 4),
        (3, 2, 1, 3),
        (3, 1, 1, 1),
        (7, 2, 3, 4),
        (1, 1, 0, 8),
        (1, 2, 0, 7),
        (1, 2, 0, 8),
    ],
)
def test_conv_as_patch_matmul_equals_xla_convolution(x64, kernel, stride, padding, size):
    """On CPU, 1x1 convolutions and those with outputs of at most 2x2 pixels run as a patch matmul."""
    from cifar_jax.models.cpu_kernels import conv2d as conv

    ours, x, k = _assert_convolution_and_gradients_equal_xla(conv, kernel, stride, padding, size, 6, 8)
    assert "conv_general_dilated" not in str(
        jax.make_jaxpr(ours)(x, k)
    )  # the patch matmul, not XLA's convolution
    assert kernel == 1 or max(ours(x, k).shape[1:3]) <= 2


@pytest.mark.parametrize(
    "kernel,stride,padding,size,as_matmul",
    [
        (3, 1, 1, 2, True),  # ResNet-50's layer3 at 32x32
        (3, 2, 1, 4, True),
        (3, 1, 1, 1, True),  # layer4: only the centre tap meets the image
        (3, 2, 1, 2, True),
        (7, 2, 3, 4, True),
        (3, 1, 1, 3, False),
        (1, 2, 0, 4, False),  # a 1x1 kernel stays XLA's convolution (cuDNN runs it well)
    ],
)
def test_stock_convolution_of_a_tiny_output_is_a_patch_matmul(x64, kernel, stride, padding, size, as_matmul):
    """What GPUs run (`layers.STOCK`): convolutions with outputs of at most 2x2 pixels as a patch
    matmul, exact to XLA's convolution with its gradients; the others XLA's convolution itself."""
    ours, x, k = _assert_convolution_and_gradients_equal_xla(
        layers.STOCK.conv, kernel, stride, padding, size, 6, 8
    )
    assert ("conv_general_dilated" not in str(jax.make_jaxpr(ours)(x, k))) == as_matmul


@pytest.mark.parametrize(
    "kernel,stride,padding,size",
    [
        (3, 1, 1, 8),
        (3, 2, 1, 8),
        (3, 2, 1, 9),
        (3, 1, 0, 7),
        (7, 2, 3, 16),
        (7, 2, 3, 15),
        (1, 2, 0, 8),
        (1, 2, 0, 7),
    ],
)
def test_conv_nhwc_gradients_equal_autodiff_of_xla_convolution(x64, kernel, stride, padding, size):
    from cifar_jax.models.cpu_kernels import conv_nhwc

    ours, x, k = _assert_convolution_and_gradients_equal_xla(conv_nhwc, kernel, stride, padding, size, 5, 4)
    strides, pads = (stride, stride), ((padding, padding), (padding, padding))
    xla = jax.lax.conv_general_dilated(x, k, strides, pads, dimension_numbers=("NHWC", "HWIO", "NHWC"))
    np.testing.assert_array_equal(ours(x, k), xla)  # the forward pass is XLA's convolution itself


def _conv_layouts(fn, *args) -> list[str]:
    """The dim_labels of every convolution in the compiled program of `fn`."""
    import re

    text = jax.jit(fn).lower(*args).compile().as_text()
    return re.findall(r"convolution\([^\n]*?dim_labels=([\w>-]+)", text)


@pytest.mark.parametrize("wrt", ["kernel", "input"])
def test_conv_gradients_take_the_fast_layout_inside_a_loop(wrt):
    """XLA:CPU moves a convolution's gradients into the layout its fast convolution takes
    (b01f_01io->b01f) only outside loops; in a fori_loop (several training steps per call) XLA's
    own gradient ran in another layout, the kernel gradient ~100x slower. conv_nhwc writes both in
    that layout itself: the compiled loop holds the same convolution as the step alone."""
    from cifar_jax.models.cpu_kernels import conv_nhwc

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.normal(size=(16, 16, 16, 32)), jnp.float32)
    k = jnp.asarray(rng.normal(size=(3, 3, 32, 64)), jnp.float32)
    dy = jnp.asarray(rng.normal(size=(16, 16, 16, 64)), jnp.float32)
    argnum = 1 if wrt == "kernel" else 0
    grad = lambda x, k: jax.vjp(lambda x, k: conv_nhwc(x, k, (1, 1), ((1, 1), (1, 1))), x, k)[1](dy)[
        argnum
    ].sum()
    # The loop's input changes every step, so that XLA cannot hoist the gradient out of it.
    alone = _conv_layouts(lambda k, x: grad(x, k), k, x)
    loop = _conv_layouts(
        lambda k, x: jax.lax.fori_loop(0, 4, lambda i, acc: acc + grad(x + acc, k + acc), 0.0), k, x
    )
    assert alone == loop == ["b01f_01io->b01f"], (alone, loop)


@pytest.mark.parametrize(
    "window,stride,padding,size",
    [(2, 2, 0, 8), (2, 2, 0, 9), (3, 3, 0, 7), (3, 2, 1, 16), (3, 2, 1, 15), (3, 1, 1, 6)],
)
def test_max_pool_gradient_goes_to_the_first_tied_maximum_like_pytorch(window, stride, padding, size):
    torch = pytest.importorskip("torch")
    max_pool = layers.max_pool

    rng = np.random.default_rng(0)
    x = rng.integers(0, 3, size=(2, size, size + 1, 5)).astype(np.float32)  # many tied maxima
    xt = torch.tensor(x.transpose(0, 3, 1, 2), requires_grad=True)
    pooled = torch.nn.functional.max_pool2d(xt, window, stride, padding)
    weights = rng.normal(size=pooled.shape).astype(np.float32)
    expected = (pooled * torch.tensor(weights)).sum()
    expected.backward()

    weights = jnp.asarray(weights.transpose(0, 2, 3, 1))
    out, grad = jax.value_and_grad(lambda x: (max_pool(x, window, stride, padding) * weights).sum())(
        jnp.asarray(x)
    )
    np.testing.assert_allclose(out, expected.item(), rtol=1e-5)  # summation order differs
    # Overlapping windows add several shares into one pixel, in another order than PyTorch.
    np.testing.assert_allclose(grad, xt.grad.numpy().transpose(0, 2, 3, 1), rtol=1e-6, atol=1e-6)


@pytest.mark.parametrize("shape", [(3, 5, 7, 4), (16, 4, 4, 8), (2, 3)])
def test_channel_sum_equals_a_float64_sum(shape):
    from cifar_jax.models.cpu_kernels import channel_sum

    x = np.random.default_rng(0).normal(3.0, 2.0, size=shape).astype(np.float32)
    expected = x.astype(np.float64).sum(tuple(range(x.ndim - 1)))
    np.testing.assert_allclose(channel_sum(jnp.asarray(x)), expected, rtol=1e-6)
    assert "dot_general" in str(
        jax.make_jaxpr(channel_sum)(x)
    )  # matrix-vector products, not XLA:CPU's slow reduction


@pytest.mark.parametrize("ops", ["cpu_kernels", "stock"])
def test_batch_norm_gradient_equals_autodiff_of_its_definition(x64, ops, monkeypatch):
    """The closed-form BatchNorm gradient (CPU), and the stock one (elsewhere), for the output and
    for the batch statistics."""

    shift = jnp.asarray(np.random.default_rng(1).normal(1.0, 1.0, 6))  # a running mean near the batch's

    def batch_norm_train(x, scale, bias, eps):
        return layers.OPS[ops].batch_norm_train(x, scale, bias, shift, eps)

    def definition(x, scale, bias):
        mean = x.mean((0, 1, 2))
        var = jnp.square(x - mean).mean((0, 1, 2))
        return (x - mean) * jax.lax.rsqrt(var + 1e-5) * scale + bias, mean, var

    rng = np.random.default_rng(0)
    args = [
        jnp.asarray(rng.normal(1.0, 2.0, size=(4, 3, 5, 6))),
        jnp.asarray(rng.uniform(0.5, 1.5, 6)),
        jnp.asarray(rng.normal(size=6)),
    ]
    cotangents = (
        jnp.asarray(rng.normal(size=(4, 3, 5, 6))),
        jnp.asarray(rng.normal(size=6)),
        jnp.asarray(rng.normal(size=6)),
    )
    ours, ours_vjp = jax.vjp(lambda *a: batch_norm_train(*a, 1e-5), *args)
    ref, ref_vjp = jax.vjp(definition, *args)
    for got, want in zip(ours + ours_vjp(cotangents), ref + ref_vjp(cotangents)):
        np.testing.assert_allclose(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("ops", ["cpu_kernels", "stock"])
def test_batch_norm_statistics_in_float32_are_those_of_float64_far_from_zero(ops):
    """float32 BatchNorm against its float64 definition on channels whose mean is up to 1000 times
    their spread: the stock one-pass sums are shifted by the running mean (here within a standard
    deviation of the batch's; unshifted, a mean of 1000 would lose the variance to cancellation)."""
    rng = np.random.default_rng(0)
    means, stds = np.array([0.0, 3.0, -50.0, 1000.0]), np.array([1.0, 0.5, 2.0, 1.0])
    x = rng.normal(means, stds, size=(16, 4, 4, 4))
    shift = means + rng.uniform(-1, 1, 4) * stds
    scale, bias = rng.uniform(0.5, 1.5, 4), rng.normal(size=4)
    f32 = [jnp.asarray(a, jnp.float32) for a in (x, scale, bias, shift)]
    y, mean, var = layers.OPS[ops].batch_norm_train(*f32, 1e-5)
    want_mean, want_var = x.mean((0, 1, 2)), x.var((0, 1, 2))
    want_y = (x - want_mean) / np.sqrt(want_var + 1e-5) * scale + bias
    np.testing.assert_allclose(mean, want_mean, rtol=1e-6, atol=1e-6)
    np.testing.assert_allclose(var, want_var, rtol=1e-4)
    np.testing.assert_allclose(y, want_y, rtol=0, atol=1e-3)


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_materialize_is_the_identity_and_a_matmul_under_differentiation_on_cpu(dtype):
    from cifar_jax.models.cpu_kernels import materialize

    x = (jax.random.normal(jax.random.key(0), (2, 3, 5, 24)) * 1e20).astype(dtype)
    out, vjp = jax.vjp(materialize, x)
    np.testing.assert_array_equal(out, x)
    np.testing.assert_array_equal(vjp(x)[0], x)
    assert "dot_general" not in str(jax.make_jaxpr(materialize)(x))  # eval: nothing to do
    assert "dot_general" in str(jax.make_jaxpr(lambda x: jax.vjp(materialize, x)[0])(x))


def test_every_basic_block_output_goes_through_materialize():
    """ResNet-18/34 blocks hand their output to `materialize` (the CPU fused-transpose workaround);
    ResNet-50's bottlenecks do not."""
    seen = []
    spy = dataclasses.replace(layers.CPU_KERNELS, materialize=lambda x: seen.append(x.shape) or x)
    model = models.create("resnet18", 10, stem="cifar", ops=layers.per_platform(spy, layers.STOCK))
    model(jnp.zeros((2, 8, 8, 3)))
    assert len(seen) == 8 and seen[-1] == (2, 1, 1, 512)
    seen.clear()
    models.create("resnet50", 10, stem="cifar", ops=spy)(jnp.zeros((2, 8, 8, 3)))
    assert seen == []


@pytest.mark.slow
@pytest.mark.parametrize("name,options", [("simple_cnn", {}), ("resnet18", {"stem": "imagenet"})])
def test_stock_operations_and_cpu_kernels_train_the_same_model(x64, name, options):
    """What runs on GPUs (XLA's stock operations) and what runs on CPUs (`cpu_kernels`, each
    convolution chosen as in float32: `conv2d_by_shape`): the same outputs, loss gradients and
    BatchNorm statistics, in float64."""
    from cifar_jax.models import cpu_kernels

    def step(model, x):
        graphdef, params, rest = nnx.split(model, nnx.Param, ...)

        def loss(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            out = m(x)
            return (out**2).mean(), (out, nnx.state(m, nnx.BatchStat))

        (_, (out, stats)), grads = jax.jit(jax.value_and_grad(loss, has_aux=True))(params)
        return [np.asarray(a) for a in jax.tree.leaves((out, stats, grads))]

    model = models.create(name, 10, dtype="float64", **options)
    nnx.update(model, jax.tree.map(lambda a: a.astype(jnp.float64), nnx.state(model)))
    # A batch of 8: ResNet's last stage normalises 1x1 maps, over 2 values with a batch of 2,
    # which amplifies the two paths' rounding differences to 5e-11.
    x = jnp.asarray(np.random.default_rng(0).normal(size=(8, 32, 32, 3)))
    models_by_kernels = {}
    as_in_float32 = dataclasses.replace(layers.CPU_KERNELS, conv=cpu_kernels.conv2d_by_shape)
    for kernels, ops in (("cpu_kernels", as_in_float32), ("stock", layers.STOCK)):
        built = models.create(name, 10, dtype="float64", ops=ops, **options)
        nnx.update(built, nnx.state(model))  # the same weights
        models_by_kernels[kernels] = built
    cpu = step(models_by_kernels["cpu_kernels"], x)
    stock = step(models_by_kernels["stock"], x)
    assert len(cpu) == len(stock) > 10
    for a, b in zip(cpu, stock):
        # 1e-14 absolute for the gradients that are zero but for rounding (a conv bias before BatchNorm).
        np.testing.assert_allclose(a, b, rtol=0, atol=1e-12 * np.abs(b).max() + 1e-14)


def _program_text(compiled) -> str:
    """A compiled program's HLO without what says where it came from: the stack-frame tables and
    metadata dropped, instruction and computation names numbered in order of appearance."""
    text = re.sub(
        r"\n(FileNames|FunctionNames|FileLocations|StackFrames)\n(\d+ .*\n)*", "\n", compiled.as_text()
    )
    text = re.sub(r",? metadata=\{[^}]*\}", "", text)
    names = {}
    return re.sub(r"%[\w.\-]+", lambda m: names.setdefault(m.group(), f"%v{len(names)}"), text)


@pytest.mark.slow
def test_a_model_built_for_the_cpu_compiles_to_the_program_per_platform_lowers_to():
    """Training and evaluation build their models with `layers.for_platforms` of their devices,
    which traces one side of each `platform_dependent` instead of both: the CPU's compiled gradient
    step is the program `PER_PLATFORM` gives (BatchNorm in training mode, every convolution).
    SimpleCNN here; ResNet-18's step and the trainer's programs of ResNet-34 and ResNet-50 were
    compared once (12-20 s each)."""
    assert layers.for_platforms({"cpu"}) is layers.CPU_KERNELS
    assert layers.for_platforms({"cuda"}) is layers.for_platforms({"gpu", "tpu"}) is layers.STOCK
    assert layers.for_platforms({"cpu", "cuda"}) is layers.PER_PLATFORM
    x = jnp.zeros((2, 32, 32, 3))  # compiled, not run

    def program(ops):
        graphdef, params, rest = nnx.split(models.create("simple_cnn", 10, ops=ops), nnx.Param, ...)

        def loss(params):
            m = nnx.merge(graphdef, params, rest, copy=True)
            return (m(x) ** 2).mean(), nnx.state(m, nnx.BatchStat)

        return _program_text(jax.jit(jax.value_and_grad(loss, has_aux=True)).lower(params).compile())

    chosen = program(layers.for_platforms({"cpu"}))
    assert chosen == program(layers.PER_PLATFORM)
    assert chosen != program(layers.STOCK)  # the comparison sees which operations were chosen


def _random_batchnorm(model, seed=0):
    """Running statistics and affine parameters away from their initial 0/1, so that folding them
    into the convolutions changes every kernel."""
    from cifar_jax.models.layers import BatchNorm

    rng = np.random.default_rng(seed)
    for _, module in nnx.iter_modules(model):
        if isinstance(module, BatchNorm):
            n = module.scale[...].shape[0]
            for name, values in (
                ("scale", rng.uniform(0.5, 1.5, n)),
                ("bias", rng.normal(0, 0.2, n)),
                ("mean", rng.normal(0, 0.2, n)),
                ("var", rng.uniform(0.5, 2.0, n)),
            ):
                getattr(module, name)[...] = jnp.asarray(values, getattr(module, name)[...].dtype)


@pytest.mark.parametrize(
    "name,options",
    [
        ("simple_cnn", {}),
        ("resnet18", {"stem": "cifar"}),
        ("resnet18", {"stem": "imagenet"}),
        pytest.param("resnet50", {"stem": "cifar"}, marks=pytest.mark.slow),
        pytest.param("resnet50", {"stem": "imagenet"}, marks=pytest.mark.slow),
    ],
)
@pytest.mark.parametrize("dtype", ["float64", "float32"])
def test_evaluation_with_batchnorm_folded_equals_the_model(request, name, options, dtype):
    """`models.for_evaluation`: every BatchNorm folded into its convolution (what the evaluation
    steps compute) gives the logits of the model itself: float64 to 1e-10, float32 to 1e-5 of the
    largest logit."""
    if dtype == "float64":
        request.getfixturevalue("x64")
    else:
        request.getfixturevalue("highest_precision")
    model = models.create(name, 10, dtype=dtype, seed=0, **options)
    _random_batchnorm(model)
    model.eval()
    graphdef, params, stats = nnx.split(model, nnx.Param, nnx.BatchStat)
    if dtype == "float64":
        params, stats = jax.tree.map(lambda a: a.astype(jnp.float64), (params, stats))
    size = 32 if name == "simple_cnn" else 16  # SimpleCNN's classifier takes 32x32; folding has no size
    x = jnp.asarray(np.random.default_rng(1).normal(size=(2, size, size, 3)), dtype)
    plain = jax.jit(lambda p, s, x: nnx.merge(graphdef, p, s, copy=True)(x))(params, stats, x)
    folded = jax.jit(lambda p, s, x: models.for_evaluation(nnx.merge(graphdef, p, s, copy=True), size)(x))(
        params, stats, x
    )
    scale = float(jnp.abs(plain).max())
    np.testing.assert_allclose(folded, plain, rtol=0, atol=(1e-10 if dtype == "float64" else 1e-5) * scale)
    assert len(model.conv_bn_pairs()) == sum(
        isinstance(m, models.layers.BatchNorm) for _, m in nnx.iter_modules(model)
    )  # every BatchNorm has its convolution


@pytest.mark.parametrize(
    "kernel,stride,padding,size,fitted_kernel",
    [
        (3, 1, 1, 2, (2, 2)),  # ResNet-50's layer3 at 32x32: one matmul of the whole input
        (3, 2, 1, 2, (2, 2)),  # layer4's first block: four taps meet the image
        (3, 1, 1, 1, (1, 1)),  # layer4: only the centre tap meets the image
        (3, 2, 1, 1, (1, 1)),
        (7, 2, 3, 2, (2, 2)),  # a stem at 2x2
        (3, 1, 0, 2, None),  # the output (0x0) is no linear map to fit: left as it is
        (3, 1, 1, 3, None),  # 9 pixels: left as it is
        (1, 1, 0, 2, None),  # a 1x1 kernel: already what cuDNN runs
    ],
)
def test_a_convolution_fitted_to_its_tiny_input_computes_the_same(
    x64, kernel, stride, padding, size, fitted_kernel
):
    """`layers.fit_to_input`: the convolution of a folded layer on its input size as one kernel over
    the whole input, output pixels as channels; float64 equal to the convolution to 1e-12."""
    make = layers.LayerMaker(jnp.float64, nnx.Rngs(0))
    conv = make.conv(4, 5, kernel, stride=stride, padding=padding, bias=True)
    x = jnp.asarray(np.random.default_rng(0).normal(size=(3, size, size, 4)))
    if (size + 2 * padding - kernel) < 0:
        layers.fit_to_input(conv, (size, size))
        assert conv.output_size is None
        return
    want = conv(x)
    layers.fit_to_input(conv, (size, size))
    np.testing.assert_allclose(conv(x), want, rtol=1e-12, atol=1e-12)
    if fitted_kernel is None:
        assert conv.output_size is None and conv.kernel[...].shape[:2] == (kernel, kernel)
    else:
        assert conv.kernel[...].shape[:2] == fitted_kernel and conv.padding == ((0, 0), (0, 0))
        assert conv.output_size == want.shape[1:3]


def test_evaluation_fits_the_convolutions_of_tiny_inputs_and_only_those():
    model = models.create("resnet50", 10, stem="imagenet")
    model.eval()
    sizes = models.conv_input_sizes(model, 32)
    assert sizes[model.conv1] == (32, 32) and sizes[model.layer3[1].conv2] == (2, 2)
    assert sizes[model.layer4[0].conv2] == (2, 2) and sizes[model.layer4[2].conv2] == (1, 1)
    models.for_evaluation(model, 32)
    fitted = [m for _, m in nnx.iter_modules(model) if isinstance(m, layers.Conv2d) and m.output_size]
    # layer3's five 3x3 convolutions at 2x2 (its first, at 4x4, stays) and layer4's three 3x3
    assert fitted == [model.layer3[i].conv2 for i in range(1, 6)] + [model.layer4[i].conv2 for i in range(3)]


def test_folding_a_batchnorm_in_training_mode_is_refused():
    model = models.create("simple_cnn", 10)
    with pytest.raises(ValueError, match="training mode"):
        models.layers.fold_batchnorm(*model.conv_bn_pairs()[0])
