"""Benchmarks: `python -m minignext bench NAME`, one module per NAME in this package,
each with `main(argv)`. They compare minignext with the reference libraries on the
same weights and inputs; nothing here runs in the tests."""

import statistics
import time

import torch


def median_time(fn, repeats=5, warmup=1):
    """Median wall time of `fn()` in seconds over `repeats` runs, after `warmup` runs."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def copy_bandwidth(nbytes=256 * 2**20, repeats=5):
    """Measured memory bandwidth in bytes/s: read + write of a large tensor copy."""
    src = torch.empty(nbytes // 4, dtype=torch.float32).fill_(1.0)
    dst = torch.empty_like(src)
    t = median_time(lambda: dst.copy_(src), repeats=repeats)
    return 2 * nbytes / t


def require_reference(name):
    try:
        return __import__(name)
    except ImportError:
        raise SystemExit(f"the benchmark compares against {name}; install the test extras: "
                         f"pip install -r requirements-test.txt") from None
