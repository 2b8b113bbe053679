"""ONNX Runtime CPU latency of an exported model: batch 1, one thread and all threads, median and p90.

Measured, never estimated from MACs: `latency.warmup` untimed runs, then `latency.runs` runs each timed with
time.perf_counter around one `InferenceSession.run` on a fixed batch-1 input. Every record carries the CPU
model string, the ONNX Runtime version and the thread counts, because the numbers are only comparable on
the same machine under the same load (see README, "Deployment").
"""

from __future__ import annotations

import os
import platform
import time
from pathlib import Path
from typing import Any

import numpy as np


def cpu_model() -> str:
    """The CPU's model string: /proc/cpuinfo "model name" on Linux, else platform.processor() / machine()."""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() in ("model name", "Model", "Hardware") and value.strip():
                return value.strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "unknown CPU"


def available_cores() -> int:
    """Cores this process may run on (the affinity mask where the OS has one, else os.cpu_count())."""
    try:
        return len(os.sched_getaffinity(0))
    except AttributeError:
        return os.cpu_count() or 1


def session(onnx_path: str | Path, threads: int) -> Any:
    """A CPU InferenceSession running each node on `threads` threads, nodes one after another."""
    import onnxruntime

    options = onnxruntime.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = onnxruntime.ExecutionMode.ORT_SEQUENTIAL
    options.log_severity_level = 3
    return onnxruntime.InferenceSession(str(onnx_path), options, providers=["CPUExecutionProvider"])


def time_session(sess: Any, inputs: np.ndarray, warmup: int, runs: int) -> dict[str, float]:
    """Median, p90, mean, min and max in milliseconds of `runs` timed runs after `warmup` untimed ones."""
    if runs < 1 or warmup < 0:
        raise ValueError(f"latency.runs={runs} must be >= 1 and latency.warmup={warmup} >= 0")
    name = sess.get_inputs()[0].name
    feed = {name: inputs}
    for _ in range(warmup):
        sess.run(None, feed)
    times = np.empty(runs)
    for i in range(runs):
        start = time.perf_counter()
        sess.run(None, feed)
        times[i] = time.perf_counter() - start
    ms = times * 1e3
    return {
        "median_ms": float(np.median(ms)),
        "p90_ms": float(np.percentile(ms, 90)),
        "mean_ms": float(ms.mean()),
        "min_ms": float(ms.min()),
        "max_ms": float(ms.max()),
    }


def measure_latency(
    onnx_path: str | Path,
    input_shape: tuple[int, ...] | list[int],
    warmup: int,
    runs: int,
    thread_counts: tuple[int, ...] | None = None,
) -> dict[str, Any]:
    """Latency record of one model: {"cpu", "onnxruntime", "batch", "warmup", "runs", "threads": {"1": {...},
    "<all>": {...}}} with median_ms/p90_ms/... per thread count (all = the cores this process may use)."""
    import onnxruntime

    cores = available_cores()
    counts = thread_counts or tuple(dict.fromkeys((1, cores)))
    inputs = np.random.default_rng(0).standard_normal((1, *input_shape[1:])).astype(np.float32)
    by_threads = {str(n): time_session(session(onnx_path, n), inputs, warmup, runs) for n in counts}
    return {
        "cpu": cpu_model(),
        "machine": platform.machine(),
        "onnxruntime": onnxruntime.__version__,
        "cores": cores,
        "all_threads": cores,
        "batch": 1,
        "warmup": warmup,
        "runs": runs,
        "threads": by_threads,
    }
