"""Weights in ggml's block types (the matrices of a GGUF file), decompressed a row block at a time.

Design note. A ggml matrix [out, in] is stored row by row (ne0 = in is contiguous); a row is
in / block_size blocks of type_size bytes, each decoding to block_size values on its own:
- F32, F16, BF16: one value per "block";
- Q4_0, Q5_0, Q8_0 (32 values): an f16 scale d, then 4, 5 or 8-bit codes; w = d * (q - 8 | 16 | 0);
- Q4_1, Q5_1 (32 values): f16 d and m, codes q >= 0; w = d * q + m;
- K-quants (256 values, a "super-block" of 16 or 8 sub-blocks): an f16 d (and dmin) and per
  sub-block 4, 6 or 8-bit scales (and mins); Q2_K/Q4_K/Q5_K: w = (d * sc) * q - dmin * m,
  Q3_K/Q6_K: w = (d * sc) * q with signed q.
The byte layouts are gguf-py's (gguf/quants.py), whose numpy dequantization is llama.cpp's reference
and is the oracle of tests/test_ggml.py.

Bit-identical. Both paths here, the compiled kernel (ggml.c, float32 on the CPU, threaded over rows)
and the torch code (any device or dtype), compute what gguf-py computes, float32 operation for
operation in its order, each product and sum rounded on its own (no fused multiply-add): the
numbers a model trains on are the ones llama.cpp's tools and transformers' GGUF loader see, so a
comparison with either is exact, and switching paths (LCSB_KERNELS=0, no compiler) changes nothing.

Speed (one core): the kernel decodes Q4_0, Q4_1 and Q8_0 about as fast per weight as formats.Int4's
kernel (0.1 ns), Q4_K/Q2_K/Q5_K within 1.5x, Q5_0/Q5_1/Q6_K about 2x and Q3_K about 3x; the torch
code is 20-70x slower. `rows(ids)` gathers the compressed rows first, so an embedding lookup decodes
only the rows asked for.

The table of types is our own, so that reading a model needs no gguf package; a type we do not
decode (the IQ*, TQ* ... families) is refused by name, with the ones that work.
"""

from __future__ import annotations

import ctypes
import os
from pathlib import Path
from typing import Callable

import torch

from .. import native
from ..errors import UserError
from .formats import Weight
from . import kernels

# ggml type id -> (name, block size, type size in bytes): gguf-py's GGML_QUANT_SIZES
TYPES = {
    0: ("F32", 1, 4), 1: ("F16", 1, 2), 2: ("Q4_0", 32, 18), 3: ("Q4_1", 32, 20), 6: ("Q5_0", 32, 22),
    7: ("Q5_1", 32, 24), 8: ("Q8_0", 32, 34), 9: ("Q8_1", 32, 40), 10: ("Q2_K", 256, 84), 11: ("Q3_K", 256, 110),
    12: ("Q4_K", 256, 144), 13: ("Q5_K", 256, 176), 14: ("Q6_K", 256, 210), 15: ("Q8_K", 256, 292),
    16: ("IQ2_XXS", 256, 66), 17: ("IQ2_XS", 256, 74), 18: ("IQ3_XXS", 256, 98), 19: ("IQ1_S", 256, 50),
    20: ("IQ4_NL", 32, 18), 21: ("IQ3_S", 256, 110), 22: ("IQ2_S", 256, 82), 23: ("IQ4_XS", 256, 136),
    24: ("I8", 1, 1), 25: ("I16", 1, 2), 26: ("I32", 1, 4), 27: ("I64", 1, 8), 28: ("F64", 1, 8),
    29: ("IQ1_M", 256, 56), 30: ("BF16", 1, 2), 34: ("TQ1_0", 256, 54), 35: ("TQ2_0", 256, 66),
    39: ("MXFP4", 32, 17), 40: ("NVFP4", 64, 36), 41: ("Q1_0", 128, 18),
}
TYPE_IDS = {name: t for t, (name, _, _) in TYPES.items()}
SUPPORTED = ("F32", "F16", "BF16", "Q4_0", "Q4_1", "Q5_0", "Q5_1", "Q8_0", "Q2_K", "Q3_K", "Q4_K", "Q5_K", "Q6_K")
FLOAT_TYPES = {"F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16}

SOURCE = Path(__file__).with_name("ggml.c")

_lib: ctypes.CDLL | None = None
_tried = False


def type_name(ggml_type: int) -> str:
    return TYPES[ggml_type][0] if ggml_type in TYPES else f"type {ggml_type}"


def _check_type(ggml_type: int, where: str) -> tuple[str, int, int]:
    """(name, block size, type size) of a type we decode, else a UserError naming it."""
    name = type_name(ggml_type)
    if name not in SUPPORTED:
        raise UserError(f"{where}: ggml type {name} is not supported; lcsb decodes {', '.join(SUPPORTED)}: "
                        "quantize the model to one of those (e.g. llama-quantize ... Q4_K_M)")
    return TYPES[ggml_type]


def tensor_nbytes(ggml_type: int, ne, where: str = "ggml tensor") -> int:
    """Bytes of a tensor of ggml dimensions `ne` (ne0 first) in type `ggml_type` (any known type)."""
    if ggml_type not in TYPES:
        raise UserError(f"{where}: unknown ggml type {ggml_type}; the file is corrupt or newer than this lcsb")
    name, bs, ts = TYPES[ggml_type]
    ne = [int(n) for n in ne] or [1]
    if ne[0] % bs:
        raise UserError(f"{where}: row length {ne[0]} is not a multiple of {name}'s block size {bs}; "
                        "the file is corrupt")
    n = ne[0] // bs * ts
    for d in ne[1:]:
        n *= d
    return n


# ---- the compiled kernel -------------------------------------------------------------------------

def _build() -> ctypes.CDLL:
    lib = native.build(SOURCE, [os.environ.get("CC", "cc"), *kernels.FLAGS])
    f = lib.lcsb_ggml_dequant
    f.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p, ctypes.c_int64, ctypes.c_int64, ctypes.c_int64,
                  ctypes.c_int]
    f.restype = ctypes.c_int
    return lib


def library() -> ctypes.CDLL | None:
    """The loaded ggml kernel, or None (LCSB_KERNELS=0, or it could not be built: warned once)."""
    global _lib, _tried
    if _tried:
        return _lib
    _tried = True
    _lib = native.optional(_build, "LCSB_KERNELS", "the ggml dequantization kernel",
                           "using the slower torch code. Install a C compiler (cc) or set LCSB_KERNELS=0 "
                           "to silence this.")
    return _lib


def kernel_dequantize(ggml_type: int, data: torch.Tensor, out: torch.Tensor) -> bool:
    """Decode raw rows `data` (uint8 [rows, row_bytes]) into float32 `out` [rows, cols] with the kernel;
    False where the kernel is unavailable or the tensors do not suit it (the caller then uses torch)."""
    lib = library()
    if lib is None or TYPES.get(ggml_type, ("",))[0] not in SUPPORTED:
        return False
    if data.dtype != torch.uint8 or out.dtype != torch.float32 or data.dim() != 2 or out.dim() != 2:
        return False
    if data.device.type != "cpu" or out.device.type != "cpu" or not (data.is_contiguous() and out.is_contiguous()):
        return False
    _, bs, ts = TYPES[ggml_type]
    rows, cols = out.shape
    if data.shape[0] != rows or cols % bs or data.shape[1] != cols // bs * ts:
        return False
    if rows and cols:
        lib.lcsb_ggml_dequant(ggml_type, data.data_ptr(), out.data_ptr(), rows, cols, data.shape[1],
                              torch.get_num_threads())
    return True


# ---- the torch code ------------------------------------------------------------------------------

def _half_to_float(h: torch.Tensor) -> torch.Tensor:
    """f16 bit patterns (int16) -> float32, exactly as numpy widens them, NaN payloads included (torch's
    own conversion quiets signalling NaNs): rebias the exponent, fix up Inf/NaN and subnormals (rebuilt
    exactly by one subtraction), as ggml.c does."""
    h = h.to(torch.int32) & 0xFFFF
    o = (h & 0x7FFF) << 13
    exp = o & (0x7C00 << 13)
    o = o + (112 << 23)
    o = torch.where(exp == 0x7C00 << 13, o + (112 << 23), o)                       # Inf / NaN
    sub = (o + (1 << 23)).view(torch.float32) - 2.0 ** -14                          # zero / subnormal
    o = torch.where(exp == 0, sub.view(torch.int32), o)
    return (o | ((h & 0x8000) << 16)).view(torch.float32)


def _f16(b: torch.Tensor, at: int) -> torch.Tensor:
    """The f16 field at byte `at` of every block [n, type_size] -> float32 [n, 1] (exact)."""
    return _half_to_float(b[:, at:at + 2].contiguous().view(torch.int16))


def _shifts(*s: int, like: torch.Tensor) -> torch.Tensor:
    return torch.tensor(s, dtype=torch.uint8, device=like.device)


def _nibbles(qs: torch.Tensor, width: int) -> torch.Tensor:
    """[n, m] bytes -> [n, 2m]: for each run of `width` bytes, their low nibbles then their high ones."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, width) >> _shifts(0, 4, like=qs).view(1, 1, 2, 1)
    return (q & 15).reshape(n, -1)


def _crumbs(qs: torch.Tensor) -> torch.Tensor:
    """[n, 64] bytes -> [n, 256] 2-bit values: per 32 bytes, bits 0-1 of each, then 2-3, 4-5, 6-7."""
    n = qs.shape[0]
    q = qs.reshape(n, -1, 1, 32) >> _shifts(0, 2, 4, 6, like=qs).view(1, 1, 4, 1)
    return (q & 3).reshape(n, -1)


def _bits(qh: torch.Tensor, width: int) -> torch.Tensor:
    """[n, m] bytes -> [n, 8m] bits: width 1 is little-endian bit order (bit j of byte j // 8);
    width m is bit b of every byte, then bit b + 1 (K-quants' high-bit planes)."""
    n = qh.shape[0]
    sh = _shifts(*range(8), like=qh)
    q = qh.reshape(n, -1, 1, 1) >> sh.view(1, 1, 8, 1) if width == 1 else \
        qh.reshape(n, -1, 1, width) >> sh.view(1, 1, 8, 1)
    return (q & 1).reshape(n, -1)


def _scale_min_k4(s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """Q4_K/Q5_K's 12 bytes [n, 12] -> six-bit scales and mins [n, 8] (gguf-py's get_scale_min)."""
    d, m, md = s[:, 0:4], s[:, 4:8], s[:, 8:12]
    sc = torch.cat((d & 0x3F, (md & 0x0F) | ((d >> 2) & 0x30)), dim=1)
    mn = torch.cat((m & 0x3F, (md >> 4) | ((m >> 2) & 0x30)), dim=1)
    return sc, mn


def _decode_blocks(name: str, b: torch.Tensor) -> torch.Tensor:
    """Blocks [n, type_size] uint8 -> float32 [n, block_size], gguf-py's arithmetic op for op."""
    n = b.shape[0]
    if name == "Q4_0":
        return _f16(b, 0) * (_nibbles(b[:, 2:], 16).to(torch.int16) - 8).float()
    if name == "Q4_1":
        return _f16(b, 0) * _nibbles(b[:, 4:], 16).float() + _f16(b, 2)
    if name in ("Q5_0", "Q5_1"):
        at = 2 if name == "Q5_0" else 4
        q = (_nibbles(b[:, at + 4:], 16) | (_bits(b[:, at:at + 4], 1) << 4)).to(torch.int16)
        if name == "Q5_0":
            return _f16(b, 0) * (q - 16).float()
        return _f16(b, 0) * q.float() + _f16(b, 2)
    if name == "Q8_0":
        return b[:, 2:].contiguous().view(torch.int8).float() * _f16(b, 0)
    if name == "Q2_K":
        sc, d, dmin = b[:, :16], _f16(b, 80), _f16(b, 82)
        dl, ml = d * (sc & 15).float(), dmin * (sc >> 4).float()                 # [n, 16]
        q = _crumbs(b[:, 16:80]).float().view(n, 16, 16)
        return (dl[..., None] * q - ml[..., None]).view(n, 256)
    if name == "Q3_K":
        s, d = b[:, 96:108], _f16(b, 108)
        lo = (s[:, :8].reshape(n, 1, 8) >> _shifts(0, 4, like=b).view(1, 2, 1)).reshape(n, 16)
        hi = (s[:, 8:].reshape(n, 1, 4) >> _shifts(0, 2, 4, 6, like=b).view(1, 4, 1)).reshape(n, 16)
        sc = ((lo & 15) | ((hi & 3) << 4)).to(torch.int16) - 32
        dl = (d * sc.float()).view(n, 16, 1)
        q = _crumbs(b[:, 32:96]).to(torch.int16) - ((_bits(b[:, :32], 32) ^ 1) << 2).to(torch.int16)
        return (dl * q.float().view(n, 16, 16)).view(n, 256)
    if name in ("Q4_K", "Q5_K"):
        d, dmin = _f16(b, 0), _f16(b, 2)
        sc, mn = _scale_min_k4(b[:, 4:16])
        dl, ml = (d * sc.float()).view(n, 8, 1), (dmin * mn.float()).view(n, 8, 1)
        q = _nibbles(b[:, 16:], 32) if name == "Q4_K" else _nibbles(b[:, 48:], 32) | (_bits(b[:, 16:48], 32) << 4)
        return (dl * q.float().view(n, 8, 32) - ml).view(n, 256)
    if name == "Q6_K":
        sc, d = b[:, 192:208].contiguous().view(torch.int8).float(), _f16(b, 208)
        dl = (d * sc).view(n, 16, 1)
        q = (_nibbles(b[:, :128], 64) | (_crumbs(b[:, 128:192]) << 4)).to(torch.int16) - 32
        return (dl * q.float().view(n, 16, 16)).view(n, 256)
    raise AssertionError(name)


def torch_dequantize(ggml_type: int, data: torch.Tensor) -> torch.Tensor:
    """Raw rows (uint8 [rows, row_bytes], any device) -> float32 [rows, cols], as gguf-py decodes them."""
    name, _, ts = _check_type(ggml_type, "ggml tensor")
    rows = data.shape[0]
    if name in FLOAT_TYPES:
        if name == "F32":
            return data.contiguous().view(torch.float32).clone()
        v = data.contiguous().view(torch.int16)
        if name == "BF16":                          # gguf-py: int16 -> int32 << 16, viewed as float32 (exact)
            return (v.to(torch.int32) << 16).view(torch.float32)
        return _half_to_float(v)
    blocks = data.reshape(-1, ts)
    return _decode_blocks(name, blocks).reshape(rows, -1)


# ---- the weight ----------------------------------------------------------------------------------

class GGMLWeight(Weight):
    """A [out, in] matrix in one ggml type: `data` is its raw bytes, uint8 [out, in / block * type_size]."""

    fmt = "gguf"

    def __init__(self, data: torch.Tensor, ggml_type: int, shape: tuple[int, int], where: str = "ggml tensor"):
        super().__init__(shape)
        ggml_type = int(ggml_type)
        name, bs, ts = _check_type(ggml_type, where)
        out, inp = self.shape
        if inp % bs:
            raise UserError(f"{where}: row length {inp} is not a multiple of {name}'s block size {bs}; "
                            "the tensor's shape or type is wrong")
        if data.dtype != torch.uint8 or tuple(data.shape) != (out, inp // bs * ts):
            raise UserError(f"{where}: {name} [{out}, {inp}] needs uint8 bytes [{out}, {inp // bs * ts}], got "
                            f"{data.dtype} {list(data.shape)}; the tensor's shape or type is wrong")
        self.data, self.ggml_type, self.where = data, ggml_type, where
        self.fmt = f"gguf-{name.lower()}"

    @property
    def type_name(self) -> str:
        return type_name(self.ggml_type)

    @property
    def is_float(self) -> bool:
        return self.type_name in FLOAT_TYPES

    def _decode(self, raw: torch.Tensor, dtype: torch.dtype, out: torch.Tensor | None, fresh: bool) -> torch.Tensor:
        """Raw rows [n, row_bytes] -> float [n, in], into `out` when given; `fresh`: `raw` is a copy
        of ours to keep (else a float type's result is copied: the storage itself is never handed out)."""
        n, cols = raw.shape[0], self.shape[1]
        if dtype == torch.float32 and raw.device.type == "cpu" and library() is not None:
            buf = out if out is not None else torch.empty(n, cols, dtype=torch.float32)
            if kernel_dequantize(self.ggml_type, raw.contiguous(), buf):
                return buf
        if self.type_name in FLOAT_TYPES and FLOAT_TYPES[self.type_name] == dtype:
            w = raw.contiguous().view(dtype)
        else:
            w = torch_dequantize(self.ggml_type, raw).to(dtype)
        if out is not None:
            return out.copy_(w)
        return w.clone() if not fresh and w.data_ptr() == raw.data_ptr() else w

    def _block(self, lo, hi, dtype, out):
        return self._decode(self.data[lo:hi], dtype, out, fresh=False)

    def rows(self, ids, dtype=torch.float32):
        # gather the compressed rows first: an embedding lookup never decodes the table
        raw = self.data[ids.reshape(-1)]
        return self._decode(raw, dtype, None, fresh=True).view(*ids.shape, self.shape[1])

    def stored_as(self, dtype):
        if FLOAT_TYPES.get(self.type_name) != dtype:
            return None
        try:
            return self.data.view(dtype)                                # zero-copy [out, in]
        except RuntimeError:                                            # misaligned or strided bytes
            return None

    def tensors(self):
        return {"weight": self.data}

    def with_rows(self, tensors):
        data = tensors["weight"]
        return GGMLWeight(data, self.ggml_type, (data.shape[0], self.shape[1]), where=self.where)

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "GGMLWeight":
        return GGMLWeight(fn(self.data), self.ggml_type, self.shape, where=self.where)


# ---- quantizing (tests, tiny models) -------------------------------------------------------------

def quantize_q8_0(w: torch.Tensor) -> torch.Tensor:
    """Float rows [out, in] -> Q8_0 bytes [out, in / 32 * 34] (llama.cpp's rounding: gguf-py's quantize)."""
    out, inp = w.shape
    if inp % 32:
        raise UserError(f"Q8_0: row length {inp} is not a multiple of 32")
    x = w.detach().float().cpu().reshape(-1, 32)
    d = x.abs().amax(dim=1, keepdim=True) / 127
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    y = x * inv
    a = y.abs()
    q = torch.sign(y) * (a.floor() + (2 * (a - a.floor())).floor())   # round half away from zero
    blocks = torch.cat((d.half().view(torch.uint8), q.to(torch.int8).view(torch.uint8)), dim=1)
    return blocks.reshape(out, -1)


def quantize_q4_0(w: torch.Tensor) -> torch.Tensor:
    """Float rows [out, in] -> Q4_0 bytes [out, in / 32 * 18] (gguf-py's quantize: d = max / -8)."""
    out, inp = w.shape
    if inp % 32:
        raise UserError(f"Q4_0: row length {inp} is not a multiple of 32")
    x = w.detach().float().cpu().reshape(-1, 32)
    m = x.gather(1, x.abs().argmax(dim=1, keepdim=True))
    d = m / -8
    inv = torch.where(d == 0, torch.zeros_like(d), 1 / d)
    q = torch.trunc(x * inv + 8.5).clamp(0, 15).to(torch.uint8)       # gguf-py: trunc, to uint8, then clip
    blocks = torch.cat((d.half().view(torch.uint8), q[:, :16] | (q[:, 16:] << 4)), dim=1)
    return blocks.reshape(out, -1)
