"""How the benchmark times: windows of jitted calls (or of PyTorch steps), medians, result rows."""

from __future__ import annotations

import statistics
import time


def median_rate(images_per_window: int, times: list[float]) -> float:
    return images_per_window / statistics.median(times)


def timed_windows(run_window, wait, warmup: int, windows: int, overlap: bool = True):
    """(seconds of the first window, seconds of each timed window).

    `run_window()` starts one window and returns a handle; `wait(handle)` blocks until that window
    is done. The first window (compilation) and the rest of the `warmup` windows run alone, waited
    for one by one. With `overlap` (for work that runs asynchronously: JAX, PyTorch on a GPU) the
    timed windows run as a training loop without host syncs runs them: each starts before the one
    before it is waited for, and its time is the interval between the two windows' ends. So the
    host's work to start a call (BENCHMARKS.md: milliseconds for ResNet-50's 591 arrays) overlaps the
    device's work for the previous call, as in the trainer, instead of leaving a GPU idle in every
    window. (The first interval also holds its own start; the median sets it aside.) Without
    `overlap`, each window is timed alone.
    """
    t0 = time.perf_counter()
    wait(run_window())
    first = time.perf_counter() - t0
    for _ in range(max(warmup, 1) - 1):
        wait(run_window())
    times = []
    if not overlap:
        for _ in range(windows):
            t0 = time.perf_counter()
            wait(run_window())
            times.append(time.perf_counter() - t0)
        return first, times
    last = time.perf_counter()
    pending = run_window()
    for i in range(windows):
        following = run_window() if i + 1 < windows else None
        wait(pending)
        now = time.perf_counter()
        times.append(now - last)
        last, pending = now, following
    return first, times


def row(case, opts, framework, mode, variant, device, img_per_s, compile_s, batch_size=None, **extra):
    return {
        "model": case.model,
        "arch": case.arch,
        "stem": case.stem,
        "image_size": case.image_size,
        "batch_size": batch_size or opts.batch_size,
        "framework": framework,
        "mode": mode,
        "variant": variant,
        "device": device,
        "img_per_s": round(img_per_s, 1),
        "compile_s": None if compile_s is None else round(max(compile_s, 0.0), 2),
        **extra,
    }


def step_ms(times, steps_per_window) -> float:
    return round(1000 * statistics.median(times) / steps_per_window, 3)
