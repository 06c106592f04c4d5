"""Guards around a training run: one process per workdir, and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from pathlib import Path

from cifar_jax.errors import write_failure
from cifar_jax.interrupts import interrupted


class WorkdirBusy(RuntimeError):
    """Another process is training in this workdir."""


class WorkdirLock:
    """An exclusive `flock` on `<workdir>/.lock`, held while training. The kernel drops it when the
    process dies (even by kill -9), so a crashed run never leaves a stale lock behind."""

    def __init__(self, workdir):
        self.path = Path(workdir) / ".lock"
        self._fd = None

    def __enter__(self):
        try:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            fd = os.open(self.path, os.O_RDWR | os.O_CREAT, 0o644)
        except OSError as e:
            raise ValueError(write_failure(f"the workdir's lock {self.path}", e)) from None
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.read(fd, 64).decode(errors="replace").strip() or "?"
            os.close(fd)
            raise WorkdirBusy(
                f"workdir {self.path.parent} is in use by another train.py (pid {holder}); "
                f"wait for it to finish or pass another --workdir"
            ) from None
        try:
            os.ftruncate(fd, 0)
            os.write(fd, str(os.getpid()).encode())
        except OSError as e:
            os.close(fd)
            raise ValueError(write_failure(f"the workdir's lock {self.path}", e)) from None
        self._fd = fd
        return self

    def __exit__(self, *exc):
        if self._fd is not None:
            fcntl.flock(self._fd, fcntl.LOCK_UN)
            os.close(self._fd)
            self._fd = None


class StopSignals:
    """Turns SIGTERM/SIGINT into a flag that the training loop checks at step boundaries (only in
    the main thread; elsewhere signals keep their default handling)."""

    SIGNALS = (signal.SIGTERM, signal.SIGINT)

    def __init__(self):
        self.signum = None
        self._previous = {}

    def _handle(self, signum, _frame):
        self.signum = signum

    @property
    def requested(self) -> bool:
        return self.signum is not None

    def __enter__(self):
        if interrupted():  # during start-up, and swallowed on the way: stop before training
            raise KeyboardInterrupt
        if threading.current_thread() is threading.main_thread():
            for sig in self.SIGNALS:
                self._previous[sig] = signal.signal(sig, self._handle)
        return self

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous.clear()


class Interrupted(Exception):
    """Training stopped on SIGTERM/SIGINT after saving a checkpoint; rerunning resumes."""

    def __init__(self, signum: int, where: str, workdir):
        self.signum = signum
        name = signal.Signals(signum).name
        super().__init__(
            f"stopped by {name} at {where}; checkpoint saved in {workdir}; rerun the same command to resume"
        )
