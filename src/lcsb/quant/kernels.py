"""The compiled dequantization kernel (dequant.c), built on first use, with torch as the fallback.

Decompression is where a MeBP step loses its time: in torch ops an int4 weight is unpacked,
converted and scaled in four passes over fresh memory (~65 ms for one Qwen2.5-0.5B block on this
2-core machine). dequant.c does it in one threaded pass into a buffer the caller reuses.

The library is compiled with the system C compiler (`cc`, or $CC) the first time it is needed and
cached (lcsb.native: $LCSB_CACHE or ~/.cache/lcsb, keyed by source, flags and CPU). No compiler, a
failed build or LCSB_KERNELS=0 selects the torch code; the results are the same bit for bit either
way (tests/test_kernels.py compares them).
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path

import torch

from .. import native

SOURCE = Path(__file__).with_name("dequant.c")
FLAGS = ["-O3", "-march=native", "-ffp-contract=off", "-fPIC", "-shared", "-pthread"]
KINDS = {"int4": 0, "nf4": 1, "int8": 2}

_lib: ctypes.CDLL | None = None
_tried = False


def _build() -> ctypes.CDLL:
    lib = native.build(SOURCE, [os.environ.get("CC", "cc"), *FLAGS])
    f = lib.lcsb_dequant
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_void_p,
                  ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_int]
    f.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded kernel library, or None (disabled, or it could not be built: warned once)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    _lib = native.optional(_build, "LCSB_KERNELS", "the dequantization kernel",
                           "using the slower torch code. Install a C compiler (cc) or set LCSB_KERNELS=0 "
                           "to silence this.")
    return _lib


def _usable(*tensors: torch.Tensor) -> bool:
    return all(t.device.type == "cpu" and t.is_contiguous() for t in tensors)


def _check_sizes(kind: str, q, s, b, rows: int, cols: int, group: int):
    """The C kernel reads exactly these many bytes from each buffer: anything else would read past a tensor's
    end (or leave rows unwritten), so a mismatch is refused here rather than trusted."""
    if kind not in KINDS:
        raise ValueError(f"dequantize: unknown kind {kind!r}")
    if kind == "int8":
        want = {"q": (q, rows * cols), "s": (s, rows * 4)}
    else:
        if group <= 0 or group % 2 or cols % group:
            raise ValueError(f"dequantize {kind}: group {group} must be even and divide cols {cols}")
        want = {"q": (q, rows * cols // 2), "s": (s, rows * (cols // group) * 4)}
        if b is None:
            raise ValueError(f"dequantize {kind}: needs {'biases' if kind == 'int4' else 'the code book'}")
        want["b"] = (b, rows * (cols // group) * 4 if kind == "int4" else 16 * 4)
    for name, (t, nbytes) in want.items():
        got = t.numel() * t.element_size()
        if got != nbytes:
            raise ValueError(f"dequantize {kind} [{rows}, {cols}] (group {group}): {name} holds {got} bytes, "
                             f"the kernel would read {nbytes}")


def dequantize(kind: str, q: torch.Tensor, s: torch.Tensor, b: torch.Tensor | None, out: torch.Tensor,
               group: int = 0) -> bool:
    """Write the float32 [rows, cols] matrix into `out` with the kernel; False where the kernel is
    unavailable or the tensors do not suit it (the caller then uses torch)."""
    lib = library()
    if lib is None or out.dtype != torch.float32 or not _usable(q, s, out) or (b is not None and not _usable(b)):
        return False
    if s.dtype != torch.float32 or (b is not None and b.dtype != torch.float32):
        return False
    rows, cols = out.shape
    _check_sizes(kind, q, s, b, rows, cols, group)
    lib.lcsb_dequant(KINDS[kind], q.data_ptr(), s.data_ptr(), b.data_ptr() if b is not None else None,
                     out.data_ptr(), rows, cols, group, torch.get_num_threads())
    return True
