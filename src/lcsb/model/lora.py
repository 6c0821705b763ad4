"""The LoRA layers: which projections get them, and adding them (linear.Linear holds A, B and the scale).

Adapter files (PEFT, MLX-LM, merged, GGUF) are read and written one layer up, in lcsb/lora.py.
"""

from __future__ import annotations

from ..config import LoraConfig
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
