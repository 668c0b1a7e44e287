"""How the ``brats`` program uses memory: freed memory kept for the next case."""

from __future__ import annotations

import ctypes


def keep_freed_memory() -> None:
    """One malloc arena that keeps freed memory for the next case. glibc's malloc gives each thread an
    arena of its own and hands large blocks back to the kernel the moment they are freed, so every
    case's arrays (hundreds of MB: inflated scans, slices, shards) would be mapped afresh and faulted
    in a page at a time (the README's "Benchmarks" has the figures). Called before any thread starts;
    a no-op where the C library has no ``mallopt``."""
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return
    m_trim_threshold, m_mmap_threshold, m_arena_max = -1, -3, -8  # <malloc.h>
    mallopt(m_arena_max, 1)
    mallopt(m_mmap_threshold, 256 << 20)  # blocks over 256 MB are still mapped on their own
    mallopt(m_trim_threshold, 1 << 30)  # up to 1 GB of free memory is kept at the heap's top
