"""glibc heap settings for a process that allocates and frees large tensors on the CPU.

By default glibc raises its mmap threshold each time a large block is freed (up to 32 MB), so tile buffers of a
few to a few dozen MB end up in the heap, where blocks of many sizes fragment it and freed memory is not handed
back: streaming the tiny VAE's tiles at 2048² grew the process by 1.5 GB for 170 MB of live tensors. With
equal tile shapes (`pipelines.vae.stages.crop_span`) and fixed thresholds (buffers below 64 MB from the heap,
where equal sizes reuse each other; larger ones mmap'ed and returned on free; up to 512 MB of free heap kept
rather than returned and faulted in again) the same decode grows it by 0.3 GB at the same speed (layer-wise:
1.5 GB -> 0.7 GB). Returning all free memory at once (a small trim threshold) would cost twice the time in page
faults. Settings given in the environment (MALLOC_MMAP_THRESHOLD_, MALLOC_TRIM_THRESHOLD_) are left alone.
"""

from __future__ import annotations

import ctypes
import logging
import os
import sys

log = logging.getLogger(__name__)

M_TRIM_THRESHOLD = -1  # glibc's mallopt parameter numbers (malloc.h)
M_MMAP_THRESHOLD = -3
MMAP_THRESHOLD = 64 << 20
TRIM_THRESHOLD = 512 << 20
_done: bool | None = None


def tune_heap() -> bool:
    """Set the thresholds once per process (Linux with glibc only); True when they are in effect."""
    global _done
    if _done is not None:
        return _done
    _done = False
    if not sys.platform.startswith("linux") or any(
            k in os.environ for k in ("MALLOC_MMAP_THRESHOLD_", "MALLOC_TRIM_THRESHOLD_")):
        return _done
    try:
        libc = ctypes.CDLL("libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):  # musl and others: nothing to tune
        return _done
    # a glibc built with a smaller limit refuses 64 MB: 32 MB (its default maximum) is always accepted
    ok = mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD) == 1 or mallopt(M_MMAP_THRESHOLD, 32 << 20) == 1
    _done = ok and mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD) == 1
    log.debug("glibc heap thresholds %s", "set" if _done else "refused")
    return _done
