"""Tiny GGUF model files written with gguf-py (llama.cpp's own writer), as llama.cpp's converter would.

`write(hf_folder, path, types)` reads a tiny transformers checkpoint (tests/hf.py) and writes it as a
GGUF file with the converter's conventions, independently of lcsb's reader: llama.cpp tensor names,
the q/k row permutation for the llama architecture, Gemma's norms stored as 1 + w, and each matrix
in the ggml type `types` gives (quantized by gguf-py's numpy code). transformers' GGUF loader then
reads the same file: the oracle of tests/test_gguf.py.
"""

from __future__ import annotations

import json
from pathlib import Path

import gguf
import numpy as np
from safetensors.numpy import load_file

ARCH = {"llama": "llama", "mistral": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3_text": "gemma3"}
BLOCK = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
         "self_attn.o_proj": "attn_output", "self_attn.q_norm": "attn_q_norm", "self_attn.k_norm": "attn_k_norm",
         "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up", "mlp.down_proj": "ffn_down",
         "input_layernorm": "attn_norm"}
NORMS = {"gemma3": {"post_attention_layernorm": "post_attention_norm", "pre_feedforward_layernorm": "ffn_norm",
                    "post_feedforward_layernorm": "post_ffw_norm"},
         "default": {"post_attention_layernorm": "ffn_norm"}}
TOP = {"model.embed_tokens": "token_embd", "model.norm": "output_norm", "lm_head": "output"}


def gguf_name(hf: str, arch: str) -> str:
    stem, _, suffix = hf.rpartition(".")
    if stem in TOP:
        return f"{TOP[stem]}.{suffix}"
    _, _, i, rest = stem.split(".", 3)
    names = {**BLOCK, **NORMS.get(arch, NORMS["default"])}
    return f"blk.{i}.{names[rest]}.{suffix}"


def permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp convert_hf_to_gguf.py LlamaModel.permute: rotary halves -> interleaved pairs."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def write(hf_folder: Path, path: Path, types=None, vocab: list[str] | None = None) -> Path:
    """Write `hf_folder`'s model to `path`; `types(hf_name) -> GGMLQuantizationType` for each matrix
    (default F32)."""
    cfg = json.loads((Path(hf_folder) / "config.json").read_text())
    arch = ARCH[cfg["model_type"]]
    tensors = load_file(str(Path(hf_folder) / "model.safetensors"))
    w = gguf.GGUFWriter(str(path), arch)
    heads, kv = cfg["num_attention_heads"], cfg.get("num_key_value_heads") or cfg["num_attention_heads"]
    head_dim = cfg.get("head_dim") or cfg["hidden_size"] // heads
    w.add_block_count(cfg["num_hidden_layers"])
    w.add_context_length(cfg["max_position_embeddings"])
    w.add_embedding_length(cfg["hidden_size"])
    w.add_feed_forward_length(cfg["intermediate_size"])
    w.add_head_count(heads)
    w.add_head_count_kv(kv)
    w.add_layer_norm_rms_eps(cfg["rms_norm_eps"])
    w.add_vocab_size(cfg["vocab_size"])
    rope = cfg.get("rope_parameters") or {}
    if arch == "gemma3":
        rope = rope.get("full_attention", {})
        w.add_sliding_window(cfg["sliding_window"])
    if arch in ("gemma3", "qwen3"):
        w.add_key_length(head_dim)
        w.add_value_length(head_dim)
    else:
        w.add_rope_dimension_count(head_dim)
    w.add_rope_freq_base(float(rope.get("rope_theta", cfg.get("rope_theta", 10000.0))))
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    # a minimal vocabulary so tools that insist on one (llama.cpp) can open the file
    toks = vocab or ["a", "b", "ab"] + [f"<t{i}>" for i in range(3, cfg["vocab_size"])]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(toks)
    w.add_token_types([gguf.TokenType.NORMAL] * len(toks))
    w.add_token_merges(["a b"])
    for name, t in tensors.items():
        t = t.astype(np.float32)
        if arch == "llama" and name.endswith(("q_proj.weight", "q_proj.bias")):
            t = permute(t, heads)
        if arch == "llama" and name.endswith(("k_proj.weight", "k_proj.bias")):
            t = permute(t, kv)
        if arch == "gemma3" and name.endswith("norm.weight"):
            t = t + 1
        qtype = gguf.GGMLQuantizationType.F32
        if t.ndim == 2 and types is not None:
            qtype = types(name)
        if qtype == gguf.GGMLQuantizationType.F32:
            w.add_tensor(gguf_name(name, arch), t)
        elif qtype == gguf.GGMLQuantizationType.F16:
            w.add_tensor(gguf_name(name, arch), t.astype(np.float16))
        else:
            q = gguf.quants.quantize(t, qtype)
            w.add_tensor(gguf_name(name, arch), q, raw_shape=q.shape, raw_dtype=qtype)
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    return path
