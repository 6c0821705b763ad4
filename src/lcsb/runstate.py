"""Run state (DESIGN section 7): what a run checkpoint holds, and writing and reading it atomically.

A run checkpoint (checkpoints/step-N in the run folder; not a model checkpoint, not a block input saved
for the backward pass) holds everything the next step depends on: the adapter, the optimizer state keyed
by parameter name (so a changed parameter order never loads a moment into the wrong tensor), the step,
the data position (epoch and batch index; the order itself is a function of the seed and the epoch), the
RNG state and the run's counters. The schedule and the selection are pure functions of the step, the
batches of the data position (data.Batches). Only
safetensors and JSON are written and read, never pickles.
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import load_file, save_file

from .atomic import write_atomic
from .lora import ADAPTER_WEIGHTS, save_adapter
from .optim import BlockOptimizer


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def write_json(path: Path, obj):
    write_text(path, json.dumps(obj, indent=2))


def write_text(path: Path, text: str):
    """Write, fsync, rename: a kill leaves the old file or the new one, never a torn one."""
    write_atomic(path, lambda tmp: Path(tmp).write_text(text))


def _save_tensors(path: Path, tensors: dict):
    save_file({k: v.contiguous() for k, v in tensors.items()}, str(path))
    with open(path, "rb+") as f:
        os.fsync(f.fileno())


@dataclass
class Position:
    """Where the run is: optimizer steps done, and the next micro-batch (epoch, batch index)."""

    step: int = 0
    epoch: int = 0
    batch: int = 0


def save_checkpoint(run: Path, model, opt: BlockOptimizer, pos: Position, base_model: str, stats: dict,
                    keep: int) -> Path:
    """Write checkpoints/step-N atomically; prune old ones; return its path.

    Everything is written into checkpoints/.tmp-step-N, fsynced and renamed: a kill at any moment
    leaves the previous checkpoints as they were, and a failed write (disk full, read-only) removes
    the temporary folder and raises OSError. Folders being replaced or pruned are first renamed to a
    dot name, so no half-deleted folder ever looks like a checkpoint; dot names left by a kill are
    removed here.
    """
    ck = run / "checkpoints"
    ck.mkdir(parents=True, exist_ok=True)
    for stale in ck.glob(".*-step-*"):
        shutil.rmtree(stale, ignore_errors=True)
    name = f"step-{pos.step:07d}"
    final, tmp = ck / name, ck / f".tmp-{name}"
    try:
        tmp.mkdir()
        save_adapter(model, tmp, base_model=base_model)
        keys = list(model.lora_parameters())
        tensors, scalars = {}, {}
        for i, st in opt.state_dict()["state"].items():
            for k, v in st.items():
                if torch.is_tensor(v):
                    tensors[f"{keys[i]}::{k}"] = v
                else:
                    scalars[f"{keys[i]}::{k}"] = v
        tensors["rng::torch"] = torch.get_rng_state()
        _save_tensors(tmp / "optimizer.safetensors", tensors)
        state = dict(step=pos.step, epoch=pos.epoch, batch=pos.batch, scalars=scalars,
                     last_trained=sorted(opt.last_trained), stats=stats)
        write_json(tmp / "state.json", state)   # written last: its presence marks a complete checkpoint
        _fsync_dir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise as_oserror(e) or e from None
    if final.exists():                           # the same step again: set the old one aside, then swap
        os.replace(final, ck / f".old-{name}")
    os.replace(tmp, final)
    _fsync_dir(ck)
    try:                                         # bookkeeping only: the checkpoint above is complete
        write_json(ck / "latest.json", {"step": pos.step, "path": name})
        done = sorted(p for p in ck.glob("step-*") if (p / "state.json").exists())
        for old in [ck / f".old-{name}", *(done[:-keep] if keep > 0 else [])]:
            if old.exists():
                trash = ck / f".trash-{old.name.removeprefix('.old-')}"
                os.replace(old, trash)
                shutil.rmtree(trash, ignore_errors=True)
    except OSError:
        pass
    return final


def as_oserror(e: BaseException) -> OSError | None:
    """safetensors reports a failed write as SafetensorError("... (os error 28)"): the OSError it stands for."""
    if isinstance(e, OSError):
        return e
    m = re.search(r"os error (\d+)", str(e)) if type(e).__name__ == "SafetensorError" else None
    if m is None:
        return None
    err = OSError(int(m.group(1)), os.strerror(int(m.group(1))))
    err.__cause__ = e
    return err


def latest_checkpoint(run: Path) -> Path | None:
    ck = run / "checkpoints"
    done = sorted(p for p in ck.glob("step-*") if (p / "state.json").exists()) if ck.exists() else []
    return done[-1] if done else None


def load_checkpoint(path: Path, model, opt: BlockOptimizer) -> tuple[Position, dict]:
    state = json.loads((path / "state.json").read_text())
    saved = load_file(str(path / ADAPTER_WEIGHTS))
    params = model.lora_parameters()
    with torch.no_grad():
        for k, p in params.items():
            p.copy_(saved[k])
    tensors = load_file(str(path / "optimizer.safetensors"))
    index = {k: i for i, k in enumerate(params)}
    opt_state: dict[int, dict] = {}
    for name, v in tensors.items():
        if name.startswith("rng::"):
            continue
        key, field_name = name.split("::")
        opt_state.setdefault(index[key], {})[field_name] = v
    for name, v in state["scalars"].items():
        key, field_name = name.split("::")
        opt_state.setdefault(index[key], {})[field_name] = v
    opt.load_state_dict({"state": opt_state, "last_trained": state["last_trained"]})
    torch.set_rng_state(tensors["rng::torch"])
    return Position(state["step"], state["epoch"], state["batch"]), state.get("stats", {})


def saved_global_batch(checkpoint: Path) -> int | None:
    """The global batch (sequences per micro-batch over all ranks) a run checkpoint's data position counts in;
    None when the checkpoint cannot be read (load_checkpoint reports it)."""
    try:
        stats = json.loads((checkpoint / "state.json").read_text()).get("stats", {})
    except (OSError, json.JSONDecodeError):
        return None
    return int(stats["global_batch"]) if "global_batch" in stats else None
