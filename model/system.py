"""Process and thread tuning for the trainer: glibc's allocator and the trainer thread's CPU priority."""

from __future__ import annotations

import ctypes
import logging
import os
import sys
import threading

log = logging.getLogger("rrstem.model")


def tune_malloc() -> bool:
    """Make glibc reuse freed multi-MB buffers instead of returning them to the OS (process-wide).

    By default glibc serves large allocations with mmap and trims freed heap
    memory, so every training step page-faults its activation buffers in again,
    which slows its elementwise ops several times over.
    Raising the mmap threshold to its 32 MB maximum and the trim threshold to
    256 MB keeps them; the cost is up to 256 MB of freed memory kept per arena.
    Returns False where it does not apply (not glibc).
    """
    if not sys.platform.startswith("linux"):
        return False
    try:
        libc = ctypes.CDLL("libc.so.6")
        return bool(libc.mallopt(-3, 32 << 20)) and bool(libc.mallopt(-1, 256 << 20))  # M_MMAP_/M_TRIM_THRESHOLD
    except (OSError, AttributeError):
        return False


def lower_priority(nice: int) -> bool:
    """Lower the calling thread's CPU priority by ``nice`` (Linux: every thread has its own nice value).

    The trainer calls this so that, when both cores are busy, the kernel runs
    the ingest threads (receiver, pipeline, ZeroMQ I/O) first: training may
    fall behind the detector and sample, ingest may not. Returns False where it
    does not apply.
    """
    if nice <= 0 or not sys.platform.startswith("linux"):
        return False
    try:
        os.setpriority(os.PRIO_PROCESS, threading.get_native_id(), min(int(nice), 19))
        return True
    except (OSError, AttributeError) as exc:
        log.warning("could not lower the trainer thread's priority: %s", exc)
        return False
