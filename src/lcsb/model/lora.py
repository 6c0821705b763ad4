"""The LoRA layers: which projections get them, and adding them (linear.Linear holds A, B and the scale).

Adapter files (PEFT, MLX-LM, merged, GGUF) are read and written one layer up, in lcsb/lora.py.
"""

from __future__ import annotations

import torch

from ..config import LoraConfig
from ..errors import UserError
from ..runtime import packed, release_cached
from .core import CausalLM
from .linear import Linear


def target_linears(model: CausalLM, targets) -> dict[str, Linear]:
    """The LoRA-able projections of every block, by module name, filtered to `targets`."""
    return {n: m for n, m in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(m, Linear) and n.rsplit(".", 1)[-1] in targets}


def add_lora(model: CausalLM, cfg: LoraConfig) -> None:
    """LoRA on the targeted projections: trainable parameters, in the model's mode (a model in eval mode
    gets its LoRA dropout off, as PEFT's)."""
    for m in target_linears(model, cfg.targets).values():
        m.add_lora(cfg)
    model.lora_config = cfg
    model.train(model.training)         # new modules start in training mode; follow the model


LORA_DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}


def set_lora_dtype(model: CausalLM, dtype: str) -> None:
    """Store the LoRA factors (and so their gradients and optimizer moments, which take the parameter's
    type) as `dtype`: "float32" (default) or "bfloat16", half the bytes of the LoRA state, which at rank 16
    on all projections is 480 MB of a 3B model's step in float32 (parameters, gradients, AdamW's two
    moments). The factors compute in the activations' type (linear.Linear); the optimizer does its
    arithmetic in float32 and rounds back stochastically (optim.BlockOptimizer), so updates smaller than
    bfloat16's resolution are not lost. Adapters are saved in float32 either way."""
    if dtype not in LORA_DTYPES:
        raise UserError(f"--lora-dtype {dtype!r}: choose one of {', '.join(LORA_DTYPES)}")
    want = LORA_DTYPES[dtype]
    with torch.no_grad():
        for block in model.model.layers:          # each block's converted factors in one allocation (runtime.packed)
            convert = [p for n, p in block.named_parameters() if ".lora_" in n and p.dtype != want]
            for p, q in zip(convert, packed(convert, want)):
                p.data, p.grad = q.copy_(p.data), None
    # the caching allocator keeps the freed float32 tensors (64 KB and up) for reuse; none will come: hand
    # them back (Qwen2.5-0.5B: resident set -11 MB after the conversion with it, +10 MB without)
    release_cached()
