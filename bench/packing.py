"""Packing short records (`--pack`) against one record per step, after equal training tokens.

    python bench/packing.py --model <SmolLM2 GGUF> --records 200 --out bench/results/packing_smollm2.json

Each run is `lcsb.train` in its own process with one torch thread (CPU seconds are what this shared machine
measures steadily), on the bundled chat task: unpacked runs `--records` steps of batch 1; packed runs as
many steps of `--max-seq-len` sequences as hold the same number of records on average (the packed
sequences of the whole training split, counted here). Both evaluate the same validation batches at the
end. Prints a table and writes the JSON after each run.

What packing computes differs: a packed record attends to the records before it in its sequence
(data.pack: the loss never crosses a boundary, attention does; no block-diagonal mask yet).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
from pathlib import Path

HERE = Path(__file__).parent

CHILD = """
import json, resource, sys, time, torch
torch.set_num_threads(1)
from lcsb import TrainConfig, train
spec = json.loads(sys.argv[1])
t0, c0 = time.perf_counter(), time.process_time()
res = train(TrainConfig(**spec), quiet=True)
cpu = time.process_time() - c0
steps = [json.loads(l) for l in open(res.run / "log.jsonl") if '"loss"' in l]
print(json.dumps({"eval_loss": res.eval["loss"], "cpu_s": cpu, "wall_s": time.perf_counter() - t0,
                  "steps": len(steps), "tokens": sum(s["tokens"] for s in steps),
                  "step_wall_s": sum(s["step_time"] for s in steps)}))
"""


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", required=True)
    p.add_argument("--data", default=str(HERE.parent / "assets" / "data" / "chat"))
    p.add_argument("--records", type=int, default=200, help="records trained on (unpacked: one per step)")
    p.add_argument("--max-seq-len", type=int, default=256)
    p.add_argument("--lr", type=float, default=1e-4)
    p.add_argument("--packed-lr", type=float, nargs="*", default=[],
                   help="also run packed at these learning rates (fewer, larger steps may want a larger one)")
    p.add_argument("--out", default=str(HERE / "results" / "packing.json"))
    p.add_argument("--work", default="/tmp/lcsb-packing")
    a = p.parse_args()

    from lcsb.atomic import write_atomic
    from lcsb.data import load_dataset, pack
    from lcsb.model.tokenizer import load_tokenizer

    train_set = load_dataset(a.data, load_tokenizer(a.model), max_seq_len=a.max_seq_len).train
    packed = pack(train_set, a.max_seq_len)
    per_seq = len(train_set) / len(packed)
    common = dict(model=a.model, data=a.data, lr=a.lr, batch_size=1, rank=16, max_seq_len=a.max_seq_len,
                  eval_batches=25, save_every=0, method="full")
    runs = {"one record per step": dict(common, steps=a.records, pack=False),
            "packed": dict(common, steps=max(1, round(a.records / per_seq)), pack=True)}
    for lr in a.packed_lr:
        runs[f"packed, lr {lr:g}"] = dict(runs["packed"], lr=lr)
    results = {"settings": {**vars(a), "records_per_packed_sequence": per_seq}, "runs": {}}
    for name, spec in runs.items():
        spec = dict(spec, out=str(Path(a.work) / name.replace(" ", "-").replace(",", "")))
        done = subprocess.run([sys.executable, "-c", CHILD, json.dumps(spec)], capture_output=True, text=True)
        if done.returncode:
            raise SystemExit(done.stderr[-2000:])
        r = json.loads(done.stdout.strip().splitlines()[-1])
        results["runs"][name] = {**r, "config": spec}
        text = json.dumps(results, indent=2)
        write_atomic(a.out, lambda tmp: Path(tmp).write_text(text))
    print(f"{'run':<22} {'steps':>5} {'tokens':>7} {'CPU s':>7} {'tokens/CPU s':>12} {'eval loss':>9}")
    for name, r in results["runs"].items():
        print(f"{name:<22} {r['steps']:>5} {r['tokens']:>7} {r['cpu_s']:>7.1f} {r['tokens'] / r['cpu_s']:>12.1f} "
              f"{r['eval_loss']:>9.4f}")


if __name__ == "__main__":
    main()
