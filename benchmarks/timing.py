"""The timing harness the training benchmarks share: one warm-up step, then timed steps."""
from __future__ import annotations

import time
from collections.abc import Callable

import torch


def images_per_s(step: Callable[[], None], batch: int, steps: int, device: torch.device) -> tuple[float, float]:
    """(images/s, peak GPU MiB or nan) of `steps` calls of `step` after one untimed warm-up call."""
    step()
    if device.type == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
    t0 = time.perf_counter()
    for _ in range(steps):
        step()
    if device.type == "cuda":
        torch.cuda.synchronize()
    peak = torch.cuda.max_memory_allocated() / 2**20 if device.type == "cuda" else float("nan")
    return batch * steps / (time.perf_counter() - t0), peak
