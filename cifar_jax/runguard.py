"""Guards around a training run: one process per workdir, and a graceful stop on SIGTERM/SIGINT."""

from __future__ import annotations

import fcntl
import os
import signal
import threading
from pathlib import Path

from cifar_jax.errors import write_failure


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


_interrupted = False  # a SIGINT arrived since `defer_interrupts` or `catch_interrupts`


def _remember(signum, frame):
    global _interrupted
    _interrupted = True


def _remember_and_raise(signum, frame):
    _remember(signum, frame)
    signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as Python's own handler raises


def _sigint_is_ours_or_default() -> bool:
    """Whether SIGINT may be handled here: in the main thread, not ignored (a shell's background job)."""
    return threading.current_thread() is threading.main_thread() and signal.getsignal(signal.SIGINT) in (
        signal.default_int_handler,
        _remember,
        _remember_and_raise,
    )


def defer_interrupts() -> None:
    """For an entry point's first imports: a SIGINT there is only remembered (a KeyboardInterrupt
    raised inside an extension module's import has crashed the interpreter), and acted on by
    `catch_interrupts`."""
    if _sigint_is_ours_or_default():
        signal.signal(signal.SIGINT, _remember)


def catch_interrupts() -> None:
    """From here on SIGINT raises KeyboardInterrupt as usual, and is also remembered: a library that
    swallows the KeyboardInterrupt (an extension's import turns it into an ImportError, which an
    optional import ignores; a garbage-collector callback prints and drops it) cannot lose it.
    Raises KeyboardInterrupt at once for a SIGINT that `defer_interrupts` remembered."""
    if _sigint_is_ours_or_default():
        signal.signal(signal.SIGINT, _remember_and_raise)
    if _interrupted:
        raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a SIGINT arrived, even if its KeyboardInterrupt was swallowed."""
    return _interrupted


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
