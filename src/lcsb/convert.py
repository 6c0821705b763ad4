"""`lcsb convert`: write a compressed, memory-mapped copy of a model, from a checkpoint folder or a GGUF file.

A Hugging Face folder is converted by `convert_model`, streaming tensor by tensor from its
safetensors. A GGUF file is loaded as lcsb runs it (memory-mapped, its matrices in their ggml types),
and each matrix is decompressed, recompressed into `quant` and appended to the output one at a time;
the tokenizer built from the file's vocabulary is written as tokenizer.json + tokenizer_config.json
(with the chat template), so the folder is a complete Hugging Face-style folder.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .atomic import new_folder
from .errors import UserError
from .model import gguf, load_config, load_model
from .model.tokenizer import load_tokenizer
from .quant.formats import FORMATS
from .model.checkpoint import (SHARD_BYTES, TOKENIZER_FILES, CheckpointReader, Shards, _write_json, check_groups,
                               read_json, write_weights)
from .model.core import CausalLM


def convert(src: str | Path, dst: str | Path, quant: str = "int4", group_size: int = 64,
            overwrite: bool = False, progress: Callable[[int, int], None] | None = None) -> Path:
    """Convert a checkpoint folder or a GGUF file into an `lcsb convert` folder at `dst`."""
    if not gguf.is_gguf(src):
        return convert_model(src, dst, quant=quant, group_size=group_size, overwrite=overwrite, progress=progress)
    return _convert_gguf(Path(src), Path(dst), quant, group_size, overwrite, progress)


def _convert_gguf(src: Path, dst: Path, quant: str, group_size: int, overwrite: bool, progress) -> Path:
    if quant not in FORMATS:
        raise UserError(f"unknown quantization {quant!r}: choose one of {', '.join(FORMATS)}")
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} already exists; choose another output folder or pass --overwrite")
    mcfg, _ = load_config(src)                      # a bad file fails here, before anything is written
    tok = load_tokenizer(src)
    model = load_model(src)                         # file-backed: one matrix decompressed at a time below
    check_groups(model, quant, group_size)
    with new_folder(dst, overwrite) as tmp:
        # each matrix read from the mapped file a row slice at a time, its pages handed back after it
        write_weights(tmp, model, lambda name, shape: model.get_submodule(name).weight.row_slices(torch.float32),
                      lambda key, p: p.detach(), quant, group_size, SHARD_BYTES, progress)
        raw = {k: v for k, v in mcfg.raw.items() if k != "quantization"}
        raw["quantization"] = {"format": quant, **({"group_size": group_size} if quant in ("int4", "nf4") else {}),
                               "lcsb_version": __version__}
        raw["source"] = str(src.resolve())          # the checkpoint it came from (exports name it)
        _write_json(tmp / "config.json", raw)
        (tmp / "tokenizer.json").write_text(tok.backend.to_str(), encoding="utf-8")
        config = {"tokenizer_class": "PreTrainedTokenizerFast", "clean_up_tokenization_spaces": False,
                  **tok.special_tokens}
        if "default" in tok.chat_templates:
            config["chat_template"] = tok.chat_templates["default"]
        (tmp / "tokenizer_config.json").write_text(json.dumps(config, indent=2, ensure_ascii=False) + "\n",
                                                   encoding="utf-8")
    return dst


def _meta_model(src: Path):
    """The model of `src` built on the meta device, as `load_model` builds it: it names what to store."""
    cfg, family = load_config(src)
    with torch.device("meta"):
        return cfg, CausalLM(cfg, family.Block)


def convert_model(src: str | Path, dst: str | Path, quant: str = "int4", group_size: int = 64,
                  dtype: torch.dtype | None = None, shard_bytes: int = SHARD_BYTES, overwrite: bool = False,
                  progress: Callable[[int, int], None] | None = None) -> Path:
    """Write a converted copy of a Hugging Face checkpoint folder, one tensor at a time.

    Args:
        src: checkpoint folder (config.json, model*.safetensors, tokenizer files).
        dst: the folder to create; it must not exist unless `overwrite`.
        quant: "int8", "int4" or "nf4".
        group_size: group size of int4 / nf4 (ignored by int8).
        dtype: cast each float tensor to this type before quantizing it and store norms and biases
            in it; None keeps the checkpoint's own types. `load_model(dst, dtype)` then equals
            `load_model(src, dtype, quant=quant)` exactly when `dtype` is that same type (or None,
            for dtypes that hold the checkpoint's values exactly).
        shard_bytes: size of each output safetensors file.
        overwrite: replace an existing `dst`.
        progress: called as progress(done, total) after each stored module.

    Returns the path of the converted folder.
    """

    src, dst = Path(src), Path(dst)
    if quant not in FORMATS:
        raise UserError(f"unknown quantization {quant!r}: choose one of {', '.join(FORMATS)}")
    _, model = _meta_model(src)
    raw = read_json(src / "config.json")
    if raw.get("quantization") is not None or raw.get("quantization_config") is not None:
        q = raw.get("quantization") or raw.get("quantization_config")
        what = q.get("format") or q.get("quant_method") or q.get("bits") if isinstance(q, dict) else q
        raise UserError(f"{src / 'config.json'}: this model is already quantized ({what}); convert the original "
                        "float checkpoint, or pass this folder to --model as it is")
    if dst.resolve() == src.resolve():
        raise UserError(f"{dst}: the output folder is the source folder; choose another output folder")
    if dst.exists() and not overwrite:
        raise UserError(f"{dst} already exists; choose another output folder or pass --overwrite")

    grouped = quant in ("int4", "nf4")
    check_groups(model, quant, group_size)                  # refuse before writing anything
    shards = Shards(src)
    if model.lm_head is None and "lm_head.weight" in shards and "model.embed_tokens.weight" not in shards:
        raise UserError(f"{src}: tie_word_embeddings is set but the checkpoint has only lm_head.weight")

    def param(key, p):
        t = source.tensor(key, p.shape)
        return t.to(dtype) if dtype is not None else t

    with CheckpointReader(shards) as source, new_folder(dst, overwrite) as tmp:
        write_weights(tmp, model, lambda name, shape: source.matrix_rows(f"{name}.weight", shape, dtype), param,
                      quant, group_size, shard_bytes, progress)
        entry = {"format": quant}
        if grouped:
            entry["group_size"] = group_size
        entry["lcsb_version"] = __version__
        raw["quantization"] = entry
        raw["source"] = str(src.resolve())          # the checkpoint it came from: adapters name it (PEFT, MLX)
        _write_json(tmp / "config.json", raw)
        for name in TOKENIZER_FILES:
            if (src / name).is_file():
                shutil.copy2(src / name, tmp / name)
    return dst
