"""LoRA adapters: add them, and read / write them in PEFT's layout.

PEFT layout: adapter_config.json + adapter_model.safetensors with keys
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (A [r, in], B [out, r]);
`peft.PeftModel.from_pretrained` loads it onto the original transformers checkpoint.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .config import LORA_TARGETS, LoraConfig
from .errors import UserError
from .model.checkpoint import read_json
from .model.core import CausalLM, Linear

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def target_linears(model: CausalLM, targets) -> dict[str, Linear]:
    """The LoRA-able projections of every block, by module name, filtered to `targets`."""
    return {n: m for n, m in model.model.layers.named_modules(prefix="model.layers")
            if isinstance(m, Linear) and n.rsplit(".", 1)[-1] in targets}


def add_lora(model: CausalLM, cfg: LoraConfig) -> None:
    for m in target_linears(model, cfg.targets).values():
        m.add_lora(cfg)
    model.lora_config = cfg


def peft_config(cfg: LoraConfig, base_model: str | None) -> dict:
    return {
        "peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_model,
        "r": cfg.rank, "lora_alpha": cfg.alpha, "lora_dropout": cfg.dropout,
        "target_modules": sorted(cfg.targets), "bias": "none", "fan_in_fan_out": False,
        "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
        "modules_to_save": None, "layers_to_transform": None, "rank_pattern": {}, "alpha_pattern": {},
    }


def save_adapter(model: CausalLM, folder: str | Path, base_model: str | None = None) -> None:
    """Write adapter_config.json and adapter_model.safetensors, each atomically (write, fsync, rename)."""
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: p.detach().to(torch.float32).contiguous() for k, p in model.lora_parameters().items()}
    _atomic(folder / ADAPTER_WEIGHTS, lambda p: save_file(tensors, p, metadata={"format": "pt"}))
    cfg = json.dumps(peft_config(model.lora_config, base_model), indent=2)
    _atomic(folder / ADAPTER_CONFIG, lambda p: Path(p).write_text(cfg))


def _atomic(path: Path, write) -> None:
    tmp = path.with_name(path.name + ".tmp")
    write(str(tmp))
    with open(tmp, "rb+") as f:
        os.fsync(f.fileno())
    os.replace(tmp, path)


def read_adapter_config(folder: Path) -> LoraConfig:
    path = folder / ADAPTER_CONFIG
    raw = read_json(path)
    if raw.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported; only LoRA adapters load")
    for key in ("use_dora", "use_rslora"):
        if raw.get(key):
            raise UserError(f"{path}: {key}=true is not supported; use a plain LoRA adapter")
    for key in ("rank_pattern", "alpha_pattern"):
        if raw.get(key):
            raise UserError(f"{path}: {key} (per-layer ranks) is not supported; use one rank for all layers")
    if raw.get("layers_to_transform") is not None:
        raise UserError(f"{path}: layers_to_transform is not supported; adapt every layer")
    targets = raw.get("target_modules")
    if isinstance(targets, str) or not targets:
        raise UserError(f"{path}: target_modules must be a list of projection names ({', '.join(LORA_TARGETS)})")
    bad = sorted(set(targets) - set(LORA_TARGETS))
    if bad:
        raise UserError(f"{path}: target_modules {bad} do not exist in this model; expected some of {', '.join(LORA_TARGETS)}")
    if "r" not in raw:
        raise UserError(f"{path}: missing field 'r' (the LoRA rank)")
    return LoraConfig(rank=raw["r"], alpha=raw.get("lora_alpha", raw["r"]), dropout=raw.get("lora_dropout", 0.0),
                      targets=tuple(targets))


def load_adapter(model: CausalLM, folder: str | Path) -> LoraConfig:
    """Add LoRA layers as the adapter folder describes and fill them from its weights."""
    folder = Path(folder)
    if not folder.is_dir():
        raise UserError(f"{folder}: adapter folder not found")
    cfg = read_adapter_config(folder)
    add_lora(model, cfg)
    path = folder / ADAPTER_WEIGHTS
    if not path.exists():
        raise UserError(f"{path} not found: an adapter folder needs {ADAPTER_WEIGHTS} (PEFT's safetensors format)")
    try:
        saved = load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    params = model.lora_parameters()
    saved = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v for k, v in saved.items()}
    extra = sorted(set(saved) - set(params))
    missing = sorted(set(params) - set(saved))
    if extra or missing:
        k = (extra or missing)[0]
        what = "has no such layer in this model" if extra else "is missing from the adapter"
        raise UserError(f"{path}: {k} {what}; the adapter was made for a different model (layers or targets differ)")
    with torch.no_grad():
        for k, p in params.items():
            if saved[k].shape != p.shape:
                raise UserError(f"{path}: {k} has shape {tuple(saved[k].shape)}, the model expects {tuple(p.shape)} "
                                "(rank or layer size differ); the adapter was made for a different model")
            p.copy_(saved[k])
    return cfg
