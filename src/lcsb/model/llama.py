"""Llama (Llama 2/3.x, SmolLM, Mistral without sliding window): pre-norm blocks, SwiGLU MLP, GQA."""

from torch import nn

from ..config import ModelConfig, RawConfig
from .core import MLP, Attention, RMSNorm


def parse_config(raw: RawConfig) -> ModelConfig:
    raw.refuse("pretraining_tp", (1,), "tensor-parallel pretraining slices; re-save the checkpoint with pretraining_tp=1")
    bias = bool(raw.get("attention_bias", False))
    return raw.common("llama", tie_default=False, qkv_bias=bias, o_bias=bias, mlp_bias=bool(raw.get("mlp_bias", False)))


class Block(nn.Module):
    # the Linear whose output only adds into the block's output (linear.output_unused)
    OUTPUT_LINEAR = "mlp.down_proj"

    def __init__(self, cfg: ModelConfig, layer_idx: int):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.self_attn = Attention(cfg, layer_idx)
        self.post_attention_layernorm = RMSNorm(cfg.hidden_size, cfg.rms_norm_eps)
        self.mlp = MLP(cfg)

    def forward(self, h, ctx, cache=None):
        h = h + self.self_attn(self.input_layernorm(h), ctx, cache)
        return h + self.mlp(self.post_attention_layernorm(h))
