"""Latency of a callable under a stated protocol: batch 1, fixed input, warm-up, then timed iterations.

On CUDA every iteration is bracketed by ``torch.cuda.synchronize()`` so queued kernels are inside the measured
interval (asynchronous launches would otherwise make a forward look almost free), and forward-only timings use CUDA
events recorded on the current stream. On CPU ``time.perf_counter`` brackets each iteration. Statistics are the
median, the 90th percentile, and mean ± standard deviation over the timed iterations, in milliseconds.
"""
from __future__ import annotations

import time
from dataclasses import asdict, dataclass
from typing import Any, Callable

import numpy as np
import torch


@dataclass
class LatencyStats:
    """Per-iteration latency statistics in milliseconds."""

    median_ms: float
    p90_ms: float
    mean_ms: float
    std_ms: float
    min_ms: float
    max_ms: float
    warmup: int
    iterations: int
    timer: str            # "perf_counter" | "cuda_events" | "perf_counter+cuda_sync"

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_samples(cls, samples_ms: list[float], warmup: int, timer: str) -> "LatencyStats":
        a = np.asarray(samples_ms, dtype=np.float64)
        return cls(
            median_ms=float(np.median(a)), p90_ms=float(np.percentile(a, 90)), mean_ms=float(a.mean()),
            std_ms=float(a.std(ddof=1)) if len(a) > 1 else 0.0, min_ms=float(a.min()), max_ms=float(a.max()),
            warmup=warmup, iterations=len(a), timer=timer,
        )


def time_callable(
    fn: Callable[[], Any],
    *,
    device: str | torch.device = "cpu",
    warmup: int = 10,
    iterations: int = 50,
    cuda_events: bool = False,
) -> LatencyStats:
    """Time ``fn()`` ``iterations`` times after ``warmup`` untimed calls.

    Args:
        fn: the work for one batch-1 item (it must not depend on previous calls).
        device: where the work runs; CUDA turns on synchronisation around every iteration.
        cuda_events: on CUDA, time with events on the current stream (GPU time of the queued work; use it for
            forward-only). Otherwise wall time with a synchronize before and after (use it when the callable does
            CPU work too, e.g. pre/post-processing).
    """
    if iterations < 1:
        raise ValueError(f"iterations must be >= 1, got {iterations}")
    on_cuda = torch.device(device).type == "cuda"
    with torch.inference_mode():
        for _ in range(max(0, warmup)):
            fn()
        if on_cuda:
            torch.cuda.synchronize(device)
        samples: list[float] = []
        if on_cuda and cuda_events:
            for _ in range(iterations):
                start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
                start.record()
                fn()
                end.record()
                end.synchronize()
                samples.append(start.elapsed_time(end))
            timer = "cuda_events"
        else:
            for _ in range(iterations):
                if on_cuda:
                    torch.cuda.synchronize(device)
                t0 = time.perf_counter()
                fn()
                if on_cuda:
                    torch.cuda.synchronize(device)
                samples.append((time.perf_counter() - t0) * 1e3)
            timer = "perf_counter+cuda_sync" if on_cuda else "perf_counter"
    return LatencyStats.from_samples(samples, warmup, timer)
