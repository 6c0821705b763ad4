"""Model families on a shared core, checkpoint loading, the tokenizer."""

from __future__ import annotations

from pathlib import Path

import torch

from ..config import LoraConfig, ModelConfig, RawConfig
from ..errors import UserError
from ..quant.formats import FORMATS, quantize
from ..quant.store import CheckpointReader
from . import gemma3, gguf, llama, qwen2, qwen3
from .checkpoint import Shards, read_json
from .core import CausalLM, Embedding, KVCache, Linear, materialized

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
               group_size: int = 64, lora: LoraConfig | None = None, adapter: str | Path | None = None) -> CausalLM:
    """Load a Hugging Face checkpoint folder, an `lcsb convert` folder or a GGUF file.

    Args:
        path: folder with config.json and model*.safetensors (sharded or not), or a .gguf file (its
            matrices stay in their ggml types, memory-mapped).
        dtype: float type of dense weights and of the computation.
        quant: compress base weights on load, one tensor at a time: "int8", "int4", "nf4" or None
            (refused for a GGUF file whose weights are quantized already).
        group_size: group size of int4 / nf4.
        lora: add fresh LoRA adapters with this configuration.
        adapter: load a PEFT adapter folder (adapter_config.json + adapter_model.safetensors).
    """
    folder = Path(path)
    cfg, family = load_config(folder)
    if quant is not None and quant not in FORMATS:
        raise UserError(f"unknown quantization {quant!r}: choose one of {', '.join(FORMATS)}")
    if adapter is not None:
        from ..lora import check_adapter
        check_adapter(adapter, cfg, folder)     # an adapter made for another model fails before the weights load
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
        from ..quant.store import fill_from_store   # a folder written by `lcsb convert`
        fill_from_store(model, folder, stored)
    else:
        _fill_from_checkpoint(model, Shards(folder), dtype, quant, group_size)
    model.quant = stored["format"] if stored else quant
    if adapter is not None:
        from ..lora import load_adapter
        load_adapter(model, adapter)
    elif lora is not None:
        from ..lora import add_lora
        add_lora(model, lora)
    model.eval()
    model.requires_grad_(False)
    for p in model.lora_parameters().values():
        p.requires_grad_(True)
    return model


def _fill_from_checkpoint(model: CausalLM, shards: Shards, dtype, quant, group_size):
    if model.lm_head is None and "lm_head.weight" in shards and "model.embed_tokens.weight" not in shards:
        raise UserError(f"{shards.folder}: tie_word_embeddings is set but the checkpoint has only lm_head.weight")
    # plain reads, a slice of rows at a time: neither the float matrix nor safetensors' whole-file
    # mapping stays resident (quantize-on-load of the Qwen2.5-0.5B shape: 733 MB peak instead of 1.8 GB)
    with CheckpointReader(shards) as reader:
        for name, module in model.named_modules():
            if isinstance(module, (Linear, Embedding)):
                key = f"{name}.weight"
                shape = ((module.out_features, module.in_features) if isinstance(module, Linear)
                         else (module.num_embeddings, module.embedding_dim))
                path, _, (src_dtype, got, _, _) = reader.entry(key)
                _check_tensor(path, key, got, src_dtype, shape)
                try:
                    module.weight = reader.weight(key, shape, quant, group_size, dtype)
                except UserError as e:
                    raise UserError(f"{key}: {e}") from None
    for name, p in list(model.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        mod = model.get_submodule(mod_name)
        t = _read(shards, name, tuple(p.shape)).to(dtype)
        mod._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)


def _check_tensor(where, key: str, shape, dtype: torch.dtype, expected) -> None:
    if tuple(shape) != tuple(expected):
        raise UserError(f"{where}: weight {key!r} has shape {list(shape)} but config.json implies {list(expected)}; "
                        "the safetensors files do not match config.json")
    if not dtype.is_floating_point:
        raise UserError(f"{where}: weight {key!r} is {dtype}, not a float tensor; pre-quantized checkpoints "
                        "(GPTQ, AWQ, bitsandbytes) are not supported: use the original float checkpoint")


def _read(shards: Shards, key: str, shape: tuple) -> torch.Tensor:
    """One (small) checkpoint tensor, checked against the shape config.json implies."""
    t = shards.get(key)
    _check_tensor(shards.where[key], key, t.shape, t.dtype, shape)
    return t
