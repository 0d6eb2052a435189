"""The process's allocator, for streams of 1 MiB buffers: glibc ``mallopt`` and ``malloc_trim``
through ctypes (no-ops returning False where there is no glibc). Used by the gateway process,
``nbdgw backup`` and the benchmarks' workers; here, not in gateway.server, so that a client
command tunes its allocator without importing the server."""

from __future__ import annotations

import ctypes

MiB = 1024 * 1024

# glibc mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_THRESHOLD = -3


def keep_freed_memory(mmap_threshold: int = 4 * MiB, trim_threshold: int = 32 * MiB) -> bool:
    """Let glibc reuse freed memory for the 1 MiB buffers of data streams.

    Each StreamExtents data message allocates and frees several ~1 MiB buffers (the NBD read,
    the protobuf field, its serialisation, grpc's copy). By default glibc serves them with fresh
    mmaps, or trims the heap when they are freed, so every message page-faults its buffers in
    again: that, not the copying, was two thirds of the gateway's CPU time per message. Below
    ``mmap_threshold`` they come from the heap, which keeps up to ``trim_threshold`` free bytes.
    Returns False where there is no glibc mallopt (nothing changes there).
    """
    try:
        mallopt = ctypes.CDLL(None).mallopt
    except (OSError, AttributeError):
        return False
    mallopt.argtypes = [ctypes.c_int, ctypes.c_int]
    mallopt.restype = ctypes.c_int
    ok = mallopt(_M_MMAP_THRESHOLD, mmap_threshold) == 1
    return bool(mallopt(_M_TRIM_THRESHOLD, trim_threshold) == 1) and ok


def give_back_freed_memory() -> bool:
    """Return the free pages of every malloc arena to the system (glibc ``malloc_trim(0)``).

    :func:`keep_freed_memory` keeps freed stream buffers for reuse, which also kept them after
    the streams ended: 64 never-reading data streams took the gateway from 68 to 209 MB, and it
    stayed there once they were gone. The gateway calls this when streams have ended and none
    is running (:meth:`Gateway._give_back_memory`). False where there is no malloc_trim.
    """
    try:
        trim = ctypes.CDLL(None).malloc_trim
    except (OSError, AttributeError):
        return False
    trim.argtypes = [ctypes.c_size_t]
    trim.restype = ctypes.c_int
    trim(0)
    return True
