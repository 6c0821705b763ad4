"""LoRA adapter files: read / write them in PEFT's layout, load a model with one, export them (PEFT, MLX-LM,
merged, GGUF). The LoRA layers themselves are model/lora.py.

PEFT layout: adapter_config.json + adapter_model.safetensors with keys
`base_model.model.model.layers.N.self_attn.q_proj.lora_A.weight` (A [r, in], B [out, r]);
`peft.PeftModel.from_pretrained` loads it onto the original transformers checkpoint.
MLX-LM layout: adapters.safetensors with `model.layers.N.self_attn.q_proj.lora_a` (A^T [in, r]) and
`.lora_b` (B^T [r, out]), and an adapter_config.json whose lora_parameters.scale is alpha / r.
Merged: a Hugging Face checkpoint with W + (alpha / r) B A.
GGUF: a llama.cpp LoRA adapter file (general.type adapter, adapter.type lora, adapter.lora.alpha)
with `<base tensor>.lora_a` (A, ggml ne [in, r]) and `.lora_b` (B, ne [r, out]) named after the base
GGUF's tensors; for the llama architecture B's rows take llama.cpp's q/k permutation, as its
convert_lora_to_gguf.py does. llama.cpp scales by alpha / r itself.
"""

from __future__ import annotations

import json
import shutil
import struct
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import load_file, save_file

from .atomic import new_folder, write_atomic
from .config import LORA_TARGETS, LoraConfig
from .errors import UserError
from .model import gguf, load_config
from .model import load_model as load_base_model
from .model.checkpoint import SHARD_BYTES, TOKENIZER_FILES, Shards, _ShardWriter, read_json
from .model.core import CausalLM
from .model.linear import Embedding, Linear
from .model.lora import add_lora

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"


def load_model(path: str | Path, dtype: torch.dtype = torch.float32, quant: str | None = None,
               group_size: int = 64, lora: LoraConfig | None = None, adapter: str | Path | None = None) -> CausalLM:
    """`lcsb.load_model`: a model (model.load_model's arguments) with fresh LoRA layers (`lora`) or a PEFT
    adapter folder's (`adapter`: adapter_config.json + adapter_model.safetensors), its LoRA trainable.
    An adapter made for another model is refused before a weight loads."""
    if adapter is not None:
        check_adapter(adapter, load_config(path)[0], Path(path))
    model = load_base_model(path, dtype, quant, group_size, lora=None if adapter is not None else lora)
    if adapter is not None:
        load_adapter(model, adapter)
    return model


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
    params = model.lora_parameters()
    _atomic(folder / ADAPTER_WEIGHTS, lambda p: _save_float32(params, p, {"format": "pt"}))
    cfg = json.dumps(peft_config(model.lora_config, base_model), indent=2)
    _atomic(folder / ADAPTER_CONFIG, lambda p: Path(p).write_text(cfg))


def _save_float32(tensors: dict[str, torch.Tensor], path: str, metadata: dict[str, str]) -> None:
    """A safetensors file of `tensors` as float32, in name order, each converted as it is written.
    safetensors' save_file needs every tensor converted first: with bfloat16 factors that was a float32 copy of
    the whole adapter at every checkpoint (114 MB at the Qwen2.5-3B shape, rank 16), above the step's peak."""
    names = sorted(tensors)
    entries, at = {}, 0
    for k in names:
        n = tensors[k].numel() * 4
        entries[k] = {"dtype": "F32", "shape": list(tensors[k].shape), "data_offsets": [at, at + n]}
        at += n
    header = json.dumps({"__metadata__": metadata, **entries}, separators=(",", ":")).encode()
    header += b" " * (-len(header) % 8)               # the data 8-byte aligned, as safetensors writes it
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(header)))
        f.write(header)
        for k in names:
            t = tensors[k].detach().cpu().to(torch.float32).contiguous()
            if t.numel():
                f.write(t.reshape(-1).view(torch.uint8).numpy().data)
            del t                                      # before the next one is made


def _atomic(path: Path, write) -> None:
    write_atomic(path, write)       # disk full, killed by Ctrl-C: no half-written file is left behind


def read_adapter_config(folder: Path) -> LoraConfig:
    path = folder / ADAPTER_CONFIG
    raw = read_json(path)
    if raw.get("peft_type", "LORA") != "LORA":
        raise UserError(f"{path}: peft_type {raw.get('peft_type')!r} is not supported; only LoRA adapters load")
    for key in ("use_dora", "use_rslora", "lora_bias", "fan_in_fan_out"):
        if raw.get(key):
            raise UserError(f"{path}: {key}=true is not supported; use a plain LoRA adapter")
    for key in ("modules_to_save", "trainable_token_indices", "target_parameters"):
        if raw.get(key):
            raise UserError(f"{path}: {key} is set ({raw[key]!r}): the adapter trains more than LoRA on the "
                            "projections, which lcsb cannot load; use a plain LoRA adapter")
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
    r, alpha, dropout = raw["r"], raw.get("lora_alpha", raw["r"]), raw.get("lora_dropout", 0.0)
    if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
        raise UserError(f"{path}: 'r' (the LoRA rank) must be a positive integer, got {r!r}")
    for key, v in (("lora_alpha", alpha), ("lora_dropout", dropout)):
        if isinstance(v, bool) or not isinstance(v, (int, float)):
            raise UserError(f"{path}: '{key}' must be a number, got {v!r}")
    try:
        return LoraConfig(rank=r, alpha=alpha, dropout=dropout, targets=tuple(targets))
    except UserError as e:
        raise UserError(f"{path}: {e}") from None


def check_adapter(path: str | Path, mcfg, model: str | Path | None = None) -> LoraConfig:
    """Check an adapter folder against a model's config.json before any weight loads; return its LoraConfig.

    Reads adapter_config.json and only the header of adapter_model.safetensors (names and shapes).
    Every mismatch names the adapter file and what differs: layers, targets, rank or a projection's size.
    """
    folder = adapter_folder(path)
    cfg = read_adapter_config(folder)
    cfg_path, weights = folder / ADAPTER_CONFIG, folder / ADAPTER_WEIGHTS
    model_json = ("the model's config.json" if model is None else
                  f"the metadata of {model}" if gguf.is_gguf(model) else f"{model}/config.json")
    if not weights.exists():
        raise UserError(f"{weights} not found: an adapter folder needs {ADAPTER_WEIGHTS} (PEFT's safetensors format)")
    try:
        with safe_open(str(weights), framework="pt") as f:
            shapes = {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{weights}: not a readable safetensors file ({e})") from None
    h, i = mcfg.hidden_size, mcfg.intermediate_size
    dq, dkv = mcfg.num_heads * mcfg.head_dim, mcfg.num_kv_heads * mcfg.head_dim
    sizes = {"q_proj": (h, dq), "k_proj": (h, dkv), "v_proj": (h, dkv), "o_proj": (dq, h),
             "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}       # (in, out)
    layers, targets = set(), set()
    for key, shape in shapes.items():
        name = key.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B.")
        parts = name.split(".")      # base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_<A|B>.weight
        if (len(parts) != 9 or parts[:4] != ["base_model", "model", "model", "layers"] or not parts[4].isdigit()
                or parts[6] not in sizes or _MODULE_OF[parts[6]] != parts[5] or parts[7] not in ("lora_A", "lora_B")
                or parts[8] != "weight"):
            raise UserError(f"{weights}: unexpected tensor {key!r}; expected PEFT LoRA keys "
                            "base_model.model.model.layers.N.<self_attn|mlp>.<proj>.lora_A.weight / .lora_B.weight")
        layer, proj, which = int(parts[4]), parts[6], parts[7]
        layers.add(layer)
        targets.add(proj)
        inp, out = sizes[proj]
        want = (cfg.rank, inp) if which == "lora_A" else (out, cfg.rank)
        if len(shape) != 2:
            raise UserError(f"{weights}: {key} has shape {list(shape)}, not a matrix")
        rank = shape[0] if which == "lora_A" else shape[1]
        if rank != cfg.rank:
            raise UserError(f"{weights}: {key} has rank {rank} but {cfg_path} says r={cfg.rank}; "
                            "the two files do not belong together")
        if shape != want:
            size = shape[1] if which == "lora_A" else shape[0]
            raise UserError(f"{weights}: {key} has shape {list(shape)}: its {proj} has "
                            f"{'inputs' if which == 'lora_A' else 'outputs'} of size {size}, but the model's {proj} "
                            f"has {inp if which == 'lora_A' else out} ({model_json}); the adapter was made for a "
                            "different model")
    n = mcfg.num_layers
    if not layers:
        raise UserError(f"{weights}: no LoRA tensors; the adapter is empty")
    if max(layers) >= n:
        raise UserError(f"{weights}: the adapter has LoRA on {max(layers) + 1} layers (0-{max(layers)}), but the model "
                        f"has {n} (num_hidden_layers in {model_json}); the adapter was made for a different model")
    if layers != set(range(n)):
        gone = sorted(set(range(n)) - layers)
        raise UserError(f"{weights}: the adapter has no LoRA on layer(s) {', '.join(map(str, gone[:8]))} of the "
                        f"model's {n} (num_hidden_layers in {model_json}); the adapter was made for a different "
                        "model, or adapts only some layers, which lcsb does not load")
    if targets != set(cfg.targets):
        raise UserError(f"{cfg_path}: target_modules lists {', '.join(sorted(cfg.targets))} but {weights} holds LoRA "
                        f"for {', '.join(sorted(targets))}; the two files do not belong together")
    return cfg


def load_adapter(model: CausalLM, folder: str | Path) -> LoraConfig:
    """Add LoRA layers as the adapter folder describes and fill them from its weights."""
    cfg, saved, _ = read_adapter(folder)          # read whole before the model is touched
    path = adapter_folder(folder) / ADAPTER_WEIGHTS
    add_lora(model, cfg)
    params = model.lora_parameters()
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


# ---------------------------------------------------------------- export: PEFT, MLX-LM, merged

MLX_WEIGHTS = "adapters.safetensors"
EXPORTS = ("peft", "mlx", "merged", "gguf")
_MODULE_OF = {"q_proj": "self_attn", "k_proj": "self_attn", "v_proj": "self_attn", "o_proj": "self_attn",
              "gate_proj": "mlp", "up_proj": "mlp", "down_proj": "mlp"}


def adapter_folder(path: str | Path) -> Path:
    """`path` if it holds an adapter (adapter_config.json + adapter_model.safetensors), with an error
    that says what to pass instead otherwise (a run that never finished has only checkpoints)."""
    folder = Path(path)
    if not folder.is_dir():
        raise UserError(f"{folder}: adapter folder not found; pass a run folder or an adapter folder")
    if not (folder / ADAPTER_CONFIG).exists():
        done = sorted(p for p in (folder / "checkpoints").glob("step-*") if (p / "state.json").exists()) \
            if (folder / "checkpoints").is_dir() else []
        hint = (f"the run has not finished; its latest checkpoint is an adapter folder: {done[-1]}" if done
                else f"an adapter folder holds {ADAPTER_CONFIG} and {ADAPTER_WEIGHTS} (PEFT layout)")
        raise UserError(f"{folder / ADAPTER_CONFIG} not found: {hint}")
    return folder


def read_adapter(path: str | Path) -> tuple[LoraConfig, dict[str, torch.Tensor], dict]:
    """(LoRA config, {PEFT key without the adapter name: float tensor}, raw adapter_config.json) of an adapter folder."""
    folder = adapter_folder(path)
    cfg = read_adapter_config(folder)
    path = folder / ADAPTER_WEIGHTS
    if not path.exists():
        raise UserError(f"{path} not found: an adapter folder needs {ADAPTER_WEIGHTS} (PEFT's safetensors format)")
    try:
        saved = load_file(str(path))
    except Exception as e:  # safetensors raises several types for damaged files
        raise UserError(f"{path}: not a readable safetensors file ({e})") from None
    saved = {k.replace(".lora_A.default.", ".lora_A.").replace(".lora_B.default.", ".lora_B."): v.float()
             for k, v in saved.items()}
    return cfg, saved, read_json(folder / ADAPTER_CONFIG)


def lora_pairs(tensors: dict[str, torch.Tensor], where: Path) -> dict[str, tuple[torch.Tensor, torch.Tensor]]:
    """{HF module name ("model.layers.3.self_attn.q_proj"): (A [r, in], B [out, r])} from PEFT keys."""
    pairs: dict[str, dict[str, torch.Tensor]] = {}
    for key, t in tensors.items():
        stem, _, which = key.removesuffix(".weight").rpartition(".")
        if not key.startswith("base_model.model.") or which not in ("lora_A", "lora_B") or not key.endswith(".weight"):
            raise UserError(f"{where}: unexpected tensor {key!r}; expected PEFT LoRA keys "
                            "base_model.model.<module>.lora_A.weight / .lora_B.weight")
        pairs.setdefault(stem.removeprefix("base_model.model."), {})[which] = t
    out = {}
    for name, ab in pairs.items():
        if set(ab) != {"lora_A", "lora_B"}:
            raise UserError(f"{where}: {name} has only {', '.join(ab)}; the adapter is incomplete")
        A, B = ab["lora_A"], ab["lora_B"]
        if A.dim() != 2 or B.dim() != 2 or A.shape[0] != B.shape[1]:
            raise UserError(f"{where}: {name} has lora_A {tuple(A.shape)} and lora_B {tuple(B.shape)}, "
                            "which do not form a rank-r product")
        out[name] = (A, B)
    return out


def _layer_index(name: str) -> int:
    parts = name.split(".")          # model.layers.N.<self_attn|mlp>.<proj>
    if len(parts) != 5 or parts[:2] != ["model", "layers"] or not parts[2].isdigit() \
            or _MODULE_OF.get(parts[4]) != parts[3]:
        raise UserError(f"{name}: not a block projection (model.layers.N.self_attn|mlp.<proj>); "
                        "only LoRA on the blocks' projections can be exported")
    return int(parts[2])


def mlx_adapter(cfg: LoraConfig, tensors: dict[str, torch.Tensor], where: Path,
                base_model: str | None = None) -> tuple[dict[str, torch.Tensor], dict]:
    """The adapter in MLX-LM's layout: (adapters.safetensors tensors, adapter_config.json).

    MLX-LM's LoRALinear computes y = W x + scale * (dropout(x) @ lora_a) @ lora_b with lora_a
    [in, r] and lora_b [r, out], so lora_a = A^T, lora_b = B^T and scale = alpha / r (PEFT's
    scaling; MLX-LM takes the scale itself, not alpha). `load_adapters` wraps the listed `keys`
    of the last `num_layers` blocks: ours adapt every block, so num_layers is the block count.
    """
    pairs = lora_pairs(tensors, where)
    layers = {_layer_index(n) for n in pairs}
    n = max(layers) + 1
    if layers != set(range(n)):
        raise UserError(f"{where}: the adapter skips blocks {sorted(set(range(n)) - layers)}; MLX-LM adapts "
                        "the last num_layers blocks, so every block must have LoRA")
    out = {}
    for name, (A, B) in pairs.items():
        out[f"{name}.lora_a"] = A.T.contiguous()       # [in, r]
        out[f"{name}.lora_b"] = B.T.contiguous()       # [r, out]
    keys = [f"{_MODULE_OF[t]}.{t}" for t in LORA_TARGETS if t in cfg.targets]
    config = {"fine_tune_type": "lora", "num_layers": n,
              "lora_parameters": {"rank": cfg.rank, "scale": cfg.alpha / cfg.rank, "dropout": cfg.dropout,
                                  "keys": keys}}
    if base_model:
        config["model"] = base_model
    return out, config


def export_adapter(adapter: str | Path, to: str, out: str | Path, model: str | Path | None = None,
                   dtype: torch.dtype | None = None, overwrite: bool = False, say=None) -> Path:
    """Write the adapter of a run (or adapter folder) as `to` into the folder `out`, atomically.

    Args:
        adapter: a run folder or an adapter folder (adapter_config.json + adapter_model.safetensors).
        to: "peft" (the two files, as `peft.PeftModel.from_pretrained` loads them), "mlx" (MLX-LM's
            adapters.safetensors + adapter_config.json) or "merged" (a Hugging Face checkpoint with
            the adapter folded into the base weights).
        out: the folder to create; it must not exist unless `overwrite`.
        model: base checkpoint for "merged" (default: the adapter's base_model_name_or_path).
        dtype: float type of the merged checkpoint (default: the base checkpoint's own).
        say: called with notes for the user (e.g. merging into dequantized weights).
    """
    say = say or (lambda *a: None)
    if to not in EXPORTS:
        raise UserError(f"unknown export format {to!r}: choose one of {', '.join(EXPORTS)}")
    cfg, tensors, raw = read_adapter(adapter)
    folder = adapter_folder(adapter)
    base = str(model) if model is not None else raw.get("base_model_name_or_path")
    out = Path(out)
    if out.resolve() == folder.resolve():
        raise UserError(f"{out}: the output folder is the adapter folder; choose another output folder")
    if to == "gguf":
        if not base or not gguf.is_gguf(base):
            raise UserError(f"--to gguf needs the base model's .gguf file (the adapter's base is {base!r}); "
                            "pass it with --model")
        gguf_adapter_file(cfg, tensors, folder / ADAPTER_WEIGHTS, Path(base), out, overwrite)
        return out
    if to == "merged":
        if not base:
            raise UserError(f"{folder / ADAPTER_CONFIG} names no base model (base_model_name_or_path); "
                            "pass the base checkpoint folder with --model")
        if not Path(base).is_dir():
            raise UserError(f"{base}: base model folder not found (from "
                            f"{'--model' if model is not None else folder / ADAPTER_CONFIG}); "
                            "pass the base checkpoint folder with --model")
    with new_folder(out, overwrite) as tmp:
        if to == "peft":
            lora_pairs(tensors, folder / ADAPTER_WEIGHTS)           # checks the keys before copying
            shutil.copy2(folder / ADAPTER_WEIGHTS, tmp / ADAPTER_WEIGHTS)
            shutil.copy2(folder / ADAPTER_CONFIG, tmp / ADAPTER_CONFIG)
        elif to == "mlx":
            weights, config = mlx_adapter(cfg, tensors, folder / ADAPTER_WEIGHTS, base)
            save_file(weights, str(tmp / MLX_WEIGHTS), metadata={"format": "mlx"})
            (tmp / ADAPTER_CONFIG).write_text(json.dumps(config, indent=2) + "\n")
        else:
            merge_adapter(cfg, tensors, folder / ADAPTER_WEIGHTS, Path(base), tmp, dtype, say)
    return out


def gguf_adapter_file(cfg: LoraConfig, tensors: dict[str, torch.Tensor], where: Path, base: Path, out: Path,
                      overwrite: bool = False) -> Path:
    """Write the adapter as a llama.cpp LoRA GGUF file for the base GGUF `base` (atomically)."""
    mcfg, _ = load_config(base)                 # a broken or unsupported base fails here, by name
    g = gguf.read_gguf(base)
    out = Path(out)
    if out.exists() and not overwrite:
        raise UserError(f"{out} already exists; choose another output file or pass --overwrite")
    if out.resolve() == base.resolve():
        raise UserError(f"{out}: the output file is the base model; choose another output file")
    names = gguf.gguf_names(g.arch, mcfg.num_layers)
    weights = {}
    for name, (A, B) in sorted(lora_pairs(tensors, where).items(), key=lambda kv: (_layer_index(kv[0]), kv[0])):
        key = names[f"{name}.weight"]
        if key not in g.tensors:
            raise UserError(f"{where}: {name} has no tensor {key} in {base}; the adapter was made for a "
                            "different model")
        base_out, base_in = g.tensors[key].shape
        if (B.shape[0], A.shape[1]) != (base_out, base_in):
            raise UserError(f"{where}: the adapter's {name} is {B.shape[0]}x{A.shape[1]} but {base} has "
                            f"{base_out}x{base_in} ({key}); the adapter was made for a different model")
        if g.arch == "llama" and name.endswith(("q_proj", "k_proj")):
            B = gguf.llama_qk_permute(B, mcfg.num_heads if name.endswith("q_proj") else mcfg.num_kv_heads)
        weights[f"{key}.lora_a"] = A.float().contiguous()         # [r, in]: ggml ne [in, r]
        weights[f"{key}.lora_b"] = B.float().contiguous()         # [out, r]: ggml ne [r, out]
    meta = {"general.architecture": g.arch, "general.type": "adapter", "adapter.type": "lora",
            "adapter.lora.alpha": float(cfg.alpha)}
    if "general.name" in g.meta:
        meta["general.name"] = f"{g.meta['general.name']} LoRA (lcsb)"
    out.parent.mkdir(parents=True, exist_ok=True)
    gguf.write_gguf(out, meta, weights)
    return out


def merge_adapter(cfg: LoraConfig, tensors: dict[str, torch.Tensor], where: Path, base: Path, out: Path,
                  dtype: torch.dtype | None = None, say=None) -> None:
    """Write into `out` a Hugging Face checkpoint of `base` with W + (alpha / r) B A in every adapted
    projection: model*.safetensors (HF names), config.json, the tokenizer files.

    A plain checkpoint is copied tensor by tensor (anything lcsb does not use included), each
    merged in float32 and stored in its own dtype (or `dtype`). A folder made by `lcsb convert` is
    merged into its dequantized weights, stored as `dtype` or the original checkpoint's dtype, and
    config.json loses its "quantization" entry: a float checkpoint that transformers loads.
    One tensor is in memory at a time.
    """
    say = say or (lambda *a: None)
    load_config(base)                            # an unsupported or broken base fails here, by name
    raw = read_json(base / "config.json")
    pairs = lora_pairs(tensors, where)
    deltas = {}
    for name, (A, B) in pairs.items():
        _layer_index(name)
        deltas[f"{name}.weight"] = (A, B)
    quant = raw.pop("quantization", None)
    raw.pop("quantization_config", None)
    dtype_key = "dtype" if "dtype" in raw or "torch_dtype" not in raw else "torch_dtype"
    names = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
    stored_dtype = names.get(str(raw.get(dtype_key)).removeprefix("torch."))

    def merged(key: str, w: torch.Tensor, want: torch.dtype) -> torch.Tensor:
        if key in deltas:
            A, B = deltas.pop(key)
            if tuple(w.shape) != (B.shape[0], A.shape[1]):
                raise UserError(f"{where}: the adapter's {key.removesuffix('.weight')} is {B.shape[0]}x{A.shape[1]} "
                                f"but {base} has {list(w.shape)}; the adapter was made for a different model")
            w = w.float() + (B @ A) * cfg.scaling
        return w.to(want) if w.is_floating_point() else w

    writer = _ShardWriter(out, SHARD_BYTES)
    if quant:
        out_dtype = dtype or stored_dtype or torch.float32
        say(f"note: {base} is a quantized `lcsb convert` folder ({quant.get('format') if isinstance(quant, dict) else quant}); "
            f"the adapter is merged into its dequantized weights, stored as {str(out_dtype).removeprefix('torch.')} "
            "(the quantization error of the base stays in the result)")
        model = load_base_model(base)            # file-backed: one module's weights resident at a time
        for name, m in model.named_modules():
            if isinstance(m, (Linear, Embedding)):
                key = f"{name}.weight"
                writer.add({key: merged(key, m.weight.dequantize(torch.float32), out_dtype)})
                m.weight.release()
        for name, p in model.named_parameters():
            writer.add({name: p.detach().to(out_dtype)})
        del model
    else:
        out_dtype = dtype or stored_dtype
        shards = Shards(base)
        for key in shards.where:
            t = shards.get(key)
            writer.add({key: merged(key, t, (dtype or t.dtype) if t.is_floating_point() else t.dtype)})
    if deltas:
        raise UserError(f"{where}: {sorted(deltas)[0].removesuffix('.weight')} has no weight in {base}; "
                        "the adapter was made for a different model")
    writer.close()
    if out_dtype is not None:
        raw[dtype_key] = str(out_dtype).removeprefix("torch.")
    (out / "config.json").write_text(json.dumps(raw, indent=2) + "\n")
    for name in TOKENIZER_FILES:
        if (base / name).is_file():
            shutil.copy2(base / name, out / name)
