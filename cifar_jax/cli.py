"""What the command-line entry points share: logging, the persistent compilation cache, errors."""

from __future__ import annotations

import logging
import os
import sys
from pathlib import Path

DEFAULT_CACHE = "~/.cache/cifar_jax/xla"


def setup_logging() -> None:
    """Our progress lines on stderr; absl-logged chatter (Orbax logs every file it writes) only at ERROR."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    logger = logging.getLogger("cifar_jax")
    if not logger.handlers:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


COMPILATIONS = {"cache_hits": 0, "cache_misses": 0}  # this process's XLA compilations, by persistent-cache outcome
_LISTENING = []  # non-empty once the counter listens to JAX's compilation-cache events


def _count_compilation(event: str, **_kwargs) -> None:
    name = event.rsplit("/", 1)[-1]
    if event.startswith("/jax/compilation_cache/") and name in COMPILATIONS:
        COMPILATIONS[name] += 1


def compilation_summary() -> str:
    """One line: how many XLA programs this process loaded from the persistent cache and compiled anew."""
    return f"XLA programs: {COMPILATIONS['cache_hits']} loaded from the compilation cache, {COMPILATIONS['cache_misses']} compiled"


def enable_compilation_cache(directory: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache so a second run of a config compiles nothing.

    `directory`: '' disables it; None takes $JAX_COMPILATION_CACHE_DIR, else ~/.cache/cifar_jax/xla.
    """
    import jax

    if directory == "":
        return None
    directory = directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE
    path = Path(os.path.expanduser(directory))
    path.mkdir(parents=True, exist_ok=True)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if not _LISTENING:
        jax.monitoring.register_event_listener(_count_compilation)
        _LISTENING.append(True)
    return str(path)


def start(argv, compilation_cache: str | None) -> None:
    """The common start of train.py and eval.py: no stray arguments, logging, the compile cache."""
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    setup_logging()
    enable_compilation_cache(compilation_cache)


def fail(message: str) -> None:
    """Exit with one line on stderr (status 2): what is wrong and how to fix it."""
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)
