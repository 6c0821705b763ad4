"""Qwen2 / Qwen2.5: the Llama block with biases on q, k and v (none on o)."""

from ..config import ModelConfig, RawConfig, rope_from_params
from ..errors import UserError
from .llama import Block  # noqa: F401  (the block is Llama's; the biases come from the config)


def sliding_layers(raw: RawConfig, cfg_kw: dict, n: int) -> dict:
    """Qwen's optional sliding window: layers from max_window_layers (transformers' default 28) on, unless
    layer_types says otherwise."""
    if not raw.get("use_sliding_window", False):
        return {}
    window = raw.need("sliding_window")
    types = raw.get("layer_types") or [
        "sliding_attention" if i >= raw.get("max_window_layers", 28) else "full_attention" for i in range(n)
    ]
    if len(types) != n:
        raise UserError(f"{raw.where}: layer_types has {len(types)} entries for {n} layers")
    return dict(layer_types=list(types), sliding_window=window)


def parse_config(raw: RawConfig, model_type: str = "qwen2", **extra) -> ModelConfig:
    n = raw.need("num_hidden_layers")
    heads, hidden = raw.need("num_attention_heads"), raw.need("hidden_size")
    head_dim = raw.get("head_dim") or hidden // heads
    rope = rope_from_params(raw.rope_params(10000.0), head_dim, raw.where)
    kw = dict(rope={"full_attention": rope, "sliding_attention": rope})
    kw.update(sliding_layers(raw, kw, n))
    kw.update(extra)
    kw.setdefault("qkv_bias", True)
    return raw.common(model_type, tie_default=False, **kw)
