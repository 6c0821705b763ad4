"""Qwen3: the Llama block with RMSNorm on each head's queries and keys, no q/k/v bias."""

from ..config import ModelConfig, RawConfig
from .llama import Block  # noqa: F401  (q/k norms come from cfg.qk_norm in the shared Attention)
from .qwen2 import parse_config as _qwen2_config


def parse_config(raw: RawConfig) -> ModelConfig:
    bias = bool(raw.get("attention_bias", False))
    return _qwen2_config(raw, "qwen3", qk_norm=True, qkv_bias=bias, o_bias=bias)
