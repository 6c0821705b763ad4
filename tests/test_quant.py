"""lcsb.quant.formats against the formulas: error bounds, the NF4 code book, MLX's int4 packing.

Every reference here is written out independently of the module under test: the published NF4
values, bitsandbytes' quantile construction, MLX's uint32 nibble order, the bits-per-parameter
arithmetic.
"""

from __future__ import annotations

import pytest
import torch

from lcsb.errors import UserError
from lcsb.quant import formats
from lcsb.quant.formats import NF4, Dense, Int4, Int8, quantize, weight_from_tensors

GROUPS = (32, 64, 128)


# QLoRA's NF4 data type as published (Dettmers et al. 2023, appendix E; bitsandbytes functional.py).
QLORA_NF4 = [
    -1.0, -0.6961928009986877, -0.5250730514526367, -0.39491748809814453,
    -0.28444138169288635, -0.18477343022823334, -0.09105003625154495, 0.0,
    0.07958029955625534, 0.16093020141124725, 0.24611230194568634, 0.33791524171829224,
    0.44070982933044434, 0.5626170039176941, 0.7229568362236023, 1.0,
]


def weights(kind: str, out: int, inp: int, seed: int) -> torch.Tensor:
    """Fresh random [out, in] matrices: Gaussian, Student-t (heavy tails), Gaussian with outliers."""
    g = torch.Generator().manual_seed(seed)
    if kind == "normal":
        return torch.randn(out, inp, generator=g) * 0.02
    if kind == "student":
        # t with 3 degrees of freedom: z / sqrt(chi2_3 / 3)
        z = torch.randn(out, inp, generator=g, dtype=torch.float64)
        chi2 = torch.randn(3, out, inp, generator=g, dtype=torch.float64).pow(2).sum(0)
        return (z / (chi2 / 3).sqrt() * 0.02).float()
    if kind == "outliers":
        w = torch.randn(out, inp, generator=g) * 0.02
        idx = torch.randint(0, out * inp, (max(1, out * inp // 500),), generator=g)
        w.view(-1)[idx] = torch.randn(idx.numel(), generator=g) * 2.0
        return w
    raise ValueError(kind)


KINDS = ("normal", "student", "outliers")


def slack(w: torch.Tensor) -> float:
    # float32 rounding in (w - lo) / scale and q * scale + lo
    return 4 * torch.finfo(torch.float32).eps * w.abs().max().item()


# ---- error bounds -------------------------------------------------------------------------------

@pytest.mark.parametrize("kind", KINDS)
def test_int8_error_within_half_a_step_per_row(kind):
    w = weights(kind, 48, 200, seed=hash(kind) % 1000)
    q = quantize(w, "int8")
    scale = w.abs().amax(dim=1) / 127                          # the formula, not the module's tensor
    torch.testing.assert_close(q.scale, scale, rtol=0, atol=0)
    err = (q.dequantize() - w).abs()
    assert (err <= scale[:, None] / 2 + slack(w)).all()
    assert q.q.dtype == torch.int8 and q.q.abs().max() <= 127
    # the largest entry of every row is exact up to rounding: it maps to +-127
    assert (q.q.abs().amax(dim=1) == 127).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", GROUPS)
def test_int4_error_within_half_a_step_per_group(kind, group):
    out, inp = 40, 4 * group
    w = weights(kind, out, inp, seed=group + len(kind))
    q = quantize(w, "int4", group)
    g = w.reshape(out, inp // group, group)
    lo, hi = g.amin(-1), g.amax(-1)
    scale = (hi - lo) / 15
    torch.testing.assert_close(q.scales, scale, rtol=1e-6, atol=0)
    torch.testing.assert_close(q.biases, lo, rtol=0, atol=0)
    err = (q.dequantize() - w).reshape(out, inp // group, group).abs()
    assert (err <= scale[..., None] / 2 + slack(w)).all()
    # both ends of every group are representable: min -> 0 and max -> 15
    codes = formats._unpack_nibbles(q.packed).reshape(out, inp // group, group)
    assert (codes.amin(-1) == 0).all() and (codes.amax(-1) == 15).all()


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("group", GROUPS)
def test_nf4_error_within_half_the_widest_gap_per_group(kind, group):
    out, inp = 40, 3 * group
    w = weights(kind, out, inp, seed=7 * group + len(kind))
    q = quantize(w, "nf4", group)
    code = torch.tensor(QLORA_NF4)
    half_gap = (code[1:] - code[:-1]).max() / 2
    absmax = w.reshape(out, inp // group, group).abs().amax(-1)
    torch.testing.assert_close(q.absmax, absmax, rtol=0, atol=0)
    err = (q.dequantize() - w).reshape(out, inp // group, group).abs()
    assert (err <= half_gap * absmax[..., None] + slack(w)).all()


@pytest.mark.parametrize("group", (32, 64))
def test_nf4_picks_the_nearest_code(group):
    w = weights("student", 16, 2 * group, seed=3)
    q = quantize(w, "nf4", group)
    x = (w.reshape(16, 2, group) / q.absmax[..., None]).reshape(16, -1)
    code = torch.tensor(QLORA_NF4)
    dist = (x[..., None] - code).abs()
    best = dist.min(-1).values
    got = dist.gather(-1, formats._unpack_nibbles(q.packed).long()[..., None])[..., 0]
    assert torch.allclose(got, best, rtol=0, atol=1e-6)


def test_constant_and_zero_rows_are_exact():
    w = torch.zeros(4, 64)
    w[1] = 0.5
    w[2, :32] = -3.0
    for fmt in ("int8", "int4", "nf4"):
        q = quantize(w, fmt, 32)
        assert torch.equal(q.dequantize(), w), fmt
        assert torch.isfinite(q.dequantize()).all()


# ---- the NF4 code book --------------------------------------------------------------------------

def test_nf4_code_is_qloras():
    assert formats.NF4_CODE.tolist() == pytest.approx(QLORA_NF4, abs=0)


def test_nf4_code_is_the_normal_quantiles_construction():
    # bitsandbytes create_normal_map(offset=0.9677083, use_extra_value=True), without scipy:
    # 8 positive quantiles, 7 negative ones, an exact zero, scaled so the largest is 1.
    normal = torch.distributions.Normal(torch.tensor(0.0, dtype=torch.float64), torch.tensor(1.0, dtype=torch.float64))
    offset = 0.9677083
    pos = normal.icdf(torch.linspace(offset, 0.5, 9).double()[:-1])
    neg = -normal.icdf(torch.linspace(offset, 0.5, 8).double()[:-1])
    v = torch.cat([pos, torch.zeros(1, dtype=torch.float64), neg]).sort().values
    v = v / v.max()
    assert v.numel() == 16
    torch.testing.assert_close(v.float(), formats.NF4_CODE, rtol=0, atol=1e-6)
    torch.testing.assert_close(v.float(), torch.tensor(QLORA_NF4), rtol=0, atol=1e-6)


# ---- int4 packing: MLX's layout -----------------------------------------------------------------

@pytest.mark.parametrize("group", GROUPS)
def test_int4_packing_is_mlx_uint32_layout(group):
    out, inp = 6, 2 * group
    w = weights("normal", out, inp, seed=group)
    q = quantize(w, "int4", group)
    codes = torch.round((w.reshape(out, -1, group) - q.biases[..., None]) / q.scales[..., None])
    codes = codes.clamp(0, 15).to(torch.int64).reshape(out, inp)
    # MLX: uint32 word j of a row holds elements 8j..8j+7, element 8j+k in bits 4k..4k+3
    expected = torch.zeros(out, inp // 8, dtype=torch.int64)
    for j in range(inp // 8):
        for k in range(8):
            expected[:, j] += codes[:, 8 * j + k] << (4 * k)
    assert q.packed.dtype == torch.uint8 and q.packed.shape == (out, inp // 2)
    # our bytes, read as little-endian uint32 words, are MLX's words
    raw = q.packed.contiguous().numpy().tobytes()
    words = torch.tensor([int.from_bytes(raw[4 * i:4 * i + 4], "little") for i in range(len(raw) // 4)],
                         dtype=torch.int64).reshape(out, inp // 8)
    assert torch.equal(words, expected)
    assert torch.equal(formats._unpack_nibbles(q.packed).long(), codes)


def test_nibble_order_low_first():
    p = formats._pack_nibbles(torch.tensor([[1, 2, 15, 0]]))
    assert p.tolist() == [[0x21, 0x0F]]
    assert formats._unpack_nibbles(p).tolist() == [[1, 2, 15, 0]]


# ---- rows, round trips, shapes ------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ("dense", "int8", "int4", "nf4"))
@pytest.mark.parametrize("dtype", (torch.float32, torch.bfloat16))
def test_rows_equal_dequantize_rows(fmt, dtype):
    w = weights("outliers", 50, 128, seed=11)
    q = quantize(w, fmt, 32)
    full = q.dequantize(dtype)
    for ids in (torch.tensor([3, 0, 49, 3]), torch.randint(0, 50, (2, 7)), torch.tensor(5)):
        got = q.rows(ids, dtype)
        assert got.dtype == dtype and got.shape == (*ids.shape, 128)
        assert torch.equal(got, full[ids])


@pytest.mark.parametrize("fmt", ("dense", "int8", "int4", "nf4"))
def test_tensors_round_trip(fmt):
    w = weights("normal", 24, 96, seed=5)
    q = quantize(w, fmt, 32)
    back = weight_from_tensors(fmt, q.tensors(), q.shape, q.group_size)
    assert type(back) is type(q) and back.shape == (24, 96)
    assert torch.equal(back.dequantize(), q.dequantize())
    moved = q.map(lambda t: t.clone())
    assert torch.equal(moved.dequantize(), q.dequantize())


@pytest.mark.parametrize("fmt", ("int8", "int4", "nf4"))
def test_bf16_and_fp16_inputs_quantize_as_their_float32_values(fmt):
    w = weights("student", 16, 64, seed=2)
    for dt in (torch.bfloat16, torch.float16):
        a, b = quantize(w.to(dt), fmt, 32), quantize(w.to(dt).float(), fmt, 32)
        assert all(torch.equal(a.tensors()[k], b.tensors()[k]) for k in a.tensors())


def test_dequantize_counts_calls():
    q = quantize(torch.randn(8, 64), "int4", 32)
    before = formats.STATS["dequantize"]
    q.dequantize()
    q.dequantize(torch.bfloat16)
    assert formats.STATS["dequantize"] == before + 2


def test_quantize_in_row_chunks_equals_whole(monkeypatch):
    # large matrices are compressed a slice of rows at a time; the result must not depend on it
    w = weights("outliers", 300, 256, seed=9)
    whole = {f: quantize(w, f, 64).tensors() for f in ("int8", "int4", "nf4")}
    monkeypatch.setattr(formats, "CHUNK_ELEMENTS", 1000)
    for f, ref in whole.items():
        got = quantize(w, f, 64).tensors()
        assert all(torch.equal(got[k], ref[k]) for k in ref), f


# ---- errors and accounting ----------------------------------------------------------------------

@pytest.mark.parametrize("fmt", ("int4", "nf4"))
def test_group_size_must_divide_the_input_dimension(fmt):
    with pytest.raises(UserError, match=r"input dimension 96 is not a multiple of the group size 64"):
        quantize(torch.randn(4, 96), fmt, 64)
    for bad in (0, -32, 7):
        with pytest.raises(UserError, match="group size"):
            quantize(torch.randn(4, 96), fmt, bad)


def test_unknown_format_is_refused():
    with pytest.raises(UserError, match="unknown quantization 'int3'"):
        quantize(torch.randn(4, 64), "int3")
    with pytest.raises(UserError, match="unknown weight format"):
        weight_from_tensors("int3", {}, (4, 64))


@pytest.mark.parametrize("inp", (64, 896, 4864))
def test_bits_per_parameter(inp):
    out = 16
    w = torch.randn(out, inp)
    assert quantize(w, "int8").bits_per_param == pytest.approx(8 + 32 / inp)
    assert quantize(w, None).bits_per_param == 32
    for g in GROUPS:
        if inp % g:
            continue
        assert quantize(w, "int4", g).bits_per_param == pytest.approx(4 + 64 / g)
        assert quantize(w, "nf4", g).bits_per_param == pytest.approx(4 + 32 / g)
    assert quantize(w, "int4", 64).nbytes == out * inp // 2 + 2 * 4 * out * inp // 64


def test_formats_have_the_documented_types():
    w = torch.randn(8, 64)
    assert isinstance(quantize(w, None), Dense) and isinstance(quantize(w, "int8"), Int8)
    assert isinstance(quantize(w, "int4", 32), Int4) and isinstance(quantize(w, "nf4", 32), NF4)
    assert quantize(w, "int4", 32).group_size == 32
