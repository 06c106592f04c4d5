"""A population: runs of one config that differ in seed and in numbers, trained side by side in one
program (`jax.vmap` over a leading member axis of the train state).

`population.seeds` ('0,1,2') and `population.sweep` ('optimizer.lr=0.05,0.1;label_smoothing=0,0.1')
make the members: every combination of the values (a grid, keys in the order given), each with
every seed, member 0 first: `members`. Member k is an ordinary run of its own config, in
`<workdir>/member_<k>/`. Its seed gives its initialisation, data order and augmentation, exactly
as the seed of a run alone does.

Only numbers the step reads can vary inside one program (`VARIES`): they reach the step as traced
values (`numbers`). Whatever changes the program's shapes or structure (model, batch size, epochs,
optimizer) is the same for all members; `problems` says so in one line.
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import statistics
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from cifar_jax import staging

# Keys a member may set in `population.sweep`: numbers the training step reads.
VARIES = (
    "optimizer.lr",
    "optimizer.weight_decay",
    "optimizer.momentum",
    "label_smoothing",
    "ema_decay",
    "data.augment.mixup_alpha",
    "data.augment.cutmix_alpha",
)
# Of those, the ones whose 0 removes part of the train state (momentum's trace, the weight
# average): 0 in every member or in none, so that every member's state has its own run's layout.
ZERO_IN_ALL_OR_NONE = ("optimizer.momentum", "ema_decay")


def is_population(config) -> bool:
    return bool(config.population.seeds or config.population.sweep)


@dataclasses.dataclass(frozen=True)
class Member:
    index: int
    seed: int
    values: dict  # {key: value} of `population.sweep` for this member
    config: ml_collections.ConfigDict  # the member's own config: a run alone (no population keys)

    @property
    def name(self) -> str:
        return f"member_{self.index}"

    def label(self) -> str:
        """'seed 1, optimizer.lr=0.1' for logs and tables."""
        return ", ".join([f"seed {self.seed}"] + [f"{k}={v:g}" for k, v in self.values.items()])


def parse_seeds(text: str) -> list[int]:
    """'0,1,2' -> [0, 1, 2]; a ValueError that says what is wrong."""
    try:
        seeds = [int(s) for s in text.split(",")]
    except ValueError:
        raise ValueError("must be seeds separated by commas, e.g. 0,1,2") from None
    if any(s < 0 or s >= 2**31 for s in seeds) or len(set(seeds)) != len(seeds):
        raise ValueError("must be distinct integers in [0, 2**31), e.g. 0,1,2")
    return seeds


def parse_sweep(text: str) -> dict[str, list[float]]:
    """'optimizer.lr=0.05,0.1;label_smoothing=0,0.1' -> {key: [values]}; a ValueError otherwise."""
    grid = {}
    for part in text.split(";"):
        key, sep, listed = part.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ValueError("must be KEY=V1,V2[;KEY=V1,V2...], e.g. optimizer.lr=0.05,0.1")
        if key not in VARIES:
            raise ValueError(
                f"names {key}, which cannot vary inside one program (only numbers the step reads can); "
                f"those that can: {', '.join(VARIES)}; train other settings as separate runs"
            )
        if key in grid:
            raise ValueError(f"names {key} twice")
        try:
            values = [float(v) for v in listed.split(",")]
        except ValueError:
            raise ValueError(f"{key}: must be numbers separated by commas, e.g. {key}=0.05,0.1") from None
        if not all(math.isfinite(v) for v in values) or len(set(values)) != len(values):
            raise ValueError(f"{key}: must be distinct finite numbers")
        grid[key] = values
    return grid


def members(config) -> list[Member]:
    """The members of `config`'s population (ValueError for population keys that do not parse)."""
    from cifar_jax import config as config_lib

    seeds = parse_seeds(config.population.seeds) if config.population.seeds else [config.seed]
    grid = parse_sweep(config.population.sweep) if config.population.sweep else {}
    out = []
    for combo in itertools.product(*grid.values()):
        for seed in seeds:
            member = config.copy_and_resolve_references()
            member.population.seeds, member.population.sweep = "", ""
            member.seed = seed
            values = dict(zip(grid, combo))
            for key, value in values.items():
                config_lib.set_key(member, key, value)
            out.append(Member(len(out), seed, values, member))
    return out


def problems(c):
    """(key, value, requirement) for each population setting that `c` breaks (config._relations)."""
    if not is_population(c):
        return
    for key in ("seeds", "sweep"):
        text = c.population[key]
        try:
            (parse_seeds if key == "seeds" else parse_sweep)(text) if text else None
        except ValueError as e:
            yield f"population.{key}", text, str(e)
            return
    from cifar_jax import config as config_lib

    listed = members(c)
    for key in ZERO_IN_ALL_OR_NONE:
        zero = {config_lib.flat(m.config)[key] == 0 for m in listed}
        if len(zero) > 1:
            yield (
                "population.sweep",
                c.population.sweep,
                f"{key} must be 0 in every member or in none (0 takes a part out of the train state)",
            )
    for m in listed:  # each member's own config must be a valid run
        for key, value, requirement in config_lib.problems(m.config):
            yield key, value, f"{requirement} (in member {m.index}: {m.label()})"
            return


def numbers(config, phase_lr: float) -> dict:
    """The numbers of a member that the step reads as traced values (`VARIES` and its seed)."""
    return {
        "seed": config.seed,
        "lr": phase_lr,
        "weight_decay": config.optimizer.weight_decay,
        "momentum": config.optimizer.momentum,
        "label_smoothing": config.label_smoothing,
        "ema_decay": config.ema_decay,
        "mixup_alpha": config.data.augment.mixup_alpha,
        "cutmix_alpha": config.data.augment.cutmix_alpha,
    }


def stacked(per_member: list[dict], mesh) -> dict:
    """{name: array over the members}, replicated on `mesh` (seeds int32, the rest JAX's float)."""
    from cifar_jax import sharding

    out = {}
    for name in per_member[0]:
        values = [m[name] for m in per_member]
        dtype = np.int32 if name == "seed" else jnp.asarray(0.0).dtype
        out[name] = sharding.replicate(np.asarray(values, dtype), mesh)
    return out


def stack(trees: list, mesh):
    """The members' trees as one tree with a leading member axis, replicated on `mesh`."""
    from cifar_jax import sharding

    out = jax.jit(
        lambda *t: jax.tree.map(lambda *a: jnp.stack(a), *t), out_shardings=sharding.replicated(mesh)
    )
    return out(*trees)


@jax.jit
def unstack(tree) -> list:
    """Each member's tree (new arrays: the stacked tree may be donated afterwards)."""
    n = jax.tree.leaves(tree)[0].shape[0]
    return [jax.tree.map(lambda a: a[k], tree) for k in range(n)]


def take(host_tree, k: int):
    """Member k's part of a tree of host arrays."""
    return jax.tree.map(lambda a: a[k], host_tree)


def member_workdir(workdir, member: int | None) -> Path:
    """The run directory of `member` of the population in `workdir` (None: `workdir`, which must
    then not be a population's); a ValueError that says what to pass instead."""
    workdir = Path(workdir)
    count = len(list(workdir.glob("member_*")))
    if member is None:
        if (workdir / "population.json").exists():
            raise ValueError(
                f"{workdir} holds a population of {count} members (population.md); pass --member K "
                f"(0..{count - 1}) to evaluate one"
            )
        return workdir
    if not (workdir / f"member_{member}").is_dir():
        members = f"its members are 0..{count - 1}" if count else "it holds no population"
        raise ValueError(f"--member {member}: {workdir} has no member_{member}/ ({members})")
    return workdir / f"member_{member}"


def write_table(workdir: Path, listed: list[Member], rows_of: list[list[dict]]) -> None:
    """`population.json` and `population.md` in `workdir`: each member's last and best validation
    accuracy, and for each combination of values the mean and sample sd over seeds."""
    table = []
    for m, rows in zip(listed, rows_of):
        scored = [r for r in rows if r.get("val_acc") is not None and math.isfinite(r["val_acc"])]
        best = max(scored, key=lambda r: r["val_acc"], default=None)
        table.append(
            {
                "member": m.index,
                "seed": m.seed,
                "values": m.values,
                "epochs": rows[-1]["epoch"] if rows else 0,
                "last_train_loss": rows[-1]["train_loss"] if rows else None,
                "last_val_acc": rows[-1].get("val_acc") if rows else None,
                "best_val_acc": best["val_acc"] if best else None,
                "best_epoch": best["epoch"] if best else None,
                "ended": next((r["ended"] for r in rows if r.get("ended")), None),
                "workdir": m.name,
            }
        )
    groups = {}
    for entry in table:
        groups.setdefault(json.dumps(entry["values"], sort_keys=True), []).append(entry)
    summary = []
    for entries in groups.values():
        last = [e["last_val_acc"] for e in entries if e["last_val_acc"] is not None]
        summary.append(
            {
                "values": entries[0]["values"],
                "seeds": [e["seed"] for e in entries],
                "last_val_acc_mean": statistics.fmean(last) if last else None,
                "last_val_acc_sd": statistics.stdev(last) if len(last) > 1 else None,
            }
        )
    scored = [s for s in summary if s["last_val_acc_mean"] is not None]
    best = max(scored, key=lambda s: s["last_val_acc_mean"], default=None)
    record = {"members": table, "by_values": summary, "best_values": best["values"] if best else None}
    staging.write_text(workdir / "population.json", json.dumps(record, indent=2) + "\n")
    staging.write_text(workdir / "population.md", _markdown(record))


def plot_members(listed: list[Member], rows_of: list[list[dict]], path: Path) -> None:
    """`population.png`: every member's training loss and validation accuracy per epoch, in one figure."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    fig = Figure(figsize=(12, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 2)
    for m, rows in zip(listed, rows_of):
        epochs = [r["epoch"] for r in rows]
        axes[0].plot(epochs, [r["train_loss"] for r in rows], marker="o", label=f"{m.index}: {m.label()}")
        axes[1].plot(epochs, [r.get("val_acc") for r in rows], marker="o")
    for ax, title in zip(axes, ("training loss", "validation accuracy")):
        ax.set_title(title), ax.set_xlabel("epoch"), ax.grid(alpha=0.3)
    axes[0].legend(fontsize=7)
    fig.subplots_adjust(left=0.06, right=0.99, bottom=0.13, top=0.92, wspace=0.15)
    staging.write_file(path, lambda tmp: fig.savefig(tmp, dpi=80, format="png"))


def _markdown(record: dict) -> str:
    def fmt(x):
        return "-" if x is None else f"{x:.4f}"

    lines = [
        "# Population",
        "",
        "Each member (its run: `member_<k>/`), and each combination of values over its seeds (validation",
        "accuracy: mean and sample sd; none without a validation split). Written by train.py after every",
        "epoch; population.png has every member's curves (redrawn at most every 10 s, and at the end).",
        "",
        "| member | seed | values | epochs | last train loss | last val_acc | best val_acc (epoch) | ended |",
        "| --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for e in record["members"]:
        values = ", ".join(f"{k}={v:g}" for k, v in e["values"].items()) or "-"
        best = f"{fmt(e['best_val_acc'])} ({e['best_epoch']})" if e["best_epoch"] else "-"
        lines.append(
            f"| {e['member']} | {e['seed']} | {values} | {e['epochs']} | {fmt(e['last_train_loss'])} "
            f"| {fmt(e['last_val_acc'])} | {best} "
            f"| {e['ended'] or '-'} |"
        )
    lines += ["", "| values | seeds | last val_acc: mean ± sd |", "| --- | --- | --- |"]
    for s in record["by_values"]:
        values = ", ".join(f"{k}={v:g}" for k, v in s["values"].items()) or "-"
        sd = f" ± {s['last_val_acc_sd']:.4f}" if s["last_val_acc_sd"] is not None else ""
        seeds = ", ".join(map(str, s["seeds"]))
        lines.append(f"| {values} | {seeds} | {fmt(s['last_val_acc_mean'])}{sd} |")
    if record["best_values"]:
        lines += ["", "Best values: " + ", ".join(f"{k}={v:g}" for k, v in record["best_values"].items())]
    return "\n".join(lines) + "\n"
