"""What a JAX profiler trace says about the device: how busy it was and which kernels took the time.

    with jax.profiler.trace(directory, create_perfetto_trace=True):
        ...                                   # the work to look at, synced at the end
    print(format_summary(trace_summary(latest_trace(directory))))

Reads the Perfetto (Chrome JSON) trace that `jax.profiler.trace` writes. Device activity is every
complete event ("ph": "X") of a process named "/device:..." (on a GPU, the kernels and copies
CUPTI records, one thread per stream). Busy time is the union of those intervals, so kernels
overlapping on several streams count once; the rest of the traced span the device sat idle,
waiting for the host (launches, dispatch, Python) or for a copy. A CPU backend has no device
process: its summary says so instead of guessing.
"""

from __future__ import annotations

import gzip
import json
import logging
from collections import defaultdict
from pathlib import Path

from cifar_jax.errors import TrainingError, one_line


def latest_trace(directory) -> Path:
    """The newest perfetto_trace.json.gz under `directory` (jax.profiler.trace's layout)."""
    found = sorted(Path(directory).glob("**/perfetto_trace.json.gz"), key=lambda p: p.stat().st_mtime)
    if not found:
        raise FileNotFoundError(
            f"no perfetto_trace.json.gz under {directory}: trace with create_perfetto_trace=True"
        )
    return found[-1]


def _union_length(intervals) -> float:
    total, end = 0.0, float("-inf")
    for start, stop in sorted(intervals):
        if stop > end:
            total += stop - max(start, end)
            end = stop
    return total


def trace_summary(path, top: int = 15) -> dict:
    """{device, span_ms, busy_ms, busy_share, events, kernels: [{name, ms, share, count}]} of the
    device processes in the trace at `path` (or {device: None} when it has none)."""
    with gzip.open(path, "rt") if str(path).endswith(".gz") else open(path) as f:
        data = json.load(f)
    events = data["traceEvents"] if isinstance(data, dict) else data
    processes = {
        e["pid"]: e["args"]["name"] for e in events if e.get("ph") == "M" and e.get("name") == "process_name"
    }
    devices = {pid for pid, name in processes.items() if name.startswith("/device:")}
    ops = [e for e in events if e.get("ph") == "X" and e.get("pid") in devices and "dur" in e]
    if not ops:
        return {"device": None, "processes": sorted(processes.values())}
    intervals = [(float(e["ts"]), float(e["ts"]) + float(e["dur"])) for e in ops]
    span = max(stop for _, stop in intervals) - min(start for start, _ in intervals)
    busy = _union_length(intervals)
    by_name, counts = defaultdict(float), defaultdict(int)
    for e in ops:
        by_name[e["name"]] += float(e["dur"])
        counts[e["name"]] += 1
    total = sum(by_name.values())
    kernels = [
        {"name": n, "ms": us / 1e3, "share": us / total, "count": counts[n]}
        for n, us in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]
    ]
    return {
        "device": ", ".join(sorted(processes[p] for p in devices)),
        "span_ms": span / 1e3,
        "busy_ms": busy / 1e3,
        "busy_share": busy / span if span else 0.0,
        "events": len(ops),
        "kernels": kernels,
    }


def format_summary(summary: dict) -> str:
    if summary["device"] is None:
        processes = ", ".join(summary["processes"])
        return (
            f"profile: no device activity in the trace (processes: {processes}); a CPU backend records none"
        )
    lines = [
        f"profile of {summary['device']}: busy {summary['busy_ms']:.1f} of {summary['span_ms']:.1f} ms "
        f"({summary['busy_share']:.1%}), {summary['events']} device events; by total time:"
    ]
    for k in summary["kernels"]:
        lines.append(f"  {k['ms']:9.2f} ms {k['share']:6.1%} x{k['count']:<5d} {k['name'][:100]}")
    return "\n".join(lines)


def _end_profiler_session() -> None:
    """After a trace that could not be written: JAX's stop_trace raises before it forgets the
    session, and every later trace in the process would then fail ("already started")."""
    try:
        from jax._src import profiler

        profiler._profile_state.reset()
    except (ImportError, AttributeError):  # another JAX: nothing to forget, or no way to
        pass


class EpochProfile:
    """A trace of a real training run (config `profile.epoch`, 1-based, and `profile.steps`): the
    first `steps` steps of that epoch in `<workdir>/profile/train`, its validation in
    `<workdir>/profile/val`, each followed by the device summary above in the log. The window ends
    with a wait for the device, so the trace holds the device's work, not only its dispatch."""

    def __init__(self, profile_config, workdir: Path, is_main: bool):
        self.epoch, self.steps = profile_config.epoch - 1, profile_config.steps  # epoch -1: off
        self.directory, self.is_main = Path(workdir) / "profile", is_main
        self._tracing = None

    def covers(self, epoch: int) -> bool:
        return epoch == self.epoch

    def start(self, name: str) -> None:
        import jax

        self._profiler(jax.profiler.start_trace, str(self.directory / name), create_perfetto_trace=True)
        self._tracing = name

    def stop(self, wait_for) -> None:
        """Wait for `wait_for` (the window's last device values), end the trace, log its summary."""
        import jax

        jax.block_until_ready(wait_for)
        traced, self._tracing = self._tracing, None
        try:
            self._profiler(jax.profiler.stop_trace)
        except TrainingError:
            _end_profiler_session()
            raise
        if self.is_main:
            summary = format_summary(trace_summary(latest_trace(self.directory / traced)))
            logging.getLogger("cifar_jax").info(
                "profile of epoch %d's %s (trace in %s):\n%s",
                self.epoch + 1,
                traced,
                self.directory / traced,
                summary,
            )

    def _profiler(self, call, *args, **kwargs) -> None:
        """`call` of jax.profiler; a trace that cannot be written is a TrainingError of one line."""
        try:
            call(*args, **kwargs)
        except Exception as e:  # noqa: BLE001  (JaxRuntimeError, OSError)
            raise TrainingError(
                f"cannot write the profile trace in {self.directory} ({one_line(e, 200)}); fix that "
                "directory, or --config.profile.epoch=0 to train without a trace"
            ) from None

    def abandon(self) -> None:
        """End a trace that an error interrupted, quietly: that error is the one to report."""
        import jax

        if self._tracing is not None:
            self._tracing = None
            try:
                jax.profiler.stop_trace()
            except Exception:  # noqa: BLE001
                _end_profiler_session()

    @property
    def tracing(self) -> bool:
        return self._tracing is not None

    def traced(self, name: str, run, state):
        """`run(state)` traced alone as `name` (after a wait for `state`): the profiled epoch's
        validation."""
        import jax

        self.start(name)
        jax.block_until_ready(state)
        result = run(state)
        self.stop(result)
        return result
