"""The shared core every family is built on: RMSNorm, rotary embedding, attention, the MLP, the KV cache
and the causal LM shell, over the compressed Linear and Embedding of linear.py.

Parameter names follow Hugging Face (`model.layers.3.self_attn.q_proj`), so checkpoints load by
name and LoRA parameters get PEFT's keys by prefixing `base_model.model.`.

Base weights are `quant.Weight` objects, not Parameters: they never take gradients and may be
compressed. A Linear decompresses its weight on every call unless its block is `materialized`,
in which case every Linear of the block reuses one float copy until the context exits; the
executor uses this to decompress a block once for both its recompute and its backward.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from ..config import ModelConfig
from ..quant.formats import Weight
from .linear import Embedding, Linear, Workspace, softcap, vocab_chunks


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


def _gelu_tanh(x):
    return F.gelu(x, approximate="tanh")


ACTIVATIONS = {
    "silu": F.silu,
    "gelu_pytorch_tanh": _gelu_tanh,
    "gelu": F.gelu,
}
# grad * act'(x): the kernel autograd's backward of each activation calls, so the result is autograd's own
_ACT_GRADS = {
    F.silu: torch.ops.aten.silu_backward,
    _gelu_tanh: lambda g, x: torch.ops.aten.gelu_backward(g, x, approximate="tanh"),
    F.gelu: lambda g, x: torch.ops.aten.gelu_backward(g, x),
}


class _GatedAct(torch.autograd.Function):
    """act(gate) * up, saving only gate and up: act(gate) is recomputed in backward instead of kept,
    one [tokens, intermediate] tensor less in every block graph (5 MB at seq 256 on Qwen2.5-0.5B; with
    --recompute off every visited block's graph is alive at once, 120 MB for a full step). The
    gradients are autograd's own: the activation's backward kernel (the one autograd calls), fed the
    same g * up. Calling it directly, not through an autograd graph of act(gate) * (g * up), holds three
    [tokens, intermediate] temporaries fewer at the block VJP's widest (the product, the gradient
    autograd forms for act(gate), and act(gate) beside g_up)."""

    @staticmethod
    def forward(ctx, gate, up, act):
        ctx.act = act
        ctx.save_for_backward(gate, up)
        return act(gate) * up

    @staticmethod
    def backward(ctx, g):
        gate, up = ctx.saved_tensors
        g_gate = g_up = None
        if ctx.needs_input_grad[0]:
            g_gate = _ACT_GRADS[ctx.act](g * up, gate)
        if ctx.needs_input_grad[1]:
            g_up = ctx.act(gate).mul_(g)
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
        hn = self.model.norm(h)
        out = torch.cat([F.linear(hn, Wj).float()
                         for _, _, Wj in vocab_chunks(self.head_weight(), h.dtype, self.workspace, device=h.device)],
                        dim=-1)
        return softcap(out, self.config.final_softcap)

    def token_logprobs(self, h, targets):
        """log p(targets) under the final norm and LM head: h [T, hidden], targets [T] -> float32 [T],
        in vocabulary chunks with a running log-sum-exp, so the [T, vocab] logits never exist (scoring labels
        at Gemma's 262k vocabulary would otherwise build gigabytes of them)."""
        hn = self.model.norm(h)
        lse = torch.full((h.shape[0],), float("-inf"), device=h.device)
        picked = torch.zeros(h.shape[0], device=h.device)
        for lo, hi, Wj in vocab_chunks(self.head_weight(), h.dtype, self.workspace, device=h.device):
            z = softcap(F.linear(hn, Wj).float(), self.config.final_softcap)
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
