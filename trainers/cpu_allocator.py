"""Keep freed training buffers in the process on CPU (glibc malloc), instead of handing them back to the OS.

Why: glibc serves large blocks with mmap and returns them with munmap (and trims the heap top), so every
training step faults the same activation and gradient buffers in again. On this kind of VM a fault costs
~18 us; for joyai-flash-small that was ~9,000 faults and ~150 ms of a ~730 ms step (benchmarks/
model_throughput.py). Raising the mmap and trim thresholds and the heap's top pad keeps the memory mapped
(all three are needed: without the pad the OpenMP threads' heaps still shrink and refault); peak RSS does
not grow (the same buffers are reused). Intel's PyTorch CPU tuning guide gets the same effect with jemalloc or
tcmalloc; this needs no extra library. Not glibc (musl, macOS): a no-op.

    from flashops.trainers.cpu_allocator import keep_freed_memory
    keep_freed_memory()                       # once, before training; the trainer does this on CPU

The same settings as environment variables (they must be set before the process starts), as the benchmark
and a pod spec would use them (`ENV`): MALLOC_MMAP_THRESHOLD_=1073741824 MALLOC_TRIM_THRESHOLD_=1073741824
MALLOC_TOP_PAD_=67108864; read at start-up, they also cover blocks over mallopt's 32 MiB limit.
Remove when torch's CPU allocator caches large blocks itself.
"""
from __future__ import annotations

import ctypes
import ctypes.util

_MMAP_THRESHOLD = 32 << 20  # glibc's maximum on 64-bit; larger blocks still come from mmap
_TRIM_THRESHOLD = 1 << 30
_TOP_PAD = 64 << 20
ENV = {"MALLOC_MMAP_THRESHOLD_": str(1 << 30), "MALLOC_TRIM_THRESHOLD_": str(_TRIM_THRESHOLD),
       "MALLOC_TOP_PAD_": str(_TOP_PAD)}
_M_TRIM_THRESHOLD, _M_TOP_PAD, _M_MMAP_THRESHOLD = -1, -2, -3


def keep_freed_memory() -> bool:
    """True when glibc accepted both settings."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    settings = ((_M_MMAP_THRESHOLD, _MMAP_THRESHOLD), (_M_TRIM_THRESHOLD, _TRIM_THRESHOLD), (_M_TOP_PAD, _TOP_PAD))
    return all([bool(mallopt(option, value)) for option, value in settings])
