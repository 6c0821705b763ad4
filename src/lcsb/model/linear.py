"""The compressed Linear: a base projection whose weight stays compressed, and what keeps it so.

Design note. Base weights are `quant.Weight` objects (int8, int4, nf4, a GGUF block type, or float),
not Parameters: they never take gradients. What this file guarantees is that a float copy of a base
weight exists only while it is used, in a buffer that is reused, and never inside autograd's graph:

- A Linear decompresses its weight when it runs (`streamed_linear`): a few MB of rows at a time
  (ROW_CHUNK_BYTES) into the model's `Workspace`, one buffer leased to one user at a time and faulted
  in once, so a matrix never exists whole in float and no fresh page is touched per call.
- Under autograd, `_CompressedLinearFn` saves the *packed* weight for backward and decompresses it
  again there: a block's recompute costs one more decompression, never a float copy held by the graph.
- `materialized(block)` decompresses every weight of a block once into the workspace and lets all its
  Linears reuse those copies until the context exits: the executor does this when a visited block's
  recompute and VJP share one decompression (`--decompress block`).
- `output_unused(block)`: the VJP of a block needs only the input gradient of the Linear whose output
  just adds into the block's output (Llama's o_proj / down_proj), so `_InputGradOnlyFn` skips its
  forward matmul (a third of the MLP's FLOPs) and computes gy W in backward.
- `forward_t` runs on activations transposed ([features, tokens]): W x^T is the faster BLAS orientation
  on CPU at a block's shapes.
The Embedding gathers rows straight from the compressed matrix (`Weight.rows`). Every path is checked
against autograd on the dense (dequantized) layer: tests/test_executor.py, tests/test_kernels.py.
"""

from __future__ import annotations

import contextlib
import math
import time

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig
from ..quant.formats import STATS, Weight


class _CompressedLinearFn(torch.autograd.Function):
    """y = x W^T with W decompressed again in backward: autograd keeps the packed weight only.
    t: activations transposed, x^T [in, T] -> y^T [out, T] (Linear.forward_t)."""

    @staticmethod
    def forward(ctx, x, weight: Weight, workspace, t=False):
        ctx.weight, ctx.workspace, ctx.t = weight, workspace, t
        return streamed_linear(x, weight, workspace, t=t)

    @staticmethod
    def backward(ctx, gy):
        gx = streamed_linear(gy, ctx.weight, ctx.workspace, transposed=True, t=ctx.t)
        ctx.weight.release()
        return gx, None, None, None


class _InputGradOnlyFn(torch.autograd.Function):
    """A Linear whose output value nothing reads: forward computes nothing (a zero view) and backward
    gives the true input gradient gy W. The executor's block VJP is the gradient of <out, g>, and
    the last Linear of a Llama-style block only adds to `out`, so its x W^T (a third of the MLP's
    FLOPs) is never needed there (`Linear.output_unused`). transposed: x^T [in, T] -> y^T [out, T]
    (`Linear.forward_t`)."""

    @staticmethod
    def forward(ctx, x, linear, transposed):
        ctx.linear, ctx.transposed = linear, transposed
        shape = (linear.out_features, x.shape[1]) if transposed else (*x.shape[:-1], linear.out_features)
        return x.new_zeros(()).expand(shape)

    @staticmethod
    def backward(ctx, gy):
        lin = ctx.linear
        if lin.cached is not None:
            return (lin.cached.t() @ gy if ctx.transposed else gy @ lin.cached), None, None
        gx = streamed_linear(gy.contiguous(), lin.weight, lin.workspace, transposed=True, t=ctx.transposed)
        lin.weight.release()
        return gx, None, None


class Linear(nn.Module):
    """A base projection: weight in any `quant.Weight` format, float bias, optional LoRA.

    Unless its block is `materialized`, a Linear decompresses its weight when it runs, into its
    model's workspace when it has one (`workspace`, set by CausalLM), and under autograd again in
    backward: one Linear's float weight is resident at a time."""

    def __init__(self, in_features: int, out_features: int, bias: bool):
        super().__init__()
        self.in_features, self.out_features = in_features, out_features
        self.weight: Weight | None = None          # set by the loader
        self.bias = nn.Parameter(torch.zeros(out_features), requires_grad=False) if bias else None
        self.lora_A = self.lora_B = None            # LoRA factors, PEFT's names and shapes
        self.cached: torch.Tensor | None = None    # float weight while the block is materialized
        self.workspace: Workspace | None = None    # where the weight is decompressed when not cached
        # set by `output_unused`: under autograd the base output is not computed, only its input
        # gradient (_InputGradOnlyFn); LoRA and bias still are
        self.output_unused = False

    def add_lora(self, cfg: LoraConfig):
        """y += (alpha / r) B A dropout(x), A [r, in] kaiming-uniform and B [out, r] zero as in PEFT."""
        self.lora_A = nn.Linear(self.in_features, cfg.rank, bias=False)
        self.lora_B = nn.Linear(cfg.rank, self.out_features, bias=False)
        nn.init.kaiming_uniform_(self.lora_A.weight, a=math.sqrt(5))
        nn.init.zeros_(self.lora_B.weight)
        self.lora_dropout = nn.Dropout(cfg.dropout) if cfg.dropout > 0 else nn.Identity()
        self.scaling = cfg.scaling

    def forward(self, x):
        if self.output_unused and torch.is_grad_enabled() and x.requires_grad:
            y = _InputGradOnlyFn.apply(x, self, False)
            if self.bias is not None:
                y = y + self.bias
        elif self.cached is not None:
            y = F.linear(x, self.cached, self.bias)
        else:
            if torch.is_grad_enabled() and x.requires_grad:
                y = _CompressedLinearFn.apply(x, self.weight, self.workspace)
            else:
                y = streamed_linear(x, self.weight, self.workspace)
            self.weight.release()          # file-backed pages leave the resident set (generation, eval)
            if self.bias is not None:
                y = y + self.bias
        if self.lora_A is not None:
            # the factors may be stored in bfloat16 (model.lora.set_lora_dtype); they compute in x's type, so float32
            # factors run exactly as nn.Linear would (.to of the same type is the tensor itself)
            A, B = self.lora_A.weight.to(x.dtype), self.lora_B.weight.to(x.dtype)
            y = y + F.linear(F.linear(self.lora_dropout(x), A), B) * self.scaling
        return y

    def forward_t(self, xt):
        """The same Linear on transposed activations: x^T [in, T] (any strides) -> y^T [out, T], as
        W x^T. On CPU, BLAS runs W x^T 15-30% faster than x W^T at a block's shapes (T a few hundred
        tokens, out up to a few thousand; numbers in MLP.forward)."""
        if self.output_unused and torch.is_grad_enabled() and xt.requires_grad:
            y = _InputGradOnlyFn.apply(xt, self, True)
        elif self.cached is not None:
            y = torch.mm(self.cached, xt)
        else:
            if torch.is_grad_enabled() and xt.requires_grad:
                y = _CompressedLinearFn.apply(xt, self.weight, self.workspace, True)
            else:
                y = streamed_linear(xt, self.weight, self.workspace, t=True)
            self.weight.release()
        if self.bias is not None:
            y = y + self.bias[:, None]
        if self.lora_A is not None:
            # dropout draws its mask in [T, in] order, as forward() does, so a seeded run is the same
            d = xt if isinstance(self.lora_dropout, nn.Identity) else self.lora_dropout(xt.t().contiguous()).t()
            y = y + torch.mm(self.lora_B.weight.to(xt.dtype), torch.mm(self.lora_A.weight.to(xt.dtype), d)) * self.scaling
        return y

    def _apply(self, fn, recurse=True):
        if self.weight is not None:
            self.weight = self.weight.map(fn)
        return super()._apply(fn, recurse)


class Workspace:
    """One reusable buffer for decompressed weights: a block's float copies, a few MB of a matrix's
    rows (streamed_linear), or an LM-head chunk.

    Decompressing into fresh memory costs a page fault per 4 KB, and with glibc handing large blocks
    back to the system (runtime.py) a block's float weights (60 MB on Qwen2.5-0.5B) would be faulted
    in afresh for every block, forward and backward. One buffer, leased to one user at a time, is
    faulted in once. A second lease while one is held is a bug and raises.
    """

    ALIGN = 16                                   # elements: every view starts on a 64-byte boundary

    def __init__(self):
        self._buf: torch.Tensor | None = None
        self._busy = False
        self.seconds = 0.0                        # time spent decompressing into it (the step's breakdown)

    @contextlib.contextmanager
    def lease(self, shapes, dtype: torch.dtype, device=None):
        """Views of the buffer with the given shapes, valid until the context exits."""
        if self._busy:
            raise RuntimeError("the decompression workspace is already leased")
        device = torch.device(device or "cpu")
        sizes = [math.prod(s) for s in shapes]
        total = sum(-(-n // self.ALIGN) * self.ALIGN for n in sizes)
        buf = self._buf
        if buf is None or buf.numel() < total or buf.dtype != dtype or buf.device != device:
            self._buf = buf = None                # drop the old one before allocating the new
            self._buf = buf = torch.empty(total, dtype=dtype, device=device)
        views, at = [], 0
        for shape, n in zip(shapes, sizes):
            views.append(buf[at:at + n].view(shape))
            at += -(-n // self.ALIGN) * self.ALIGN
        self._busy = True
        try:
            yield views
        finally:
            self._busy = False

    def clear(self):
        """Give the buffer back (after training, before a long idle phase)."""
        if self._busy:
            raise RuntimeError("the decompression workspace is in use")
        self._buf = None

    @property
    def nbytes(self) -> int:
        return 0 if self._buf is None else self._buf.numel() * self._buf.element_size()


ROW_CHUNK_BYTES = 4 << 20     # streamed_linear decompresses this much of a matrix at a time


def streamed_linear(x: torch.Tensor, weight: Weight, workspace: Workspace | None = None,
                    transposed: bool = False, t: bool = False) -> torch.Tensor:
    """x W^T (or x W with transposed=True, a Linear's input gradient) with W decompressed a few MB of
    rows at a time into `workspace`, so a matrix never exists whole in float: the workspace stays at
    ROW_CHUNK_BYTES where a whole MLP matrix would be 17 MB (Qwen2.5-0.5B). Without a workspace, or
    for a weight stored in float already, the whole matrix is used at once. t=True: activations
    transposed, 2-D [features, tokens] in and out (W x^T, or W^T x with transposed)."""
    whole = weight.stored_as(x.dtype)
    if whole is None and workspace is None:
        whole = weight.dequantize(x.dtype)
    if whole is not None:
        if t:
            return whole.t() @ x if transposed else whole @ x
        return x @ whole if transposed else F.linear(x, whole)
    STATS["dequantize"] += 1                       # one decompression of the matrix, chunk by chunk
    rows, cols = weight.shape
    step = max(1, min(rows, ROW_CHUNK_BYTES // (cols * x.element_size())))
    x2 = x if t else x.reshape(-1, x.shape[-1])
    n = x2.shape[1] if t else x2.shape[0]
    width = cols if transposed else rows
    out = x2.new_empty((width, n) if t else (n, width))
    with workspace.lease([(step, cols)], x.dtype, x.device) as (buf,):
        for lo in range(0, rows, step):
            hi = min(lo + step, rows)
            t0 = time.perf_counter()
            w = weight.row_block(lo, hi, x.dtype, out=buf[:hi - lo])        # [c, cols]
            workspace.seconds += time.perf_counter() - t0
            if transposed:                                                  # x [., rows] -> [., cols]
                a, b = (w.t(), x2[lo:hi]) if t else (x2[:, lo:hi], w)
                if lo == 0:
                    torch.mm(a, b, out=out)
                else:
                    out.addmm_(a, b)
            elif t:                                                         # x^T [cols, .] -> [rows, .]
                torch.mm(w, x2, out=out[lo:hi])
            else:                                                           # x [., cols] -> [., rows]
                out[:, lo:hi] = x2 @ w.T
    return out if t else out.view(*x.shape[:-1], out.shape[-1])


# LM-head rows per chunk: 3.7 MB of float32 at hidden 896, so a chunk stays in cache from its
# decompression through both of its matmuls (4096 rows, 15 MB, were 4-6% slower at 32-256 tokens)
VOCAB_CHUNK = 1024


def vocab_chunks(weight: Weight, dtype: torch.dtype, workspace: Workspace | None, rows: int = 0, device=None):
    """The LM head's loop, shared by training (executor.head_loss_and_grad), evaluation (eval_step,
    CausalLM.token_logprobs) and generation (CausalLM.logits): yields (lo, hi, W[lo:hi]) over consecutive
    blocks of `rows` rows (VOCAB_CHUNK, read at call time, unless given), each decompressed once into the
    workspace (fresh memory without one) and valid until the next; the file-backed pages of each are
    released after use, so the head (often the largest matrix) is never decompressed whole."""
    rows = rows or VOCAB_CHUNK
    V, H = weight.shape
    lease = (workspace.lease([(min(rows, V), H)], dtype, device) if workspace is not None
             else contextlib.nullcontext([None]))
    with lease as (buf,):
        for lo in range(0, V, rows):
            hi = min(lo + rows, V)
            yield lo, hi, weight.row_block(lo, hi, dtype, out=None if buf is None else buf[:hi - lo])
            weight.release()


def softcap(z: torch.Tensor, cap: float | None) -> torch.Tensor:
    """Gemma's final logit softcapping: cap * tanh(z / cap); z itself without a cap."""
    return z if cap is None else torch.tanh(z / cap) * cap


@contextlib.contextmanager
def materialized(module: nn.Module, dtype: torch.dtype = torch.float32, workspace: Workspace | None = None):
    """Decompress every base weight under `module` once; reuse the float copies until exit, then
    drop them and let file-backed storage release its pages. With a `workspace` the copies live in
    its buffer (no fresh memory per block) and the time is added to its `seconds`."""
    linears = [m for m in module.modules() if isinstance(m, Linear)]
    packed = [m for m in linears if m.weight.stored_as(dtype) is None]      # float weights are used as stored
    lease = (workspace.lease([m.weight.shape for m in packed], dtype, _device_of(linears))
             if workspace is not None and packed else contextlib.nullcontext([None] * len(packed)))
    with lease as bufs:
        try:
            t0 = time.perf_counter()
            for m in linears:
                m.cached = m.weight.stored_as(dtype)
            for m, buf in zip(packed, bufs):
                m.cached = m.weight.dequantize(dtype, out=buf)
            if workspace is not None:
                workspace.seconds += time.perf_counter() - t0
            yield
        finally:
            for m in linears:
                m.cached = None
                m.weight.release()


@contextlib.contextmanager
def output_unused(block: nn.Module):
    """For a VJP through `block` (the gradient of <block(x), g>), whose output value is not used:
    the Linear named by the block's OUTPUT_LINEAR, whose output only adds into the block's output,
    skips its forward matmul (`_InputGradOnlyFn`). Gradients are unchanged; the output is not the
    block's output. A block without OUTPUT_LINEAR (e.g. Gemma 3: a norm reads that output) is run
    as it is."""
    name = getattr(block, "OUTPUT_LINEAR", None)
    lin = block.get_submodule(name) if name else None
    if lin is None:
        yield
        return
    lin.output_unused = True
    try:
        yield
    finally:
        lin.output_unused = False


def _device_of(linears) -> torch.device:
    for m in linears:
        for t in m.weight.tensors().values():
            return t.device
    return torch.device("cpu")


class Embedding(nn.Module):
    def __init__(self, num: int, dim: int, scale: float = 1.0):
        super().__init__()
        self.num_embeddings, self.embedding_dim = num, dim
        self.weight: Weight | None = None
        self.scale = scale

    def forward(self, ids, dtype=torch.float32):
        x = self.weight.rows(ids, dtype)
        self.weight.release()
        if self.scale != 1.0:
            # Gemma scales in the weight dtype, as a tensor: keep the same rounding
            x = x * torch.tensor(self.scale, dtype=dtype)
        return x

    def _apply(self, fn, recurse=True):
        if self.weight is not None:
            self.weight = self.weight.map(fn)
        return super()._apply(fn, recurse)
