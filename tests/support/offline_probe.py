"""Run as a subprocess: train.py (same flags) on a machine whose network is unreachable, as on a
compute node without internet: every socket connection fails with ENETUNREACH. At exit it writes
how many connections were tried to $PROBE_ATTEMPTS_FILE."""

import atexit
import errno
import os
import runpy
import socket
import sys

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
attempts = []


def _unreachable(*args, **kwargs):
    attempts.append(args[:1])
    raise OSError(errno.ENETUNREACH, os.strerror(errno.ENETUNREACH))


socket.socket.connect = _unreachable
socket.create_connection = _unreachable
atexit.register(lambda: open(os.environ["PROBE_ATTEMPTS_FILE"], "w").write(str(len(attempts))))

sys.path.insert(0, ROOT)
sys.argv = [os.path.join(ROOT, "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
