"""What the command-line entry points share: logging, the persistent compilation cache, errors."""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import traceback
from pathlib import Path

from cifar_jax import staging

DEFAULT_CACHE = "~/.cache/cifar_jax/xla"


# XLA:CPU's settings train.py, eval.py and the benchmark run with, each measured on this project's
# programs (BENCHMARKS.md): convolutions not handed to YNNPACK (its other convolution path was faster
# in every case measured; matmuls stay with YNNPACK), and fusions compiled by XLA's LLVM IR emitters
# rather than its newer MLIR fusion emitters (shorter compilations: a tiny train.py run's 47 programs
# in 4.2 s against 6.2; run time the same within the machine's spread: "XLA:CPU's fusion emitters").
# Only for jaxlib 0.10, where they were measured: XLA aborts on flags it does not know.
CPU_FLAGS = {
    "xla_cpu_experimental_ynn_fusion_type": "LIBRARY_FUSION_TYPE_INDIVIDUAL_DOT",
    "xla_cpu_use_fusion_emitters": "false",
}


def tune_xla_cpu() -> bool:
    """Add CPU_FLAGS to $XLA_FLAGS (call before JAX starts a backend; GPUs ignore them), each unless
    the user set that option, and only for jaxlib 0.10. Returns whether any was added."""
    from importlib import metadata

    try:
        jaxlib_version = metadata.version("jaxlib")
    except metadata.PackageNotFoundError:
        return False
    flags = os.environ.get("XLA_FLAGS", "")
    added = [f"--{name}={value}" for name, value in CPU_FLAGS.items() if name not in flags]
    if not jaxlib_version.startswith("0.10.") or not added:
        return False
    os.environ["XLA_FLAGS"] = " ".join([flags, *added]).strip()
    return True


def _not_from_orbax(record: logging.LogRecord) -> bool:
    """Orbax logs the traceback of a failed write or read itself (330 lines for a full disk) and then
    raises it to us, and our entry points report every such error in one line. asyncio logs the
    same error once more for each of Orbax's write tasks ("Task exception was never retrieved")."""
    if f"{os.sep}orbax{os.sep}" in record.pathname:
        return False
    tb = record.exc_info[2] if record.exc_info else None
    return not (tb and any(f"{os.sep}orbax{os.sep}" in frame.filename for frame in traceback.extract_tb(tb)))


def _unraisable(unraisable) -> None:
    """Exceptions Python cannot raise (printed as "Exception ignored in ..."), less two kinds of
    noise: a KeyboardInterrupt that a garbage-collector callback dropped (`interrupts` remembers it,
    and it is reported in one line), and, after a failed write, each TensorStore callback into the
    event loop that Orbax already closed ("Event loop is closed") beside the one error we report."""
    if unraisable.exc_type is KeyboardInterrupt:
        return
    if unraisable.exc_type is RuntimeError and str(unraisable.exc_value) == "Event loop is closed":
        return
    sys.__unraisablehook__(unraisable)


class _StderrHandler(logging.StreamHandler):
    """Writes to the sys.stderr of the moment, as logging's last-resort handler does: a redirect
    (or a test's capture) made after the set-up is followed, a closed one never written to."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _):
        pass


def setup_logging() -> None:
    """Our progress lines on stderr; absl-logged chatter (Orbax logs every file it writes) only at ERROR."""
    from absl import logging as absl_logging

    absl_logging.set_verbosity(absl_logging.ERROR)
    for name in ("absl", "asyncio"):
        if _not_from_orbax not in logging.getLogger(name).filters:
            logging.getLogger(name).addFilter(_not_from_orbax)
    logger = logging.getLogger("cifar_jax")
    if not logger.handlers:
        handler = _StderrHandler()
        handler.setFormatter(logging.Formatter("%(asctime)s %(message)s", "%H:%M:%S"))
        logger.addHandler(handler)
    logger.setLevel(logging.INFO)
    logger.propagate = False


COMPILATIONS = {
    "cache_hits": 0,
    "cache_misses": 0,
}  # this process's XLA compilations, by persistent-cache outcome
_LISTENING = []  # non-empty once the counter listens to JAX's compilation-cache events


def _count_compilation(event: str, **_kwargs) -> None:
    name = event.rsplit("/", 1)[-1]
    if event.startswith("/jax/compilation_cache/") and name in COMPILATIONS:
        COMPILATIONS[name] += 1


def compilation_summary() -> str:
    """One line: how many XLA programs this process loaded from the persistent cache and compiled anew."""
    if not _LISTENING:
        return "XLA programs: the persistent compilation cache is off"
    hits, misses = COMPILATIONS["cache_hits"], COMPILATIONS["cache_misses"]
    return f"XLA programs: {hits} loaded from the compilation cache, {misses} compiled"


def enable_compilation_cache(directory: str | None) -> str | None:
    """Turn on JAX's persistent compilation cache so a second run of a config compiles nothing.

    `directory`: '' turns it off ($JAX_COMPILATION_CACHE_DIR too; call before anything compiles, as
    `without_compilation_cache` says); None takes $JAX_COMPILATION_CACHE_DIR, else
    ~/.cache/cifar_jax/xla. A directory that cannot be made or written is a ValueError of one line.
    """
    import jax

    if directory == "":
        jax.config.update("jax_enable_compilation_cache", False)
        return None
    directory = directory or os.environ.get("JAX_COMPILATION_CACHE_DIR") or DEFAULT_CACHE
    path = Path(os.path.expanduser(directory))
    fix = "pass another --compilation_cache, or --compilation_cache= to run without the cache"
    staging.check_directory(path, "--compilation_cache", fix)
    jax.config.update("jax_compilation_cache_dir", str(path))
    jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
    jax.config.update("jax_persistent_cache_min_entry_size_bytes", 0)
    if not _LISTENING:
        jax.monitoring.register_event_listener(_count_compilation)
        _LISTENING.append(True)
    return str(path)


@contextlib.contextmanager
def without_compilation_cache():
    """JAX's persistent compilation cache off within the block ($JAX_COMPILATION_CACHE_DIR too): what
    compiles there is compiled (timed, dumped), never read back. JAX decides at a process's first
    compilation whether it uses the cache and keeps that decision: enter before anything compiles."""
    import jax

    was_on = jax.config.jax_enable_compilation_cache
    jax.config.update("jax_enable_compilation_cache", False)
    try:
        yield
    finally:
        jax.config.update("jax_enable_compilation_cache", was_on)


def checkpoint_step(value: str):
    """An argparse type: which checkpoint of a run a command reads (`--step best|latest|N`)."""
    import argparse

    if value in ("best", "latest"):
        return value
    if value.isdigit():
        return int(value)
    raise argparse.ArgumentTypeError(f"{value!r} is not best, latest or an epoch number")


STEP_HELP = "best (by validation accuracy, the default), latest, or an epoch number"


def start(compilation_cache: str | None, argv=("",)) -> None:
    """The common start of commands that compile: no stray arguments (absl leaves them in `argv`),
    XLA:CPU's settings, logging, the compile cache."""
    from absl import app

    if len(argv) > 1:
        raise app.UsageError(f"unexpected arguments: {' '.join(argv[1:])}")
    tune_xla_cpu()
    setup_logging()
    try:
        enable_compilation_cache(compilation_cache)
    except ValueError as e:
        fail(str(e))


def fail(message: str) -> None:
    """Exit with one line on stderr (status 2): what is wrong and how to fix it. After a Ctrl-C,
    the error is likely its consequence (an import cut short): report the interrupt instead."""
    from cifar_jax import interrupts

    if interrupts.interrupted():
        raise KeyboardInterrupt
    print(f"error: {message}", file=sys.stderr)
    sys.exit(2)


def parse_flags(argv):
    """absl's flag parsing (app.run's `flags_parser`), where a config file that does not load or an
    override of a key the config lacks fails in one line instead of a traceback."""
    from absl import app

    from cifar_jax.errors import one_line

    try:
        return app.parse_flags_with_usage(argv)
    except AttributeError as e:
        if "get_config" in str(e):
            fail(
                "the --config file defines no get_config(); a config file returns its ConfigDict from "
                "get_config() (see configs/)"
            )
        fail(_unknown_key(e))
    except (KeyError, ImportError, SyntaxError, OSError) as e:
        fail(f"the --config file does not load ({one_line(e, 300)})")
    except Exception as e:  # noqa: BLE001  (the config file is the user's code: anything may fail in it)
        fail(f"the --config file's get_config() raised {one_line(e, 200)}{_where_in_config(e, argv)}")


def _unknown_key(e: AttributeError) -> str:
    """The one line for a --config override of a key the config lacks; ml_collections' message is
    "'KEY'", and a second line 'Did you mean "NEAR" instead of "KEY"?' when a key is near."""
    inner = e.args[0] if e.args else e
    text = inner.args[0] if isinstance(inner, KeyError) and inner.args else str(inner)
    first, *rest = str(text).splitlines() or [""]
    near = re.search(r'Did you mean "([^"]+)"', " ".join(rest))
    hint = f" (did you mean {near.group(1)!r}?)" if near else ""
    key = first.strip("'\"")
    return (
        f"a --config override names {key!r}, which the config does not have{hint}: "
        "check its spelling against the config file and cifar_jax/config.py"
    )


def _where_in_config(e: BaseException, argv) -> str:
    """' (FILE, line N)': the deepest frame of `e`'s traceback in the --config file, else ''."""
    names = {
        os.path.abspath(a.split("=", 1)[1])
        for a in argv
        if a.startswith("--config=") and not a.startswith("--config.")
    }
    names |= {os.path.abspath(b) for a, b in zip(argv, argv[1:]) if a == "--config"}
    frames = [f for f in traceback.extract_tb(e.__traceback__) if os.path.abspath(f.filename) in names]
    return f" ({frames[-1].filename}, line {frames[-1].lineno})" if frames else ""


def loaded_config(holder):
    """The --config flag's ConfigDict. ml_collections reports a config file that does not load (a
    missing file, an import error in it) only when the config is first used: one line here."""
    from cifar_jax.errors import one_line

    try:
        return holder.value.copy_and_resolve_references()  # an attribute of the value is where it raises
    except OSError as e:
        reasons = [line.strip() for line in str(e).splitlines() if line.strip().startswith("[Errno")]
        fail(
            f"the --config file does not load ({reasons[-1] if reasons else one_line(e, 200)}); "
            f"pass a config file such as configs/quickstart.py"
        )


BUG = (
    "this is a bug in cifar_jax, not a problem with your input or files: please report it with the command "
    "and the traceback above"
)


def run(main, what: str, *, absl_flags: bool = True) -> None:
    """The one entry of every command (train.py, eval.py, python -m cifar_jax.*), which owns how it
    ends: `main`'s status (absl's app.run with our flag parsing, or `main(argv)` of an argparse
    command); a known failure in one line and status 2 (`fail`); a stop by signal in one line,
    status 128+N (130 for Ctrl-C, `what` says what was going on); anything else is a bug: its
    traceback, then the line `BUG`, status 1. Any error after a Ctrl-C is taken for its consequence
    (an import cut short) and reported as the interrupt."""
    from cifar_jax import interrupts, runguard

    sys.unraisablehook = _unraisable
    try:
        if absl_flags:
            from absl import app

            def after_imports(argv):
                _heavy_imports()
                interrupts.catch()
                return main(argv)

            app.run(after_imports, flags_parser=parse_flags)
        else:
            interrupts.catch()
            status = main(sys.argv[1:])
            sys.exit(status if isinstance(status, int) else 0)  # a benchmark returns its rows
    except KeyboardInterrupt:
        _say_interrupted(what)
    except runguard.Interrupted as e:
        print(str(e), file=sys.stderr)
        sys.exit(128 + e.signum)  # the shell's convention for "ended by signal N"
    except Exception:  # noqa: BLE001
        if interrupts.interrupted():
            _say_interrupted(what)
        traceback.print_exc()
        print(BUG, file=sys.stderr)
        sys.exit(1)


def _heavy_imports() -> None:
    """JAX, Flax, Optax and Orbax: seconds of extension imports, where a KeyboardInterrupt has
    crashed the interpreter or been turned into an ImportError. An absl command's flags (the
    config file imports JAX) and these load while a Ctrl-C is only remembered
    (`interrupts.defer` in its first lines); `run` acts on it once they are done."""
    tune_xla_cpu()  # before JAX starts a backend
    import flax.nnx  # noqa: F401
    import jax  # noqa: F401
    import optax  # noqa: F401
    import orbax.checkpoint  # noqa: F401


def _say_interrupted(what: str):
    print(
        f"interrupted (Ctrl-C) {what}; what was already saved is kept: rerun the same command",
        file=sys.stderr,
    )
    sys.exit(130)
