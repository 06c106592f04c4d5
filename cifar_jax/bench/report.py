"""The benchmark's report: a Markdown table of JAX against PyTorch, and the software versions."""

from __future__ import annotations

import datetime
import os
import platform
import sys

from cifar_jax.bench.cases import MODELS, MODES


def table(rows: list[dict]) -> str:
    """Markdown table: per case and mode, JAX against the faster PyTorch variant."""
    lines = [
        "| model | size | batch | mode | JAX img/s | PyTorch img/s (variant) | JAX / PyTorch | JAX compile s "
        "| PyTorch compile s |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    cases = list(dict.fromkeys((r["model"], r["image_size"]) for r in rows))  # in the order measured
    keys = sorted(
        {(r["model"], r["image_size"], r["mode"]) for r in rows},
        key=lambda k: (cases.index(k[:2]), MODES.index(k[2])),
    )
    for key in keys:
        group = [r for r in rows if (r["model"], r["image_size"], r["mode"]) == key]
        jax_row = next((r for r in group if r["framework"] == "jax"), None)
        torch_rows = [r for r in group if r["framework"] == "torch"]
        best = max(torch_rows, key=lambda r: r["img_per_s"], default=None)
        stem = MODELS[key[0]][1]
        ref = jax_row or best
        cells = [
            f"{key[0]}{f' ({stem})' if stem else ''}",
            str(key[1]),
            str(ref["batch_size"]),
            key[2],
            f"{jax_row['img_per_s']:,.1f}" if jax_row else "-",
            f"{best['img_per_s']:,.1f} ({best['variant'].split(',')[0]})" if best else "-",
            f"{jax_row['img_per_s'] / best['img_per_s']:.2f}x" if jax_row and best else "-",
            _fmt_s(jax_row["compile_s"]) if jax_row else "-",
            ", ".join(
                f"{r['variant'].split(',')[0]} {_fmt_s(r['compile_s'])}"
                for r in torch_rows
                if r["compile_s"] is not None
            )
            or "-",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    for (model, size), (alone, in_step) in pipeline_shares(rows).items():
        parts = [] if alone is None else [f"{alone:.2%} alone (an upper bound)"]
        if in_step is not None:
            p = next(
                r for r in rows if r["mode"] == "pipeline" and (r["model"], r["image_size"]) == (model, size)
            )
            parts.append(
                f"{in_step:.2%} in the step (median {p['step_ms_with_pipeline']:.3f} ms a step with it, "
                f"{p['step_ms_prepared_batches']:.3f} ms fed prepared batches)"
            )
        lines.append(f"\nInput pipeline share of a JAX training step, {model} @{size}: {'; '.join(parts)}")
    return "\n".join(lines)


def pipeline_shares(rows) -> dict:
    """(model, size) -> (the on-device input pipeline's time alone / the training step's time, or
    None without a train row; the pipeline's measured cost within the step / the step, or None)."""
    out = {}
    for p in (r for r in rows if r["framework"] == "jax" and r["mode"] == "pipeline"):
        t = next(
            (
                r
                for r in rows
                if r["framework"] == "jax"
                and r["mode"] == "train"
                and (r["model"], r["image_size"]) == (p["model"], p["image_size"])
            ),
            None,
        )
        alone = t["img_per_s"] / p["img_per_s"] if t else None
        if alone is not None or p.get("in_step_share") is not None:
            out[p["model"], p["image_size"]] = (alone, p.get("in_step_share"))
    return out


def _fmt_s(x):
    return "-" if x is None else f"{x:.1f}"


def versions() -> dict:
    out = {
        "date": datetime.date.today().isoformat(),
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "xla_flags": os.environ.get("XLA_FLAGS", ""),
    }
    for name in ("jax", "jaxlib", "flax", "optax"):
        out[name] = __import__(name).__version__
    for name in ("torch", "torchvision"):  # their builds (+cpu, +cu130), where the bench ran them
        if name in sys.modules:
            out[name] = sys.modules[name].__version__
    return out
