"""`lcsb export --to gguf` adapters in llama.cpp itself (llama-cpp-python, a source build of llama.cpp).

Skipped when llama_cpp is not importable (`python scripts/check_llama_cpp.py --install` builds it and
runs the same check on the real models). The bases are F32 GGUF files: llama.cpp does not quantize
the activations of an F32 matmul, so its logits with the adapter must equal lcsb's to float
tolerance, which checks the adapter file itself (tensor names, ne order, the q/k row permutation of
the llama architecture, alpha). On a quantized base llama.cpp rounds the activations to 8 bits and
differs by a few percent of the logit scale (README, "GGUF files").
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

import lcsb
from lcsb.lora import export_adapter, save_adapter

import gguf_models
import hf

llama_cpp = pytest.importorskip("llama_cpp", reason="llama-cpp-python is not installed "
                                                    "(python scripts/check_llama_cpp.py --install)")
import gguf as gguf_py  # noqa: E402

FAMILIES = {"llama": dict(num_key_value_heads=2), "qwen2": dict(), "qwen3": dict(head_dim=128),
            "gemma3": dict(num_hidden_layers=7, head_dim=32, query_pre_attn_scalar=32, sliding_window_pattern=6,
                           sliding_window=64)}
TOL = {"gemma3": 5e-3}       # ggml's CPU GELU reads an F16 table (the real Gemma 3 270M in F32: 1e-3)


def _logits(path, adapter, ids):
    llm = llama_cpp.Llama(model_path=str(path), lora_path=str(adapter) if adapter else None, n_ctx=64,
                          logits_all=True, verbose=False, n_threads=1, type_k=0, type_v=0)
    llm.eval(ids)
    return np.array(llm.scores[:len(ids)], dtype=np.float32)


@pytest.mark.parametrize("family", list(FAMILIES))
def test_gguf_adapter_in_llama_cpp(family, tmp_path, seed):
    folder = tmp_path / family
    folder.mkdir()
    hf.make(family, folder, **FAMILIES[family])
    base = gguf_models.write(folder, folder / "model.gguf", lambda n: gguf_py.GGMLQuantizationType.F32)
    model = lcsb.load_model(base, lora=lcsb.LoraConfig(rank=4, alpha=8.0))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.lora_parameters().items():
            if "lora_B" in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.1)
    save_adapter(model, tmp_path / "adapter", base_model=str(base))
    out = export_adapter(tmp_path / "adapter", "gguf", tmp_path / "adapter.gguf")
    ids = torch.randint(3, hf.BASE["vocab_size"], (14,), generator=g).tolist()
    with torch.no_grad():
        ours = model(torch.tensor([ids]))[0].numpy()
    theirs = _logits(base, out, ids)
    effect = np.abs(ours - _logits(base, None, ids)).max()
    assert effect > 0.1 * np.abs(ours).max()                 # the adapter really moves the logits
    assert np.abs(theirs - ours).max() / np.abs(ours).max() < TOL.get(family, 1e-4)
