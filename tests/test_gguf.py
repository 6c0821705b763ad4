"""GGUF model files: lcsb's reader against gguf-py, logits and LoRA gradients against transformers' GGUF loading.

Tiny files are written by tests/gguf_models.py with gguf-py (llama.cpp's writer) in the converter's
conventions, from tiny random transformers checkpoints; transformers reads the same file (it
dequantizes with gguf-py) and is the oracle. The real files (SmolLM2-135M Q4_1, Gemma 3 270M
Q4_K_M) are checked when their packages are installed.
"""

from __future__ import annotations

from pathlib import Path

import gguf as gguf_py
import numpy as np
import pytest
import torch
import transformers

import lcsb
from lcsb.errors import UserError
from lcsb.model import gguf
from lcsb.model.checkpoint import _FileBacked

import gguf_models
import hf
import real_models

Q = gguf_py.GGMLQuantizationType
TOL = 1e-4

# family -> config overrides that transformers' GGUF loader can express (it reads no head_dim for Qwen3, and
# for Gemma 3 no sliding pattern and no query_pre_attn_scalar: it takes 256, llama.cpp and lcsb head_dim)
FAMILIES = {
    "llama": dict(num_key_value_heads=2),
    "qwen2": dict(),
    "qwen3": dict(head_dim=128),
    "gemma3": dict(num_hidden_layers=7, head_dim=256, query_pre_attn_scalar=256, sliding_window_pattern=6,
                   sliding_window=4),
}
# a mix of ggml types, one per kind of matrix, so every block type meets every projection shape
MIX = {"q_proj": Q.Q4_0, "k_proj": Q.Q4_1, "v_proj": Q.Q8_0, "o_proj": Q.Q5_0, "gate_proj": Q.Q5_1,
       "up_proj": Q.F16, "down_proj": Q.Q8_0, "embed_tokens": Q.Q8_0, "lm_head": Q.Q4_1}


def _types(name: str):
    for k, t in MIX.items():
        if k in name:
            return t
    return Q.F32


def _tiny(family: str, tmp: Path, types=_types, **over) -> Path:
    folder = tmp / family
    folder.mkdir()
    hf.make(family, folder, **{**FAMILIES[family], **over})
    return gguf_models.write(folder, folder / "model.gguf", types)


def _reference(path: Path):
    return transformers.AutoModelForCausalLM.from_pretrained(
        path.parent, gguf_file=path.name, dtype=torch.float32, attn_implementation="eager").eval()


def _ids(length=16, batch=2, seed=3):
    return torch.randint(0, hf.BASE["vocab_size"], (batch, length), generator=torch.Generator().manual_seed(seed))


# ---- the reader ----------------------------------------------------------------------------------

def test_reader_matches_gguf_py(tmp_path):
    path = _tiny("qwen2", tmp_path)
    g, ref = gguf.read_gguf(path), gguf_py.GGUFReader(path)
    for key, field in ref.fields.items():
        if key.startswith("GGUF."):
            continue
        want, got = field.contents(), g.meta[key]
        assert (list(got) == list(want)) if isinstance(want, list) else got == want, key
    assert set(g.tensors) == {t.name for t in ref.tensors}
    for t in ref.tensors:
        info = g.tensors[t.name]
        assert info.ggml_type == int(t.tensor_type) and list(info.ne) == [int(n) for n in t.shape]
        assert info.nbytes == t.n_bytes
        assert np.array_equal(g.raw(t.name).reshape(-1).numpy(), np.asarray(t.data).reshape(-1).view(np.uint8))


def test_qk_permutation_roundtrip():
    w = torch.randn(4 * 8, 5)
    heads = 4
    file_rows = torch.from_numpy(gguf_models.permute(w.numpy(), heads))       # llama.cpp's converter
    assert torch.equal(file_rows[gguf.llama_qk_rows(32, heads)], w)
    assert torch.equal(gguf.llama_qk_permute(w, heads), file_rows)


# ---- the model -----------------------------------------------------------------------------------

@pytest.mark.parametrize("family", list(FAMILIES))
def test_logits_match_transformers_gguf(family, tmp_path):
    path = _tiny(family, tmp_path)
    ids = _ids(12 if family != "gemma3" else 10)
    model = lcsb.load_model(path)
    with torch.no_grad():
        want = _reference(path)(ids).logits.float()
        got = model(ids)
    assert got.shape == want.shape
    assert hf.rel_diff(want, got) < TOL
    # the matrices stay in the file's own types, memory-mapped
    q = model.layers[0].self_attn.q_proj.weight
    assert q.ggml_type == Q.Q4_0 and q.tensors()["weight"].dtype == torch.uint8
    if family == "gemma3":
        assert model.config.layer_types.count("full_attention") == 1


def test_float_gguf_llama_qk_rows(tmp_path):
    """F32 q/k of the llama architecture are read through the row order too (a zero-copy view of the
    file's rows would be in llama.cpp's order)."""
    path = _tiny("llama", tmp_path, types=lambda n: Q.F32)
    ids = _ids()
    model = lcsb.load_model(path)
    assert model.layers[0].self_attn.q_proj.weight.stored_as(torch.float32) is None
    assert model.layers[0].self_attn.v_proj.weight.stored_as(torch.float32) is not None
    with torch.no_grad():
        assert hf.rel_diff(_reference(path)(ids).logits, model(ids)) < TOL


def test_loading_leaves_no_page_of_the_file_resident(tmp_path):
    """Norms and biases are read with pread, not through the mapping (whose fault-around would leave 64 KB of
    the neighbouring matrices resident per small tensor)."""
    import sys
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux /proc/self/smaps")
    from test_store import mapped_rss
    path = _tiny("qwen2", tmp_path)
    model = lcsb.load_model(path)
    assert mapped_rss(path) == 0
    assert model.model.embed_tokens.weight.dequantize().abs().sum() > 0         # the control touches the mapping
    assert mapped_rss(path) > 0


def test_row_gathers_read_the_file(tmp_path, monkeypatch):
    """Embedding and LM head rows of a GGUF file are read with pread (not through the mapping, where a row
    maps its page-cache folio) and equal the rows of the same bytes in RAM; llama's reordered q rows too."""
    from lcsb.quant.ggml import GGMLWeight
    path = _tiny("llama", tmp_path)
    model = lcsb.load_model(path)
    calls = []
    preadv = __import__("os").preadv
    monkeypatch.setattr("os.preadv", lambda *a: calls.append(1) or preadv(*a))
    ids = torch.randint(0, hf.BASE["vocab_size"], (2, 9), generator=torch.Generator().manual_seed(7))
    ids[1, 4] = ids[0, 0]
    for w in (model.model.embed_tokens.weight, model.head_weight()):
        assert isinstance(w, _FileBacked)
        n = len(calls)
        got = w.rows(ids)
        assert len(calls) > n
        assert torch.equal(got, GGMLWeight(w.data.clone(), w.ggml_type, w.shape).rows(ids))
        assert torch.equal(got, w.dequantize()[ids])
    q = model.layers[0].self_attn.q_proj.weight                 # rows in llama.cpp's order in the file
    assert q.order is not None
    rows = torch.tensor([0, 5, 1, q.shape[0] - 1])
    assert torch.equal(q.rows(rows), q.dequantize()[rows])


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_lora_gradients_match_peft_on_dequantized_weights(family, tmp_path, seed):
    """Exact LoRA gradients on a quantized GGUF: transformers' GGUF model (gguf-py dequantizes) + PEFT."""
    import peft

    path = _tiny(family, tmp_path)
    torch.manual_seed(seed)
    targets = list(lcsb.config.LORA_TARGETS)
    oracle = peft.get_peft_model(_reference(path), peft.LoraConfig(
        r=4, lora_alpha=8, target_modules=targets, init_lora_weights=False))   # A and B both non-zero
    oracle.save_pretrained(tmp_path / "adapter")
    model = lcsb.load_model(path, adapter=tmp_path / "adapter")
    ids = _ids(12, batch=2, seed=seed)
    labels = ids.clone()
    labels[:, :3] = -100
    loss, grads = lcsb.lora_gradients(model, ids, labels, roles=["train"] * model.config.num_layers)
    params = {n.replace(".default", ""): p for n, p in oracle.named_parameters() if "lora_" in n}
    out = oracle(input_ids=ids, labels=labels)
    want = dict(zip(params, torch.autograd.grad(out.loss, list(params.values()))))
    assert abs(loss - out.loss.item()) / out.loss.item() < TOL
    assert set(grads) == set(want)
    for k, g in want.items():
        assert ((grads[k] - g).norm() / g.norm()).item() < 1e-4, k


# ---- bad input -----------------------------------------------------------------------------------

def _one_line(e) -> str:
    msg = str(e.value)
    assert "\n" not in msg
    return msg


def test_truncated_file(tmp_path):
    path = _tiny("qwen2", tmp_path)
    data = path.read_bytes()
    for cut in (10, 200, len(data) - 100):
        bad = tmp_path / f"cut{cut}.gguf"
        bad.write_bytes(data[:cut])
        with pytest.raises(UserError) as e:
            lcsb.load_model(bad)
        msg = _one_line(e)
        assert str(bad) in msg and "truncated" in msg


def test_not_gguf(tmp_path):
    bad = tmp_path / "model.gguf"
    bad.write_bytes(b"PK\x03\x04" + b"\0" * 100)
    with pytest.raises(UserError) as e:
        lcsb.load_model(bad)
    assert "not a GGUF file" in _one_line(e)


def test_unsupported_architecture_and_adapter(tmp_path):
    path = _tiny("qwen2", tmp_path)
    for arch, kind, words in (("phi3", "model", "architecture 'phi3' is not supported"),
                              ("qwen2", "adapter", "LoRA adapter")):
        w = gguf_py.GGUFWriter(str(tmp_path / f"{arch}-{kind}.gguf"), arch)
        w.add_type(kind)
        w.add_tensor("token_embd.weight", np.zeros((4, 8), np.float32))
        w.write_header_to_file()
        w.write_kv_data_to_file()
        w.write_tensors_to_file()
        w.close()
        with pytest.raises(UserError) as e:
            lcsb.load_model(tmp_path / f"{arch}-{kind}.gguf")
        assert words in _one_line(e)
    assert path.exists()


def test_unsupported_tensor_type_named(tmp_path):
    path = _tiny("qwen2", tmp_path)
    g = gguf.read_gguf(path)
    info = g.tensors["blk.0.attn_q.weight"]
    # rewrite the type field of that tensor's header entry to IQ2_XXS
    data = bytearray(path.read_bytes())
    name = b"blk.0.attn_q.weight"
    at = data.index(name) + len(name)
    n_dims = int.from_bytes(data[at:at + 4], "little")
    type_at = at + 4 + 8 * n_dims
    assert int.from_bytes(data[type_at:type_at + 4], "little") == info.ggml_type
    data[type_at:type_at + 4] = int(Q.IQ2_XXS).to_bytes(4, "little")
    bad = tmp_path / "iq2.gguf"
    bad.write_bytes(bytes(data))
    with pytest.raises(UserError) as e:
        lcsb.load_model(bad)
    assert "IQ2_XXS" in _one_line(e)


def test_quant_flag_on_quantized_gguf_refused(tmp_path):
    path = _tiny("qwen2", tmp_path)
    with pytest.raises(UserError) as e:
        lcsb.load_model(path, quant="int4")
    assert "--quant" in _one_line(e)


@pytest.mark.parametrize("family", ["qwen2", "llama"])       # llama: q/k rows permuted in the file
def test_quant_flag_on_float_gguf_honoured(tmp_path, monkeypatch, family):
    monkeypatch.setenv("LCSB_CACHE", str(tmp_path / "cache"))
    path = _tiny(family, tmp_path, types=lambda n: Q.F32)
    model = lcsb.load_model(path, quant="int8")
    w = model.layers[0].self_attn.q_proj.weight
    assert w.fmt == "int8" and isinstance(w, _FileBacked)    # compressed into a scratch folder, mapped
    assert not list((tmp_path / "cache").glob("quantized-*"))
    ref = lcsb.load_model(path.parent, quant="int8")         # the Hugging Face folder it came from
    ids = _ids()
    with torch.no_grad():
        assert hf.rel_diff(ref(ids), model(ids)) < TOL


# ---- the real files ------------------------------------------------------------------------------

@pytest.mark.parametrize("which", ["smollm2", "gemma3"])
def test_real_file_logits_match_transformers(which):
    path = real_models.smollm2() if which == "smollm2" else real_models.gemma3()
    if path is None:
        pytest.skip(f"the {which} package is not installed (see the README's setup)")
    model = lcsb.load_model(path)
    ids = torch.randint(0, model.config.vocab_size, (1, 24), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        got = model(ids)
        want = _reference(path)(ids).logits.float()
    assert hf.rel_diff(want, got) < TOL
