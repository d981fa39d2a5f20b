"""Cost of a model call: FLOPs (``torch.utils.flop_counter``) and wall time."""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass

import torch
from torch.utils.flop_counter import FlopCounterMode, flop_registry, register_flop_formula, sdpa_flop_count

# torch's counter knows SDPA's CUDA kernels but not the CPU one, so CPU counts silently
# dropped every attention FLOP; count it with the same formula as the CUDA kernels.
_SDPA_CPU = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu
if _SDPA_CPU not in flop_registry and _SDPA_CPU.default not in flop_registry:

    @register_flop_formula(_SDPA_CPU)
    def _sdpa_cpu_flops(query_shape, key_shape, value_shape, *args, out_shape=None, **kwargs) -> int:
        return sdpa_flop_count(query_shape, key_shape, value_shape)


def count_flops(fn: Callable[[], object]) -> int:
    """FLOPs of one call of ``fn`` (matmuls, convolutions and attention, as torch counts them)."""
    with FlopCounterMode(display=False) as counter:
        fn()
    return counter.get_total_flops()


@dataclass(frozen=True)
class Timing:
    """Median and spread of repeated wall-clock measurements, in seconds."""

    median: float
    low: float
    high: float
    repeats: int


def time_call(fn: Callable[[], object], repeats: int = 5, warmup: int = 1) -> Timing:
    """Wall time of ``fn`` after ``warmup`` untimed calls."""
    for _ in range(warmup):
        fn()
    times = []
    for _ in range(repeats):
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        start = time.perf_counter()
        fn()
        if torch.cuda.is_available():
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    return Timing(statistics.median(times), min(times), max(times), repeats)
