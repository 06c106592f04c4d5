"""Outputs written whole or not at all: a file or a staging directory beside the target, renamed
into its place when complete (`write_file`: exports, datasets, config.json, metrics, figures;
`new` and `publish`: `convert`'s weights, `eval.py`'s outputs), and the checks of an output.

The partial file or directory is named `.<target>.partial-<pid>`; one whose process is gone
(killed mid-write) is removed by the next writer, one whose process is alive is left to it.
Files are written with the mode the umask gives a new file (0644 under the usual 022), whatever
the library that wrote them chose.
"""

from __future__ import annotations

import fcntl
import os
import shutil
import tempfile
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
            if stale.is_dir() and not stale.is_symlink():
                shutil.rmtree(stale, ignore_errors=True)
            else:
                stale.unlink(missing_ok=True)


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


def check_directory(path: Path, what: str, fix: str, create: bool = True) -> None:
    """A ValueError in one line unless `path` is a directory this process can write (made when
    missing if `create`; without `create`, a missing one passes). `what` names it ("--out",
    "profile.epoch's trace directory"), `fix` says what else to do. A write is tried, not the
    permissions read: root passes those even on a read-only file system."""
    if path.exists() and not path.is_dir():
        raise ValueError(f"{what} {path} is a file, not a directory; {fix}")
    if not path.exists() and not create:
        return
    try:
        path.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise ValueError(f"{what} {path} cannot be made ({e.strerror or e}); {fix}") from None
    try:
        tempfile.TemporaryFile(dir=path).close()
    except OSError as e:
        raise ValueError(f"{what} {path} is not writable ({e.strerror or e}); {fix}") from None


def check_out_file(out: Path, suffixes: tuple[str, ...], overwrite: bool) -> None:
    """A ValueError in one line unless `out` can be written: one of `suffixes`, in an existing
    directory, and new or (with `overwrite`) an existing file."""
    if out.suffix not in suffixes:
        raise ValueError(f"--out {out} must end in {', '.join(suffixes)}")
    if out.is_dir():
        raise ValueError(
            f"--out {out} is a directory; --out names the file to write, e.g. {out / ('NAME' + suffixes[0])}"
        )
    if out.exists() and not overwrite:
        raise ValueError(f"--out {out} exists; pass --overwrite to replace that file, or another --out")
    if not out.parent.is_dir():
        raise ValueError(f"--out {out}: {out.parent} is not a directory")


def _new_file_mode() -> int:
    """The mode the umask gives a new file; read once, at import, while the process has one
    thread: os.umask can only be read by setting it, which other threads would see."""
    umask = os.umask(0)
    os.umask(umask)
    return 0o666 & ~umask


_NEW_FILE_MODE = _new_file_mode()


def write_file(path, write) -> None:
    """`write(tmp)` writes the file to a temporary path beside `path`, which is then renamed into
    place: never a half-written `path`. Dead writers' partial files are removed first."""
    path = Path(path)
    remove_dead(path)
    tmp = path.with_name(f".{path.name}.partial-{os.getpid()}")
    try:
        write(tmp)
        os.chmod(tmp, _NEW_FILE_MODE)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def write_text(path, text: str) -> None:
    """`text` into `path` (UTF-8), through `write_file`."""
    write_file(path, lambda tmp: Path(tmp).write_text(text, encoding="utf-8"))
