"""Run as a subprocess: train.py (same flags), with a signal sent to itself at a chosen moment,
the same in every run whatever the machine's speed.

PROBE_SIGNAL_AT: 'row:N' right after the metrics row of epoch N is written; 'final_wait' when the
trainer starts waiting for its last background checkpoint writes; 'step:E:S' once the call that
trains epoch E from step S on is dispatched (both counted from 1 and 0 as train.py says them).
PROBE_SIGNAL: TERM (the default) or KILL.
"""

import os
import runpy
import signal
import sys

from cifar_jax import checkpoint, tracking, trainer

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
WHEN = os.environ["PROBE_SIGNAL_AT"]
SIGNAL = getattr(signal, "SIG" + os.environ.get("PROBE_SIGNAL", "TERM"))
sent = []


def _signal():
    if not sent:
        sent.append(SIGNAL)
        os.kill(os.getpid(), SIGNAL)


if WHEN.startswith("row:"):
    real_append = tracking.MetricsLog.append

    def append(self, row):
        real_append(self, row)
        if row["epoch"] == int(WHEN.split(":")[1]):
            _signal()

    tracking.MetricsLog.append = append
elif WHEN == "final_wait":
    real_wait = checkpoint.Checkpoints.wait

    def wait(self):  # the trainer's first wait, in a run that neither resumes nor stops, is its last
        _signal()
        return real_wait(self)

    checkpoint.Checkpoints.wait = wait
elif WHEN.startswith("step:"):
    epoch, step = (int(n) for n in WHEN.split(":")[1:])
    real_push = trainer.InFlight.push

    def push(self, entry):
        real_push(self, entry)
        if isinstance(entry, trainer.Chunk) and entry.epoch.index + 1 == epoch and entry.first_step == step:
            _signal()

    trainer.InFlight.push = push
else:
    raise SystemExit(f"unknown PROBE_SIGNAL_AT={WHEN!r}")

sys.path.insert(0, ROOT)
sys.argv = [os.path.join(ROOT, "train.py"), *sys.argv[1:]]
runpy.run_path(sys.argv[0], run_name="__main__")
