"""Tiny random transformers models saved with save_pretrained: the oracles of the parity tests."""

from __future__ import annotations

import torch
import transformers

BASE = dict(vocab_size=96, hidden_size=64, intermediate_size=96, num_hidden_layers=3,
            num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256)


def config(family: str, **over):
    kw = dict(BASE)
    if family == "llama":
        kw.update(tie_word_embeddings=False)
        kw.update(over)
        return transformers.LlamaConfig(**kw)
    if family == "mistral":
        kw.update(tie_word_embeddings=False, sliding_window=None)   # lcsb reads Mistral without sliding window
        kw.update(over)
        return transformers.MistralConfig(**kw)
    if family == "qwen2":
        kw.update(tie_word_embeddings=True)
        kw.update(over)
        return transformers.Qwen2Config(**kw)
    if family == "qwen3":
        kw.update(head_dim=24, tie_word_embeddings=True)
        kw.update(over)
        return transformers.Qwen3Config(**kw)
    if family == "gemma3":
        kw.update(head_dim=16, sliding_window=5, query_pre_attn_scalar=20, layer_types=None,
                  sliding_window_pattern=2)
        kw.update(over)
        cfg = transformers.Gemma3TextConfig(**{k: v for k, v in kw.items() if k != "sliding_window_pattern"},
                                             **({"sliding_window_pattern": kw["sliding_window_pattern"]}))
        return cfg
    raise ValueError(family)


def make(family: str, folder, seed: int = 0, dtype=torch.float32, max_shard_size=None, **over):
    """Build a random model of `family`, perturb its norms so they matter, save it; return the model in fp32."""
    torch.manual_seed(seed)
    cfg = config(family, **over)
    cls = transformers.Gemma3ForCausalLM if family == "gemma3" else transformers.AutoModelForCausalLM
    model = cls.from_config(cfg) if cls is transformers.AutoModelForCausalLM else cls(cfg)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if "norm" in n:
                p.add_(torch.randn_like(p) * 0.1)
            elif p.dim() == 1:  # biases
                p.normal_(0, 0.05)
    model = model.to(dtype)
    kw = {} if max_shard_size is None else {"max_shard_size": max_shard_size}
    model.save_pretrained(folder, **kw)
    return model.float().eval()


def reference(folder) -> "transformers.PreTrainedModel":
    """The transformers model read back from `folder` in float32, eager attention (the plain-math path)."""
    return transformers.AutoModelForCausalLM.from_pretrained(
        folder, dtype=torch.float32, attn_implementation="eager").eval()


def rel_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """max |a - b| relative to max |a|: the parity measure of DESIGN section 2."""
    return ((a.float() - b.float()).abs().max() / a.float().abs().max()).item()
