"""Gemma 3 text: embeddings scaled by sqrt(hidden), (1 + w) RMSNorms around both sublayers,
q/k norms, softmax scale query_pre_attn_scalar ** -0.5, and interleaved sliding-window (local)
layers with their own rope base."""

import math

from torch import nn

from ..config import ModelConfig, RawConfig, rope_from_params
from ..errors import UserError
from .core import MLP, Attention, RMSNorm


def parse_config(raw: RawConfig) -> ModelConfig:
    n = raw.need("num_hidden_layers")
    hidden, heads = raw.need("hidden_size"), raw.need("num_attention_heads")
    head_dim = raw.get("head_dim", 256)
    if raw.get("use_bidirectional_attention", False):
        raise UserError(f"{raw.where}: use_bidirectional_attention is not supported (causal language models only)")
    pattern = raw.get("sliding_window_pattern", 6)
    types = raw.get("layer_types") or [
        "sliding_attention" if (i + 1) % pattern else "full_attention" for i in range(n)
    ]
    if len(types) != n:
        raise UserError(f"{raw.where}: layer_types has {len(types)} entries for {n} layers")
    rope = {kind: rope_from_params(p, head_dim, raw.where) for kind, p in rope_params(raw).items()}
    return raw.common(
        "gemma3_text", tie_default=True,
        head_dim=head_dim, layer_types=list(types), sliding_window=raw.get("sliding_window", 4096),
        rope=rope, qk_norm=True, norm_offset=1.0, embed_scale=math.sqrt(hidden),
        hidden_act=raw.get("hidden_activation", raw.get("hidden_act", "gelu_pytorch_tanh")),
        attn_scale=raw.get("query_pre_attn_scalar", 256) ** -0.5,
        # Gemma 3 replaced Gemma 2's attention-logit softcapping with q/k norms: transformers keeps the
        # config field but never applies it (every attention implementation), so neither do we
        attn_softcap=None, final_softcap=raw.get("final_logit_softcapping"),
        qkv_bias=bool(raw.get("attention_bias", False)), o_bias=bool(raw.get("attention_bias", False)),
    )


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        eps, off = cfg.rms_norm_eps, cfg.norm_offset
        self.input_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.pre_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)
        self.mlp = MLP(cfg)
        self.post_feedforward_layernorm = RMSNorm(cfg.hidden_size, eps, off)

    def forward(self, h, ctx, cache=None):
        h = h + self.post_attention_layernorm(self.self_attn(self.input_layernorm(h), ctx, cache))
        return h + self.post_feedforward_layernorm(self.mlp(self.pre_feedforward_layernorm(h)))


def rope_params(raw: RawConfig) -> dict[str, dict]:
    """Rope parameters by layer type, as transformers' Gemma3TextConfig reads them: rope_parameters
    {"full_attention": {...}, "sliding_attention": {...}}, or the older rope_theta (global layers),
    rope_local_base_freq (local layers) and rope_scaling (global layers only); rope_scaling is applied
    on top of rope_parameters when both are present."""
    given = raw.raw.get("rope_parameters") or {}
    scaling = raw.raw.get("rope_scaling")
    if not isinstance(given, dict) or not (scaling is None or isinstance(scaling, dict)):
        raise UserError(f"{raw.where}: rope_parameters / rope_scaling must be JSON objects")
    out = {}
    for kind, theta_key, default_theta in (("full_attention", "rope_theta", 1_000_000.0),
                                           ("sliding_attention", "rope_local_base_freq", 10_000.0)):
        p = given.get(kind)
        if p is not None and not isinstance(p, dict):
            raise UserError(f"{raw.where}: rope_parameters[{kind!r}] must be a JSON object")
        p = dict(p or {"rope_type": "default"})
        if kind == "full_attention" and scaling:
            p.update(scaling)
        p.setdefault("rope_theta", raw.get(theta_key, default_theta))
        p.setdefault("rope_type", p.get("type", "default"))
        if p["rope_type"] in ("llama3", "yarn", "longrope"):
            p.setdefault("original_max_position_embeddings", raw.raw.get("max_position_embeddings"))
        out[kind] = p
    return out
