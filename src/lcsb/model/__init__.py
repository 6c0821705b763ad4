"""Model families on a shared core, checkpoint loading, the tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import LoraConfig, ModelConfig, RawConfig
from ..errors import UserError
from ..quant.formats import FORMATS
from . import gemma3, gguf, llama, qwen2, qwen3
from .checkpoint import Shards, fill_from_checkpoint, fill_from_store, read_json
from .core import CausalLM, KVCache
from .linear import materialized
from .lora import add_lora

FAMILIES = {"llama": llama, "mistral": llama, "qwen2": qwen2, "qwen3": qwen3, "gemma3_text": gemma3}

__all__ = ["CausalLM", "KVCache", "FAMILIES", "load_config", "load_model", "materialized"]


def load_config(path: str | Path) -> tuple[ModelConfig, object]:
    """Parse <path>/config.json (or a GGUF file's metadata) with its family's rules -> (ModelConfig, family module)."""
    folder = Path(path)
    if gguf.is_gguf(folder):
        return _parse_config(gguf.hf_config(gguf.read_gguf(folder)), str(folder))
    if folder.is_file():
        raise UserError(f"{folder}: not a model folder or a .gguf file; pass a Hugging Face checkpoint folder, "
                        "an `lcsb convert` folder or a GGUF model file with --model")
    if not folder.is_dir():
        hint = (" (a Hugging Face Hub id? lcsb does not download: pass the downloaded folder)"
                if "/" in str(path) and not str(path).startswith((".", "/", "~")) else "")
        raise UserError(f"{folder}: model not found{hint}; pass a Hugging Face checkpoint folder or a .gguf file "
                        "with --model")
    cfg_path = folder / "config.json"
    if not cfg_path.exists():
        raise UserError(f"{cfg_path} not found: a model folder needs the config.json of its Hugging Face checkpoint")
    return _parse_config(read_json(cfg_path), str(cfg_path))


def _parse_config(raw: dict, cfg_path: str) -> tuple[ModelConfig, object]:
    model_type = raw.get("model_type")
    if model_type is None:
        raise UserError(f"{cfg_path}: missing field 'model_type'; supported: {', '.join(sorted(FAMILIES))}")
    if model_type == "gemma3":
        raise UserError(f"{cfg_path}: model_type 'gemma3' is the multimodal Gemma 3; "
                        "use a text-only checkpoint (model_type 'gemma3_text', e.g. gemma-3-1b)")
    if model_type not in FAMILIES:
        raise UserError(f"{cfg_path}: model_type {model_type!r} is not supported; supported: {', '.join(sorted(FAMILIES))}")
    if model_type == "mistral" and raw.get("sliding_window") is not None:
        raise UserError(f"{cfg_path}: Mistral with a sliding window is not supported; set sliding_window to null "
                        "if the model does not rely on it")
    family = FAMILIES[model_type]
    return family.parse_config(RawConfig(raw, cfg_path)), family


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, quant: str | None = None,
               group_size: int = 64, lora: LoraConfig | None = None) -> CausalLM:
    """Load a Hugging Face checkpoint folder, an `lcsb convert` folder or a GGUF file (`lcsb.load_model`, in
    lora.py, also loads an adapter onto it).

    Args:
        path: folder with config.json and model*.safetensors (sharded or not), or a .gguf file (its
            matrices stay in their ggml types, memory-mapped).
        dtype: float type of dense weights and of the computation.
        quant: compress base weights on load, one tensor at a time: "int8", "int4", "nf4" or None
            (refused for a GGUF file whose weights are quantized already, and for a converted folder of
            another format).
        group_size: group size of int4 / nf4.
        lora: add fresh LoRA adapters with this configuration (trainable; every base weight is frozen).
    """
    folder = Path(path)
    cfg, family = load_config(folder)
    if quant is not None and quant not in FORMATS:
        raise UserError(f"unknown quantization {quant!r}: choose one of {', '.join(FORMATS)}")
    stored = cfg.raw.get("quantization")
    with torch.device("meta"):
        model = CausalLM(cfg, family.Block)
    model.dtype = dtype
    if gguf.is_gguf(folder):
        gguf.fill_from_gguf(model, gguf.read_gguf(folder), quant, group_size)
        stored = {"format": quant or "gguf"}
    elif stored:
        if quant is not None and quant != stored.get("format"):
            raise UserError(f"{folder} is already compressed to {stored.get('format')} (`lcsb convert`); --quant "
                            f"{quant} cannot apply to it: leave --quant out, or convert the original checkpoint "
                            f"with --quant {quant}")
        fill_from_store(model, folder, stored)
    else:
        fill_from_checkpoint(model, Shards(folder), dtype, quant, group_size)
    model.quant = stored["format"] if stored else quant
    model.eval()
    model.requires_grad_(False)
    if lora is not None:
        add_lora(model, lora)          # new parameters: trainable
    return model
