"""Where training reports to: `metrics.jsonl` (one row per epoch), PNG curves, and wandb when asked."""

from __future__ import annotations

import json
import logging
import math
import time
from collections.abc import Callable
from pathlib import Path

from cifar_jax import staging
from cifar_jax.errors import TrainingError, one_line

log = logging.getLogger("cifar_jax")


class MetricsLog:
    """`<workdir>/metrics.jsonl`, one JSON object per epoch. On resume, rows of epochs after the
    restored checkpoint (logged by a run killed before its checkpoint landed) are dropped; a last
    line torn by a kill is dropped too, and the restored epoch's row, saved in its checkpoint, put
    back if it was lost."""

    def __init__(self, workdir, resume_epoch: int, resume_row: dict | None = None):
        self.path = Path(workdir) / "metrics.jsonl"
        self._torn = False
        rows = self.read(self.path) if self.path.exists() else []
        self.rows = [r for r in rows if r["epoch"] <= resume_epoch]
        if (
            resume_row is not None
            and resume_row["epoch"] == resume_epoch
            and (not self.rows or self.rows[-1]["epoch"] < resume_epoch)
        ):
            self.rows.append(resume_row)
        if self.rows != rows or self._torn:
            self._rewrite()

    def read(self, path) -> list[dict]:
        """The rows of `path`; a torn last line is reported and left out, any other bad line is an error."""
        lines = [line for line in Path(path).read_bytes().splitlines() if line.strip()]
        rows, self._torn = [], False
        for i, line in enumerate(lines):
            try:
                row = json.loads(line.decode("utf-8"))
            except (UnicodeDecodeError, json.JSONDecodeError) as e:
                if i + 1 < len(lines):
                    what = "not UTF-8 text" if isinstance(e, UnicodeDecodeError) else "not JSON"
                    raise ValueError(
                        f"{path} line {i + 1} is {what} ({line[:40].decode('utf-8', 'replace')!r}); move the "
                        "file aside to start its log anew"
                    ) from None
                self._torn = True
                log.warning(
                    "%s: its last line was cut short (a run was killed while writing it); dropped it", path
                )
                continue
            if not (isinstance(row, dict) and isinstance(row.get("epoch"), int)):
                raise ValueError(
                    f"{path} line {i + 1} is no metrics row (no epoch number: "
                    f"{line[:40].decode('utf-8', 'replace')!r}); move the file aside "
                    f"to start its log anew"
                )
            rows.append(row)
        return rows

    def _rewrite(self):
        staging.write_text(self.path, "".join(json.dumps(r) + "\n" for r in self.rows))

    def append(self, row: dict):
        self.rows.append(row)
        with open(self.path, "a") as f:
            f.write(json.dumps(row) + "\n")


def plot_curves(rows: list[dict], path) -> None:
    """Loss, accuracy and learning rate per epoch, like the study's figures (written atomically)."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    epochs = [r["epoch"] for r in rows]
    fig = Figure(figsize=(15, 4))
    FigureCanvasAgg(fig)
    axes = fig.subplots(1, 3)
    for ax, key, title in ((axes[0], "loss", "loss"), (axes[1], "acc", "accuracy")):
        for split in ("train", "val", "ema_val"):  # ema_val: the weight average, when kept
            values = [r.get(f"{split}_{key}") for r in rows]
            if any(v is not None for v in values):
                ax.plot(epochs, values, marker="o", label=split)
        ax.set_title(title, y=1.0), ax.set_xlabel("epoch"), ax.legend(), ax.grid(alpha=0.3)
    lrs = [r["lr"] for r in rows]
    axes[2].plot(epochs, lrs, marker="o")
    axes[2].set_title("learning rate", y=1.0)
    axes[2].set_xlabel("epoch")
    if all(lr > 0 and math.isfinite(lr) for lr in lrs):  # a schedule that reaches 0 stays linear
        axes[2].set_yscale("log")
    axes[2].grid(alpha=0.3)
    # Fixed margins: tight_layout took as long as the drawing itself (BENCHMARKS.md).
    fig.subplots_adjust(left=0.05, right=0.99, bottom=0.13, top=0.92, wspace=0.2)
    staging.write_file(Path(path), lambda tmp: fig.savefig(tmp, dpi=80, format="png"))


class CurvesPlotter:
    """Redraws a figure of the rows as epochs end: the first time `min_interval_s` seconds after it
    started, then at most once every `min_interval_s` seconds, and once more on `close()` if epochs
    ended since the last drawing. `draw(rows, path)` draws (`plot_curves` by default).

    Drawing stops training meanwhile, a large share of a short GPU epoch; a background thread
    competed with XLA for the cores instead (BENCHMARKS.md, "Things measured while building").
    Epochs longer than the interval still get a drawing each; a run shorter than it, one at the end.
    A failure to draw is logged once and never stops training.
    """

    def __init__(self, path, min_interval_s: float = 10.0, draw: Callable[[list, Path], None] | None = None):
        self.path = Path(path)
        self.min_interval_s = min_interval_s
        self.draw = draw
        self._last_draw = time.perf_counter()  # of the last drawing, or of the start
        self._undrawn = None  # rows not drawn yet
        self._warned = False

    def update(self, rows: list) -> None:
        self._undrawn = list(rows)
        if time.perf_counter() - self._last_draw >= self.min_interval_s:
            self._draw()

    def close(self) -> None:
        if self._undrawn is not None:
            self._draw()

    def _draw(self) -> None:
        rows, self._undrawn = self._undrawn, None
        try:
            (self.draw or plot_curves)(rows, self.path)
        except Exception as e:  # noqa: BLE001  (curves are a convenience; metrics.jsonl holds the numbers)
            if not self._warned:
                log.warning("could not draw %s: %s", self.path, e)
                self._warned = True
        self._last_draw = time.perf_counter()


class Wandb:
    """A wandb run when `config.wandb.mode` is 'online' or 'offline' (lazy import), else nothing.
    A population's member is one run of its own, in the population's `group`, beside the others in
    one process."""

    def __init__(self, config, workdir, resume: bool, group: str | None = None):
        self.run = None
        if config.wandb.mode == "disabled":
            return
        try:
            import wandb
        except ImportError:
            raise ImportError(
                "wandb.mode is not 'disabled' but wandb is not installed: pip install 'cifar_jax[wandb]' or "
                "set --config.wandb.mode=disabled"
            ) from None
        try:
            self.run = wandb.init(
                project=config.wandb.project,
                entity=config.wandb.entity or None,
                name=f"{group}/{Path(workdir).name}" if group else config.wandb.name or Path(workdir).name,
                group=group,
                reinit="create_new" if group else "default",
                mode=config.wandb.mode,
                dir=str(workdir),
                config=config.to_dict(),
                id=_wandb_id(workdir),
                resume="allow" if resume else None,
            )
        except Exception as e:  # noqa: BLE001  (wandb raises its own errors, OSError, timeouts)
            raise TrainingError(
                f"wandb could not start its run in {Path(workdir) / 'wandb'} ({one_line(e, 200)}); fix that, "
                "or --config.wandb.mode=disabled"
            ) from None

    def log(self, row: dict):
        if self.run is not None:
            self.run.log({k: v for k, v in row.items() if v is not None}, step=row["epoch"])

    def finish(self):
        if self.run is not None:
            self.run.finish()


def _wandb_id(workdir) -> str:
    """A stable run id per workdir, so a resumed run continues the same wandb run."""
    path = Path(workdir) / "wandb_id.txt"
    if not path.exists():
        import uuid

        path.write_text(uuid.uuid4().hex[:12])
    return path.read_text().strip()
