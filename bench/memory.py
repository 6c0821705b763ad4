"""Peak memory of a training step on the reference workload, loaded the way users run it.

    python bench/memory.py [--workdir DIR] [--methods full lcsb:4] [--seq 256] [--steps 2]

Makes (once, in --workdir) the Qwen2.5-0.5B shape with random bf16 weights and its `lcsb convert`
int4 copy, then for each method runs training steps (seq 256, batch 1, LoRA rank 16 on all seven
projections, AdamW) in a fresh process on the memory-mapped int4 folder and reports the process's
peak RSS (ru_maxrss; file-backed pages of the mapped weights count while resident), and at the end
its anonymous and file-backed resident memory. Writes bench/results/memory.json.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))


def child(code: str, *args) -> str:
    out = subprocess.run([sys.executable, "-c", code, *args], capture_output=True, text=True, cwd=HERE.parent)
    if out.returncode:
        raise RuntimeError(out.stderr[-3000:])
    return out.stdout


def ensure_models(work: Path) -> Path:
    src, dst = work / "qwen05-bf16", work / "qwen05-int4"
    if not (src / "config.json").exists():
        print(f"writing the random bf16 checkpoint to {src} ...", file=sys.stderr, flush=True)
        child("import sys; sys.path.insert(0, 'bench'); import convert_memory as c; from pathlib import Path; "
              "c.write_checkpoint(Path(sys.argv[1]))", str(src))
    if not (dst / "config.json").exists():
        print(f"converting to int4 in {dst} ...", file=sys.stderr, flush=True)
        child("import sys; from lcsb.convert import convert_model; convert_model(sys.argv[1], sys.argv[2], 'int4', 64)",
              str(src), str(dst))
    return dst


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--workdir", default="/tmp/lcsb-bench")
    ap.add_argument("--methods", nargs="+", default=["full", "full@decompress=linear@activations=disk", "lcsb:4",
                                                     "lcsb:4@decompress=linear@activations=disk"],
                    help="methods, with options after @: recompute=on|off, decompress=block|linear, activations=ram|disk")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2)
    ap.add_argument("--out", default=str(HERE / "results" / "memory.json"))
    args = ap.parse_args(argv)
    model_dir = ensure_models(Path(args.workdir))
    import workload
    rows = []
    for m in args.methods:
        r = workload.in_subprocess("run_config", method=m, layers=0, seq=args.seq, steps=args.steps, warmup=1,
                                   quant="stored", model_dir=str(model_dir))
        rows.append(r)
        print(f"{m:>40}: peak RSS {r['peak_rss_mb']:.0f} MB (anon at end {r.get('rssanon_mb', 0):.0f} MB, "
              f"file {r.get('rssfile_mb', 0):.0f} MB), {r['step_time']:.1f} s/step", flush=True)
    base = workload.in_subprocess("import_baseline")
    print(f"bare `import torch, lcsb`: {base['peak_rss_mb']:.0f} MB")
    out = dict(workload=dict(shape="Qwen2.5-0.5B", seq=args.seq, batch=1, rank=16, targets="all 7", optimizer="AdamW",
                             weights="int4 g64, lcsb convert folder, memory-mapped"),
               machine=workload.machine(), import_baseline_mb=base["peak_rss_mb"], results=rows)
    Path(args.out).write_text(json.dumps(out, indent=2))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
