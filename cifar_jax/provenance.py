"""Where and with what a run trained: `<workdir>/sessions.json`, one entry per `train.py` session
(a resumed run has several), so that a figure can be traced to the code, libraries and devices
that made it.

An entry is written when the session starts ("status": "running") and rewritten when it ends
("finished", "stopped by SIGTERM", "failed: <the error>"); a session killed outright stays
"running" with no "ended". The file is replaced whole each time (`staging.write_text`).
"""

from __future__ import annotations

import datetime
import json
import logging
import platform
import subprocess
import sys
import time
from importlib import metadata
from pathlib import Path

from cifar_jax import staging
from cifar_jax.errors import one_line

log = logging.getLogger("cifar_jax")

FILE = "sessions.json"
PACKAGES = ("jax", "jaxlib", "flax", "optax", "orbax-checkpoint", "numpy")


def _utc(seconds_ago: float = 0.0) -> str:
    moment = datetime.datetime.now(datetime.timezone.utc) - datetime.timedelta(seconds=seconds_ago)
    return moment.isoformat(timespec="seconds")


def commit() -> str | None:
    """The git commit of this checkout, '+dirty' when tracked files differ from it; None outside git."""
    root = Path(__file__).resolve().parent.parent
    try:
        head = subprocess.run(
            ["git", "-C", str(root), "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10
        )
        if head.returncode != 0:
            return None
        dirty = subprocess.run(
            ["git", "-C", str(root), "status", "--porcelain", "--untracked-files=no"],
            capture_output=True,
            text=True,
            timeout=10,
        )
    except (OSError, subprocess.SubprocessError):
        return None
    return head.stdout.strip() + ("+dirty" if dirty.stdout.strip() else "")


def versions(packages=PACKAGES) -> dict[str, str | None]:
    """{package: its installed version, None when it is not installed}, read without importing it
    (`bench.report.versions` reads torch's __version__ where the bench imported it: it names the build,
    +cpu or +cu130)."""
    out = {}
    for package in packages:
        try:
            out[package] = metadata.version(package)
        except metadata.PackageNotFoundError:
            out[package] = None
    return out


def cpu_model() -> str:
    """The CPU's model name (/proc/cpuinfo on Linux), else what `platform` says."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def describe() -> dict:
    """This process's code, libraries and devices."""
    import jax

    devices = jax.devices()
    return {
        "commit": commit(),
        "python": sys.version.split()[0],
        "versions": versions(),
        "backend": jax.default_backend(),
        "device_kind": devices[0].device_kind,
        "devices": len(devices),
        "processes": jax.process_count(),
        "cpu": cpu_model(),
    }


class Sessions:
    """The sessions of the run in `workdir`; `start` appends this one, `end` closes it."""

    def __init__(self, workdir: Path):
        self.path = Path(workdir) / FILE
        self.entries = self._read()
        self.t0 = None

    def _read(self) -> list[dict]:
        if not self.path.exists():
            return []
        try:
            entries = json.loads(self.path.read_text())
            if isinstance(entries, list) and all(isinstance(e, dict) for e in entries):
                return entries
            problem = "not a list of sessions"
        except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
            problem = one_line(e, 200)
        kept = self.path.with_name(f"{FILE}.unreadable-{int(time.time())}")
        self.path.rename(kept)
        log.warning("%s does not read (%s): kept as %s; a new one starts", self.path, problem, kept.name)
        return []

    def start(self, t0: float, first_epoch: int, first_step: int) -> None:
        """Record this session, begun at `time.perf_counter()` `t0` (its set-up included) and about
        to train from 0-based `first_epoch` (at `first_step`)."""
        self.t0 = t0
        entry = {"started": _utc(time.perf_counter() - t0), "ended": None, "status": "running"}
        entry.update(from_epoch=first_epoch + 1, from_step=first_step, **describe())
        self.entries.append(entry)
        self._write()

    def end(self, status: str, epochs_done: int) -> None:
        """Close this session: how it ended, and the number of epochs the run holds now. A failed
        write is only logged: it must not hide the error that may have ended the run (a full disk)."""
        entry = self.entries[-1]
        entry.update(ended=_utc(), status=status, wall_s=round(time.perf_counter() - self.t0, 1))
        entry["epochs_done"] = epochs_done
        try:
            self._write()
        except OSError as e:
            log.warning("could not record how this session ended in %s (%s)", self.path, one_line(e))

    def _write(self) -> None:
        staging.write_text(self.path, json.dumps(self.entries, indent=1) + "\n")
