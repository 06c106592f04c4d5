"""Run as a subprocess: train.py (same flags), with a SIGTERM sent to itself at a chosen moment.

PROBE_SIGNAL_AT: 'row:N' right after the metrics row of epoch N is written; 'final_wait' when the
trainer starts waiting for its last background checkpoint writes.
"""

import os
import runpy
import signal
import sys

from cifar_jax import checkpoint, tracking

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHEN = os.environ["PROBE_SIGNAL_AT"]


def _sigterm():
    os.kill(os.getpid(), signal.SIGTERM)


if WHEN.startswith("row:"):
    real_append = tracking.MetricsLog.append

    def append(self, row):
        real_append(self, row)
        if row["epoch"] == int(WHEN.split(":")[1]):
            _sigterm()

    tracking.MetricsLog.append = append
elif WHEN == "final_wait":
    real_wait = checkpoint.Checkpoints.wait
    calls = []

    def wait(self):  # the trainer's first wait, in a run that neither resumes nor stops, is its last
        if not calls:
            _sigterm()
        calls.append(1)
        return real_wait(self)

    checkpoint.Checkpoints.wait = wait
else:
    raise SystemExit(f"unknown PROBE_SIGNAL_AT={WHEN!r}")

sys.path.insert(0, ROOT)
sys.argv = [os.path.join(ROOT, "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
