"""The compiled dequantization kernel against the torch code it replaces (bit for bit), and the
workspace that decompressed weights are written into."""

import os
import subprocess
import sys

import pytest
import torch

from lcsb.model.linear import Workspace
from lcsb.quant import kernels
from lcsb.quant.formats import NF4_CODE, quantize


def torch_reference(w):
    """The torch path of each format, written out from the format's definition."""
    if w.fmt == "int8":
        return w.q.float() * w.scale[:, None]
    q = torch.stack((w.packed & 15, w.packed >> 4), dim=-1).flatten(-2).long()          # low nibble first
    g = w.group_size
    if w.fmt == "int4":
        return (q.float().unflatten(-1, (-1, g)) * w.scales[..., None] + w.biases[..., None]).flatten(-2)
    return (NF4_CODE[q].unflatten(-1, (-1, g)) * w.absmax[..., None]).flatten(-2)


@pytest.fixture(autouse=True)
def kernel_available():
    if kernels.library() is None:
        pytest.skip("no C compiler: the kernel is not built here (the torch path is tested everywhere else)")


@pytest.mark.parametrize("fmt,group", [("int4", 32), ("int4", 64), ("int4", 128), ("nf4", 64), ("nf4", 32),
                                       ("int8", 0)])
@pytest.mark.parametrize("shape", [(1, 128), (7, 256), (300, 384), (129, 1024)])
@pytest.mark.parametrize("threads", [1, 2, 3])
def test_kernel_equals_torch(fmt, group, shape, threads, seed):
    g = torch.Generator().manual_seed(seed)
    w = quantize(torch.randn(*shape, generator=g) * torch.rand(shape[0], 1, generator=g) * 3, fmt, group or 64)
    ref = torch_reference(w)
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        out = torch.full(shape, float("nan"))
        assert w.dequantize(out=out) is out
        assert torch.equal(out, ref)
        assert torch.equal(w.dequantize(), ref)
        lo, hi = shape[0] // 3, shape[0] - shape[0] // 4
        assert torch.equal(w.row_block(lo, hi), ref[lo:hi])
    finally:
        torch.set_num_threads(before)


def test_torch_fallback_gives_the_same_numbers(tmp_path):
    """LCSB_KERNELS=0 takes the torch code: same bits in a fresh process."""
    code = ("import torch, sys; from lcsb.quant import kernels; from lcsb.quant.formats import quantize;"
            "torch.manual_seed(3); w = quantize(torch.randn(64, 256), sys.argv[1], 64);"
            "assert (kernels.library() is None) == (sys.argv[2] == '0');"
            "torch.save(w.dequantize(), sys.argv[3])")
    for fmt in ("int4", "nf4", "int8"):
        outs = []
        for flag in ("0", "1"):
            path = tmp_path / f"{fmt}-{flag}.pt"
            env = dict(os.environ, LCSB_KERNELS=flag)
            subprocess.run([sys.executable, "-c", code, fmt, flag, str(path)], check=True, env=env)
            outs.append(torch.load(path))      # our own file, written a line above
        assert torch.equal(*outs), fmt


def test_kernel_skips_what_it_does_not_do():
    """Other dtypes and non-contiguous storage take the torch path, with the same values."""
    w = quantize(torch.randn(32, 128), "int4", 64)
    ref = torch_reference(w)
    assert torch.allclose(w.dequantize(torch.float64), ref.double(), rtol=1e-6, atol=1e-6)
    assert not kernels.dequantize("int4", w.packed.t(), w.scales, w.biases, torch.empty(64, 32), 64)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8"])
def test_kernel_refuses_buffers_of_the_wrong_size(fmt):
    """The C code reads rows x cols worth of each buffer: one that is a row short (or a group size that does
    not divide the row) is refused before the call instead of read past its end."""
    w = quantize(torch.randn(16, 128), fmt, 64)
    q, s, b = {"int8": lambda: (w.q, w.scale, None), "int4": lambda: (w.packed, w.scales, w.biases),
               "nf4": lambda: (w.packed, w.absmax, NF4_CODE)}[fmt]()
    assert kernels.dequantize(fmt, q, s, b, torch.empty(16, 128), 64)            # the right sizes work
    with pytest.raises(ValueError, match="q holds .* bytes, the kernel would read"):
        kernels.dequantize(fmt, q[:15].contiguous(), s, b, torch.empty(16, 128), 64)
    with pytest.raises(ValueError, match="s holds .* bytes"):
        kernels.dequantize(fmt, q, s[:15].contiguous(), b, torch.empty(16, 128), 64)
    if fmt != "int8":
        with pytest.raises(ValueError, match="group 48 must be even and divide cols 128"):
            kernels.dequantize(fmt, q, s, b, torch.empty(16, 128), 48)


def test_a_broken_compiler_falls_back_with_one_warning(tmp_path):
    code = ("import warnings, torch; from lcsb.quant import kernels; from lcsb.quant.formats import quantize;"
            "warnings.simplefilter('error');\n"
            "try:\n    kernels.library()\nexcept RuntimeWarning as e:\n    print('warned:', str(e)[:60])\n"
            "warnings.simplefilter('ignore'); w = quantize(torch.randn(8, 64), 'int4', 64); w.dequantize()")
    env = dict(os.environ, CC="/nonexistent/cc", LCSB_CACHE=str(tmp_path))
    r = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
    assert "warned: lcsb: the dequantization kernel could not be built" in r.stdout


def test_workspace_reuses_one_buffer_and_refuses_a_second_lease():
    ws = Workspace()
    with ws.lease([(4, 8), (3,)], torch.float32) as (a, b):
        assert a.shape == (4, 8) and b.shape == (3,)
        assert b.data_ptr() - a.data_ptr() == 32 * 4                 # packed, 64-byte aligned
        a.fill_(1), b.fill_(2)
        assert (a == 1).all()                                         # views do not overlap
        with pytest.raises(RuntimeError, match="already leased"):
            with ws.lease([(1,)], torch.float32):
                pass
        ptr = a.data_ptr()
    with ws.lease([(2, 8)], torch.float32) as (c,):
        assert c.data_ptr() == ptr                                    # smaller: the same memory
    with ws.lease([(100, 8)], torch.float32) as (d,):
        assert d.numel() == 800                                        # larger: grown
    assert ws.nbytes == 800 * 4
    ws.clear()
    assert ws.nbytes == 0
