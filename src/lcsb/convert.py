"""`lcsb convert`: write a compressed, memory-mapped copy of a model, from a checkpoint folder or a GGUF file.

A Hugging Face folder is converted by `quant.store.convert_model`, streaming tensor by tensor from its
safetensors. A GGUF file is loaded as lcsb runs it (memory-mapped, its matrices in their ggml types),
and each matrix is decompressed, recompressed into `quant` and appended to the output one at a time;
the tokenizer built from the file's vocabulary is written as tokenizer.json + tokenizer_config.json
(with the chat template), so the folder is a complete Hugging Face-style folder.
"""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path
from typing import Callable

import torch

from . import __version__
from .errors import UserError
from .model import gguf, load_config, load_model
from .model.core import Embedding, Linear
from .model.tokenizer import load_tokenizer
from .quant.formats import FORMATS, check_group_size, quantize
from .quant.store import SHARD_BYTES, _fsync_dir, _ShardWriter, _write_json, convert_model


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
        raise UserError(f"{dst} already exists; choose another output folder or remove it first")
    mcfg, _ = load_config(src)                      # a bad file fails here, before anything is written
    if quant in ("int4", "nf4"):
        check_group_size(group_size, quant)
        for n in (mcfg.hidden_size, mcfg.intermediate_size, mcfg.num_heads * mcfg.head_dim):
            if n % group_size:
                raise UserError(f"{quant}: {src} has a matrix input dimension {n}, not a multiple of the group "
                                f"size {group_size}; choose a --group-size that divides it")
    tok = load_tokenizer(src)
    model = load_model(src)                         # file-backed: one matrix decompressed at a time below
    dst.parent.mkdir(parents=True, exist_ok=True)
    tmp = dst.parent / f".{dst.name}.lcsb-tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        writer = _ShardWriter(tmp, SHARD_BYTES)
        modules = [(n, m) for n, m in model.named_modules()
                   if isinstance(m, (Linear, Embedding)) or any(True for _ in m.parameters(recurse=False))]
        for i, (name, m) in enumerate(modules):
            group = {}
            if isinstance(m, (Linear, Embedding)):
                w = quantize(m.weight.dequantize(torch.float32), quant, group_size)
                m.weight.release()
                group.update({f"{name}.{suffix}": t for suffix, t in w.tensors().items()})
            for pname, p in m.named_parameters(recurse=False):
                group[f"{name}.{pname}"] = p.detach()
            writer.add(group)
            if progress is not None:
                progress(i + 1, len(modules))
        writer.close()
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
        if dst.exists():
            shutil.rmtree(dst)
        tmp.rename(dst)
        _fsync_dir(dst.parent)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return dst
