"""Speed and memory of lcsb against transformers + PEFT, side by side, and against the machine's limit.

    python bench/speed.py            # the reference workload: Qwen2.5-0.5B shape, seq 256, batch 1
    python bench/speed.py --quick    # 4 layers, seq 64, transformers+PEFT and lcsb full / K=4 int4: < 2 min
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
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


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
            child("import sys; from lcsb.quant.store import convert_model; "
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


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps per configuration (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quick", action="store_true",
                    help="4 layers, seq 64, 2 steps; transformers+PEFT and lcsb full and K=4 at int4 "
                         "(1.5 min on this 2-core machine, models included)")
    ap.add_argument("--only", nargs="+", help="run only configurations whose name contains one of these")
    ap.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's)")
    ap.add_argument("--workdir", default="/tmp/lcsb-bench")
    ap.add_argument("--out", default=str(HERE / "results" / "speed.json"))
    args = ap.parse_args(argv)
    if args.quick:
        args.layers, args.seq, args.steps = 4, 64, 2
        args.only = args.only or QUICK
    import workload

    models = ensure_models(Path(args.workdir), args.layers)
    shape = json.loads((models["fp32"] / "config.json").read_text())
    rates = workload.in_subprocess("machine_rates", threads=args.threads)
    # every configuration loaded side by side and stepped in turn (workload.Interleaved): the ratios
    # are between steps taken within the same minutes of this shared machine
    runs = workload.Interleaved()
    chosen = []
    for name, kind, method, weights in CONFIGS:
        if args.only and not any(o in name for o in args.only):
            continue
        plain = workload.split_spec(method)[0] if kind == "lcsb" else ""
        if ":" in plain and int(plain.split(":")[1]) > args.layers:
            continue      # more groups than layers (--quick)
        print(f"loading {name} ...", file=sys.stderr, flush=True)
        if kind == "hf":
            runs.add(name, "prepare_hf", model_dir=str(models["fp32"]), seq=args.seq, checkpointing=method,
                     threads=args.threads)
        else:
            runs.add(name, "prepare_config", method=method, layers=args.layers, seq=args.seq,
                     quant="stored" if weights != "fp32" else None, model_dir=str(models[weights]),
                     threads=args.threads)
        chosen.append((name, kind, plain, weights))

    results = runs.run(args.warmup, args.steps)
    rows = []
    for name, kind, plain, weights in chosen:
        r = results[name]
        if kind == "lcsb":
            sel = workload.parse_method(plain).validate(args.layers)
            # lcsb's median is over its cycle's steps; the floor is averaged the same way
            costs = [workload.step_cost(shape, sel.roles(t, args.layers), args.seq, 16,
                                        None if weights == "fp32" else weights)
                     for t in range(args.warmup, args.warmup + args.steps)]
            flops = sum(c["flops"] for c in costs) / len(costs)
            dq = sum(c["decompress_bytes"] for c in costs) / len(costs)
            floor = flops / (rates["matmul_gflops"] * 1e9) + dq / (rates["bandwidth_gbs"] * 1e9)
            r.update(flops=flops, decompress_bytes=dq, floor_s=floor, over_floor=r["step_time"] / floor)
        r["name"] = name
        rows.append(r)
        print(f"{name:>30}: {r['step_time']:6.2f} s/step  peak {r['peak_rss_mb']:5.0f} MB", file=sys.stderr, flush=True)

    base = next((r for r in rows if r["name"] == "transformers+peft fp32"), None)
    for r in rows:
        if base:
            r["time_vs_hf"] = r["step_time"] / base["step_time"]
            r["rss_vs_hf"] = r["peak_rss_mb"] / base["peak_rss_mb"]
    print(f"\nQwen2.5-0.5B shape ({args.layers} layers), seq {args.seq}, batch 1, LoRA r16 all projections, AdamW; "
          f"this machine: {rates['matmul_gflops']:.0f} GFLOP/s fp32 matmul, {rates['bandwidth_gbs']:.1f} GB/s\n")
    print("| configuration | s/step | tok/s | peak RSS MB | time vs HF | RSS vs HF | floor s | x floor "
          "| fwd | head | bwd | decomp | optim |")
    print("|---|---|---|---|---|---|---|---|---|---|---|---|---|")
    for r in rows:
        b = r.get("breakdown", {})
        cells = [f"{r['step_time']:.2f}", f"{r['tokens_per_s']:.0f}", f"{r['peak_rss_mb']:.0f}",
                 f"{r.get('time_vs_hf', float('nan')):.2f}", f"{r.get('rss_vs_hf', float('nan')):.2f}",
                 f"{r['floor_s']:.2f}" if "floor_s" in r else "-", f"{r['over_floor']:.1f}" if "over_floor" in r else "-"]
        cells += [f"{b[k]:.2f}" if k in b else "-" for k in ("forward", "head", "backward", "decompress", "optimizer")]
        print(f"| {r['name']} | " + " | ".join(cells) + " |")
    print("(decomp is part of fwd and bwd)")
    _write(args, rates, rows)
    print(f"wrote {args.out}")


def _write(args, rates, rows):
    import workload
    out = dict(workload=dict(shape="Qwen2.5-0.5B", layers=args.layers, seq=args.seq, batch=1, rank=16,
                             optimizer="AdamW", steps=args.steps, warmup=args.warmup),
               machine=dict(workload.machine(), **rates), results=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))


if __name__ == "__main__":
    main()
