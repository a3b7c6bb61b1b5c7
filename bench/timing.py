"""Wall-clock timing for the benchmarks: CUDA kernels run asynchronously, so synchronise
around the timed call."""
import time

import torch


def seconds(fn, device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize()
    t0 = time.perf_counter()
    fn()
    if device.type == "cuda":
        torch.cuda.synchronize()
    return time.perf_counter() - t0
