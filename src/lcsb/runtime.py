"""Process-level settings that decide how much memory a run really holds.

glibc's malloc keeps freed memory for reuse: blocks above its mmap threshold are returned to the
system, but the threshold grows dynamically up to 32 MB after such frees, and each thread gets its
own arena. A training step allocates and frees tensors of 1-30 MB by the hundred, so without
this the resident set of a long run creeps up by a hundred MB or more (measured on the Qwen2.5-0.5B
shape: 397 -> 335 MB resident after a step, peak 437 -> 427 MB, at no measurable cost in time).
A fixed threshold of 64 KB hands every tensor of that size back to the system on free.

That costs time: the next tensor of the size gets fresh pages, which the kernel faults in and
zeroes 4 KB at a time (~7 GB and ~1.7M faults per full step on the Qwen2.5-0.5B shape, a third of
the step). `install_allocator` replaces torch's CPU allocator with lcsb's caching one (alloc.cpp):
each tensor of 64 KB or more is its own mapping (so nothing long-lived fragments a heap) and a
freed one is kept for the next request of its size; the engine empties that cache at the end of
each phase of a step (`release_cached`: forward, LM head, backward) and keeps at most one block's
temporaries in it (`limit_cache`), so what is held stays that close to what is used. No C++
compiler or LCSB_ALLOCATOR=0: torch's allocator, as before.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
from pathlib import Path

from . import native

M_TRIM_THRESHOLD, M_MMAP_THRESHOLD, M_ARENA_MAX = -1, -3, -8
_done = False


def tune_malloc(threshold: int = 64 * 1024, arenas: int = 2, trim: int | None = None) -> bool:
    """Fix glibc's mmap and trim thresholds and cap its arenas; False where there is no glibc.
    LCSB_MMAP_THRESHOLD, LCSB_TRIM_THRESHOLD and LCSB_ARENA_MAX (bytes, bytes, count) override."""
    global _done
    if _done:
        return True
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return False
    threshold = int(os.environ.get("LCSB_MMAP_THRESHOLD", threshold))
    trim = int(os.environ.get("LCSB_TRIM_THRESHOLD", threshold if trim is None else trim))
    arenas = int(os.environ.get("LCSB_ARENA_MAX", arenas))
    ok = all(mallopt(opt, val) == 1 for opt, val in
             ((M_MMAP_THRESHOLD, threshold), (M_TRIM_THRESHOLD, trim), (M_ARENA_MAX, arenas)))
    _done = ok
    return ok




def trim_heap() -> bool:
    """Hand the free pages of glibc's heap back to the system (malloc_trim); False where there is no glibc.
    A library cannot assume `tune_malloc` ran: after a burst of large temporaries (loading a model),
    glibc's raised thresholds keep tens of MB of freed memory resident until this is called."""
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        return bool(libc.malloc_trim(0))
    except (OSError, AttributeError):
        return False

ALLOC_SOURCE = Path(__file__).with_name("alloc.cpp")
_alloc: ctypes.CDLL | None = None
_alloc_tried = False
_STATS = ("in_use", "held", "cached", "peak_held", "maps", "hits", "unmaps")


def _build_allocator() -> ctypes.CDLL:
    import torch

    root = Path(torch.__file__).parent
    abi = int(getattr(torch._C, "_GLIBCXX_USE_CXX11_ABI", True))
    command = [os.environ.get("CXX", "c++"), "-O2", "-std=c++17", "-fPIC", "-shared",
               f"-D_GLIBCXX_USE_CXX11_ABI={abi}", "-I", str(root / "include")]
    lib = native.build(ALLOC_SOURCE, command, ["-L", str(root / "lib"), "-lc10", f"-Wl,-rpath,{root / 'lib'}"],
                       extra_key=f"torch {torch.__version__} {root}")
    lib.lcsb_alloc_install.argtypes = [ctypes.c_size_t, ctypes.c_size_t]
    lib.lcsb_alloc_install.restype = ctypes.c_int
    lib.lcsb_alloc_stats.argtypes = [ctypes.POINTER(ctypes.c_uint64)]
    lib.lcsb_alloc_limit.argtypes = [ctypes.c_size_t]
    return lib


def install_allocator(small: int = 64 * 1024, limit: int = 64 << 20) -> bool:
    """Make lcsb's caching allocator (alloc.cpp) torch's CPU allocator for the rest of the process:
    tensors of `small` bytes or more reuse freed blocks of their size; at most `limit` bytes of freed
    blocks are kept. False where it is disabled (LCSB_ALLOCATOR=0) or cannot be built (warned once).
    Call it once, early: the process owns it from then on (the CLI does)."""
    global _alloc, _alloc_tried
    if _alloc is not None or _alloc_tried:
        return _alloc is not None
    _alloc_tried = True
    lib = native.optional(_build_allocator, "LCSB_ALLOCATOR", "the caching allocator",
                          "steps will spend more time in page faults. Install a C++ compiler (c++) "
                          "or set LCSB_ALLOCATOR=0 to silence this.")
    if lib is None:
        return False
    lib.lcsb_alloc_install(small, limit)
    _alloc = lib
    return True


def limit_cache(nbytes: int) -> None:
    """Keep at most `nbytes` of freed blocks from now on (a no-op without the allocator). The
    engine sets it to what one block's temporaries need, so the cache serves them block after
    block; generation and evaluation run under whatever limit was set last."""
    if _alloc is not None:
        _alloc.lcsb_alloc_limit(int(nbytes))


def release_cached() -> None:
    """Hand the allocator's cached free blocks back to the system (a no-op without it)."""
    if _alloc is not None:
        _alloc.lcsb_alloc_release()


def packed(like, dtype=None) -> list:
    """Empty tensors shaped like the tensors `like` (of `dtype`, else theirs), sharing one allocation.

    For long-lived tensors made while a step runs: the LoRA factors, gradients and optimizer moments of
    a small model are mostly under 64 KB (Qwen2.5-0.5B at rank 16 in bfloat16: 28 KB each), so each
    would go to glibc's heap among the step's short-lived small tensors, and the holes those leave
    when freed stay resident (21-30 MB measured with bfloat16 state). Their sum is one allocation of
    its own (a mapping of the caching allocator, or glibc's mmap above its threshold)."""
    import torch
    like = list(like)
    if not like:
        return []
    flat = torch.empty(sum(t.numel() for t in like), dtype=dtype or like[0].dtype, device=like[0].device)
    out, o = [], 0
    for t in like:
        out.append(flat[o: o + t.numel()].view(t.shape))
        o += t.numel()
    return out


def allocator_stats() -> dict | None:
    """Bytes in use / held / cached / peak held by the caching allocator, and its counts of new
    mappings, reuses and unmappings; None where it is not installed."""
    if _alloc is None:
        return None
    out = (ctypes.c_uint64 * len(_STATS))()
    _alloc.lcsb_alloc_stats(out)
    return dict(zip(_STATS, (int(v) for v in out)))
