"""The shared core every family is built on: the Linear over a (compressed) weight with optional
LoRA, RMSNorm, rotary embedding, attention, the MLP, the KV cache and the causal LM shell.

Parameter names follow Hugging Face (`model.layers.3.self_attn.q_proj`), so checkpoints load by
name and LoRA parameters get PEFT's keys by prefixing `base_model.model.`.

Base weights are `quant.Weight` objects, not Parameters: they never take gradients and may be
compressed. A Linear decompresses its weight on every call unless its block is `materialized`,
in which case every Linear of the block reuses one float copy until the context exits; the
executor uses this to decompress a block once for both its recompute and its backward.
"""

from __future__ import annotations

import contextlib
import math
import time
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import LoraConfig, ModelConfig
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
            # the factors may be stored in bfloat16 (lora.set_lora_dtype); they compute in x's type, so float32
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


class RMSNorm(nn.Module):
    """x / rms(x) * (offset + weight), computed in float32; Gemma uses offset 1."""

    def __init__(self, dim: int, eps: float, offset: float = 0.0):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim), requires_grad=False)
        self.eps, self.offset = eps, offset

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + self.eps)
        return (y * (self.offset + self.weight.float())).to(x.dtype)


def rotate_half(x):
    x1, x2 = x.chunk(2, dim=-1)
    return torch.cat((-x2, x1), dim=-1)


def apply_rope(q, k, cos, sin):
    # q, k: [B, H, S, D]; cos, sin: [S, D]
    return q * cos + rotate_half(q) * sin, k * cos + rotate_half(k) * sin


@dataclass
class Context:
    """Per-forward data shared by all blocks: rotary tables and masks by layer type."""

    rope: dict[str, tuple[torch.Tensor, torch.Tensor]]      # layer type -> (cos, sin) [S, D]
    masks: dict[str, torch.Tensor | None]                   # layer type -> bool [S, T] or None = causal


def make_context(cfg: ModelConfig, start: int, length: int, device, dtype) -> Context:
    """Rotary tables and attention masks for query positions start..start+length-1."""
    pos = torch.arange(start, start + length, device=device)
    rope, masks = {}, {}
    for kind in set(cfg.layer_types):
        r = cfg.rope[kind]
        freqs = pos[:, None].float() * r.inv_freq.to(device)[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        rope[kind] = ((emb.cos() * r.attention_scaling).to(dtype), (emb.sin() * r.attention_scaling).to(dtype))
        window = cfg.sliding_window if kind == "sliding_attention" else None
        if start == 0 and (window is None or window >= length):
            masks[kind] = None                              # plain causal: SDPA's fast path
        else:
            kpos = torch.arange(0, start + length, device=device)
            allowed = kpos[None, :] <= pos[:, None]
            if window is not None:
                allowed &= pos[:, None] - kpos[None, :] < window
            masks[kind] = allowed
    return Context(rope, masks)


class KVCache:
    """Keys and values of every layer so far, for generation."""

    def __init__(self, num_layers: int):
        self.k: list[torch.Tensor | None] = [None] * num_layers
        self.v: list[torch.Tensor | None] = [None] * num_layers

    @property
    def length(self) -> int:
        return 0 if self.k[0] is None else self.k[0].shape[2]

    def update(self, layer: int, k, v):
        if self.k[layer] is not None:
            k = torch.cat((self.k[layer], k), dim=2)
            v = torch.cat((self.v[layer], v), dim=2)
        self.k[layer], self.v[layer] = k, v
        return k, v


def attention(q, k, v, mask, scale: float, softcap: float | None):
    # q: [B, H, S, D]; k, v: [B, KV, T, D]; mask: bool [S, T] or None for causal
    rep = q.shape[1] // k.shape[1]
    if rep > 1:
        k = k.repeat_interleave(rep, dim=1)
        v = v.repeat_interleave(rep, dim=1)
    if softcap is None:
        if mask is None:
            return F.scaled_dot_product_attention(q, k, v, is_causal=q.shape[2] > 1, scale=scale)
        return F.scaled_dot_product_attention(q, k, v, attn_mask=mask, scale=scale)
    s = (q @ k.transpose(-1, -2)) * scale
    s = torch.tanh(s / softcap) * softcap
    if mask is None:
        mask = torch.ones(s.shape[-2], s.shape[-1], dtype=torch.bool, device=s.device).tril(s.shape[-1] - s.shape[-2])
    s = s.masked_fill(~mask, float("-inf"))
    return torch.softmax(s, dim=-1, dtype=torch.float32).to(q.dtype) @ v


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        h, d, kv = cfg.num_heads, cfg.head_dim, cfg.num_kv_heads
        self.layer_idx, self.layer_type = layer_idx, cfg.layer_types[layer_idx]
        self.heads, self.kv_heads, self.head_dim = h, kv, d
        self.scale, self.softcap = cfg.attn_scale, cfg.attn_softcap
        self.q_proj = Linear(cfg.hidden_size, h * d, cfg.qkv_bias)
        self.k_proj = Linear(cfg.hidden_size, kv * d, cfg.qkv_bias)
        self.v_proj = Linear(cfg.hidden_size, kv * d, cfg.qkv_bias)
        self.o_proj = Linear(h * d, cfg.hidden_size, cfg.o_bias)
        if cfg.qk_norm:
            self.q_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
            self.k_norm = RMSNorm(d, cfg.rms_norm_eps, cfg.norm_offset)
        else:
            self.q_norm = self.k_norm = None

    def forward(self, x, ctx: Context, cache: KVCache | None = None):
        B, S, _ = x.shape                                    # x: [B, S, hidden]
        q = self.q_proj(x).view(B, S, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(B, S, self.kv_heads, self.head_dim).transpose(1, 2)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        cos, sin = ctx.rope[self.layer_type]
        q, k = apply_rope(q, k, cos, sin)
        if cache is not None:
            k, v = cache.update(self.layer_idx, k, v)
        o = attention(q, k, v, ctx.masks[self.layer_type], self.scale, self.softcap)
        return self.o_proj(o.transpose(1, 2).reshape(B, S, self.heads * self.head_dim))


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
    "gelu": F.gelu,
}


class _GatedAct(torch.autograd.Function):
    """act(gate) * up, saving only gate and up: act(gate) is recomputed in backward instead of kept,
    one [tokens, intermediate] tensor less in every block graph (5 MB at seq 256 on Qwen2.5-0.5B; with
    --recompute off every visited block's graph is alive at once, 120 MB for a full step). The
    gradients are autograd's own: the activation's backward is autograd's, fed the same g * up."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        with torch.enable_grad():
            x = gate.detach().requires_grad_(True)
            a = ctx.act(x)
            # the gradient of the scalar <a, g * up>: no grad_outputs, which would import sympy (executor._vjp)
            (g_gate,) = torch.autograd.grad((a * (g * up)).sum(), [x]) if ctx.needs_input_grad[0] else (None,)
        g_up = g * a.detach() if ctx.needs_input_grad[1] else None
        return g_gate, g_up, None


class MLP(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.gate_proj = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.up_proj = Linear(cfg.hidden_size, cfg.intermediate_size, cfg.mlp_bias)
        self.down_proj = Linear(cfg.intermediate_size, cfg.hidden_size, cfg.mlp_bias)
        self.act = ACTIVATIONS[cfg.hidden_act]

    def forward(self, x):
        # on transposed activations ([features, tokens], Linear.forward_t): W x^T is faster than x W^T
        # here, 104 -> 83 ms for a Qwen2.5-0.5B MLP forward over 256 tokens, 193 -> 178 ms forward and
        # backward (2 cores; bench note in the commit). The result is a transposed view.
        xt = x.reshape(-1, x.shape[-1]).t()
        gate, up = self.gate_proj.forward_t(xt), self.up_proj.forward_t(xt)
        if torch.is_grad_enabled() and (gate.requires_grad or up.requires_grad):
            a = _GatedAct.apply(gate, up, self.act)
        else:
            a = self.act(gate) * up
        return self.down_proj.forward_t(a).t().reshape(x.shape)


class Backbone(nn.Module):
    def __init__(self, cfg: ModelConfig, block_cls):
        super().__init__()
        self.embed_tokens = Embedding(cfg.vocab_size, cfg.hidden_size, cfg.embed_scale)
        self.layers = nn.ModuleList(block_cls(cfg, i) for i in range(cfg.num_layers))
        self.norm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps, cfg.norm_offset)


class CausalLM(nn.Module):
    """Embedding, blocks, final norm and LM head; every family plugs in its own block class.

    A block is `block(h, ctx, cache=None) -> h`; the engine relies on nothing else.
    """

    def __init__(self, cfg: ModelConfig, block_cls):
        super().__init__()
        self.config = cfg
        self.model = Backbone(cfg, block_cls)
        self.lm_head = None if cfg.tie_word_embeddings else Linear(cfg.hidden_size, cfg.vocab_size, False)
        self.dtype = torch.float32
        self.workspace = Workspace()                # decompressed weights, reused block after block
        for m in self.modules():
            if isinstance(m, Linear):
                m.workspace = self.workspace

    @property
    def layers(self):
        return self.model.layers

    def head_weight(self) -> Weight:
        return self.model.embed_tokens.weight if self.lm_head is None else self.lm_head.weight

    def embed(self, ids):
        return self.model.embed_tokens(ids, self.dtype)

    def context(self, start: int, length: int, device=None) -> Context:
        return make_context(self.config, start, length, device or torch.device("cpu"), self.dtype)

    def logits(self, h):
        """Final norm and LM head over hidden states h [B, S, hidden] -> float32 logits [B, S, V]."""
        # vocabulary chunks: the head (often the largest matrix) is never decompressed whole
        W, hn = self.head_weight(), self.model.norm(h)
        chunks = []
        for lo in range(0, W.shape[0], 16384):
            chunks.append(F.linear(hn, W.row_block(lo, min(lo + 16384, W.shape[0]), h.dtype)).float())
            W.release()
        out = torch.cat(chunks, dim=-1)
        if self.config.final_softcap is not None:
            out = torch.tanh(out / self.config.final_softcap) * self.config.final_softcap
        return out

    def token_logprobs(self, h, targets):
        """log p(targets) under the final norm and LM head: h [T, hidden], targets [T] -> float32 [T],
        in vocabulary chunks with a running log-sum-exp, so the [T, vocab] logits never exist (scoring labels
        at Gemma's 262k vocabulary would otherwise build gigabytes of them)."""
        W, hn = self.head_weight(), self.model.norm(h)
        lse = torch.full((h.shape[0],), float("-inf"), device=h.device)
        picked = torch.zeros(h.shape[0], device=h.device)
        for lo in range(0, W.shape[0], 16384):
            hi = min(lo + 16384, W.shape[0])
            z = F.linear(hn, W.row_block(lo, hi, h.dtype)).float()
            W.release()
            if self.config.final_softcap is not None:
                z = torch.tanh(z / self.config.final_softcap) * self.config.final_softcap
            lse = torch.logaddexp(lse, torch.logsumexp(z, dim=-1))
            inside = (targets >= lo) & (targets < hi)
            picked[inside] = z[inside, targets[inside] - lo]
        return picked - lse

    def forward(self, input_ids, cache: KVCache | None = None, last_only: bool = False):
        """Logits [B, S, V] (or [B, 1, V] with last_only, which spares the LM head the other positions)."""
        start = cache.length if cache is not None else 0
        h = self.embed(input_ids)
        ctx = self.context(start, input_ids.shape[1], input_ids.device)
        for block in self.model.layers:
            h = block(h, ctx, cache)
        return self.logits(h[:, -1:] if last_only else h)

    def lora_parameters(self) -> dict[str, nn.Parameter]:
        """LoRA parameters by PEFT key (base_model.model.<name>)."""
        return {f"base_model.model.{n}": p for n, p in self.named_parameters() if ".lora_" in n}
