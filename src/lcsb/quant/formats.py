"""Weight formats for base Linear layers and the embedding: dense float, int8, int4, NF4.

Every format holds a [out, in] matrix and gives it back as float with `dequantize()`; the
embedding gathers rows with `rows(ids)` without decompressing the whole table.

- `int8`: symmetric per output channel, w = q * scale, q in [-127, 127]. 8 + 32/in bits.
- `int4`: group-wise affine along the input dimension, w = q * scale + bias, q in [0, 15], two
  values per byte, low nibble first. Byte for byte this is MLX's layout (MLX packs eight nibbles
  into a little-endian uint32, low nibble first; the uint8 view of that is ours), scales and biases
  [out, in / group]. 4 + 64/group bits.
- `nf4`: QLoRA's 4-bit NormalFloat: the 16 quantiles of N(0, 1) scaled to [-1, 1], group-wise
  absmax, w = code[q] * absmax. 4 + 32/group bits.

`dequantize()` bumps `STATS["dequantize"]` so tests can count decompressions; it and `row_block()`
can write into a caller's buffer (`out=`), and use the compiled kernel of kernels.py for float32
on the CPU (the torch code otherwise, with the same results). `quantize()` works
through the rows `CHUNK_ELEMENTS` elements at a time: every format is row-wise, so the result is
the same, and a 150k-row embedding needs tens of MB of temporaries instead of a few GB.
"""

from __future__ import annotations

from typing import Callable

import torch

from ..errors import UserError
from . import kernels

STATS = {"dequantize": 0}
CHUNK_ELEMENTS = 1 << 20          # elements quantized at a time (4 MB of float32)

# The NF4 code book as published with QLoRA (bitsandbytes' create_normal_map, offset 0.9677).
NF4_CODE = torch.tensor([
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
], dtype=torch.float32)


class Weight:
    """A [out, in] matrix in some storage format."""

    fmt = ""
    group_size = 0

    def __init__(self, shape: tuple[int, int]):
        self.shape = tuple(shape)

    def dequantize(self, dtype: torch.dtype = torch.float32, out: torch.Tensor | None = None) -> torch.Tensor:
        """The float [out, in] matrix, written into `out` when given (a reusable buffer)."""
        STATS["dequantize"] += 1
        return self._block(0, self.shape[0], dtype, out)

    def row_block(self, lo: int, hi: int, dtype: torch.dtype = torch.float32,
                  out: torch.Tensor | None = None) -> torch.Tensor:
        """Rows lo:hi as float [hi - lo, in]: a slice of the storage, no gather (the LM head's chunks)."""
        return self._block(lo, hi, dtype, out)

    def row_slices(self, dtype: torch.dtype = torch.float32):
        """The matrix as consecutive float row slices of about CHUNK_ELEMENTS elements, `release()`d after
        each: a streamed read that holds neither the float matrix nor the stored one whole (recompressing,
        converting)."""
        for rows in _row_chunks(self.shape):
            yield self._block(rows.start, min(rows.stop, self.shape[0]), dtype, None)
            self.release()

    def _block(self, lo: int, hi: int, dtype: torch.dtype, out: torch.Tensor | None) -> torch.Tensor:
        raise NotImplementedError

    def stored_as(self, dtype: torch.dtype) -> torch.Tensor | None:
        """The matrix itself when it is already stored as float `dtype` (nothing to decompress), else None."""
        return None

    def rows(self, ids: torch.Tensor, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        """Dequantized rows `ids` (any shape) -> [*ids.shape, in]."""
        raise NotImplementedError

    def release(self) -> None:
        """Drop whatever the weight keeps resident beyond its storage (file-backed pages); a no-op in RAM."""

    def with_rows(self, tensors: dict[str, torch.Tensor]) -> "Weight":
        """A weight of this format holding the rows given as storage tensors (the rows a gather read)."""
        n = next(iter(tensors.values())).shape[0]
        return weight_from_tensors(self.fmt, tensors, (n, self.shape[1]), self.group_size)

    def tensors(self) -> dict[str, torch.Tensor]:
        """Storage tensors by suffix ("weight", "scales", ...), as written to safetensors."""
        raise NotImplementedError

    def map(self, fn: Callable[[torch.Tensor], torch.Tensor]) -> "Weight":
        """The same weight with `fn` applied to every storage tensor (device moves)."""
        return weight_from_tensors(self.fmt, {k: fn(v) for k, v in self.tensors().items()}, self.shape, self.group_size)

    @property
    def nbytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in self.tensors().values())

    @property
    def bits_per_param(self) -> float:
        return 8.0 * self.nbytes / (self.shape[0] * self.shape[1])

    def __repr__(self):
        return f"{type(self).__name__}{self.shape}"


class Dense(Weight):
    fmt = "dense"

    def __init__(self, w: torch.Tensor):
        super().__init__(w.shape)
        self.w = w

    def _block(self, lo, hi, dtype, out):
        return _into(out, self.w[lo:hi].to(dtype))

    def stored_as(self, dtype):
        return self.w if self.w.dtype == dtype else None

    def rows(self, ids, dtype=torch.float32):
        return self.w[ids].to(dtype)

    def tensors(self):
        return {"weight": self.w}


class Int8(Weight):
    fmt = "int8"

    def __init__(self, q: torch.Tensor, scale: torch.Tensor):
        super().__init__(q.shape)
        self.q, self.scale = q, scale               # int8 [out, in], float32 [out]

    @classmethod
    def quantize(cls, w: torch.Tensor) -> "Int8":
        q = torch.empty(w.shape, dtype=torch.int8, device=w.device)
        scale = torch.empty(w.shape[0], dtype=torch.float32, device=w.device)
        for rows in _row_chunks(w.shape):
            x = w[rows].float()
            s = x.abs().amax(dim=1).clamp_min(1e-12) / 127.0
            q[rows] = torch.round(x / s[:, None]).clamp_(-127, 127)
            scale[rows] = s
        return cls(q, scale)

    def _block(self, lo, hi, dtype, out):
        q, scale = self.q[lo:hi], self.scale[lo:hi]
        buf = out if out is not None else _kernel_buffer(q.shape[0], self.shape[1], dtype, q.device)
        if buf is not None and kernels.dequantize("int8", q, scale, None, buf):
            return buf
        return _into(out, q.to(dtype).mul_(scale[:, None].to(dtype)))

    def rows(self, ids, dtype=torch.float32):
        return self.q[ids].to(dtype).mul_(self.scale[ids][..., None].to(dtype))

    def tensors(self):
        return {"weight": self.q, "scales": self.scale}


def _into(out: torch.Tensor | None, t: torch.Tensor) -> torch.Tensor:
    """`t`, or `out` filled with it."""
    return t if out is None else out.copy_(t)


def _kernel_buffer(rows: int, cols: int, dtype: torch.dtype, device: torch.device) -> torch.Tensor | None:
    """A new output buffer where the compiled kernel can fill it (float32 on the CPU), else None."""
    if dtype != torch.float32 or device.type != "cpu" or kernels.library() is None:
        return None
    return torch.empty(rows, cols, dtype=dtype)


def _pack_nibbles(q: torch.Tensor) -> torch.Tensor:
    """[out, in] values 0..15 -> [out, in/2] uint8, element 2k in the low nibble."""
    q = q.to(torch.uint8)
    return q[:, 0::2] | (q[:, 1::2] << 4)


def _unpack_nibbles(p: torch.Tensor) -> torch.Tensor:
    """[..., in/2] uint8 -> [..., in] uint8 values 0..15."""
    return torch.stack((p & 0x0F, p >> 4), dim=-1).flatten(-2)


def _row_chunks(shape):
    """Row slices of about CHUNK_ELEMENTS elements covering a [out, in] matrix."""
    step = max(1, CHUNK_ELEMENTS // max(1, shape[1]))
    return [slice(a, a + step) for a in range(0, shape[0], step)]


def check_group_size(group_size, fmt: str):
    """A group size must be a positive even integer (nibbles pair up inside a group)."""
    if isinstance(group_size, bool) or not isinstance(group_size, int) or group_size <= 0 or group_size % 2:
        raise UserError(f"{fmt}: group size {group_size!r} is not a positive even integer; use 32, 64 or 128")


def _check_groups(shape, group_size: int, fmt: str):
    check_group_size(group_size, fmt)
    if shape[1] % group_size:
        raise UserError(f"{fmt}: input dimension {shape[1]} is not a multiple of the group size {group_size}; "
                        "choose a --group-size that divides it (32, 64 or 128)")


class Int4(Weight):
    fmt = "int4"

    def __init__(self, packed: torch.Tensor, scales: torch.Tensor, biases: torch.Tensor, group_size: int):
        super().__init__((packed.shape[0], packed.shape[1] * 2))
        self.packed, self.scales, self.biases = packed, scales, biases   # uint8 [o, i/2], f32 [o, i/g] x2
        self.group_size = group_size

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = 64) -> "Int4":
        _check_groups(w.shape, group_size, "int4")
        out, inp = w.shape
        packed = torch.empty(out, inp // 2, dtype=torch.uint8, device=w.device)
        scales = torch.empty(out, inp // group_size, dtype=torch.float32, device=w.device)
        biases = torch.empty_like(scales)
        for rows in _row_chunks(w.shape):
            g = w[rows].float().unflatten(-1, (-1, group_size))
            lo, hi = g.amin(dim=-1), g.amax(dim=-1)
            scale = ((hi - lo) / 15.0).clamp_min(1e-12)
            q = torch.round((g - lo[..., None]) / scale[..., None]).clamp_(0, 15).flatten(-2)
            packed[rows], scales[rows], biases[rows] = _pack_nibbles(q), scale, lo
        return cls(packed, scales, biases, group_size)

    def _groups(self, packed, scales, biases, dtype):
        # w = q * scale + bias, in place on the one full-size temporary
        q = _unpack_nibbles(packed).to(dtype).unflatten(-1, (-1, self.group_size))
        return q.mul_(scales[..., None].to(dtype)).add_(biases[..., None].to(dtype)).flatten(-2)

    def _block(self, lo, hi, dtype, out):
        packed, scales, biases = self.packed[lo:hi], self.scales[lo:hi], self.biases[lo:hi]
        buf = out if out is not None else _kernel_buffer(packed.shape[0], self.shape[1], dtype, packed.device)
        if buf is not None and kernels.dequantize("int4", packed, scales, biases, buf, self.group_size):
            return buf
        return _into(out, self._groups(packed, scales, biases, dtype))

    def rows(self, ids, dtype=torch.float32):
        return self._groups(self.packed[ids], self.scales[ids], self.biases[ids], dtype)

    def tensors(self):
        return {"weight": self.packed, "scales": self.scales, "biases": self.biases}


class NF4(Weight):
    fmt = "nf4"

    def __init__(self, packed: torch.Tensor, absmax: torch.Tensor, group_size: int):
        super().__init__((packed.shape[0], packed.shape[1] * 2))
        self.packed, self.absmax = packed, absmax                         # uint8 [o, i/2], f32 [o, i/g]
        self.group_size = group_size

    @classmethod
    def quantize(cls, w: torch.Tensor, group_size: int = 64) -> "NF4":
        _check_groups(w.shape, group_size, "nf4")
        out, inp = w.shape
        packed = torch.empty(out, inp // 2, dtype=torch.uint8, device=w.device)
        absmax = torch.empty(out, inp // group_size, dtype=torch.float32, device=w.device)
        # nearest code: the code book is sorted, so compare with the midpoints between neighbours
        mids = ((NF4_CODE[1:] + NF4_CODE[:-1]) / 2).to(w.device)
        for rows in _row_chunks(w.shape):
            g = w[rows].float().unflatten(-1, (-1, group_size))
            m = g.abs().amax(dim=-1).clamp_min(1e-12)
            packed[rows] = _pack_nibbles(torch.bucketize((g / m[..., None]).flatten(-2), mids))
            absmax[rows] = m
        return cls(packed, absmax, group_size)

    def _groups(self, packed, absmax, dtype):
        # one table lookup per byte gives both codes (low nibble first), then scale in place
        pairs = _NF4_PAIRS.to(device=packed.device, dtype=dtype)
        v = pairs.index_select(0, packed.reshape(-1).int()).view(*packed.shape[:-1], -1, self.group_size)
        return v.mul_(absmax[..., None].to(dtype)).flatten(-2)

    def _block(self, lo, hi, dtype, out):
        packed, absmax = self.packed[lo:hi], self.absmax[lo:hi]
        buf = out if out is not None else _kernel_buffer(packed.shape[0], self.shape[1], dtype, packed.device)
        if buf is not None and kernels.dequantize("nf4", packed, absmax, NF4_CODE, buf, self.group_size):
            return buf
        return _into(out, self._groups(packed, absmax, dtype))

    def rows(self, ids, dtype=torch.float32):
        return self._groups(self.packed[ids], self.absmax[ids], dtype)

    def tensors(self):
        return {"weight": self.packed, "absmax": self.absmax}


# byte -> (code of the low nibble, code of the high nibble)
_NF4_PAIRS = NF4_CODE[torch.stack((torch.arange(256) & 0x0F, torch.arange(256) >> 4), dim=-1)]

FORMATS = ("int8", "int4", "nf4")


def quantize(w: torch.Tensor, fmt: str | None, group_size: int = 64) -> Weight:
    """Compress a float [out, in] matrix; fmt None keeps it dense."""
    if fmt is None or fmt == "dense":
        return Dense(w)
    if fmt == "int8":
        return Int8.quantize(w)
    if fmt == "int4":
        return Int4.quantize(w, group_size)
    if fmt == "nf4":
        return NF4.quantize(w, group_size)
    raise UserError(f"unknown quantization {fmt!r}: choose one of {', '.join(FORMATS)}")


def weight_from_tensors(fmt: str, t: dict[str, torch.Tensor], shape, group_size: int = 0) -> Weight:
    """Rebuild a Weight from its storage tensors (the inverse of `Weight.tensors()`)."""
    if fmt == "dense":
        return Dense(t["weight"])
    if fmt == "int8":
        return Int8(t["weight"], t["scales"])
    if fmt == "int4":
        return Int4(t["weight"], t["scales"], t["biases"], group_size)
    if fmt == "nf4":
        return NF4(t["weight"], t["absmax"], group_size)
    raise UserError(f"unknown weight format {fmt!r}: expected dense, {', '.join(FORMATS)}")
