"""Every convolution of a model timed alone, ours against PyTorch's, in the same process:

    python -m cifar_jax.bench.convs --case resnet50@224 [--batch_size 32] [--reps 5]

For each distinct convolution of the model (found by running torchvision's model once with hooks
on its `nn.Conv2d` layers), at the training batch size: our `Conv` (jitted, NHWC) against
`torch.nn.Conv2d` (channels_last), forward alone and forward plus gradients (kernel and bias; the
input too, except for the layer that reads the image). Counts weight the totals. The totals say
how much of a training step the convolution kernels alone take on each side: the part that no
change outside them can win back.
"""

from __future__ import annotations

from cifar_jax import interrupts

if __name__ == "__main__":  # a Ctrl-C during the imports below is acted on once they are done (cli.run)
    interrupts.defer()

import argparse
import statistics

import numpy as np

from cifar_jax.bench.cases import NUM_CLASSES, BenchError, Case, parse_cases
from cifar_jax.bench.timing import timed_windows


def conv_layers(case: Case) -> list[dict]:
    """The distinct convolutions of `case`'s model, in order of first use, with their counts."""
    import torch

    from cifar_jax import models

    model = models.torch_twin(case.arch, NUM_CLASSES, **case.options).eval()
    seen: dict[tuple, dict] = {}

    def hook(module, args):
        x = args[0]
        spec = dict(
            in_ch=module.in_channels,
            out_ch=module.out_channels,
            kernel=module.kernel_size[0],
            stride=module.stride[0],
            padding=module.padding[0],
            bias=module.bias is not None,
            size=x.shape[-1],
            reads_image=not seen and x.shape[1] == 3,
        )
        key = tuple(spec.values())
        seen.setdefault(key, {**spec, "count": 0})["count"] += 1

    handles = [m.register_forward_pre_hook(hook) for m in model.modules() if isinstance(m, torch.nn.Conv2d)]
    with torch.no_grad():
        model(torch.zeros(1, 3, case.image_size, case.image_size))
    for h in handles:
        h.remove()
    return list(seen.values())


def _median_ms(fn, reps: int) -> float:
    """Median milliseconds of `reps` calls of `fn` (which waits for its result), after one untimed."""
    _, times = timed_windows(fn, lambda _: None, 1, reps, overlap=False)
    return statistics.median(times) * 1e3


def time_jax(layer: dict, batch: int, reps: int) -> tuple[float, float]:
    import jax
    import jax.numpy as jnp
    from flax import nnx

    from cifar_jax.models.layers import LayerMaker

    rng = np.random.default_rng(0)
    m = LayerMaker(jnp.float32, nnx.Rngs(0)).conv(
        layer["in_ch"],
        layer["out_ch"],
        layer["kernel"],
        stride=layer["stride"],
        padding=layer["padding"],
        bias=layer["bias"],
    )
    graphdef, params = nnx.split(m)
    x = jnp.asarray(rng.standard_normal((batch, layer["size"], layer["size"], layer["in_ch"]), np.float32))
    forward = jax.jit(lambda p, x: nnx.merge(graphdef, p)(x))
    g = jnp.asarray(rng.standard_normal(forward(params, x).shape, np.float32))

    def loss(p, x, g):  # the output rides along as aux: a linear loss's gradient would not need the forward
        y = nnx.merge(graphdef, p)(x)
        return jnp.vdot(y, g), y

    grads = jax.jit(jax.grad(loss, argnums=0 if layer["reads_image"] else (0, 1), has_aux=True))
    fwd_ms = _median_ms(lambda: forward(params, x).block_until_ready(), reps)
    train_ms = _median_ms(lambda: jax.block_until_ready(grads(params, x, g)), reps)
    return fwd_ms, train_ms


def time_torch(layer: dict, batch: int, reps: int) -> tuple[float, float]:
    import torch

    cl = torch.channels_last
    m = torch.nn.Conv2d(
        layer["in_ch"],
        layer["out_ch"],
        layer["kernel"],
        layer["stride"],
        layer["padding"],
        bias=layer["bias"],
    ).to(memory_format=cl)
    x = torch.randn(batch, layer["in_ch"], layer["size"], layer["size"]).contiguous(memory_format=cl)
    x.requires_grad_(not layer["reads_image"])
    with torch.no_grad():
        g = torch.randn_like(m(x)).contiguous(memory_format=cl)

    def forward():
        with torch.no_grad():
            m(x)

    def train():
        m.zero_grad(set_to_none=True)
        x.grad = None
        m(x).backward(g)

    return _median_ms(forward, reps), _median_ms(train, reps)


def describe(layer: dict) -> str:
    k, s = layer["kernel"], layer["stride"]
    return f"{k}x{k}{f'/{s}' if s > 1 else ''} {layer['in_ch']}->{layer['out_ch']} @{layer['size']}"


def run(case: Case, batch: int, reps: int, log=print) -> list[dict]:
    rows = []
    for layer in conv_layers(case):
        jf, jt = time_jax(layer, batch, reps)
        tf, tt = time_torch(layer, batch, reps)
        rows.append(
            {**layer, "jax_forward_ms": jf, "torch_forward_ms": tf, "jax_train_ms": jt, "torch_train_ms": tt}
        )
        log(
            f"{describe(layer):24s} x{layer['count']:<2d} forward {jf:8.1f} vs {tf:8.1f} ms ({tf / jf:4.2f}x)"
            f"   forward+gradients {jt:8.1f} vs {tt:8.1f} ms ({tt / jt:4.2f}x)"
        )
    return rows


def totals(rows: list[dict]) -> dict:
    """Count-weighted sums of each timing column."""
    keys = ("jax_forward_ms", "torch_forward_ms", "jax_train_ms", "torch_train_ms")
    return {k: sum(r[k] * r["count"] for r in rows) for k in keys}


def _check(opts):
    """The one case to run; a BenchError for anything that cannot run here."""
    cases = parse_cases(opts.case, None, None)
    if len(cases) != 1:
        raise BenchError(f"--case {opts.case!r}: give exactly one model@size")
    if opts.batch_size < 1 or opts.reps < 1:
        raise BenchError("--batch_size and --reps must be at least 1")
    try:
        import torch  # noqa: F401
    except ImportError:
        raise BenchError("PyTorch is not installed: pip install -e '.[torch]'") from None
    import jax

    if jax.default_backend() != "cpu":  # the PyTorch side runs on the CPU: compare like with like
        raise BenchError(
            f"this compares CPU kernels, and JAX runs on {jax.default_backend()}: set JAX_PLATFORMS=cpu"
        )
    return cases[0]


def main(argv=None) -> list[dict]:
    from cifar_jax import cli

    cli.tune_xla_cpu()  # the settings train.py runs with, before JAX starts
    p = argparse.ArgumentParser(
        prog="python -m cifar_jax.bench.convs",
        description=__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    p.add_argument(
        "--case", default="resnet50@224", help="one model@size, as in cifar_jax.bench (default: %(default)s)"
    )
    p.add_argument("--batch_size", type=int, default=32, help="default: %(default)s")
    p.add_argument(
        "--reps",
        type=int,
        default=5,
        help="timed calls per measurement, after one untimed (default: %(default)s)",
    )
    opts = p.parse_args(argv)
    try:
        case = _check(opts)
    except BenchError as e:
        cli.fail(str(e))
    print(f"{case}, batch {opts.batch_size}, median of {opts.reps}; ours vs PyTorch on the CPU", flush=True)
    rows = run(case, opts.batch_size, opts.reps, log=lambda line: print(line, flush=True))
    t = totals(rows)
    print(
        f"all convolutions, weighted by count: forward {t['jax_forward_ms']:.0f} vs "
        f"{t['torch_forward_ms']:.0f} ms "
        f"({t['torch_forward_ms'] / t['jax_forward_ms']:.2f}x); forward+gradients {t['jax_train_ms']:.0f} vs "
        f"{t['torch_train_ms']:.0f} ms ({t['torch_train_ms'] / t['jax_train_ms']:.2f}x)"
    )
    return rows


if __name__ == "__main__":
    from cifar_jax import cli

    cli.run(main, "during the benchmark", absl_flags=False)
