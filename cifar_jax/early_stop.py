"""Early stopping on validation accuracy (PyTorch Lightning's EarlyStopping, mode 'max').

The run ends after `patience` epochs in a row whose `val_acc` does not rise above the best so far
by more than `min_delta` (patience 0: off). The epoch it ends at is checkpointed, and the best
checkpoint is kept as always. The record rides in every checkpoint's meta, so a resumed run goes
on counting where it stopped, and rerunning a run that ended early trains nothing more.
"""

from __future__ import annotations


class EarlyStop:
    def __init__(self, patience: int, min_delta: float):
        self.patience, self.min_delta = patience, min_delta
        self.best, self.best_epoch, self.bad = None, None, 0
        self.ended: str | None = None  # why the run ended, once it has

    def restore(self, record: dict | None) -> None:
        """Go on from a checkpoint's `record()` (None: one saved without early stopping)."""
        if self.patience and record:
            self.best, self.best_epoch, self.bad = record["best"], record["best_epoch"], record["bad"]
            self.ended = self._why() if self.bad >= self.patience else None  # the patience may have changed

    def record(self) -> dict | None:
        return {"best": self.best, "best_epoch": self.best_epoch, "bad": self.bad} if self.patience else None

    def may_end_at_next_validation(self) -> bool:
        """Whether the next epoch's validation can end the run (then it is not run ahead of)."""
        return bool(self.patience) and self.bad + 1 >= self.patience

    def update(self, epoch: int, val_acc: float | None) -> str | None:
        """Count 0-based `epoch`'s validation accuracy; why the run ends now, or None."""
        if not self.patience or val_acc is None:
            return None
        if self.best is None or val_acc > self.best + self.min_delta:
            self.best, self.best_epoch, self.bad = val_acc, epoch + 1, 0
        else:
            self.bad += 1
        self.ended = self._why() if self.bad >= self.patience else None
        return self.ended

    def _why(self) -> str:
        return (
            f"early stop: val_acc has not risen above {self.best:.4f} (epoch {self.best_epoch}) by more than "
            f"{self.min_delta:g} for {self.bad} epochs (early_stop.patience={self.patience})"
        )
