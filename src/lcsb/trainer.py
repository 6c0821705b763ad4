"""The training run (DESIGN section 7): setup in named steps, then the step loop.

The loop reads top to bottom: pick the roles of this step, run the micro-batches through the
executor, reduce (the token-weighted mean gradient; all-reduced across ranks under torchrun, see
distributed.py), clip, step the optimizer with the inactive-block policy, log, evaluate, checkpoint.

Settings come resolved from settings.py (one place, with provenance); run checkpoints are written and
read by runstate.py (atomically: a kill at any moment leaves the previous one intact), so `--resume`
continues exactly as if the run had never stopped. Output goes through `_Console`: a reader of stderr
that goes away (`lcsb train ... | tee log` and Ctrl-C, which stops tee too) never costs a step or a
checkpoint.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import json
import math
import os
import signal
import sys
import time
from dataclasses import dataclass
from pathlib import Path

import torch
import yaml

from . import checks
from . import data as datalib
from . import distributed
from .config import TrainConfig
from .engine.executor import block_lora_params, run_step
from .engine.selection import Selection
from .errors import UserError
from .evaluate import evaluate, generate_text
from .lora import load_model, save_adapter
from .memory import check_budget, estimate_run, fit_suggestion, parse_size, peak_rss
from .model import load_config
from .model.lora import set_lora_dtype
from .model.tokenizer import load_tokenizer
from .optim import BlockOptimizer, clip_grad_norm, fuses_step, schedule_factor
from .runstate import (Position, as_oserror, latest_checkpoint, load_checkpoint, save_checkpoint,
                       write_text)
from .settings import Settings, resolve


class NonFiniteError(UserError):
    """The loss or a gradient became NaN/inf; the run stops with its last good checkpoint named."""

    exit_code = 3


class WriteError(UserError):
    """The run folder cannot be written (disk full, read-only, permission); the last checkpoint is intact."""

    exit_code = 4


def peak_rss_mb() -> float:
    return peak_rss() / (1 << 20)


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


_FULL = {errno.ENOSPC, errno.EDQUOT, errno.EROFS, errno.EFBIG}     # a write failed, whatever the file
_DENIED = {errno.EACCES, errno.EPERM, errno.EIO}


@contextlib.contextmanager
def _write_errors(run: Path):
    """A failed write (disk full, read-only, permission) anywhere in the run folder -- log, config,
    checkpoint, adapter -- becomes one line naming the run folder and its last complete checkpoint,
    exit status 4 (`WriteError`); an unreadable input file becomes one line too (exit status 2)."""
    try:
        yield
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


def train(cfg: TrainConfig, quiet: bool = False, given_as: str = "argument") -> TrainResult:
    """Run a fine-tuning job; returns the run folder and the final metrics.

    The fields set on `cfg` are the given ones (settings.py): a YAML file named by `cfg.config`, a resumed
    run and the defaults fill the rest. given_as: how to name them in the printed sources ("flag" for the
    CLI)."""
    ddp = distributed.setup()        # under torchrun: this rank in the data-parallel group; else a world of one
    console = _Console(quiet or not ddp.main)    # rank 0 alone prints (and writes)
    settings = resolve(cfg, given_as, ddp.size)
    run = Path(settings.cfg.out)
    with _write_errors(run), contextlib.ExitStack() as closing:
        return _train(settings, ddp, console, closing)


def _train(settings: Settings, ddp, console, closing: contextlib.ExitStack) -> TrainResult:
    cfg, say = settings.cfg, console.say
    run = Path(cfg.out)
    if not cfg.resume and latest_checkpoint(run) is not None:
        # a fresh run must not share checkpoints/ with an earlier one: pruning by name could delete the new
        # run's checkpoints and --resume would then continue the old run
        raise UserError(f"{run} holds the checkpoints of an earlier run; continue it with --resume {run}, "
                        "or choose another --out")
    say(settings.line())
    for note in settings.notes:
        say(note)

    # setup: config, tokenizer and data first, so bad input stops us before the model is loaded
    mcfg, selection, lora = _setup_shape(cfg)
    tok, splits, train_set = _setup_data(cfg, ddp, say)
    # the step's peak memory, from shapes and the longest batch, before a single weight is loaded
    estimate = estimate_run(cfg, mcfg, lora, selection, train_set, cfg.steps or 512, world=ddp.size)
    say(estimate.line())
    if cfg.max_memory is not None:
        limit = parse_size(cfg.max_memory)
        if estimate.total > limit:      # name the flags that would make it fit
            check_budget(estimate, limit, suggestion=fit_suggestion(cfg, mcfg, lora, selection, train_set,
                                                                    cfg.steps or 512, limit, estimate.parts["runtime"],
                                                                    ddp.size))
    model, blocks, opt = _setup_model(cfg, lora, selection, say)
    n = model.config.num_layers
    micro_per_epoch = math.ceil(len(train_set) / (cfg.batch_size * ddp.size))   # global micro-batches
    total = cfg.steps or max(1, int(cfg.epochs * micro_per_epoch / cfg.grad_accum))
    pos, stats = _restore(cfg, run, model, opt, ddp, say)
    if ddp.main:
        write_text(run / "config.yaml", yaml.safe_dump(dataclasses.asdict(cfg), sort_keys=False))
    if pos.step >= total:
        say(f"nothing to do: the run is at step {pos.step} of {total}")
    history, eval_history = _restore_log(run, pos, total) if cfg.resume and ddp.main else ([], [])
    log = closing.enter_context(open(run / "log.jsonl" if ddp.main else os.devnull, "a"))
    writer = _tensorboard(run) if ddp.main else None
    if writer is not None:
        closing.callback(writer.close)
    base_name = _base_name(cfg.model, mcfg)

    preview = _preview_examples(splits, cfg.preview) if ddp.main and pos.step == 0 else []
    before = _answers(model, tok, preview)       # the model as it starts: the base model with a fresh LoRA
    if preview and splits.valid:                 # and its loss, so the run's evaluations have a start
        _eval_and_log(model, splits.valid, cfg, tok, pos, log, writer, eval_history, say)
    batches = datalib.Batches(train_set, cfg.batch_size, cfg.seed, pos.epoch, pos.batch, tok.pad_token_id,
                              ddp.size, ddp.rank)      # this rank's rows of each global micro-batch
    console.start(total, pos.step)
    closing.callback(console.close)
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
            last_ckpt = save_checkpoint(run, model, opt, pos, base_name, stats, cfg.keep_checkpoints)
        except OSError as e:
            raise WriteError(f"cannot write checkpoint step {pos.step} in {run / 'checkpoints'} ({e.strerror or e}); "
                             f"the previous checkpoint is intact: {last_ckpt or 'none written yet'}; free space or "
                             f"fix the folder, then continue with `lcsb train --resume {run}`") from None

    # the optimizer step inside the backward, a block at a time, where that gives the same update
    fused = fuses_step(cfg.clip, cfg.grad_accum, ddp.size, cfg.skip_nonfinite)
    with _Interrupt() as stop:
        while pos.step < total:
            t0 = time.perf_counter()
            plan = selection.plan(pos.step, n)
            trained = set(plan.trained)
            opt.set_lr_factor(schedule_factor(cfg.schedule, pos.step, total, cfg.warmup))
            ddp.seed_step(cfg.seed, pos.step)
            loss_sum, tokens, counted = 0.0, 0, 0
            done, norms = set(), {}          # blocks updated inside the backward (fused), their gradient norms
            for _ in range(cfg.grad_accum):
                ids, labels = batches.next()
                if ids is None:      # this rank's share of an epoch's short last global batch is empty
                    continue
                # loss_scale = the micro-batch's counted tokens: .grad sums per-token gradients, and
                # reduce_step divides by the count over all micro-batches and ranks (a token-weighted mean)
                scale = distributed.counted_tokens(labels)
                res = run_step(model, ids, labels, plan, cfg.activations, loss_scale=scale,
                               recompute=cfg.recompute == "on", decompress=cfg.decompress,
                               after_block=_fused_step(opt, blocks, trained, scale, done, norms, pos.step, last_ckpt)
                               if fused else None)
                loss_sum += res.loss * res.tokens
                counted += res.tokens
                tokens += int(ids.numel())
            # only the trained blocks' gradients are all-reduced; a signal on any rank stops every rank
            totals = ddp.reduce_step(blocks, trained, loss_sum, counted, tokens, stop)
            loss_sum, tokens = totals.loss, totals.tokens
            if fused:        # the norm clip_grad_norm would log, from the blocks' own, in block order
                each = [n for b in sorted(norms) for n in norms[b]]
                gnorm = float(torch.linalg.vector_norm(torch.stack(each))) if each else 0.0
            else:
                gnorm = clip_grad_norm(opt.params, cfg.clip)
            finite = math.isfinite(loss_sum) and math.isfinite(gnorm)
            if finite:
                opt.step(trained, done)
            elif cfg.skip_nonfinite:
                stats["skipped_nonfinite"] += 1
            else:
                raise _nonfinite("loss" if not math.isfinite(loss_sum) else "gradient", pos.step, last_ckpt)
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
            console.step(line, cfg.log_every)

            if cfg.eval_every and pos.step % cfg.eval_every == 0 and pos.step < total and splits.valid and ddp.main:
                eval_result = _eval_and_log(model, splits.valid, cfg, tok, pos, log, writer, eval_history, say)
            if (cfg.save_every and pos.step % cfg.save_every == 0) or stop.signal or pos.step == total:
                checkpoint()         # before anything is printed: a broken stderr must never cost it
            if stop.signal:
                say(f"\nstopped by signal {stop.signal} after step {pos.step}; checkpoint: {last_ckpt}\n"
                    f"continue with: lcsb train --resume {run}")
                interrupted = True
                break
    console.close()
    if not interrupted and ddp.main:
        if splits.valid:
            eval_result = _eval_and_log(model, splits.valid, cfg, tok, pos, log, writer, eval_history, say)
        save_adapter(model, run, base_model=base_name)
        plotted = _plot(run, history, eval_history)
        say(f"adapter: {run}/adapter_model.safetensors (PEFT format)\nlog: {run}/log.jsonl\n"
            + (f"plot: {run}/loss.png" if plotted is None else f"plot: none ({plotted})"))
        if stats["skipped_nonfinite"]:
            say(f"skipped {stats['skipped_nonfinite']} step(s) with a non-finite loss or gradient "
                "(--skip-nonfinite; `skipped` in log.jsonl)")
        if preview:
            console.show_preview(tok, preview, before, _answers(model, tok, preview),
                                 "base" if not cfg.adapter else "before")
    return TrainResult(run, pos.step, history[-1][1] if history else None, eval_result, interrupted)


def _nonfinite(what: str, step: int, last_ckpt) -> NonFiniteError:
    return NonFiniteError(f"non-finite {what} at step {step + 1}; last good checkpoint: {last_ckpt or 'none yet'} "
                          "(lower --lr, or pass --skip-nonfinite)")


def _fused_step(opt: BlockOptimizer, blocks, trained: set[int], counted: int, done: set[int], norms: dict,
                step: int, last_ckpt):
    """run_step's `after_block` for the optimizer step fused into the backward (optim.fuses_step): block i's
    summed gradients become the step's mean, as reduce_step makes them for one process, their norms are kept
    for the log, and the block is updated and its gradients dropped before the blocks below run their VJP."""
    if counted == 0:
        raise UserError(distributed.NO_TOKENS)

    def after_block(i: int):
        params = [p for p in blocks[i] if p.grad is not None]
        for p in params:
            p.grad.div_(float(counted))
        norms[i] = [torch.linalg.vector_norm(p.grad) for p in params]
        if not all(bool(torch.isfinite(n)) for n in norms[i]):
            raise _nonfinite("gradient", step, last_ckpt)
        opt.step_block(i, trained)
        done.add(i)
        for p in blocks[i]:
            p.grad = None

    return after_block


# ---------------------------------------------------------------- setup steps


def _setup_shape(cfg: TrainConfig):
    """config.json only: the context, the selection and the LoRA shape fit the model (values that follow
    from the model are filled in: --max-seq-len, --active)."""
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
    return mcfg, selection, lora


def _setup_data(cfg: TrainConfig, ddp, say):
    """Tokenizer and data: every record read and checked before a weight is loaded."""
    tok = load_tokenizer(cfg.model)
    splits = datalib.load_dataset(cfg.data, tok, max_seq_len=cfg.max_seq_len, mask_prompt=cfg.mask_prompt,
                                  valid_fraction=cfg.valid_fraction, seed=cfg.seed,
                                  on_error="skip" if cfg.skip_bad_lines else "stop")
    train_set = datalib.pack(splits.train, cfg.max_seq_len) if cfg.pack else splits.train
    say(splits.report.summary())
    if cfg.batch_size * ddp.size > len(train_set):
        what = f"{len(train_set)} {'packed sequences' if cfg.pack else 'records'}"
        raise UserError(f"--batch-size {cfg.batch_size}{f' x {ddp.size} ranks' if ddp.size > 1 else ''} is more "
                        f"than the training set's {what} ({cfg.data}); use --batch-size "
                        f"{max(1, len(train_set) // ddp.size)} or less, or more data")
    return tok, splits, train_set


def _setup_model(cfg: TrainConfig, lora, selection, say):
    """The model with its LoRA (fresh, or --adapter's), and the block-wise optimizer."""
    torch.manual_seed(cfg.seed)
    model = load_model(cfg.model, quant=cfg.quant, group_size=cfg.group_size, lora=None if cfg.adapter else lora,
                       adapter=cfg.adapter)
    set_lora_dtype(model, cfg.lora_dtype)
    n = model.config.num_layers
    if cfg.inactive == "reset" and cfg.method not in ("lisa", "badam"):
        say("note: --inactive reset is LISA's and BAdam's behaviour; it applies to any method but was designed for them")
    blocks = [block_lora_params(b) for b in model.model.layers]
    opt = BlockOptimizer(blocks, cfg.lr, cfg.optimizer, cfg.weight_decay, momentum=cfg.momentum,
                         inactive=cfg.inactive,
                         lr_scales=selection.lr_scales(n, cfg.inactive, cfg.optimizer) if cfg.compensate else None)
    if model.lora_config.dropout > 0:    # the adapter's own dropout when one is loaded, not --dropout
        model.train()
    return model, blocks, opt


def _restore(cfg: TrainConfig, run: Path, model, opt, ddp, say) -> tuple[Position, dict]:
    """The run's position and counters: from its last checkpoint on --resume, else a fresh start."""
    pos, stats = Position(), {"skipped_nonfinite": 0}
    if ddp.main:
        run.mkdir(parents=True, exist_ok=True)
    last = latest_checkpoint(run) if cfg.resume else None
    if cfg.resume and last is None:
        # stopped before its first checkpoint: nothing to lose, so start over with the run's config
        say(f"{run} has no checkpoint yet: starting from step 0")
    elif last is not None:
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
    return pos, stats


def _restore_log(run: Path, pos: Position, total: int):
    """Drop log lines past the checkpoint (and a line cut short by a kill), so the log reads as one
    uninterrupted run; the curves of the plot start from the kept lines."""
    kept = _read_log(run / "log.jsonl", pos.step)
    # the end-of-run evaluation follows the last checkpoint: it is done again, so drop its line
    kept = [r for r in kept if not ("eval_loss" in r and r["step"] >= total)]
    write_text(run / "log.jsonl", "".join(json.dumps(r) + "\n" for r in kept))
    return ([(r["step"], r["loss"]) for r in kept if "loss" in r],
            [(r["step"], r["eval_loss"]) for r in kept if "eval_loss" in r])


def _base_name(model: str, mcfg) -> str:
    """The base model as adapters name it: the checkpoint an `lcsb convert` folder was made from (while it
    exists), else the model itself; an absolute path, so PEFT (AutoPeftModelForCausalLM) and exports find it
    from anywhere."""
    source = mcfg.raw.get("source") if mcfg.raw.get("quantization") else None
    if source and Path(source).exists():
        return str(source)
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


class _Console:
    """What the run prints: lines on stderr, a tqdm bar on a terminal (loss, tokens/s, ETA) or a plain line
    every `log_every` steps otherwise, the preview on stdout.

    Lines are written above the bar (tqdm.write), never into it. A reader that went away (a closed pipe:
    Ctrl-C in `lcsb train ... | tee log` stops tee as well) turns every later write into a no-op: the run
    goes on to its checkpoint and its exit status instead of dying of BrokenPipeError."""

    def __init__(self, quiet: bool):
        self.quiet, self.bar, self.lost = quiet, None, False

    def _guard(self, write):
        if self.quiet or self.lost:
            return
        try:
            write()
        except OSError as e:            # BrokenPipeError is EPIPE
            if e.errno != errno.EPIPE:
                raise
            self._lose()

    def _lose(self):
        # later writes, tqdm's and Python's own flush at exit included, go nowhere instead of failing
        self.lost = True
        devnull = os.open(os.devnull, os.O_WRONLY)
        for fd in (1, 2):
            with contextlib.suppress(OSError):
                os.dup2(devnull, fd)
        os.close(devnull)

    def say(self, *parts):
        text = " ".join(map(str, parts))
        if self.bar is not None:
            self._guard(lambda: self.bar.write(text, file=sys.stderr))
        else:
            self._guard(lambda: print(text, file=sys.stderr, flush=True))

    def start(self, total: int, start: int):
        self.total, self.t0, self.start_step = total, time.perf_counter(), start
        if not self.quiet and not self.lost and sys.stderr.isatty():
            from tqdm import tqdm
            self.bar = tqdm(total=total, initial=start, unit="step", dynamic_ncols=True)

    def step(self, line: dict, every: int):
        if self.bar is not None:
            def update():
                self.bar.set_postfix(loss=f"{line['loss']:.4f}", tok_s=f"{line['tok_per_s']:.0f}", refresh=False)
                self.bar.update(1)
            self._guard(update)
        elif line["step"] % max(1, every) == 0 or line["step"] == self.total:
            done = line["step"] - self.start_step
            eta = (time.perf_counter() - self.t0) / max(done, 1) * (self.total - line["step"])
            self.say(f"step {line['step']}/{self.total}  loss {line['loss']:.4f}  lr {line['lr']:.2e}  "
                     f"{line['tok_per_s']:.0f} tok/s  eta {eta:.0f}s  peak {line['peak_rss_mb']:.0f} MB")

    def close(self):
        if self.bar is not None:
            bar, self.bar = self.bar, None
            self._guard(bar.close)

    def show_preview(self, tok, examples, before: list[str], after: list[str], label: str):
        """The held-out prompts with the answers before and after training, on stdout (what the run is for)."""
        def one_line(text: str, width: int = 100) -> str:
            text = " ".join(text.split())
            return text if len(text) <= width else text[:width - 3] + "..."

        lines = [f"\n{len(examples)} held-out prompts, answered by the {label} model and the tuned one:"]
        for e, b, a in zip(examples, before, after):
            n = _prompt_len(e)
            prompt = " ".join(tok.decode(e.ids[:n], skip_special_tokens=True).split())
            prompt = prompt if len(prompt) <= 100 else "..." + prompt[-97:]     # the question is at the end
            expected = tok.decode([t for t in e.ids[n:]], skip_special_tokens=True)
            lines.append(f"\n  prompt:   {one_line(prompt)}\n  expected: {one_line(expected)}\n"
                         f"  {label + ':':<9} {one_line(b) or '(empty)'}\n  tuned:    {one_line(a) or '(empty)'}")
        self._guard(lambda: print("\n".join(lines), flush=True))


def _tensorboard(run: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except Exception:   # tensorboard not installed: events are optional
        return None
    return SummaryWriter(str(run / "tensorboard"))


def _plot(run: Path, history, eval_history) -> str | None:
    """loss.png of the train and eval curves; returns why there is none, or None when it was written."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return "matplotlib is not installed: pip install matplotlib (or lcsb[plot]) for loss.png"
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
    return None
