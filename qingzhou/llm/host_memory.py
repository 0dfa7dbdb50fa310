"""Keep a long layer-by-layer run's resident memory at its working set, not its history.

glibc's malloc serves an allocation above its mmap threshold with its own mapping, given back to
the OS when freed; below it, from the heap, where freed memory stays with the process. The
threshold is dynamic: each time a large mapped block is freed it rises to that block's size (up to
32 MiB on 64-bit), so after the first few layers a streamed run's tens-of-megabyte temporaries
(Hessians, activations, layer weights) land on the heap, and every layer leaves some behind:
streaming GPTQ of a Llama-3.2-1B shape grew ~100 MB per layer this way (3.3 GB peak RSS for a
2.5 GB model). Fixing the threshold (what `MALLOC_MMAP_THRESHOLD_` does at startup) keeps large
blocks mapped and returned; RSS then stays flat from layer to layer. At 4 MiB on a 3-layer
1B-shaped model: flat (397 MB after each layer) at +12% time; at 32 MiB RSS still grew; at glibc's
initial 128 KiB the many mid-sized temporaries each paid a fresh mapping (+55% time on SmolLM2).

Linux/glibc only; elsewhere these calls do nothing and say so by returning False.
"""
from __future__ import annotations

import ctypes
import ctypes.util
import sys
from functools import lru_cache

M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
DEFAULT_THRESHOLD = 4 * 2**20  # blocks above it are mapped, and stay so (see the module doc)


@lru_cache(maxsize=1)
def _libc() -> ctypes.CDLL | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.mallopt  # noqa: B018 - glibc (musl has no mallopt)
        libc.malloc_trim  # noqa: B018
    except (OSError, AttributeError):
        return None
    return libc


def fix_mmap_threshold(threshold: int = DEFAULT_THRESHOLD) -> bool:
    """Serve every allocation above `threshold` bytes from its own mapping, for the rest of the
    process (a process-wide allocator setting; it also stops glibc raising the threshold)."""
    libc = _libc()
    return bool(libc is not None and libc.mallopt(M_MMAP_THRESHOLD, int(threshold)) == 1)


def trim_heap() -> bool:
    """Give the heap's free memory back to the OS (`malloc_trim(0)`)."""
    libc = _libc()
    return bool(libc is not None and libc.malloc_trim(0))
