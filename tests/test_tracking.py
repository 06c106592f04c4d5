"""What training reports besides the checkpoints: the curves, drawn without slowing fast epochs."""

import logging
import types

from cifar_jax import tracking


def _rows(n):
    return [
        {"epoch": e, "train_loss": 1 / e, "val_loss": 1 / e, "train_acc": 0.5, "val_acc": 0.5, "lr": 1e-3}
        for e in range(1, n + 1)
    ]


def test_fast_epochs_are_drawn_at_most_once_per_interval_and_all_at_close(tmp_path, monkeypatch):
    drawn = []
    monkeypatch.setattr(tracking, "plot_curves", lambda rows, path: drawn.append(len(rows)))
    now = [1000.0]
    monkeypatch.setattr(tracking, "time", types.SimpleNamespace(perf_counter=lambda: now[0]))
    plotter = tracking.CurvesPlotter(tmp_path / "curves.png", min_interval_s=60)
    for n in range(1, 6):  # five epochs end within the first interval
        now[0] += 1
        plotter.update(_rows(n))
    assert drawn == []  # a run shorter than the interval is drawn once, at its end
    now[0] += 60
    plotter.update(_rows(6))
    assert drawn == [6]  # the interval has passed since the start: drawn at once
    for n in (7, 8):
        now[0] += 1
        plotter.update(_rows(n))
    assert drawn == [6]  # then nothing until the interval has passed again
    plotter.close()
    assert drawn == [6, 8]  # closing draws every epoch
    plotter.close()
    assert drawn == [6, 8]  # nothing new: nothing drawn

    drawn.clear()
    # Epochs longer than the interval.
    plotter = tracking.CurvesPlotter(tmp_path / "curves.png", min_interval_s=0)
    for n in range(1, 4):
        plotter.update(_rows(n))
    plotter.close()
    assert drawn == [1, 2, 3]


class _Records(logging.Handler):
    """The records of one logger, whatever pytest attaches to it or whether it propagates."""

    def __init__(self):
        super().__init__(logging.WARNING)
        self.records = []

    def emit(self, record):
        self.records.append(record)


def test_curves_png_is_written_and_a_failing_drawing_is_logged_once(tmp_path, monkeypatch, caplog):
    plotter = tracking.CurvesPlotter(tmp_path / "curves.png")
    plotter.update(_rows(3))
    plotter.close()
    assert (tmp_path / "curves.png").stat().st_size > 1000

    def broken(rows, path):
        raise OSError("disk full")

    monkeypatch.setattr(tracking, "plot_curves", broken)
    records = _Records()
    logger = logging.getLogger("cifar_jax")
    monkeypatch.setattr(logger, "handlers", [records])  # only ours: no stale stream of another test
    monkeypatch.setattr(logger, "disabled", False)
    # The level through caplog: Logger.setLevel also clears the logger's cached isEnabledFor answers
    # and lifts a global logging.disable (both undone after), which setting `level` alone would keep.
    with caplog.at_level(logging.INFO, logger="cifar_jax"):
        plotter = tracking.CurvesPlotter(tmp_path / "curves.png", min_interval_s=0)
        for n in range(1, 4):
            plotter.update(_rows(n))
        plotter.close()
    warnings = [r for r in records.records if "could not draw" in r.getMessage()]
    assert len(warnings) == 1 and "disk full" in warnings[0].getMessage()
