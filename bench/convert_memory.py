"""Peak memory of loading, converting and quantizing on load, for the shapes of bench/memory.py.

    python bench/convert_memory.py [--shape qwen2.5-0.5b ...] [--runs import convert load_quantize ...]
                                   [--workdir /tmp/lcsb-bench] [--keep]

For each shape (Qwen2.5 0.5B / 1.5B / 3B / 7B, Gemma 3 4B: bench/memory.py's SHAPES) it writes once a
Hugging Face checkpoint folder with random bfloat16 weights (std 0.02, norms 1, or 0 for Gemma's offset
norms) under --workdir, tensor by tensor a row slice at a time, then measures, each in a fresh
child process through the API (`import torch, lcsb`, no `tune_malloc`, as a library user runs it):
  - import: `import torch, lcsb` alone, the floor under everything else;
  - convert: `lcsb.convert.convert_model(src, dst, "int4", 64)`;
  - load_quantize: `load_model(src, quant="int4")`: quantize on load (into a scratch converted folder,
    mapped); its peak after loading ("load peak"), then after a walk over every block with
    `materialized()`, as the engine does (one block's float weights in the workspace);
  - load_quantize_in_memory: the same with the cache unwritable, so the weights are compressed into
    RAM (the fallback, and what quantize-on-load did before);
  - load_converted_walk: `load_model(dst)` and the same walk.
Peak RSS is the child's VmHWM (per address space: the parent's RSS is not inherited); RssAnon at the
end says what stays. Each is printed beside the least peak of a training step on that shape in
bench/results/memory_shapes.json: loading must stay within the step's own peak. Results go to
bench/results/convert_memory.json (rewritten after every run, other shapes kept).

This parent process imports neither torch nor lcsb; the checkpoint is written by a child as well.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))
from memory import SHAPES  # noqa: E402  (bench/memory.py: stdlib only at import)

OUT = HERE / "results" / "convert_memory.json"
WALK = ("LOAD_PEAK = status('VmHWM')\n"
        "from lcsb.model import materialized\n"
        "for b in m.layers:\n"
        "    with materialized(b):\n"
        "        pass\n")
CHILD = {
    "import": "",
    "convert": "from lcsb.convert import convert_model\n"
               "convert_model(SRC, DST, quant='int4', group_size=64, overwrite=True)\n",
    "load_quantize": "m = lcsb.load_model(SRC, quant='int4', group_size=64)\n" + WALK,
    "load_quantize_in_memory": "import os\n"
                               "os.environ['LCSB_CACHE'] = os.path.join(SRC, 'config.json', 'no-cache')\n"
                               "import warnings; warnings.simplefilter('ignore')\n"
                               "m = lcsb.load_model(SRC, quant='int4', group_size=64)\n" + WALK,
    "load_converted_walk": "m = lcsb.load_model(DST)\n" + WALK,
    "convert_gguf": "from lcsb.convert import convert\n"
                    "convert(SRC, DST, quant='int4', group_size=64, overwrite=True)\n",
}
PRELUDE = """
import json, sys, time
t0, c0 = time.perf_counter(), time.process_time()
import torch, lcsb
SRC, DST = sys.argv[1], sys.argv[2]
LOAD_PEAK = None
def status(field):
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) / 1024
"""
EPILOGUE = """
print(json.dumps({"peak_rss_mb": status("VmHWM"), "load_peak_mb": LOAD_PEAK, "anon_mb_at_end": status("RssAnon"),
                  "file_mb_at_end": status("RssFile"), "wall_s": time.perf_counter() - t0,
                  "cpu_s": time.process_time() - c0}))
"""


def write_checkpoint(folder: Path, shape: str, seed: int = 0) -> int:
    """A Hugging Face folder of `shape` with random bf16 weights, a row slice at a time; returns the parameter count."""
    import torch
    from lcsb.convert import _meta_model
    from lcsb.model.checkpoint import SHARD_BYTES, _ShardWriter, _shape, _write_json, stored_modules
    from lcsb.model.linear import Embedding, Linear
    from lcsb.quant.formats import CHUNK_ELEMENTS

    raw = {k: v for k, v in SHAPES[shape].items()}
    tmp = folder.parent / f".{folder.name}.tmp-{os.getpid()}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    _write_json(tmp / "config.json", raw)
    cfg, model = _meta_model(tmp)
    g = torch.Generator().manual_seed(seed)
    writer = _ShardWriter(tmp, 4 << 30 if SHARD_BYTES < 4 << 30 else SHARD_BYTES)
    count = 0
    for name, m in stored_modules(model):
        layout, parts = {}, ()
        if isinstance(m, (Linear, Embedding)):
            rows, cols = _shape(m)
            step = max(1, CHUNK_ELEMENTS // cols)
            layout = {f"{name}.weight": ((rows, cols), torch.bfloat16)}
            parts = ({f"{name}.weight": (torch.randn(min(step, rows - a), cols, generator=g) * 0.02).bfloat16()}
                     for a in range(0, rows, step))
            count += rows * cols
        params = {}
        for pname, p in m.named_parameters(recurse=False):
            norm = "norm" in name.rsplit(".", 1)[-1] or "norm" in pname
            t = (torch.zeros(p.shape) if cfg.norm_offset else torch.ones(p.shape)) if norm \
                else torch.randn(p.shape, generator=g) * 0.02
            params[f"{name}.{pname}"] = t.bfloat16()
            count += p.numel()
        writer.add(params, layout, parts)
    writer.close()
    tmp.rename(folder)
    return count


def run_child(what: str, src: Path, dst: Path) -> dict:
    code = PRELUDE + CHILD[what] + EPILOGUE
    r = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{what} failed:\n{r.stderr[-3000:]}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


def step_peak(shape: str) -> tuple[float, str] | None:
    """The least peak RSS of a training step on `shape` in memory_shapes.json, and its row."""
    path = HERE / "results" / "memory_shapes.json"
    if not path.exists():
        return None
    rows = json.loads(path.read_text())["shapes"].get(shape, {}).get("rows", [])
    if not rows:
        return None
    r = min(rows, key=lambda r: r["peak_rss_mb"])
    return r["peak_rss_mb"], f"{r['method']} r{r['rank']} {r['optimizer']} {r['lora_dtype']}"


def main():
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--shape", nargs="*", default=["qwen2.5-0.5b"], choices=list(SHAPES))
    ap.add_argument("--runs", nargs="+", default=list(CHILD), choices=list(CHILD))
    ap.add_argument("--workdir", type=Path, default=Path("/tmp/lcsb-bench"))
    ap.add_argument("--keep", action="store_true", help="keep the float checkpoints and converted folders")
    ap.add_argument("--gguf", nargs="*", default=[], type=Path,
                    help="also convert these GGUF files to int4 folders (`lcsb convert FILE DIR`) and record the peak")
    ap.add_argument("--label", default="", help="suffix of the GGUF rows' names (e.g. the lcsb on PYTHONPATH)")
    ap.add_argument("--write-checkpoint", nargs=2, default=None, help=argparse.SUPPRESS)   # the child's job
    args = ap.parse_args()
    if args.write_checkpoint is not None:
        sys.path.insert(0, str(HERE.parent / "src"))
        print(write_checkpoint(Path(args.write_checkpoint[0]), args.write_checkpoint[1]))
        return
    results = json.loads(OUT.read_text()) if OUT.exists() else {}
    if "shapes" not in results:                                # the 0.5B-only layout of before: start over
        results = {"shapes": {}}
    results.update(quant="int4", group_size=64, machine={
        "cpus": os.cpu_count(), "python": platform.python_version(), "date": time.strftime("%Y-%m-%d")})
    for path in args.gguf:
        dst = args.workdir / f"{path.stem}-int4"
        r = {k: round(v, 1) if v is not None else v for k, v in run_child("convert_gguf", path, dst).items()}
        r["loadavg"] = [round(x, 1) for x in os.getloadavg()]
        results.setdefault("gguf", {})[path.name + (f" ({args.label})" if args.label else "")] = r
        shutil.rmtree(dst, ignore_errors=True)
        print(f"{path.name} convert: peak RSS {r['peak_rss_mb']:.0f} MB, {r['cpu_s']:.1f} CPU s", flush=True)
        OUT.write_text(json.dumps(results, indent=2) + "\n")
    for shape in args.shape:
        src, dst = args.workdir / f"{shape}-bf16", args.workdir / f"{shape}-int4-converted"
        if not (src / "config.json").exists():
            t = time.perf_counter()
            r = subprocess.run([sys.executable, __file__, "--write-checkpoint", str(src), shape],
                               capture_output=True, text=True)
            if r.returncode:
                raise SystemExit(f"writing the checkpoint failed:\n{r.stderr[-3000:]}")
            print(f"wrote {src}: {int(r.stdout.split()[-1]) / 1e6:.0f}M parameters, {folder_mb(src):.0f} MB "
                  f"in {time.perf_counter() - t:.0f} s", flush=True)
        res = results["shapes"].setdefault(shape, {})
        res["source_mb"] = round(folder_mb(src), 1)
        step = step_peak(shape)
        if step:
            res["least_step_peak_mb"], res["least_step_row"] = step
        runs = res.setdefault("runs", {})
        for what in args.runs:
            if what == "load_converted_walk" and not (dst / "config.json").exists():
                run_child("convert", src, dst)
            r = run_child(what, src, dst)
            r = {k: round(v, 1) if v is not None else v for k, v in r.items()}
            r["loadavg"] = [round(x, 1) for x in os.getloadavg()]
            runs[what] = r
            if what == "convert":
                res["output_mb"] = round(folder_mb(dst), 1)
            note = f" (least step peak {step[0]:.0f} MB: {step[1]})" if step else ""
            load = f" (after loading {r['load_peak_mb']:.0f}, then the walk)" if r["load_peak_mb"] else ""
            print(f"{shape} {what:>24}: peak RSS {r['peak_rss_mb']:6.0f} MB{load}, anon at end {r['anon_mb_at_end']:5.0f} MB, "
                  f"{r['wall_s']:6.1f} s wall, {r['cpu_s']:6.1f} CPU s{note}", flush=True)
            OUT.write_text(json.dumps(results, indent=2) + "\n")
        if not args.keep:
            shutil.rmtree(dst, ignore_errors=True)
            shutil.rmtree(src, ignore_errors=True)
    print(f"wrote {OUT}")


if __name__ == "__main__":
    main()
