"""Peak memory of `lcsb convert` on the Qwen2.5-0.5B shape, with random bfloat16 weights.

Writes a synthetic checkpoint (24 layers, hidden 896, intermediate 4864, 14 heads, 2 KV heads,
vocab 151936, tied embeddings) tensor by tensor with Hugging Face key names, then measures, each
in a fresh child process (peak RSS = the child's own ru_maxrss):
  - `import torch, lcsb` alone, the floor under everything else;
  - convert_model(src, dst, "int4", 64), the number this script is for (target: < 1 GB);
  - load_model(src, quant="int4"): quantize on load from the float checkpoint;
  - the same quantize-on-load done through model.checkpoint.CheckpointReader (row slices, file reads);
  - load_model(dst) and a walk over every block with materialized(), as the engine does.
Results go to bench/results/convert_memory.json.

This parent process imports neither torch nor lcsb, and the checkpoint is written by a child as
well: on Linux a child's ru_maxrss starts from its parent's RSS at fork/exec, so a heavy parent
would hide the child's real peak. VmHWM (per address space, not inherited) is recorded as a check.

    python bench/convert_memory.py [--workdir DIR] [--keep]
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

QWEN05 = dict(hidden=896, inter=4864, layers=24, heads=14, kv_heads=2, vocab=151936)

CHILD = {
    "import": "",
    "convert": "from lcsb.convert import convert_model\n"
               "convert_model(SRC, DST, quant='int4', group_size=64)",
    "load_quantize": "from lcsb import load_model\n"
                     "m = load_model(SRC, quant='int4', group_size=64)",
    # what load_model(src, quant=...) would cost reading through CheckpointReader instead of Shards.get
    "load_quantize_reader": "from pathlib import Path\n"
                            "from lcsb.model import CausalLM, load_config\n"
                            "from lcsb.model.checkpoint import Shards\n"
                            "from lcsb.model.linear import Embedding, Linear\n"
                            "from lcsb.model.checkpoint import CheckpointReader, _shape\n"
                            "cfg, family = load_config(SRC)\n"
                            "with torch.device('meta'):\n"
                            "    m = CausalLM(cfg, family.Block)\n"
                            "with CheckpointReader(Shards(Path(SRC))) as r:\n"
                            "    for n, mod in m.named_modules():\n"
                            "        if isinstance(mod, (Linear, Embedding)):\n"
                            "            mod.weight = r.weight(n + '.weight', _shape(mod), 'int4', 64, torch.float32)",
    "load_converted_walk": "from lcsb import load_model\n"
                           "from lcsb.model import materialized\n"
                           "m = load_model(DST)\n"
                           "for b in m.layers:\n"
                           "    with materialized(b):\n"
                           "        pass",
}
PRELUDE = """
import json, resource, sys, time
t0 = time.perf_counter()
import torch, lcsb
SRC, DST = sys.argv[1], sys.argv[2]
"""
EPILOGUE = """
def status(field):
    try:
        return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith(field + ":")) / 1024
    except (OSError, StopIteration):
        return None
print(json.dumps({"peak_rss_mb": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
                  "vm_hwm_mb": status("VmHWM"), "rss_file_mb_at_end": status("RssFile"),
                  "wall_s": time.perf_counter() - t0}))
"""


def write_checkpoint(folder: Path, seed: int = 0) -> int:
    """The Qwen2.5-0.5B layout with random bf16 weights, one tensor at a time; returns the parameter count."""
    import torch
    from lcsb.model.checkpoint import _ShardWriter
    h, f, n, heads, kv, vocab = (QWEN05[k] for k in ("hidden", "inter", "layers", "heads", "kv_heads", "vocab"))
    d = h // heads
    folder.mkdir(parents=True)
    config = {
        "architectures": ["Qwen2ForCausalLM"], "model_type": "qwen2", "hidden_size": h, "intermediate_size": f,
        "num_hidden_layers": n, "num_attention_heads": heads, "num_key_value_heads": kv, "vocab_size": vocab,
        "max_position_embeddings": 32768, "max_window_layers": 21, "rms_norm_eps": 1e-6, "rope_theta": 1000000.0,
        "hidden_act": "silu", "tie_word_embeddings": True, "torch_dtype": "bfloat16", "use_sliding_window": False,
        "sliding_window": 32768, "bos_token_id": 151643, "eos_token_id": 151645,
    }
    (folder / "config.json").write_text(json.dumps(config, indent=2))
    g = torch.Generator().manual_seed(seed)
    writer = _ShardWriter(folder, 400 << 20)
    count = 0

    def put(name, *shape, std=0.02, ones=False):
        nonlocal count
        t = torch.ones(shape) if ones else torch.randn(shape, generator=g) * std
        writer.add({name: t.to(torch.bfloat16)})
        count += t.numel()

    put("model.embed_tokens.weight", vocab, h)
    for i in range(n):
        p = f"model.layers.{i}."
        put(p + "input_layernorm.weight", h, ones=True)
        for proj, out in (("q_proj", heads * d), ("k_proj", kv * d), ("v_proj", kv * d)):
            put(p + f"self_attn.{proj}.weight", out, h)
            put(p + f"self_attn.{proj}.bias", out)
        put(p + "self_attn.o_proj.weight", h, heads * d)
        put(p + "post_attention_layernorm.weight", h, ones=True)
        put(p + "mlp.gate_proj.weight", f, h)
        put(p + "mlp.up_proj.weight", f, h)
        put(p + "mlp.down_proj.weight", h, f)
    put("model.norm.weight", h, ones=True)
    writer.close()
    return count


def torch_version() -> str:
    r = subprocess.run([sys.executable, "-c", "import torch; print(torch.__version__)"], capture_output=True, text=True)
    return r.stdout.strip()


def run_child(what: str, src: Path, dst: Path) -> dict:
    code = PRELUDE + CHILD[what] + "\n" + EPILOGUE
    r = subprocess.run([sys.executable, "-c", code, str(src), str(dst)], capture_output=True, text=True)
    if r.returncode:
        raise SystemExit(f"{what} failed:\n{r.stderr}")
    return json.loads(r.stdout.strip().splitlines()[-1])


def folder_mb(folder: Path) -> float:
    return sum(p.stat().st_size for p in folder.iterdir() if p.is_file()) / 2**20


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--workdir", type=Path, default=None, help="where the checkpoints go (default: a temp folder)")
    ap.add_argument("--keep", action="store_true", help="keep the checkpoints")
    ap.add_argument("--write-checkpoint", type=Path, default=None, help=argparse.SUPPRESS)   # the child's job
    args = ap.parse_args()
    if args.write_checkpoint is not None:
        print(write_checkpoint(args.write_checkpoint))
        return
    work = args.workdir or Path(tempfile.mkdtemp(prefix="lcsb-convert-bench-"))
    src, dst = work / "qwen05-bf16", work / "qwen05-int4"
    try:
        t = time.perf_counter()
        r = subprocess.run([sys.executable, __file__, "--write-checkpoint", str(src)], capture_output=True, text=True)
        if r.returncode:
            raise SystemExit(f"writing the checkpoint failed:\n{r.stderr}")
        params = int(r.stdout.split()[-1])
        print(f"wrote {src}: {params / 1e6:.1f}M parameters, {folder_mb(src):.0f} MB bf16 "
              f"in {time.perf_counter() - t:.0f} s")
        runs = {}
        for what in CHILD:
            runs[what] = run_child(what, src, dst)
            print(f"{what:>20}: peak RSS {runs[what]['peak_rss_mb']:7.0f} MB (VmHWM {runs[what]['vm_hwm_mb']:.0f}), "
                  f"{runs[what]['wall_s']:6.1f} s")
        result = {
            "shape": "Qwen2.5-0.5B", **QWEN05, "params": params, "quant": "int4", "group_size": 64,
            "source_mb": round(folder_mb(src), 1), "output_mb": round(folder_mb(dst), 1),
            "output_files": sorted(p.name for p in dst.iterdir()),
            "convert_peak_rss_mb": round(runs["convert"]["peak_rss_mb"], 1),
            "convert_wall_s": round(runs["convert"]["wall_s"], 1),
            "runs": {k: {kk: (round(vv, 1) if isinstance(vv, float) else vv) for kk, vv in v.items()}
                     for k, v in runs.items()},
            "machine": {"cpus": os.cpu_count(), "python": platform.python_version(), "torch": torch_version(),
                        "loadavg": os.getloadavg() if hasattr(os, "getloadavg") else None},
        }
        print(f"convert: peak RSS {result['convert_peak_rss_mb']:.0f} MB (import alone "
              f"{runs['import']['peak_rss_mb']:.0f} MB); output {result['output_mb']:.0f} MB "
              f"from {result['source_mb']:.0f} MB")
        out = Path(__file__).resolve().parent / "results" / "convert_memory.json"
        out.parent.mkdir(exist_ok=True)
        out.write_text(json.dumps(result, indent=2) + "\n")
        print(f"wrote {out}")
    finally:
        if not args.keep:
            shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
