"""Peak memory of a training step as the model grows: Qwen2.5 0.5B / 1.5B / 3B / 7B and Gemma 3 4B shapes.

    python bench/memory.py --shape qwen2.5-0.5b qwen2.5-3b [--rows ours mebp] [--steps 2] [--seq 256]
                           [--workdir /tmp/lcsb-bench] [--out bench/results/memory_shapes.json] [--threads 1]

For each shape, makes once (cached in --workdir) an `lcsb convert`-format int4 folder (group 64) with
random weights in the real shape, written module by module: no float matrix larger than a row chunk
exists, so the 7B shape builds in a few hundred MB. Then every row runs in a fresh process (its
peak is its own) on the memory-mapped folder, as users run it (`tune_malloc` and the caching
allocator installed, as the `lcsb` command does): load, one warm-up step, `--steps` timed steps at
seq 256, batch 1, LoRA on all seven projections. Each row reports:
  - peak RSS: VmHWM of the process (file-backed pages of the mapped weights count while resident);
  - anon: RssAnon at the end of the last step (the resident set that is not the mapped weights);
  - load peak: VmHWM after loading, before the first step;
  - s/step (wall, median) and CPU s/step (user + system of all threads, median), with torch's thread
    count (--threads; default: torch's own) and the machine's load average before and after the row:
    on a shared 2-core machine wall time follows the load, and with several threads so does CPU time
    (OpenMP threads spin while they wait); one thread's CPU seconds are the figure to compare;
  - the estimate of `--max-memory` (lcsb.memory.estimate with the row's settings and the measured
    runtime) and what it is made of, and its error against the measured peak of the whole run: the
    process's VmHWM after the steps and a checkpoint save (a run saves; bfloat16 factors are converted
    to float32 for the adapter file).
Rows (--rows): `ours` = rank 16, AdamW, least-memory settings (--decompress linear --activations
disk), full and lcsb K=4, with the LoRA state in float32 and in bfloat16 (--lora-dtype); `mebp` =
MeBP's settings: rank 8, SGD (no momentum), full, float32 and bfloat16; `defaults` = rank 16, AdamW,
--decompress block --activations ram; `fused` = `ours`' full rows with the optimizer step fused into the
backward (what `lcsb train --clip 0` does: a block's gradients are dropped once it is updated). MeBP's and MeSP's figures (iPhone 17 Pro, phys_footprint,
issue 19) are printed beside the shapes they measured. The JSON is rewritten after every row; rows
already in --out stay unless this run measures the same row again (shape and settings), so shapes and
rows can be (re)measured a few at a time.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent

QWEN2 = dict(model_type="qwen2", architectures=["Qwen2ForCausalLM"], max_position_embeddings=32768,
             rope_theta=1000000.0, rms_norm_eps=1e-6, hidden_act="silu", use_sliding_window=False,
             torch_dtype="bfloat16", bos_token_id=151643, eos_token_id=151645)
SHAPES = {
    "qwen2.5-0.5b": dict(QWEN2, hidden_size=896, intermediate_size=4864, num_hidden_layers=24, num_attention_heads=14,
                         num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(QWEN2, hidden_size=1536, intermediate_size=8960, num_hidden_layers=28,
                         num_attention_heads=12, num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-3b": dict(QWEN2, hidden_size=2048, intermediate_size=11008, num_hidden_layers=36, num_attention_heads=16,
                       num_key_value_heads=2, vocab_size=151936, tie_word_embeddings=True),
    "qwen2.5-7b": dict(QWEN2, hidden_size=3584, intermediate_size=18944, num_hidden_layers=28, num_attention_heads=28,
                       num_key_value_heads=4, vocab_size=152064, tie_word_embeddings=False),
    "gemma3-4b": dict(model_type="gemma3_text", architectures=["Gemma3ForCausalLM"], hidden_size=2560,
                      intermediate_size=10240, num_hidden_layers=34, num_attention_heads=8, num_key_value_heads=4,
                      head_dim=256, vocab_size=262208, tie_word_embeddings=True, sliding_window=1024,
                      sliding_window_pattern=6, query_pre_attn_scalar=256, rope_theta=1000000.0,
                      rope_local_base_freq=10000.0, rope_scaling={"rope_type": "linear", "factor": 8.0},
                      rms_norm_eps=1e-6, hidden_activation="gelu_pytorch_tanh", max_position_embeddings=131072,
                      torch_dtype="bfloat16"),
}
# issue 19: iPhone 17 Pro, seq 256, rank 8 on all projections, int4 group 64, SGD: (MB, s/step)
MEBP = {"qwen2.5-0.5b": (360.8, 0.68), "qwen2.5-1.5b": (516.2, 1.66), "qwen2.5-3b": (637.6, 3.21)}
MESP = {"qwen2.5-0.5b": (136.2, 0.86), "qwen2.5-1.5b": (262.6, 2.17), "qwen2.5-3b": (368.4, 4.09)}
LEAST = dict(decompress="linear", activations="disk")
ROWS = {
    "ours": [dict(method=m, rank=16, optimizer="adamw", lora_dtype=d, **LEAST)
             for m in ("full", "lcsb:4") for d in ("float32", "bfloat16")],
    "mebp": [dict(method="full", rank=8, optimizer="sgd", lora_dtype=d, **LEAST) for d in ("float32", "bfloat16")],
    "defaults": [dict(method=m, rank=16, optimizer="adamw", lora_dtype="float32", decompress="block", activations="ram")
                 for m in ("full", "lcsb:4")],
    # the optimizer step fused into the backward (what `lcsb train --clip 0` does: optim.fuses_step)
    "fused": [dict(method="full", rank=16, optimizer="adamw", lora_dtype=d, fused=True, **LEAST)
              for d in ("float32", "bfloat16")],
}


def write_model(folder: Path, raw: dict, group_size: int = 64, seed: int = 0) -> None:
    """An `lcsb convert`-format int4 folder with random weights (std 0.02; norms 1 / 0 for Gemma's
    offset norms) in the shape of config `raw`, module by module, each matrix a row chunk at a time."""
    import torch
    from lcsb import __version__
    from lcsb.quant.formats import CHUNK_ELEMENTS, quantize
    from lcsb.convert import _meta_model
    from lcsb.model.checkpoint import SHARD_BYTES, _ShardWriter, _shape, _write_json
    from lcsb.model.linear import Embedding, Linear

    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    tmp.mkdir(parents=True)
    (tmp / "config.json").write_text(json.dumps(raw))
    cfg, model = _meta_model(tmp)
    g = torch.Generator().manual_seed(seed)
    writer = _ShardWriter(tmp, SHARD_BYTES)
    for name, m in model.named_modules():
        group = {}
        if isinstance(m, (Linear, Embedding)):
            rows, cols = _shape(m)
            step = max(1, CHUNK_ELEMENTS // cols)
            parts = [quantize(torch.randn(min(step, rows - a), cols, generator=g) * 0.02, "int4", group_size).tensors()
                     for a in range(0, rows, step)]
            group.update({f"{name}.{k}": torch.cat([p[k] for p in parts]) for k in parts[0]})
            del parts
        for pname, p in m.named_parameters(recurse=False):
            norm = "norm" in name.rsplit(".", 1)[-1] or "norm" in pname
            t = (torch.zeros(p.shape) if cfg.norm_offset else torch.ones(p.shape)) if norm \
                else torch.randn(p.shape, generator=g) * 0.02
            group[f"{name}.{pname}"] = t.to(torch.bfloat16)
        if group:
            writer.add(group)
    writer.close()
    raw = dict(raw, quantization={"format": "int4", "group_size": group_size, "lcsb_version": __version__})
    _write_json(tmp / "config.json", raw)
    tmp.rename(folder)


def ensure_model(work: Path, shape: str) -> Path:
    folder = work / f"{shape}-int4"
    if not (folder / "config.json").exists():
        print(f"writing the random int4 {shape} to {folder} ...", file=sys.stderr, flush=True)
        t = time.time()
        run_child({"make": shape, "folder": str(folder)})
        print(f"  done in {time.time() - t:.0f} s", file=sys.stderr, flush=True)
    return folder


def _status() -> dict:
    out = {}
    for line in open("/proc/self/status"):
        k, _, v = line.partition(":")
        if k in ("VmHWM", "VmRSS", "RssAnon", "RssFile"):
            out[k] = int(v.split()[0]) / 1024
    return out


def estimate_row(row: dict, runtime: int):
    """The `--max-memory` estimate of a row (as the trainer makes it), for a measured runtime in bytes."""
    from lcsb import memory
    from lcsb.config import LoraConfig
    from lcsb.model import load_config
    sys.path.insert(0, str(HERE))
    from workload import parse_method
    mcfg, _ = load_config(row["folder"])
    sel = parse_method(row["method"]).validate(mcfg.num_layers)
    stored = mcfg.raw["quantization"]
    return memory.estimate(mcfg, fmt=stored["format"], group_size=stored["group_size"], mapped=True,
                           lora=LoraConfig(rank=row["rank"], alpha=2 * row["rank"]),
                           visited=memory.max_visited(sel, mcfg.num_layers, 512), recompute=True, batch=1,
                           seq=row["seq"], counted=row["seq"] - 1, optimizer=row["optimizer"], momentum=0.0,
                           runtime=runtime, malloc_tuned=True, decompress=row["decompress"],
                           activations=row["activations"], caching=True, lora_dtype=row["lora_dtype"],
                           trained=memory.max_trained(sel, mcfg.num_layers, 512), fused_step=row.get("fused", False))


def reestimate(path: Path, workdir: Path) -> None:
    """Recompute every row's estimate in `path` with this checkout's lcsb.memory (the measured runtime kept)."""
    from lcsb.atomic import write_atomic
    results = json.loads(path.read_text())
    for shape, res in results["shapes"].items():
        for r in res["rows"]:
            est = estimate_row(dict(r, folder=str(workdir / f"{shape}-int4")), int(r["runtime_mb"] * 2**20))
            r.update(estimate_mb=est.total / 2**20, estimate_error=est.total / 2**20 / r["save_peak_mb"] - 1,
                     estimate_parts_mb={k: round(v / 2**20, 1) for k, v in est.parts.items()})
    write_atomic(path, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    print(table(results))


def child_row(row: dict) -> dict:
    """One row, in this (fresh) process."""
    import torch
    from lcsb import memory
    from lcsb.config import LoraConfig
    from lcsb.engine.executor import block_lora_params, run_step
    from lcsb.model import load_config, load_model
    from lcsb.model.lora import set_lora_dtype
    from lcsb.optim import BlockOptimizer
    from lcsb.runtime import install_allocator, tune_malloc
    sys.path.insert(0, str(HERE))
    from workload import parse_method

    if row.get("threads"):
        torch.set_num_threads(row["threads"])
    tune_malloc()                        # as the lcsb command does
    install_allocator()
    memory.warm_up(row["lora_dtype"])
    runtime = memory.current_rss()
    folder = row["folder"]
    mcfg, _ = load_config(folder)
    lora = LoraConfig(rank=row["rank"], alpha=2 * row["rank"])
    sel = parse_method(row["method"]).validate(mcfg.num_layers)
    seq = row["seq"]
    est = estimate_row(row, runtime)
    model = load_model(folder, lora=lora)
    set_lora_dtype(model, row["lora_dtype"])
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():                # non-zero B, as after some training: every gradient path runs
        for k, p in model.lora_parameters().items():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.01)
    n = mcfg.num_layers
    opt = BlockOptimizer([block_lora_params(b) for b in model.model.layers], lr=1e-4, kind=row["optimizer"])
    loaded = _status()
    ids = torch.randint(0, mcfg.vocab_size, (1, seq), generator=torch.Generator().manual_seed(1))
    times, cpus, loss = [], [], None
    for t in range(1 + row["steps"]):
        roles = sel.roles(t, n)
        w0, c0 = time.perf_counter(), time.process_time()
        trained, done = {i for i, r in enumerate(roles) if r == "train"}, set()

        def fused(i):                    # as the trainer's with --clip 0: update the block, drop its gradients
            opt.step_block(i, trained)
            done.add(i)
            for p in model.model.layers[i].parameters():
                p.grad = None

        res = run_step(model, ids, ids, roles, row["activations"], decompress=row["decompress"],
                       after_block=fused if row.get("fused") else None)
        opt.step(trained, done)
        opt.zero_grad()
        if t:
            times.append(time.perf_counter() - w0)
            cpus.append(time.process_time() - c0)
        loss = res.loss
    end = _status()
    # then a checkpoint as a run writes one: the adapter and the optimizer state (runstate.save_checkpoint)
    import tempfile
    from safetensors.torch import save_file
    from lcsb.lora import save_adapter
    with tempfile.TemporaryDirectory(dir=row["folder"] + "/..") as tmp:
        save_adapter(model, tmp)
        keys = list(model.lora_parameters())
        save_file({f"{keys[i]}::{k}": v.contiguous() for i, st in opt.state_dict()["state"].items()
                   for k, v in st.items() if torch.is_tensor(v)}, tmp + "/optimizer.safetensors")
    saved = _status()
    return dict(row, threads=torch.get_num_threads(), step_s=statistics.median(times), cpu_s=statistics.median(cpus), loss=loss,
                step_s_all=times, cpu_s_all=cpus, save_peak_mb=saved["VmHWM"],
                peak_rss_mb=end["VmHWM"], anon_mb=end["RssAnon"], file_mb=end["RssFile"], load_peak_mb=loaded["VmHWM"],
                runtime_mb=runtime / memory.MB, estimate_mb=est.total / memory.MB,
                estimate_parts_mb={k: round(v / memory.MB, 1) for k, v in est.parts.items()},
                estimate_error=est.total / memory.MB / saved["VmHWM"] - 1)   # against the run's peak, save included


def child_import() -> dict:
    import lcsb  # noqa: F401
    import torch  # noqa: F401
    return {"peak_rss_mb": _status()["VmHWM"]}


def run_child(job: dict) -> dict:
    r = subprocess.run([sys.executable, str(Path(__file__).resolve()), "--child", json.dumps(job)],
                       capture_output=True, text=True, cwd=ROOT)
    if r.returncode:
        raise RuntimeError(r.stderr[-3000:])
    return json.loads([l for l in r.stdout.splitlines() if l.startswith("RESULT")][-1][6:])


def child_main(job: dict) -> dict:
    if "make" in job:
        write_model(Path(job["folder"]), SHAPES[job["make"]])
        return {}
    if job.get("import"):
        return child_import()
    return child_row(job)


def same_row(a: dict, b: dict) -> bool:
    return all(a.get(k) == b.get(k) for k in ("method", "rank", "optimizer", "lora_dtype", "decompress", "activations", "seq",
                                               "fused"))


def label(r: dict) -> str:
    opt = "AdamW" if r["optimizer"] == "adamw" else "SGD"
    m = "full" if r["method"] == "full" else "lcsb K=" + r["method"].split(":")[1]
    state = "bf16" if r["lora_dtype"] == "bfloat16" else "fp32"
    least = r["decompress"] == "linear" and r["activations"] == "disk"
    return (f"{m}, r{r['rank']} {opt}, {state} state" + ("" if least else f", {r['decompress']}/{r['activations']}")
            + (", step fused (--clip 0)" if r.get("fused") else ""))


def table(results: dict) -> str:
    lines = ["| shape | row | peak RSS MB | above import | anon MB | load peak MB | with checkpoint save MB | s/step "
             "| CPU s/step | threads (load avg.) | estimate MB | est. error |", "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for shape, res in results["shapes"].items():
        base = results["import_mb"]
        for r in res["rows"]:
            lines.append(f"| {shape} | {label(r)} | {r['peak_rss_mb']:.0f} | {r['peak_rss_mb'] - base:.0f} | "
                         f"{r['anon_mb']:.0f} | {r['load_peak_mb']:.0f} | {r['save_peak_mb']:.0f} | {r['step_s']:.2f} | {r['cpu_s']:.2f} | "
                         f"{r.get('threads') or '?'}{' (%.1f)' % max(r['load_avg']) if 'load_avg' in r else ''} | "
                         f"{r['estimate_mb']:.0f} | {100 * r['estimate_error']:+.1f}% |")
        for who, figs in (("MeBP", MEBP), ("MeSP", MESP)):
            if shape in figs:
                mb, s = figs[shape]
                lines.append(f"| {shape} | {who} (iPhone 17 Pro, r8 SGD) | {mb:.0f} | | | | | {s:.2f} | | | | |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="+", default=["qwen2.5-0.5b"], choices=list(SHAPES))
    ap.add_argument("--rows", nargs="+", default=["ours", "mebp"], choices=list(ROWS))
    ap.add_argument("--only", nargs="*", default=None, help="keep rows whose label contains one of these strings")
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--steps", type=int, default=2, help="timed steps after one warm-up step")
    ap.add_argument("--threads", type=int, default=None,
                    help="torch threads in each row's process (default: torch's own); 1 gives CPU seconds that "
                         "do not grow with the load")
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lcsb-bench"))
    ap.add_argument("--out", type=Path, default=HERE / "results" / "memory_shapes.json")
    ap.add_argument("--reestimate", action="store_true",
                    help="recompute the estimates of --out's rows with this checkout's lcsb.memory (no steps)")
    ap.add_argument("--child", default=None, help=argparse.SUPPRESS)
    args = ap.parse_args(argv)
    if args.reestimate:
        return reestimate(args.out, args.workdir)
    if args.child is not None:
        print("RESULT" + json.dumps(child_main(json.loads(args.child))), flush=True)
        return
    sys.path.insert(0, str(ROOT / "src"))
    from lcsb.atomic import write_atomic
    import platform
    results = json.loads(args.out.read_text()) if args.out.exists() else {"shapes": {}}
    results.update({"workload": dict(seq=args.seq, batch=1, targets="all 7", weights="int4 g64, converted folder, mapped",
                                     warmup=1),
                    "machine": dict(cpus=os.cpu_count(), python=platform.python_version()),
                    "mebp": MEBP, "mesp": MESP, "import_mb": run_child({"import": True})["peak_rss_mb"]})
    print(f"bare `import torch, lcsb`: {results['import_mb']:.0f} MB", flush=True)
    for shape in args.shape:
        folder = ensure_model(args.workdir, shape)
        res = results["shapes"].setdefault(shape, {"folder_mb": sum(p.stat().st_size for p in folder.iterdir()) / 2**20,
                                                   "rows": []})
        for kind in args.rows:
            for row in ROWS[kind]:
                row = dict(row, folder=str(folder), seq=args.seq, steps=args.steps, threads=args.threads)
                if args.only and not any(s in label(row) for s in args.only):
                    continue
                load = os.getloadavg()[0]
                r = run_child(row)
                r.pop("folder")
                r.update(date=time.strftime("%Y-%m-%d %H:%M"), load_avg=[round(load, 2), round(os.getloadavg()[0], 2)])
                res["rows"] = [x for x in res["rows"] if not same_row(x, r)] + [r]
                print(f"{shape} {label(r):>45}: peak {r['peak_rss_mb']:.0f} MB (anon {r['anon_mb']:.0f}, load "
                      f"{r['load_peak_mb']:.0f}), {r['step_s']:.2f} s/step ({r['cpu_s']:.2f} CPU s, {r['threads']} "
                      f"threads, load average {r['load_avg'][0]:.1f}-{r['load_avg'][1]:.1f}), estimate "
                      f"{r['estimate_mb']:.0f} ({100 * r['estimate_error']:+.1f}%)", flush=True)
                write_atomic(args.out, lambda p: Path(p).write_text(json.dumps(results, indent=2) + "\n"))
    print(table(results))
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
