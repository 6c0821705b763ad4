"""Step time, its breakdown and peak RSS of every selection method on the reference workload.

    python bench/methods.py                      # Qwen2.5-0.5B shape, seq 256, int4, rank 16, AdamW
    python bench/methods.py --layers 8 --seq 128  # smaller
Each configuration runs in its own process (its peak RSS is its own); all are loaded side by side
and stepped in turn (workload.Interleaved), so the ratios to `full` are measured within the same
minutes of this shared machine, on the memory-mapped folder that
`lcsb convert` makes of the random checkpoint (made once in --workdir, shared with bench/speed.py),
as users run it. A method may carry engine options after @ ('lcsb:4@recompute=off').
Writes bench/results/methods.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))
import workload  # noqa: E402

DEFAULT = ["full", "lcsb:2", "lcsb:4", "lcsb:8", "lcsb-exact:4", "lisa:2", "badam", "freeze:6",
           "full@recompute=off", "lcsb:4@recompute=off"]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--layers", type=int, default=24)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=3, help="timed steps (median reported)")
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--quant", default="int4", choices=("int4", "int8", "fp32"))
    ap.add_argument("--workdir", default="/tmp/lcsb-bench", help="where the checkpoint and its conversions are kept")
    ap.add_argument("--methods", nargs="+", default=DEFAULT,
                    help="methods, with options after @: recompute=on|off, decompress=block|linear, activations=ram|disk")
    ap.add_argument("--recompute", choices=("on", "off"), default="on")
    ap.add_argument("--out", default=str(Path(__file__).parent / "results" / "methods.json"))
    args = ap.parse_args(argv)

    from speed import ensure_models
    model_dir = ensure_models(Path(args.workdir), args.layers)[args.quant]
    runs = workload.Interleaved()
    for m in args.methods:
        print(f"loading {m} ...", file=sys.stderr, flush=True)
        runs.add(m, "prepare_config", method=m, layers=args.layers, seq=args.seq,
                 quant="stored" if args.quant != "fp32" else None, model_dir=str(model_dir),
                 recompute=args.recompute == "on")
    results = runs.run(args.warmup, args.steps)
    rows = [results[m] for m in args.methods]
    full = next((r for r in rows if r["method"] == "full"), rows[0])
    for r in rows:
        r["ratio_to_full"] = r["step_time"] / full["step_time"]
    parts = ["forward", "head", "backward", "decompress", "optimizer"]
    print(f"\n{'method':>22} {'s/step':>7} {'vs full':>7} " + " ".join(f"{p:>10}" for p in parts) + f" {'peak MB':>8}")
    for r in rows:
        b = r["breakdown"]
        print(f"{r['method']:>22} {r['step_time']:7.2f} {r['ratio_to_full']:7.2f} "
              + " ".join(f"{b[p]:10.2f}" for p in parts) + f" {r['peak_rss_mb']:8.0f}")
    print("(decompress is included in forward and backward)")
    out = dict(workload=dict(shape="Qwen2.5-0.5B", layers=args.layers, seq=args.seq, quant=args.quant, rank=16,
                             optimizer="AdamW", recompute=args.recompute),
               machine=workload.machine(), results=rows)
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
