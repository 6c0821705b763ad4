"""Speed and memory of lcsb against transformers + PEFT, side by side, and against the machine's limit.

    python bench/speed.py            # the reference workload: Qwen2.5-0.5B shape, seq 256, batch 1
    python bench/speed.py --quick    # 4 layers, seq 64, transformers+PEFT and lcsb full / K=4 int4: < 2 min
    python bench/speed.py --lengths  # seq 32-512 and the real models at their bundled tasks' lengths, 1 thread
    lcsb bench speed ...             # the same

Every configuration runs in its own process; all are loaded side by side and stepped in turn
(step 1 of each, then step 2 of each, ...), so a slow minute of a shared machine falls on all of
them alike. They run on the same random checkpoint and the same tokens (LoRA rank 16 on all
seven projections, AdamW, batch 1):
transformers + PEFT fp32 without and with gradient checkpointing; lcsb full and lcsb K=4 at int4,
int8 and fp32 base weights; lcsb K=2 and K=8 at int4. For each: median step time after a warm-up,
tokens/s, peak RSS, and ratios to transformers + PEFT fp32; for lcsb, the step's matmul FLOPs and
decompressed bytes over this machine's measured matmul rate and bandwidth give a floor, and the
step-time breakdown says where the rest goes. Writes bench/results/speed.json.

--seqs runs the set at several sequence lengths, one side-by-side run per length; --models adds the
real GGUF files (SmolLM2-135M, Gemma 3 270M, found as tests/real_models.py finds them) at the lengths
of their bundled tasks' records, transformers + PEFT fp32 on the same file (transformers dequantizes
it) against lcsb on the file as it is. --before SRC adds every lcsb configuration a second time, run
from another copy of the source (PYTHONPATH=SRC), in the same run: a before/after measurement. Each
row also has the CPU seconds of its step (the child's user + system time): on this shared 2-core
machine a single-thread run's CPU seconds move far less with the neighbours than its wall time, so
--threads 1 with CPU-second ratios is the measurement to trust here. The JSON is rewritten (atomically)
after each run, so a cut-off benchmark keeps what it finished.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
from pathlib import Path

from lcsb.atomic import write_atomic

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "tests"))   # real_models: where the tests find the GGUF files

import workload  # noqa: E402


def child(code: str, *args) -> None:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=HERE.parent)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])


def ensure_models(work: Path, layers: int) -> dict[str, Path]:
    """The random bf16 checkpoint of the shape (`layers` deep) and its int4 / int8 conversions."""
    src = work / f"qwen05-L{layers}-bf16"
    if not (src / "config.json").exists():
        print(f"writing a random bf16 checkpoint ({layers} layers) to {src} ...", file=sys.stderr, flush=True)
        child("import sys; sys.path.insert(0, 'bench'); import convert_memory as c; from pathlib import Path; "
              "c.QWEN05['layers'] = int(sys.argv[2]); c.write_checkpoint(Path(sys.argv[1]))", str(src), str(layers))
    out = {"fp32": src}
    for q in ("int4", "int8"):
        dst = work / f"qwen05-L{layers}-{q}"
        if not (dst / "config.json").exists():
            print(f"converting to {q} ...", file=sys.stderr, flush=True)
            child("import sys; from lcsb.convert import convert_model; "
                  "convert_model(sys.argv[1], sys.argv[2], sys.argv[3], 64)", str(src), str(dst), q)
        out[q] = dst
    return out


CONFIGS = [  # (name, kind, method, weights)
    ("transformers+peft fp32", "hf", False, "fp32"),
    ("transformers+peft fp32 +ckpt", "hf", True, "fp32"),
    ("lcsb full int4", "lcsb", "full", "int4"),
    ("lcsb K=4 int4", "lcsb", "lcsb:4", "int4"),
    ("lcsb full int8", "lcsb", "full", "int8"),
    ("lcsb K=4 int8", "lcsb", "lcsb:4", "int8"),
    ("lcsb full fp32", "lcsb", "full", "fp32"),
    ("lcsb K=4 fp32", "lcsb", "lcsb:4", "fp32"),
    ("lcsb K=2 int4", "lcsb", "lcsb:2", "int4"),
    ("lcsb K=8 int4", "lcsb", "lcsb:8", "int4"),
    # one matrix decompressed at a time (a few MB of rows): the workspace shrinks from a block to 4 MB
    ("lcsb full int4, decompress linear", "lcsb", "full@decompress=linear", "int4"),
    ("lcsb K=4 int4, decompress linear", "lcsb", "lcsb:4@decompress=linear", "int4"),
    # the least-memory engine settings: one matrix decompressed at a time, block checkpoints on disk
    ("lcsb full int4, least memory", "lcsb", "full@decompress=linear@activations=disk", "int4"),
    ("lcsb K=4 int4, least memory", "lcsb", "lcsb:4@decompress=linear@activations=disk", "int4"),
]


# --quick: transformers+PEFT both ways, lcsb full and K=4 at int4 (each also with --decompress linear
# and least memory); name substrings, as --only
QUICK = ["transformers+peft fp32", "lcsb full int4", "lcsb K=4 int4"]
# --lengths: the rows of the issue-18 table, at every length
LENGTHS = dict(seqs=[32, 64, 128, 256, 512], models=["smollm2", "gemma3"],
               only=["transformers+peft fp32", "lcsb full int4", "lcsb K=4 int4"])

# the real models, and the lengths of their bundled tasks' records (their own tokenizers, train
# splits): SmolLM2 chat mean 58 (p90 64), classify 49, domain 99 (median 93); Gemma 3 270M (a base
# model: no chat template) classify and domain
REAL_SEQS = {"smollm2": [56, 96], "gemma3": [48, 96]}
REAL_CONFIGS = [("transformers+peft fp32", "hf", False), ("lcsb full gguf", "lcsb", "full"),
                ("lcsb K=4 gguf", "lcsb", "lcsb:4")]


def real_model(name: str) -> Path:
    import real_models
    path = getattr(real_models, name)()
    if path is None:
        raise SystemExit(f"--models {name}: its package is not installed (README: the test command installs it)")
    return Path(path)


def cost_shape(cfg) -> dict:
    """workload.step_cost's shape from an lcsb ModelConfig."""
    return dict(num_hidden_layers=cfg.num_layers, hidden_size=cfg.hidden_size,
                intermediate_size=cfg.intermediate_size, vocab_size=cfg.vocab_size, num_attention_heads=cfg.num_heads, num_key_value_heads=cfg.num_kv_heads, head_dim=cfg.head_dim)


def _cpu_seconds(pid: int) -> float:
    """User + system CPU seconds of a process so far (/proc/PID/stat, clock ticks)."""
    with open(f"/proc/{pid}/stat") as f:
        fields = f.read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


class Timed(workload.Interleaved):
    """Interleaved, and the CPU seconds each child spends on each step (read from /proc by the parent)."""

    def __init__(self):
        super().__init__()
        self.cpu: dict[str, list[float]] = {}

    def _ask(self, name: str, cmd: str):
        pid = self.children[name].pid
        c0 = _cpu_seconds(pid)
        out = super()._ask(name, cmd)
        if cmd == "step":
            self.cpu.setdefault(name, []).append(_cpu_seconds(pid) - c0)
        return out


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--seqs", type=int, nargs="+", help="sequence lengths of the Qwen2.5-0.5B shape, one run each "
                    "(default: --seq); 0 for none")
    ap.add_argument("--models", nargs="*", default=None, choices=sorted(REAL_SEQS),
                    help="real GGUF models too, at their bundled tasks' lengths (bare --models: none)")
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="4 layers, seq 64, 2 steps; transformers+PEFT and lcsb full and K=4 at int4 "
                         "(1.5 min on this 2-core machine, models included)")
    ap.add_argument("--lengths", action="store_true",
                    help="seq 32 64 128 256 512 and --models smollm2 gemma3; transformers+PEFT fp32, lcsb full and "
                         "K=4 int4; one thread (CPU seconds are the measure)")
    ap.add_argument("--only", nargs="+", help="run only configurations whose name contains one of these")
    ap.add_argument("--before", help="a copy of src/ (the folder holding lcsb/): every lcsb row is run from it "
                    "too, side by side, named '... [before]'")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", default="/tmp/lcsb-bench")
    ap.add_argument("--out", default=None, help="JSON (default bench/results/speed.json, "
                    "speed_lengths.json with --lengths)")
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.seq, args.steps = 4, 64, 2
        args.only = args.only or QUICK
    if args.lengths:
        args.seqs = args.seqs or LENGTHS["seqs"]
        args.models = LENGTHS["models"] if args.models is None else args.models
        args.only = args.only or LENGTHS["only"]
        args.threads = args.threads or 1
    seqs = [q for q in (args.seqs or [args.seq]) if q > 0]
    args.out = args.out or str(HERE / "results" / ("speed_lengths.json" if args.lengths else "speed.json"))

    rates = workload.in_subprocess("machine_rates", threads=args.threads)
    print(f"this machine ({args.threads or 'default'} threads): {rates['matmul_gflops']:.0f} GFLOP/s fp32 matmul, "
          f"{rates['bandwidth_gbs']:.1f} GB/s", file=sys.stderr, flush=True)
    plans = []
    if seqs:
        models = ensure_models(Path(args.workdir), args.layers)
        shape = json.loads((models["fp32"] / "config.json").read_text())
        for seq in seqs:
            plans.append((f"Qwen2.5-0.5B shape ({args.layers} layers)", seq, shape,
                          [(n, k, m, str(models[w]), w) for n, k, m, w in CONFIGS]))
    from lcsb.model import load_config
    for name in args.models or []:
        path = real_model(name)
        cfg, _ = load_config(path)
        for seq in REAL_SEQS[name]:
            plans.append((f"{name} ({path.name}, {cfg.num_layers} layers)", seq, cost_shape(cfg),
                          [(n, k, m, str(path), "gguf") for n, k, m in REAL_CONFIGS]))
    runs = []
    for label, seq, shape, configs in plans:
        rows = run_one(args, label, seq, shape, configs, rates)
        runs.append(dict(model=label, seq=seq, shape=shape, results=rows))
        print_table(label, seq, rows, rates, args.threads)
        _write(args, rates, runs)
    print(f"wrote {args.out}")


def run_one(args, label: str, seq: int, shape: dict, configs, rates) -> list[dict]:
    """One side-by-side run of `configs` at `seq`: their rows, with floors and ratios."""
    print(f"== {label}, seq {seq}", file=sys.stderr, flush=True)
    runs = Timed()
    chosen = []
    variants = [("", None)] + ([(" [before]", {"PYTHONPATH": str(Path(args.before).resolve())})] if args.before else [])
    for name, kind, method, model_dir, weights in configs:
        if kind == "lcsb" and weights == "gguf":
            pass                    # the real models' rows are always run
        elif args.only and not any(o == name if args.lengths else o in name for o in args.only):
            continue
        plain = workload.split_spec(method)[0] if kind == "lcsb" else method    # hf: gradient checkpointing
        for tag, env in (variants if kind == "lcsb" else variants[:1]):
            print(f"loading {name}{tag} ...", file=sys.stderr, flush=True)
            if kind == "hf":
                runs.add(name, "prepare_hf", model_dir=model_dir, seq=seq, checkpointing=method, threads=args.threads)
            else:
                runs.add(name + tag, "prepare_config", env=env, method=method, layers=args.layers, seq=seq,
                         quant="stored" if weights != "fp32" else None, model_dir=model_dir, threads=args.threads)
            chosen.append((name + tag, kind, plain, weights))

    results = runs.run(args.warmup, args.steps)
    rows = []
    for name, kind, plain, weights in chosen:
        r = results[name]
        r["name"] = name
        r["cpu_s"] = statistics.median(runs.cpu[name][args.warmup:])
        layers = r.get("layers", args.layers)
        quant = None if weights == "fp32" else ("int4" if weights == "gguf" else weights)   # gguf: ~5 bits/param
        if kind == "lcsb":
            sel = workload.parse_method(plain).validate(layers)
            # lcsb's median is over its cycle's steps; the floor is averaged the same way
            costs = [workload.step_cost(shape, sel.roles(t, layers), seq, 16, quant)
                     for t in range(args.warmup, args.warmup + args.steps)]
        else:
            # transformers + PEFT: forward, head, every block's backward, no recompute, nothing to decompress
            n = shape.get("num_hidden_layers") or args.layers
            costs = [workload.step_cost(shape, ["train"] * n, seq, 16, None, recompute=bool(plain))]
        flops = sum(c["flops"] for c in costs) / len(costs)
        dq = sum(c["decompress_bytes"] for c in costs) / len(costs)
        floor = flops / (rates["matmul_gflops"] * 1e9) + dq / (rates["bandwidth_gbs"] * 1e9)
        # one thread: its CPU seconds are the time it ran, whatever the neighbours did; else wall time
        measured = r["cpu_s"] if args.threads == 1 else r["step_time"]
        r.update(flops=flops, decompress_bytes=dq, floor_s=floor, over_floor=measured / floor)
        rows.append(r)
    base = next((r for r in rows if r["name"] == "transformers+peft fp32"), None)
    for r in rows:
        if base:
            r["time_vs_hf"] = r["step_time"] / base["step_time"]
            r["cpu_vs_hf"] = r["cpu_s"] / base["cpu_s"]
            r["rss_vs_hf"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    return rows


def print_table(label, seq, rows, rates, threads):
    print(f"\n{label}, seq {seq}, batch 1, LoRA r16 all projections, AdamW; {threads or 'default'} threads; "
          f"this machine: {rates['matmul_gflops']:.0f} GFLOP/s fp32 matmul, {rates['bandwidth_gbs']:.1f} GB/s\n")
    print("| configuration | s/step | CPU s/step | tok/s | peak RSS MB | time vs HF | CPU vs HF | RSS vs HF | floor s "
          "| x floor | fwd | head | bwd | decomp | optim |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r.get("breakdown", {})
        cells = [f"{r['step_time']:.2f}", f"{r['cpu_s']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_mb']:.0f}",
                 f"{r.get('time_vs_hf', float('nan')):.2f}", f"{r.get('cpu_vs_hf', float('nan')):.2f}",
                 f"{r.get('rss_vs_hf', float('nan')):.2f}", f"{r['floor_s']:.2f}", f"{r['over_floor']:.2f}"]
        cells += [f"{b[k]:.2f}" if k in b else "-" for k in ("forward", "head", "backward", "decompress", "optimizer")]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")
    print("(x floor: CPU s over the floor with one thread, else s/step; decomp is part of fwd and bwd)", flush=True)


def _write(args, rates, runs):
    out = dict(workload=dict(layers=args.layers, batch=1, rank=16, optimizer="AdamW", steps=args.steps,
                             warmup=args.warmup, threads=args.threads, before=args.before),
               machine=dict(workload.machine(), **rates), runs=runs,
               results=runs[0]["results"] if len(runs) == 1 else None)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def write(tmp):
        Path(tmp).write_text(json.dumps(out, indent=2))
    write_atomic(args.out, write)


if __name__ == "__main__":
    main()
