"""On PYTHONPATH, Python imports this at start-up: it restores SIGINT's default handler (as a shell
leaves it for a foreground command) and, when $SIGINT_AT_IMPORT names a module, sends this process a
SIGINT as that module starts to import, so that a test can press Ctrl-C at a chosen point of a
command's start-up instead of at a time that depends on the machine's speed."""

import os
import signal
import sys

signal.signal(signal.SIGINT, signal.default_int_handler)


class _SigintAtImport:
    def __init__(self, name: str):
        self.name = name

    def find_spec(self, name, path=None, target=None):
        if name == self.name:
            sys.meta_path.remove(self)
            os.kill(os.getpid(), signal.SIGINT)  # acted on at the next bytecode: inside this import
        return None  # the usual finders import the module


if os.environ.get("SIGINT_AT_IMPORT"):
    sys.meta_path.insert(0, _SigintAtImport(os.environ["SIGINT_AT_IMPORT"]))
