"""Outputs written whole or not at all: a staging directory beside the target, renamed into its
place when complete (`convert`'s weights, `eval.py`'s outputs), and the checks of an output file
(`export`, `prepare`).

A staging directory is named `.<target>.partial-<pid>`; one whose process is gone (killed
mid-write) is removed by the next writer, one whose process is alive is left to it.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import sys
from pathlib import Path


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_dead(target: Path) -> None:
    """Remove the staging (and replaced) directories of writers of `target` whose process is gone."""
    for stale in target.parent.glob(f".{target.name}.*-*"):
        kind, _, pid = stale.name.rpartition("-")
        if (
            kind.endswith((".partial", ".old"))
            and pid.isdigit()
            and int(pid) != os.getpid()
            and not _alive(int(pid))
        ):
            shutil.rmtree(stale, ignore_errors=True)


def new(target: Path) -> Path:
    """A new, empty staging directory for `target` (of this process), after removing dead writers' ones."""
    target.parent.mkdir(parents=True, exist_ok=True)
    remove_dead(target)
    staging = target.parent / f".{target.name}.partial-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    staging.mkdir()
    return staging


def publish(staging: Path, target: Path) -> None:
    """Replace `target` by `staging`: two renames under a lock, so that concurrent writers of one
    target replace each other's results whole (the last one stays) and never lose their own; a
    kill between the renames leaves the old contents whole, beside `target`."""
    old = target.parent / f".{target.name}.old-{os.getpid()}"
    # flock on the parent directory: no lock file left beside `target`.
    lock = os.open(target.parent, os.O_RDONLY)
    try:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if target.exists():
            os.replace(target, old)
        os.replace(staging, target)
    finally:
        os.close(lock)
    shutil.rmtree(old, ignore_errors=True)


def check_out_file(out: Path, suffixes: tuple[str, ...], overwrite: bool) -> None:
    """A ValueError in one line unless `out` can be written: one of `suffixes`, in an existing
    directory, and new or (with `overwrite`) an existing file."""
    if out.suffix not in suffixes:
        raise ValueError(f"--out {out} must end in {', '.join(suffixes)}")
    if out.is_dir() or (out.exists() and not overwrite):
        raise ValueError(f"--out {out} exists; pass --overwrite to replace that file, or another --out")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: {out.parent} is not a directory")


def fail(message: str) -> int:
    """Say `message` as one line on stderr; the exit status of a command that refused its input."""
    print(f"error: {message}", file=sys.stderr)
    return 2


def write_text(path: Path, text: str) -> None:
    """`text` into `path` through a temporary name and a rename: never a half-written file."""
    tmp = path.with_name(path.name + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)
