"""Checks of a training run's options before any work: types, ranges, and the fit with the model.

The CLI's flags arrive typed by argparse, but a YAML file (`--config`) or the Python API can hand
any value to any option; a string where a number belongs would otherwise surface as a TypeError
deep in the run. Every problem here is one `UserError` line naming the option (`--name`, which is
also the YAML key with underscores) and what to give instead. `check_fit` needs config.json only,
so a run that cannot work on this model stops before the tokenizer, the data or the weights load.
"""

from __future__ import annotations

import dataclasses
import math
from pathlib import Path
from .config import LORA_TARGETS, LoraConfig, TrainConfig
from .errors import UserError
from .lora import check_adapter
from .memory import parse_size
from .quant.formats import check_group_size

_KINDS = {"int": "an integer", "float": "a number", "bool": "true or false", "str": "a string",
          "list": "a list of strings"}


def flag(name: str) -> str:
    """The option's flag: `lr` -> `--lr`, `batch_size` -> `--batch-size`."""
    return "--" + name.replace("_", "-")


def _is(kind: str, v) -> bool:
    if kind == "int":
        return isinstance(v, int) and not isinstance(v, bool)
    if kind == "float":
        return isinstance(v, (int, float)) and not isinstance(v, bool)
    if kind == "bool":
        return isinstance(v, bool)
    if kind == "str":
        return isinstance(v, str)
    return isinstance(v, (list, tuple)) and all(isinstance(x, str) for x in v)


def check_types(cfg: TrainConfig):
    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if v is None or _is(kind, v) or (f.name == "max_memory" and _is("float", v)):
            continue
        raise UserError(f"{flag(f.name)} (`{f.name}` in a config file) must be {_KINDS.get(kind, kind)}, got {v!r}")
    # choices: argparse checks them for flags, this for config files and the API
    for f in dataclasses.fields(TrainConfig):
        choices, v = f.metadata.get("choices"), getattr(cfg, f.name)
        if choices and v is not None and v not in choices:
            raise UserError(f"{flag(f.name)} must be one of {', '.join(choices)}, got {v!r}")


def check_options(cfg: TrainConfig):
    """Types and choices, then every field's own rule (its `check` in config.py), then rules across fields."""
    check_types(cfg)
    check_ranges(cfg)


def check_ranges(cfg: TrainConfig):
    """Every numeric option in its range (after check_types), as one line naming the flag."""
    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        if isinstance(v, float) and not math.isfinite(v):
            raise UserError(f"{flag(f.name)} must be a finite number, got {v!r}")
        wrong = f.metadata["check"](v) if f.metadata["check"] and v is not None else None
        if wrong:
            raise UserError(f"{flag(f.name)} {wrong}, got {v!r}")
    bad = [t for t in cfg.targets if t not in LORA_TARGETS]
    if bad or not cfg.targets:
        raise UserError(f"--targets {' '.join(cfg.targets) or '(none)'}: choose among {', '.join(LORA_TARGETS)}")
    if cfg.quant in ("int4", "nf4"):
        check_group_size(cfg.group_size, f"--group-size ({cfg.quant})")
    if cfg.max_memory is not None:
        parse_size(cfg.max_memory)
    if cfg.out is not None and Path(cfg.out).exists() and not Path(cfg.out).is_dir():
        raise UserError(f"--out {cfg.out} is a file; the run folder must be a folder (new or a run's)")


def check_fit(cfg: TrainConfig, mcfg, selection_cls) -> tuple[object, LoraConfig]:
    """The selection and the LoRA adapter on this model's config.json: (validated Selection, LoraConfig).

    `cfg.active` must be resolved. With `cfg.adapter` the LoRA configuration is the adapter's own,
    checked against the model's shape before anything loads.
    """
    n = mcfg.num_layers
    if cfg.quant in ("int4", "nf4") and not mcfg.raw.get("quantization"):
        dims = {"hidden_size": mcfg.hidden_size, "intermediate_size": mcfg.intermediate_size,
                "num_attention_heads * head_dim": mcfg.num_heads * mcfg.head_dim}
        bad = {k: d for k, d in dims.items() if d % cfg.group_size}
        if bad:
            k, d = next(iter(bad.items()))
            ok = [g for g in (32, 64, 128) if all(x % g == 0 for x in dims.values())]
            raise UserError(f"--group-size {cfg.group_size} does not divide {k}={d} ({cfg.model}/config.json): "
                            f"{cfg.quant} groups run along every weight's input; use --group-size "
                            f"{' or '.join(map(str, ok)) if ok else 'of a divisor'} or --quant int8")
    selection = selection_cls(cfg.method, cfg.groups, cfg.grouping, cfg.interval, cfg.active, cfg.order,
                              cfg.seed, cfg.full_every).validate(n)
    if cfg.adapter:
        return selection, check_adapter(cfg.adapter, mcfg, cfg.model)
    return selection, LoraConfig(cfg.rank, cfg.alpha, cfg.dropout, tuple(cfg.targets))
