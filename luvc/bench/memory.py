"""Peak memory of one call: the CUDA allocator's peak, or resident-set growth on CPU."""

from __future__ import annotations

import threading
from collections.abc import Callable

import torch


def _rss_bytes() -> int:
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * 4096


def peak_memory(fn: Callable[[], object], device: str) -> int:
    """Bytes above the starting level at the peak of one call of ``fn``.

    On CUDA this is ``max_memory_allocated`` (exact); on CPU the process's
    resident set is sampled every millisecond, so it includes allocator slack.
    """
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        start = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - start
    start = _rss_bytes()
    peak = [start]
    done = threading.Event()

    def sample() -> None:
        while not done.is_set():
            peak[0] = max(peak[0], _rss_bytes())
            done.wait(0.001)

    thread = threading.Thread(target=sample, daemon=True)
    thread.start()
    try:
        fn()
    finally:
        done.set()
        thread.join()
    return max(peak[0], _rss_bytes()) - start


def kv_cache_bytes(cache) -> int:
    """Bytes held by a KV cache's key and value tensors, over all layers."""
    total = 0
    for layer in getattr(cache, "layers", []):
        for name in ("keys", "values"):
            tensor = getattr(layer, name, None)
            if isinstance(tensor, torch.Tensor):
                total += tensor.numel() * tensor.element_size()
    return total
