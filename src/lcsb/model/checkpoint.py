"""Reading a Hugging Face checkpoint folder: config.json and the safetensors shards.

The model is built on the meta device (its Parameters are only norms and biases; base weights are
`quant.Weight` objects set afterwards), then filled tensor by tensor from the shards. A tensor is
read, converted or compressed, and the float original dropped before the next one, so the float
model never exists in full when loading with `quant`.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from ..errors import UserError


def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); restore the file from the original checkpoint") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object")
    return d


class Shards:
    """Every tensor of a checkpoint by name, across one or several safetensors files."""

    def __init__(self, folder: Path):
        self.folder = folder
        index = folder / "model.safetensors.index.json"
        if index.exists():
            weight_map = read_json(index).get("weight_map")
            if not isinstance(weight_map, dict):
                raise UserError(f"{index}: no 'weight_map' object; restore the index from the original checkpoint")
            files = sorted(set(weight_map.values()))
        else:
            files = sorted(p.name for p in folder.glob("*.safetensors"))
            if not files:
                raise UserError(f"{folder}: no *.safetensors files; a model folder needs the checkpoint's weights "
                                "(convert .bin checkpoints to safetensors first)")
        self.where: dict[str, Path] = {}
        self.handles = {}
        for name in files:
            path = folder / name
            if not path.exists():
                raise UserError(f"{path} not found, but the index lists it; the checkpoint is incomplete")
            try:
                h = safe_open(str(path), framework="pt")
                keys = list(h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt, "
                                "download or convert it again") from None
            self.handles[path] = h
            for k in keys:
                self.where[k] = path

    def __contains__(self, key):
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        path = self.where.get(key)
        if path is None:
            raise UserError(f"{self.folder}: weight {key!r} is missing from the checkpoint; "
                            "the safetensors files do not match config.json")
        try:
            return self.handles[path].get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read {key!r} ({e}); the file is truncated or corrupt") from None

    def dtype(self, key: str) -> torch.dtype:
        return self.get_slice(key).get_dtype()

    def get_slice(self, key):
        return self.handles[self.where[key]].get_slice(key)
