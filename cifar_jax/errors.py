"""Errors from libraries (Orbax, TensorStore, torch, pickle) as the one line our messages quote,
and what to do about a write that the OS refused."""

import errno
import json
import os
import re
from pathlib import Path


class TrainingError(RuntimeError):
    """Training cannot go on (non-finite loss, a checkpoint that cannot be written, ...); the
    checkpoints already written are kept."""


def one_line(e: BaseException, limit: int = 160) -> str:
    """'TypeName: first line of the message' (cut at `limit`); just the type for an empty message."""
    lines = str(e).splitlines()
    return f"{type(e).__name__}: {lines[0][:limit]}" if lines else type(e).__name__


_WRITE_ADVICE = {
    errno.ENOSPC: "free some space",
    errno.EDQUOT: "free some space (disk quota)",
    errno.EACCES: "make it writable",
    errno.EPERM: "make it writable",
    errno.EROFS: "use a writable {flag}",
    errno.ENAMETOOLONG: "use a shorter {flag}",
    errno.EFBIG: "raise the file size limit (ulimit -f)",
}


def write_errno(e: BaseException) -> int | None:
    """The OS error number behind a failed write: an OSError anywhere in the chain, or the
    `[os_error_code='N']` of TensorStore's messages (how Orbax reports a full disk)."""
    seen = set()
    while e is not None and id(e) not in seen:
        seen.add(id(e))
        if isinstance(e, OSError) and e.errno:
            return e.errno
        found = re.search(r"os_error_code='?(\d+)", str(e))
        if found:
            return int(found.group(1))
        e = e.__cause__ or e.__context__
    return None


def write_advice(code: int | None, flag: str = "--workdir") -> str:
    """What to do about a write refused with OS error `code`, e.g. 'free some space'."""
    return _WRITE_ADVICE.get(code, "fix that").format(flag=flag)


def write_failure(what: str, e: OSError, flag: str = "--workdir") -> str:
    """One line for a write the OS refused: 'cannot write WHAT (No space left on device); free some space'."""
    code = write_errno(e)
    return f"cannot write {what} ({os.strerror(code) if code else one_line(e)}); {write_advice(code, flag)}"


def read_json_object(path: Path, redo: str, error: type[ValueError] = ValueError) -> dict:
    """The JSON object in `path` (UTF-8); `error` in one line naming the file and where it breaks,
    then `redo` (what to do about it), for anything else."""
    try:
        value = json.loads(Path(path).read_text(encoding="utf-8"))
    except UnicodeDecodeError as e:
        raise error(f"{path} is not UTF-8 text (byte {e.start}); {redo}") from None
    except json.JSONDecodeError as e:
        raise error(f"{path} is not valid JSON ({e.msg}, line {e.lineno} column {e.colno}); {redo}") from None
    if not isinstance(value, dict):
        raise error(f"{path} holds a JSON {type(value).__name__}, not an object; {redo}")
    return value
