"""The study's cells: each part's config, the study's own figure for it and where the study gives
it, and the recipes that aim past it. The figures are the study's words, never ours."""

from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class Cell:
    part: str  # '1', '2', '3'; a recipe past part N is 'N+'
    config: str  # the stem of configs/<config>.py
    what: str  # one line for the tables
    study: str  # the study's figure as it gives it, or '-'
    where: str  # where the study gives it, or why there is none

    @property
    def config_file(self) -> str:
        return f"configs/{self.config}.py"

    @property
    def recipe(self) -> bool:
        return self.part.endswith("+")


CELLS = (
    Cell(
        "1",
        "simple_cnn",
        "SimpleCNN, the course starter's settings (Adam 1e-3 + L2 5e-4, StepLR(2, 0.1), crop+flip+jitter, "
        "80/20 split)",
        "-",
        "the study reports no figure for these settings",
    ),
    Cell(
        "1",
        "simple_cnn_writeup",
        "SimpleCNN, the write-up's lr 0.1",
        "val 0.98%",
        "Table 1: train 0.9375%, val 0.98%, losses 4.6066, 4.60743",
    ),
    Cell(
        "1+",
        "simple_cnn_tuned",
        "SimpleCNN, the tuned recipe (SGD+Nesterov, cosine, label smoothing, flips), same 5 epochs",
        "-",
        "a recipe past part 1",
    ),
    Cell(
        "2",
        "resnet34",
        "ResNet-34 from scratch, ImageNet stem, 100 epochs",
        "val 52.8% (text), 56.77% (table)",
        "part 2",
    ),
    Cell(
        "2+",
        "resnet18_recipe",
        "ResNet-18, CIFAR stem, CutMix, weight average, 200 epochs",
        "-",
        "a recipe past part 2",
    ),
    Cell(
        "3",
        "resnet50_ft",
        "ResNet-50 from ImageNet V1 weights, 10 head-only + 100 epochs",
        "val 67.5%",
        "part 3",
    ),
    Cell(
        "3+",
        "resnet50_ft_recipe",
        "ResNet-50 from ImageNet V2 weights at 224x224, 15 epochs",
        "-",
        "a recipe past part 3",
    ),
)

PARTS = ("1", "2", "3", "recipes")


def selected(parts: str) -> list[Cell]:
    """The cells of '--parts 1,2,3' in the order given: a part, 'recipes' (the recipes past the parts
    named, or past all of them when it stands alone), or one cell by its config (e.g. resnet50_ft);
    a ValueError that lists the choices."""
    names = [p.strip() for p in parts.split(",") if p.strip()]
    configs = [c.config for c in CELLS]
    unknown = [p for p in names if p not in PARTS and p not in configs]
    if unknown or not names:
        raise ValueError(
            f"--parts {parts!r}: choose from {', '.join(PARTS)} or a cell's config ({', '.join(configs)}), "
            "separated by commas (e.g. 1,2,3)"
        )
    numbered = [p for p in names if p in PARTS and p != "recipes"]

    def rank(cell: Cell) -> int | None:
        if cell.config in names:
            return names.index(cell.config)
        if cell.part in numbered:
            return names.index(cell.part)
        if cell.recipe and "recipes" in names and (cell.part[:-1] in numbered or not numbered):
            return names.index("recipes")
        return None

    chosen = [c for c in CELLS if rank(c) is not None]
    return sorted(chosen, key=lambda c: (rank(c), CELLS.index(c)))
