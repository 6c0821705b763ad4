"""The 4-bit stability finding: a learning-rate sweep at int4 and unquantized base weights, full vs LCSB.

    python bench/lr_sweep.py                                  # chat task, 5 lrs x 2 bases x 2 methods
    python bench/lr_sweep.py --task domain --steps 200 --lrs 1e-3 1e-2
    python bench/lr_sweep.py --model SmolLM2-135M-Instruct.Q4_1.gguf --quants as-is --methods full lcsb-K4 topdown-T6-P4-comp

The LCSB paper reports a 3B model diverging under full backprop with 4-bit base weights while LCSB
converged. This sweep asks the same question of the bundled model: for each learning rate, base
weights int4 (group 64, quantized on load: TrainConfig.quant="int4") or as shipped (quant=None: the
bfloat16 checkpoint, computed in float32; "fp32" below), and method full or lcsb K=4, train
--steps steps with a constant learning rate and no warmup (the library defaults: AdamW, weight
decay 0.01, gradient clipping at 1.0; batch 4, rank 16, seed 0, skip_nonfinite=False) and record:
- non-finite: the run stopped with NonFiniteError (the step is recorded);
- diverged: the final eval loss is above the base model's eval loss on the same valid batches (the
  base evaluated with the same quantization), or the final train loss (mean of the last 10 steps)
  is above the start (the loss of step 1, computed before any update);
- ok otherwise. The peak train loss shows the spikes of runs that recovered.
`--from-json FILE` re-renders the table (and verdicts) of an earlier run without training.
Each run is `lcsb.train(TrainConfig(...), quiet=True)` in its own subprocess with one torch thread.
Writes bench/results/lr_sweep.json and prints the table, whatever the outcome.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import re
import sys
import threading
import time
from datetime import date
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
from quality import method_config, one_thread_subprocess, run_jobs, write_results  # noqa: E402

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
METHODS = ("full", "lcsb-K4")              # any name quality.method_config knows
# "fp32": the bundled bfloat16 checkpoint computed in float32; "as-is": the model file's own weights
# (a quantized GGUF, e.g. SmolLM2's Q4_1, which --quant cannot requantize)
QUANTS = {"int4": "int4", "fp32": None, "as-is": None}


def _worker(spec: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    from lcsb.config import TrainConfig
    from lcsb.trainer import NonFiniteError, train

    cfg = TrainConfig(**spec["config"])
    t0 = time.perf_counter()
    error, nonfinite_step = None, None
    try:
        train(cfg, quiet=True)
    except NonFiniteError as e:
        error = str(e)
        m = re.search(r"at step (\d+)", error)
        nonfinite_step = int(m.group(1)) if m else None
    wall = time.perf_counter() - t0
    log = [json.loads(line) for line in open(Path(cfg.out) / "log.jsonl") if line.strip()]
    steps = [r for r in log if "loss" in r]
    evals = [dict(step=r["step"], eval_loss=r["eval_loss"]) for r in log if "eval_loss" in r]
    losses = [r["loss"] for r in steps]
    return dict(name=spec["name"], quant=spec["quant"], lr=cfg.lr, config=spec["config"], wall=wall,
                steps_done=len(steps), nonfinite_step=nonfinite_step, error=error,
                start_train_loss=losses[0] if losses else None, final_train_loss=_mean(losses[-10:]),
                max_train_loss=max(losses, default=None), max_grad_norm=max((r["grad_norm"] for r in steps), default=None),
                train_losses=losses, evals=evals, final_eval_loss=evals[-1]["eval_loss"] if evals else None)


def _mean(xs):
    return sum(xs) / len(xs) if xs else None


def _base(spec: dict) -> dict:
    import torch
    torch.set_num_threads(1)
    from lcsb import data as datalib
    from lcsb.evaluate import evaluate
    from lcsb.model import load_model
    from lcsb.model.tokenizer import load_tokenizer

    c = spec["config"]
    tok = load_tokenizer(c["model"])
    splits = datalib.load_dataset(c["data"], tok, max_seq_len=c["max_seq_len"], mask_prompt=True)
    model = load_model(c["model"], quant=c.get("quant"), group_size=c.get("group_size", 64))
    model.eval()
    r = evaluate(model, splits.valid, c["batch_size"], c["eval_batches"], tok.pad_token_id)
    return dict(quant=spec["quant"], eval_loss=r["loss"])


def _in_subprocess(kind: str, spec: dict) -> dict:
    return one_thread_subprocess(__file__, kind, spec, f"{kind} {spec.get('name')}")


def verdict(r: dict, base_eval: float) -> str:
    if r["nonfinite_step"] is not None or r["error"]:
        return f"non-finite at step {r['nonfinite_step']}"
    vals = [r["final_train_loss"], r["final_eval_loss"]]
    if any(v is None or not math.isfinite(v) for v in vals):
        return "non-finite"
    why = []
    if r["final_eval_loss"] > base_eval:
        why.append("eval loss above base")
    if r["final_train_loss"] > r["start_train_loss"]:
        why.append("train loss above start")
    return "diverged (" + ", ".join(why) + ")" if why else "ok"


def _f(v, fmt="{:.3f}"):
    return "-" if v is None else fmt.format(v)


def table(results: dict) -> str:
    lines = ["| base weights | method | lr | outcome | train loss: step 1 | peak | final (last 10) | "
             "eval loss: base | final | max grad norm |",
             "| --- | --- | ---: | --- | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for r in results["runs"]:
        base = results["base"][r["quant"]]
        lines.append(f"| {r['quant']} | {r['name']} | {r['lr']:g} | {r['outcome']} | {_f(r['start_train_loss'])} | "
                     f"{_f(r['max_train_loss'])} | {_f(r['final_train_loss'])} | {base:.3f} | {_f(r['final_eval_loss'])} | "
                     f"{_f(r['max_grad_norm'], '{:.2f}')} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--task", default="chat", choices=("domain", "chat", "classify"))
    ap.add_argument("--model", default=str(ASSETS / "model"), help="checkpoint folder or GGUF file (default: the bundled model)")
    ap.add_argument("--lrs", nargs="+", type=float, default=[1e-4, 1e-3, 1e-2, 3e-2, 1e-1])
    ap.add_argument("--quants", nargs="+", default=list(QUANTS), choices=list(QUANTS))
    ap.add_argument("--methods", nargs="+", default=list(METHODS), help="method names as bench/quality.py takes them")
    ap.add_argument("--steps", type=int, default=150)
    ap.add_argument("--batch-size", type=int, default=4)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--eval-batches", type=int, default=25)
    ap.add_argument("--jobs", type=int, default=2, choices=(1, 2))
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "lr_sweep.json"))
    ap.add_argument("--runs", default="/tmp/lcsb-lr-sweep")
    ap.add_argument("--from-json", help="re-render the verdicts and table of this earlier result; no training")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_base", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.from_json:
        results = json.loads(Path(args.from_json).read_text())
        for r in results["runs"]:
            losses = r["train_losses"]
            r["start_train_loss"] = losses[0] if losses else None
            r["final_train_loss"] = _mean(losses[-10:])
            r["outcome"] = verdict(r, results["base"][r["quant"]])
        results["table"] = table(results)
        print(results["table"])
        Path(args.out).write_text(json.dumps(results, indent=2))
        print(f"wrote {args.out}", file=sys.stderr)
        return
    if args._worker:
        print("RESULT" + json.dumps(_worker(json.loads(args._worker))))
        return
    if args._base:
        print("RESULT" + json.dumps(_base(json.loads(args._base))))
        return

    # the pid too: two benchmarks started in the same second must not share run folders
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    for m in args.methods:
        method_config(m)                           # an unknown name stops here, before any run
    common = dict(model=args.model, data=str(ASSETS / "data" / args.task), steps=args.steps,
                  batch_size=args.batch_size, seed=args.seed, rank=16, alpha=32.0, schedule="constant", warmup=0,
                  max_seq_len=256, eval_every=max(1, args.steps // 3), eval_batches=args.eval_batches, save_every=0,
                  keep_checkpoints=1, skip_nonfinite=False)
    t_all = time.perf_counter()
    base = {}
    for q in args.quants:
        base[q] = _in_subprocess("base", dict(quant=q, config=dict(common, quant=QUANTS[q])))["eval_loss"]
        print(f"{q}: base eval loss {base[q]:.4f}", file=sys.stderr, flush=True)
    specs = [dict(name=m, quant=q, config=dict(common, **method_config(m), quant=QUANTS[q], lr=lr,
                                               out=f"{args.runs}/{stamp}/{q}-{m}-{lr:g}"))
             for q in args.quants for m in args.methods for lr in args.lrs]

    def one(spec):
        r = _in_subprocess("worker", spec)
        r["outcome"] = verdict(r, base[spec["quant"]])
        print(f"{r['quant']:>5} {r['name']:>8} lr {r['lr']:<7g} {r['outcome']}  train {_f(r['start_train_loss'])} -> "
              f"{_f(r['final_train_loss'])}  eval {_f(r['final_eval_loss'])}", file=sys.stderr, flush=True)
        return r

    results = dict(date=str(date.today()), task=args.task,
                   settings=dict(common, lrs=args.lrs, quants={q: QUANTS[q] for q in args.quants},
                                 methods={m: method_config(m) for m in args.methods}, optimizer="adamw",
                                 weight_decay=0.01, clip=1.0, threads=1,
                                 note="fp32 = quant None on the bundled bfloat16 checkpoint, computed in float32; "
                                      "as-is = the model file's own (possibly quantized) weights"),
                   machine=dict(platform=platform.platform(), cpus=os.cpu_count(), python=platform.python_version()),
                   base=base, runs=[])
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    lock = threading.Lock()

    def save():
        # after every finished run, so a stopped sweep keeps what it measured (paths relative to the repo)
        results["table"] = table(results)
        write_results(out, results)

    def one_saved(spec):
        r = one(spec)
        with lock:
            results["runs"].append(r)
            save()
        return r

    runs = run_jobs(one_saved, specs, args.jobs)
    results["runs"] = runs                      # in the order of the specs, however the jobs finished
    results["total_wall_s"] = time.perf_counter() - t_all
    save()
    print(results["table"])
    print(f"wrote {out}", file=sys.stderr)


if __name__ == "__main__":
    main()
