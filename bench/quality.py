"""Quality of LCSB against full backprop and the baselines on the bundled tasks (DESIGN sections 10, 11).

    python bench/quality.py                                   # 3 tasks x 10 methods, settings below
    python bench/quality.py --tasks chat --steps 100 --methods full lcsb-K4
    python bench/quality.py --quick                           # a smoke run: few steps, small test subsets

Every method trains the bundled model (assets/model; or --model, any checkpoint folder lcsb loads, with a
chat template for the chat task, e.g. a deeper model built by scripts/pretrain.py) on each task for the
same number of steps with the same seed and the same settings: `assets/train-default.yaml` (lr, batch
size, schedule, warmup, rank, ...), with --steps / --lr / --batch-size on top, equal for all methods, never tuned per method.
Each run is `lcsb.train(TrainConfig(...), quiet=True)` in a fresh subprocess with one torch thread
(`--jobs 2` runs two such processes side by side), evaluated every --eval-every steps on the valid
split (the same --eval-batches batches every time); the base model is scored once per task for the
step-0 point (LoRA starts with B = 0, so every method starts there).

Per task and method it reports: the final eval loss; the task metric (domain: eval perplexity on the
valid split; chat: exact match of greedy answers generated with the chat template on the first
--test-limit test records; classify: accuracy choosing the label of labels.json with the highest sum
of log-probs of its tokens after the prompt, on the first --test-limit test records); the training
time (the steps only: model loading and evaluations are left out) as wall seconds and as CPU seconds
of the process (a single-threaded process's CPU time is much less sensitive to other load on a shared
machine than its wall time); the gap of the final eval loss to full's in percent; and the training
time each method needs to reach full's final eval loss, interpolated linearly between eval points
("not reached" if it never does). JSON to --out, the eval-loss curves to a PNG beside it.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import subprocess
import sys
import threading
import time
from datetime import date
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
ASSETS = REPO / "assets"
TASKS = ("domain", "chat", "classify")
METRIC = {"domain": "eval_ppl", "chat": "exact_match", "classify": "accuracy"}

# the default method list (names parsed by method_config; any N works: lcsb-K6, freeze-8, lisa-4 ...)
METHODS = ("full", "lcsb-K2", "lcsb-K4", "lcsb-K2-strided", "lcsb-K4-strided", "lcsb-exact-K4", "lcsb-K4-frozen",
           "lcsb-K4-reset", "random-2", "lisa-2", "badam", "freeze-2")
_POLICY = {"frozen", "reset", "momentum"}       # optimizer policy of the blocks not trained (optim.py)


def _method_name(name: str) -> str:
    method_config(name)                 # refuses an unknown name while the arguments are parsed
    return name


def method_config(name: str) -> dict:
    """A method name -> TrainConfig fields (on top of the common settings):
    full | badam | lcsb-K<N>[-strided][-frozen|-reset] | lcsb-exact-K<N>[...] | random-<N> | lisa-<N> | freeze-<N>
    | topdown-T<k>-P<p> (the top k blocks every step, all every p-th), each with -comp for --compensate.
    LISA switches every 10 steps, BAdam too (their papers' style of schedule)."""
    parts = name.split("-")
    if len(parts) > 1 and parts[-1] == "comp":        # any method: --compensate
        return dict(method_config("-".join(parts[:-1])), compensate=True)
    head, rest = parts[0], parts[1:]
    if head == "lcsb" and rest[:1] == ["exact"]:
        head, rest = "lcsb-exact", rest[1:]
    try:
        if name == "full":
            return dict(method="full")
        if name == "badam":
            return dict(method="badam", interval=10)
        if head in ("lcsb", "lcsb-exact") and rest and rest[0].startswith("K"):
            cfg = dict(method=head, groups=int(rest[0][1:]))
            for opt in rest[1:]:
                if opt == "strided":
                    cfg["grouping"] = "strided"
                elif opt in _POLICY:
                    cfg["inactive"] = opt
                else:
                    raise ValueError(opt)
            return cfg
        if head == "topdown" and len(rest) == 2 and rest[0][0] == "T" and rest[1][0] == "P":
            return dict(method="topdown", active=int(rest[0][1:]), full_every=int(rest[1][1:]))
        if head in ("random", "lisa", "freeze") and len(rest) == 1:
            return dict(method=head, active=int(rest[0]), **({"interval": 10} if head == "lisa" else {}))
    except ValueError:
        pass
    raise argparse.ArgumentTypeError(
        f"unknown method {name!r}: full, badam, lcsb-K<N>[-strided][-frozen|-reset], lcsb-exact-K<N>, "
        "random-<N>, lisa-<N>, freeze-<N>, topdown-T<k>-P<p>, any of them with -comp")


DEFAULT_FILE = ASSETS / "train-default.yaml"
DEFAULT_MODEL = ASSETS / "model"
SHARED_KEYS = ("lr", "batch_size", "schedule", "warmup", "max_seq_len", "rank", "alpha", "weight_decay",
               "grad_accum", "clip", "optimizer", "inactive")


# ---------------------------------------------------------------- the worker (one subprocess per run)


def _worker(spec: dict) -> dict:
    """Train one configuration with timing hooks; then score the task metric. Runs in its own process."""
    import torch
    torch.set_num_threads(1)
    from lcsb import trainer
    from lcsb.config import TrainConfig

    marks, clock = [], {"start": None, "eval_wall": 0.0, "eval_cpu": 0.0}
    run_step, eval_and_log = trainer.run_step, trainer._eval_and_log

    def timed_step(*a, **k):
        if clock["start"] is None:        # the first micro-batch: setup is over, the clock starts
            clock["start"] = (time.perf_counter(), time.process_time())
        return run_step(*a, **k)

    def timed_eval(model, valid, cfg, tok, pos, *a, **k):
        w0, c0 = time.perf_counter(), time.process_time()
        sw, sc = clock["start"]
        train_wall, train_cpu = w0 - sw - clock["eval_wall"], c0 - sc - clock["eval_cpu"]
        r = eval_and_log(model, valid, cfg, tok, pos, *a, **k)
        clock["eval_wall"] += time.perf_counter() - w0
        clock["eval_cpu"] += time.process_time() - c0
        marks.append(dict(step=pos.step, eval_loss=r["loss"], train_wall=train_wall, train_cpu=train_cpu))
        return r

    trainer.run_step, trainer._eval_and_log = timed_step, timed_eval
    cfg = TrainConfig(**spec["config"])
    w0, c0 = time.perf_counter(), time.process_time()
    res = trainer.train(cfg, quiet=True)
    total_wall, total_cpu = time.perf_counter() - w0, time.process_time() - c0
    log = [json.loads(line) for line in open(Path(res.run) / "log.jsonl")]
    steps = [r for r in log if "loss" in r]
    out = dict(name=spec["name"], task=spec["task"], config=spec["config"], curve=marks,
               final_eval_loss=marks[-1]["eval_loss"] if marks else None,
               final_train_loss=res.train_loss, train_wall=marks[-1]["train_wall"] if marks else None,
               train_cpu=marks[-1]["train_cpu"] if marks else None, total_wall=total_wall, total_cpu=total_cpu,
               step_time_mean=sum(r["step_time"] for r in steps) / max(len(steps), 1),
               peak_rss_mb=max((r["peak_rss_mb"] for r in steps), default=None), loadavg=os.getloadavg())
    out.update(_metric(spec["task"], spec["config"]["model"], res.run, spec["config"]["data"], spec["test_limit"],
                       final_eval_loss=out["final_eval_loss"]))
    return out


def _chat_kind(question: str) -> str:
    for prefix, kind in (("What kind of thing", "category"), ("Give a synonym", "synonym"),
                         ("Give the opposite", "antonym")):
        if question.startswith(prefix):
            return kind
    return "other"


def _metric(task: str, model_dir: str, adapter, data: str, test_limit: int, final_eval_loss=None) -> dict:
    """The task metric of the model (with the adapter of a run folder, or the base model when None)."""
    from lcsb.evaluate import exact_match, label_accuracy
    from lcsb import load_model
    from lcsb.model.tokenizer import load_tokenizer

    t0 = time.perf_counter()
    if task == "domain":
        return {"eval_ppl": math.exp(final_eval_loss), "metric_time": 0.0}
    model = load_model(model_dir, adapter=adapter)
    tok = load_tokenizer(model_dir)
    records = [json.loads(line) for line in open(Path(data) / "test.jsonl") if line.strip()]
    if task == "chat":
        r = exact_match(model, tok, records, max_new_tokens=8, limit=test_limit)
        # by kind of question (scripts/build_tasks.py): the category questions have 25 possible answers,
        # the synonyms and antonyms are rare words no train answer shows
        kinds: dict[str, list[bool]] = {}
        for rec, ok in zip(records, r["correct"]):
            kinds.setdefault(_chat_kind(rec["messages"][-2]["content"]), []).append(ok)
        return {"exact_match": r["exact_match"], "test_n": r["n"], "samples": r["examples"][:3],
                "exact_match_by_kind": {k: sum(v) / len(v) for k, v in sorted(kinds.items())},
                "metric_time": time.perf_counter() - t0}
    labels = json.loads((Path(data) / "labels.json").read_text())
    r = label_accuracy(model, tok, records, labels, limit=test_limit)
    return {"accuracy": r["accuracy"], "test_n": r["n"], "metric_time": time.perf_counter() - t0}


def _base(spec: dict) -> dict:
    """The base model's eval loss on the same valid batches, and its task metric: the step-0 point."""
    import torch
    torch.set_num_threads(1)
    from lcsb import data as datalib
    from lcsb.evaluate import evaluate
    from lcsb.model import load_model
    from lcsb.model.tokenizer import load_tokenizer

    c = spec["config"]
    tok = load_tokenizer(c["model"])
    splits = datalib.load_dataset(c["data"], tok, max_seq_len=c.get("max_seq_len") or 2048, mask_prompt=True)
    model = load_model(c["model"])
    model.eval()
    r = evaluate(model, splits.valid, c["batch_size"], c["eval_batches"], tok.pad_token_id)
    out = dict(name="base", task=spec["task"], eval_loss=r["loss"])
    out.update(_metric(spec["task"], c["model"], None, c["data"], spec["test_limit"], final_eval_loss=r["loss"]))
    return out


def one_thread_subprocess(script: str, kind: str, spec: dict, what: str) -> dict:
    """`script --_<kind> <spec as JSON>` in a fresh interpreter with one BLAS thread; its RESULT line."""
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    p = subprocess.run([sys.executable, script, f"--_{kind}", json.dumps(spec)], capture_output=True, text=True,
                       env=env, cwd=REPO)
    for line in reversed(p.stdout.splitlines()):
        if line.startswith("RESULT"):
            return json.loads(line[len("RESULT"):])
    raise RuntimeError(f"{what} failed:\n{p.stderr[-3000:]}")


def write_results(out: Path, results: dict) -> None:
    """The results as JSON, written atomically, with paths relative to the repository."""
    from lcsb.atomic import write_atomic
    text = json.dumps(results, indent=2).replace(str(REPO) + "/", "")
    write_atomic(out, lambda tmp: Path(tmp).write_text(text))


def run_jobs(one, specs: list, jobs: int) -> list:
    """one(spec) for every spec, `jobs` at a time (1: one after another, the fairest timing)."""
    if jobs == 1:
        return [one(s) for s in specs]
    from concurrent.futures import ThreadPoolExecutor
    with ThreadPoolExecutor(jobs) as ex:
        return list(ex.map(one, specs))


def _in_subprocess(kind: str, spec: dict) -> dict:
    return one_thread_subprocess(__file__, kind, spec, f"{kind} {spec.get('name')} on {spec.get('task')}")


# ---------------------------------------------------------------- analysis


def time_to_reach(curve: list[dict], start_loss: float, target: float, key: str) -> float | None:
    """Training time at which the eval loss first reaches `target`, interpolated linearly between eval
    points (the base model's loss at time 0 is the first point); None if it never does."""
    pts = [(0.0, start_loss)] + [(m[key], m["eval_loss"]) for m in curve]
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if l1 <= target:
            if l0 <= target:
                return t0
            return t0 + (t1 - t0) * (l0 - target) / (l0 - l1)
    return None


def loss_at(curve: list[dict], start_loss: float, when: float, key: str) -> float | None:
    """The eval loss of a curve after `when` training time, interpolated linearly between eval points
    (the base model's loss at time 0 first); None past the curve's end."""
    pts = [(0.0, start_loss)] + [(m[key], m["eval_loss"]) for m in curve]
    for (t0, l0), (t1, l1) in zip(pts, pts[1:]):
        if t0 <= when <= t1:
            return l0 if t1 == t0 else l0 + (l1 - l0) * (when - t0) / (t1 - t0)
    return None


def analyse(results: dict) -> None:
    """Add gap to full and time to full's final eval loss to every row, in place."""
    for task, t in results["tasks"].items():
        rows = t["methods"]
        full = rows.get("full")
        for r in rows.values():
            if full is None:
                r["gap_pct"] = r["gain_lost_pct"] = r["reach_wall"] = r["reach_cpu"] = None
                r["cpu_vs_full"] = r["full_at_same_cpu"] = None
                continue
            target = full["final_eval_loss"]
            r["gap_pct"] = 100.0 * (r["final_eval_loss"] - target) / target
            # the share of full's improvement over the base model that the method does not get: a gap in
            # percent of the loss says little once losses are small
            gain = t["base"]["eval_loss"] - target
            r["gain_lost_pct"] = 100.0 * (r["final_eval_loss"] - target) / gain if gain > 0 else None
            r["reach_wall"] = time_to_reach(r["curve"], t["base"]["eval_loss"], target, "train_wall")
            r["reach_cpu"] = time_to_reach(r["curve"], t["base"]["eval_loss"], target, "train_cpu")
            # the other way round: where full's curve was after the CPU time this method took (equal time)
            r["cpu_vs_full"] = r["train_cpu"] / full["train_cpu"] if full["train_cpu"] else None
            r["full_at_same_cpu"] = loss_at(full["curve"], t["base"]["eval_loss"], r["train_cpu"], "train_cpu")


def _fmt_metric(task: str, r: dict) -> str:
    v = r.get(METRIC[task])
    if v is None:
        return "-"
    if task == "domain":
        return f"{v:.1f}"
    cat = (r.get("exact_match_by_kind") or {}).get("category")
    return f"{100 * v:.1f}%" + ("" if cat is None else f" (category {100 * cat:.0f}%)")


def table(results: dict) -> str:
    lines = ["| task | method | final eval loss | gap to full | gain lost | metric | train wall s | train CPU s | "
             "CPU vs full | full's loss at that CPU time | CPU to full's loss |",
             "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |"]
    for task, t in results["tasks"].items():
        b = t["base"]
        lines.append(f"| {task} | (base model) | {b['eval_loss']:.4f} | | | {_fmt_metric(task, b)} | | | | | |")
        for name, r in t["methods"].items():
            gap = "" if r.get("gap_pct") is None else f"{r['gap_pct']:+.2f}%"
            lost = "" if r.get("gain_lost_pct") is None else f"{r['gain_lost_pct']:.1f}%"
            rc = "not reached" if r.get("reach_cpu") is None else f"{r['reach_cpu']:.1f}"
            ratio = "" if r.get("cpu_vs_full") is None else f"{r['cpu_vs_full']:.2f}"
            same = "" if r.get("full_at_same_cpu") is None else f"{r['full_at_same_cpu']:.4f}"
            lines.append(f"| {task} | {name} | {r['final_eval_loss']:.4f} | {gap} | {lost} | {_fmt_metric(task, r)} | "
                         f"{r['train_wall']:.1f} | {r['train_cpu']:.1f} | {ratio} | {same} | {rc} |")
    names = {"domain": "eval perplexity (valid)", "chat": "exact match (test)", "classify": "label accuracy (test)"}
    lines.append("")
    lines.append("metric: " + "; ".join(f"{k}: {names[k]}" for k in results["tasks"]) +
                 ". gain lost: the share of full's improvement over the base model's eval loss that the method "
                 "does not get. full's loss at that CPU time: full's eval-loss curve read at the method's train CPU "
                 "time (equal time); below the method's own final loss means full was ahead at equal time")
    return "\n".join(lines)


def plot(results: dict, path: Path) -> bool:
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return False
    tasks = list(results["tasks"])
    fig, axes = plt.subplots(2, len(tasks), figsize=(5.5 * len(tasks), 8), squeeze=False)
    for j, task in enumerate(tasks):
        t = results["tasks"][task]
        base = t["base"]["eval_loss"]
        for name, r in t["methods"].items():
            style = dict(lw=2.2, color="black") if name == "full" else \
                dict(lw=2.0) if name == "lcsb-K4" else dict(lw=1.0, alpha=0.85)
            steps = [0] + [m["step"] for m in r["curve"]]
            cpu = [0.0] + [m["train_cpu"] for m in r["curve"]]     # CPU time: steadier than wall on a shared machine
            loss = [base] + [m["eval_loss"] for m in r["curve"]]
            axes[0][j].plot(steps, loss, marker=".", label=name, **style)
            axes[1][j].plot(cpu, loss, marker=".", label=name, **style)
        for i, xl in enumerate(("step", "training CPU time (s, one thread)")):
            ax = axes[i][j]
            if "full" in t["methods"]:
                ax.axhline(t["methods"]["full"]["final_eval_loss"], color="grey", ls=":", lw=1)
            finals = [r["final_eval_loss"] for r in t["methods"].values()]
            lo, hi = min(finals), max(max(finals), min(base, max(finals) + 0.6 * (base - min(finals))))
            ax.set_ylim(lo - 0.05 * (hi - lo), hi + 0.05 * (hi - lo))
            ax.set_xlabel(xl)
            ax.set_ylabel("eval loss")
            ax.set_title(f"{task}")
            ax.grid(alpha=0.3)
        axes[0][j].legend(fontsize=7)
    s = results["settings"]
    model = REPO / s.get("model", DEFAULT_MODEL)   # saved JSON holds it relative to the repo; older results none
    model = "bundled model" if model.resolve() == DEFAULT_MODEL.resolve() else model.name
    fig.suptitle(f"{model}, {s['steps']} steps, lr {s['common']['lr']}, batch {s['common']['batch_size']}, "
                 f"rank {s['common'].get('rank', 16)}, seed {s['seed']}\n(dotted: full's final eval loss)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return True


# ---------------------------------------------------------------- main


def common_settings(args) -> dict:
    import yaml
    base = yaml.safe_load(DEFAULT_FILE.read_text()) if DEFAULT_FILE.exists() else {}
    common = {k: base[k] for k in SHARED_KEYS if k in base}
    common.setdefault("lr", 1e-3)
    common.setdefault("batch_size", 4)
    for k in ("lr", "batch_size", "schedule", "warmup"):
        if getattr(args, k) is not None:
            common[k] = getattr(args, k)
    return common


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--tasks", nargs="+", default=list(TASKS), choices=TASKS)
    ap.add_argument("--methods", nargs="+", default=list(METHODS), type=_method_name,
                    help="methods to run (any N: lcsb-K6, lcsb-exact-K4, freeze-8, lisa-4, random-2, badam, full)")
    ap.add_argument("--model", default=str(DEFAULT_MODEL), help="checkpoint folder (default: the bundled model)")
    ap.add_argument("--steps", type=int, default=200, help="optimizer steps, the same for every method")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--lr", type=float, help="override train-default.yaml's lr (for every method)")
    ap.add_argument("--batch-size", type=int, help="override train-default.yaml's batch_size (for every method)")
    ap.add_argument("--schedule", choices=("constant", "linear", "cosine"), help="override train-default.yaml's")
    ap.add_argument("--warmup", type=int, help="override train-default.yaml's warmup")
    ap.add_argument("--eval-every", type=int, help="evaluate every N steps (default: steps / 8)")
    ap.add_argument("--eval-batches", type=int, default=25, help="valid batches per evaluation (0: all)")
    ap.add_argument("--test-limit", type=int, default=100, help="test records for exact match / accuracy (0: all)")
    ap.add_argument("--jobs", type=int, default=1, choices=(1, 2), help="runs side by side (1: fairest timing)")
    ap.add_argument("--quick", action="store_true", help="smoke run: 20 steps, 2 evals, 10 test records")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "quality.json"))
    ap.add_argument("--resume", action="store_true",
                    help="keep the runs already in --out (written after every finished run) and run the rest")
    ap.add_argument("--png", help="eval-loss curves (default: --out with .png)")
    ap.add_argument("--runs", default="/tmp/lcsb-quality", help="where the run folders go")
    ap.add_argument("--_worker", help=argparse.SUPPRESS)
    ap.add_argument("--_base", help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args._worker:
        print("RESULT" + json.dumps(_worker(json.loads(args._worker))))
        return
    if args._base:
        print("RESULT" + json.dumps(_base(json.loads(args._base))))
        return
    if args.quick:
        args.steps, args.test_limit = min(args.steps, 20), min(args.test_limit or 10, 10)
        args.eval_every = args.eval_every or 10
    eval_every = args.eval_every or max(1, args.steps // 8)
    common = common_settings(args)
    settings = dict(model=args.model, steps=args.steps, seed=args.seed, eval_every=eval_every,
                    eval_batches=args.eval_batches, test_limit=args.test_limit, jobs=args.jobs, common=common, threads=1,
                    methods={m: method_config(m) for m in args.methods})
    # the pid too: two benchmarks started in the same second must not share run folders
    stamp = f"{time.strftime('%Y%m%d-%H%M%S')}-{os.getpid()}"
    specs, bases = [], []
    for task in args.tasks:
        cfg = dict(model=args.model, data=str(ASSETS / "data" / task), steps=args.steps, seed=args.seed,
                   eval_every=eval_every, eval_batches=args.eval_batches, save_every=0, keep_checkpoints=1, **common)
        bases.append(dict(task=task, config=cfg, test_limit=args.test_limit))
        for name in args.methods:
            specs.append(dict(name=name, task=task, test_limit=args.test_limit,
                              config=dict(cfg, **method_config(name), out=f"{args.runs}/{stamp}/{task}/{name}")))
    results = dict(date=str(date.today()), machine=dict(platform=platform.platform(), cpus=os.cpu_count(),
                                                        python=platform.python_version()),
                   settings=settings, tasks={t: {"base": None, "methods": {}} for t in args.tasks})
    try:
        import torch
        results["machine"]["torch"] = torch.__version__
    except ImportError:
        pass
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    if args.resume and out.exists():
        # a partly done benchmark: keep what it measured under the same settings, run the rest
        before = json.loads(out.read_text())
        same = ("common", "steps", "seed", "eval_every", "eval_batches", "test_limit")
        if any(before.get("settings", {}).get(k) != settings[k] for k in same):
            raise SystemExit(f"{out} was measured with other settings; --resume needs the same command")
        for task, t in before.get("tasks", {}).items():
            if task in results["tasks"]:
                results["tasks"][task]["base"] = t.get("base")
                results["tasks"][task]["methods"].update(
                    {m: r for m, r in t.get("methods", {}).items() if m in args.methods})
        print(f"--resume: {sum(len(t['methods']) for t in results['tasks'].values())} runs kept from {out}",
              file=sys.stderr, flush=True)
    lock = threading.Lock()

    def save():
        # after every finished run, so a stopped benchmark keeps what it measured (paths relative to the repo)
        with lock:
            write_results(out, results)

    t_all = time.perf_counter()
    for b in bases:
        if results["tasks"][b["task"]]["base"] is None:
            results["tasks"][b["task"]]["base"] = _in_subprocess("base", b)
            save()
        r = results["tasks"][b["task"]]["base"]
        print(f"{b['task']:>8} base: eval loss {r['eval_loss']:.4f}", file=sys.stderr, flush=True)

    def one(spec):
        r = _in_subprocess("worker", spec)
        print(f"{spec['task']:>8} {spec['name']:>16}: eval loss {r['final_eval_loss']:.4f}  train {r['train_wall']:.1f} s "
              f"wall / {r['train_cpu']:.1f} s CPU  (load {r['loadavg'][0]:.1f})", file=sys.stderr, flush=True)
        with lock:
            results["tasks"][spec["task"]]["methods"][spec["name"]] = r
        save()
        return r

    run_jobs(one, [s for s in specs if s["name"] not in results["tasks"][s["task"]]["methods"]], args.jobs)
    for t in results["tasks"].values():          # the table in the order of --methods, however the jobs finished
        t["methods"] = {m: t["methods"][m] for m in args.methods if m in t["methods"]}
    results["total_wall_s"] = time.perf_counter() - t_all
    analyse(results)
    text = table(results)
    print(text)
    results["table"] = text
    save()
    png = Path(args.png) if args.png else out.with_suffix(".png")
    if plot(results, png):
        print(f"wrote {out} and {png}", file=sys.stderr)
    else:
        print(f"wrote {out} (no matplotlib: no plot)", file=sys.stderr)


if __name__ == "__main__":
    main()
