"""Ctrl-C (SIGINT) during a command's start-up: the first import of every command, so it imports
nothing but `signal`, and a Ctrl-C is remembered from its first line on.

`defer()` at the top of a command: a SIGINT during the imports that follow is only remembered (a
KeyboardInterrupt raised inside an extension module's import has crashed the interpreter, or been
turned into an ImportError); `catch()` once they are done (`cli.run`) acts on it.
"""

import signal

_interrupted = False  # a SIGINT arrived since `defer` or `catch`


def _remember(signum, frame):
    global _interrupted
    _interrupted = True


def _remember_and_raise(signum, frame):
    _remember(signum, frame)
    signal.default_int_handler(signum, frame)  # KeyboardInterrupt, as Python's own handler raises


def _handle_with(handler) -> None:
    """Install `handler` for SIGINT unless SIGINT is ignored (a shell's background job) or another's;
    outside the main thread, where Python refuses signal handlers, nothing changes."""
    if signal.getsignal(signal.SIGINT) not in (signal.default_int_handler, _remember, _remember_and_raise):
        return
    try:
        signal.signal(signal.SIGINT, handler)
    except ValueError:  # not the main thread
        pass


def defer() -> None:
    """From here on a SIGINT is only remembered, until `catch`."""
    _handle_with(_remember)


def catch() -> None:
    """From here on SIGINT raises KeyboardInterrupt as usual, and is also remembered: a library that
    swallows the KeyboardInterrupt (an extension's import turns it into an ImportError, which an
    optional import ignores; a garbage-collector callback prints and drops it) cannot lose it.
    Raises KeyboardInterrupt at once for a SIGINT that `defer` remembered."""
    _handle_with(_remember_and_raise)
    if _interrupted:
        raise KeyboardInterrupt


def interrupted() -> bool:
    """Whether a SIGINT arrived, even if its KeyboardInterrupt was swallowed."""
    return _interrupted
