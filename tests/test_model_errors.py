"""Bad checkpoint folders are refused with a one-line UserError naming the file or field; loading
with on-the-fly int4 compression works for every family."""

from __future__ import annotations

import json
import os
import shutil
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

import lcsb
from lcsb.errors import UserError
from lcsb.model import FAMILIES
from lcsb.model.linear import Embedding, Linear
from lcsb.quant.formats import Dense, Int4

import hf

FAMILY_NAMES = ["llama", "qwen2", "qwen3", "gemma3"]


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    """One good checkpoint per family (and a sharded Llama), built once; tests edit copies."""
    root = tmp_path_factory.mktemp("good")
    out = {}
    for fam in FAMILY_NAMES:
        hf.make(fam, root / fam)
        out[fam] = root / fam
    hf.make("llama", root / "sharded", max_shard_size="20KB")
    out["sharded"] = root / "sharded"
    return out


@pytest.fixture
def copy(built, tmp_path):
    def _copy(name: str = "llama") -> Path:
        dst = tmp_path / name
        shutil.copytree(built[name], dst)
        return dst
    return _copy


def _refused(folder, *needles, **load_kw) -> str:
    """Load, expect a UserError; its message is one line and contains every needle."""
    with pytest.raises(UserError) as info:
        lcsb.load_model(folder, **load_kw)
    msg = str(info.value)
    assert "\n" not in msg
    for n in needles:
        assert str(n) in msg, f"{n!r} not in {msg!r}"
    return msg


def _edit_config(folder: Path, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg))
    return path


def _rewrite(path: Path, fn):
    tensors = load_file(str(path))
    fn(tensors)
    save_file(tensors, str(path), metadata={"format": "pt"})


# --- the folder and config.json ------------------------------------------------------------------

def test_missing_folder(tmp_path):
    _refused(tmp_path / "nope", tmp_path / "nope", "not found")


def test_missing_config(copy):
    d = copy()
    (d / "config.json").unlink()
    _refused(d, d / "config.json", "not found")


@pytest.mark.parametrize("content", [b"{not json", b"\xff\xfe\x00garbage", b"[1, 2, 3]", b""],
                         ids=["syntax", "binary", "not-an-object", "empty"])
def test_config_not_json(copy, content):
    d = copy()
    (d / "config.json").write_bytes(content)
    _refused(d, d / "config.json")


def test_unsupported_model_type(copy):
    d = copy()
    cfg = _edit_config(d, model_type="gpt2")
    msg = _refused(d, cfg, "'gpt2'", "model_type")
    for name in FAMILIES:
        assert name in msg


def test_missing_model_type(copy):
    d = copy()
    cfg = _edit_config(d, model_type=None)
    _refused(d, cfg, "model_type", "llama")


@pytest.mark.parametrize("text_config", [True, False], ids=["with-text_config", "bare"])
def test_multimodal_gemma3_refused(copy, text_config):
    d = copy("gemma3")
    cfg = json.loads((d / "config.json").read_text())
    new = {"model_type": "gemma3", "architectures": ["Gemma3ForConditionalGeneration"]}
    if text_config:
        new["text_config"] = {**cfg, "model_type": "gemma3_text"}
        new["vision_config"] = {"model_type": "siglip_vision_model"}
    (d / "config.json").write_text(json.dumps(new))
    _refused(d, d / "config.json", "gemma3", "gemma3_text", "multimodal")


@pytest.mark.parametrize("family,field", [
    ("llama", "hidden_size"), ("llama", "num_hidden_layers"), ("llama", "num_attention_heads"),
    ("llama", "vocab_size"), ("llama", "intermediate_size"), ("qwen2", "hidden_size"),
    ("qwen3", "num_hidden_layers"), ("gemma3", "hidden_size"),
])
def test_missing_required_field(copy, family, field):
    d = copy(family)
    cfg = _edit_config(d, **{field: None})
    _refused(d, cfg, f"'{field}'", "missing")


@pytest.mark.parametrize("value", ["64", -64, 0, 64.0, True])
def test_bad_field_value(copy, value):
    d = copy()
    cfg = _edit_config(d, hidden_size=value)
    _refused(d, cfg, "'hidden_size'", "positive integer")


@pytest.mark.parametrize("value", [0, -2, "2"])
def test_bad_num_key_value_heads(copy, value):
    """An optional field, once present, is checked as a required one (0 once divided by zero)."""
    d = copy()
    cfg = _edit_config(d, num_key_value_heads=value)
    _refused(d, cfg, "'num_key_value_heads'", "positive integer")


ROPE_REFUSED = {
    "llama-dynamic": ("llama", "dynamic", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "llama-yarn-old-format": ("llama", "yarn", dict(rope_parameters=None, rope_theta=10000.0,
                                                    rope_scaling=dict(type="yarn", factor=4.0))),
    "llama-longrope": ("llama", "longrope", dict(rope_parameters=dict(
        rope_type="longrope", rope_theta=10000.0, short_factor=[1.0] * 8, long_factor=[2.0] * 8))),
    "qwen2-yarn": ("qwen2", "yarn", dict(rope_parameters=None, rope_theta=10000.0, rope_scaling=dict(
        rope_type="yarn", factor=4.0, original_max_position_embeddings=32))),
    "qwen3-dynamic": ("qwen3", "dynamic", dict(rope_parameters=dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0))),
    "gemma3-yarn": ("gemma3", "yarn", dict(rope_parameters=None, rope_scaling=dict(rope_type="yarn", factor=8.0))),
}


@pytest.mark.parametrize("case", list(ROPE_REFUSED))
def test_unsupported_rope_type(copy, case):
    family, kind, changes = ROPE_REFUSED[case]
    d = copy(family)
    cfg = _edit_config(d, **changes)
    _refused(d, cfg, f"'{kind}'", "rope", "not supported")


def test_rope_missing_parameter(copy):
    d = copy()
    cfg = _edit_config(d, rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, low_freq_factor=1.0,
                                               high_freq_factor=4.0))
    _refused(d, cfg, "'llama3'", "'factor'")


def test_partial_rotary_refused(copy):
    d = copy()
    cfg = _edit_config(d, partial_rotary_factor=0.5)
    _refused(d, cfg, "partial_rotary_factor")


def test_mistral_sliding_window_refused(copy):
    d = copy()
    cfg = _edit_config(d, model_type="mistral", sliding_window=16)
    _refused(d, cfg, "sliding_window")


def test_unsupported_activation(copy):
    d = copy()
    cfg = _edit_config(d, hidden_act="relu2")
    _refused(d, cfg, "hidden_act", "relu2")


# --- the safetensors files -----------------------------------------------------------------------

def test_no_weights(copy):
    d = copy()
    (d / "model.safetensors").unlink()
    _refused(d, d, "safetensors")


@pytest.mark.parametrize("name", ["llama", "sharded"])
def test_truncated_safetensors(copy, name):
    d = copy(name)
    path = sorted(d.glob("*.safetensors"))[-1]
    data = path.read_bytes()
    path.write_bytes(data[: len(data) // 2])
    _refused(d, path, "truncated or corrupt")


@pytest.mark.parametrize("how", ["random", "header-bytes", "tiny", "empty"])
def test_corrupt_header(copy, how):
    d = copy()
    path = d / "model.safetensors"
    data = path.read_bytes()
    if how == "random":
        data = os.urandom(256) + data[256:]
    elif how == "header-bytes":          # a plausible length, then garbage where the JSON header should be
        data = data[:8] + b"\xff" * 64 + data[72:]
    elif how == "tiny":
        data = b"abc"
    else:
        data = b""
    path.write_bytes(data)
    _refused(d, path, "corrupt")


@pytest.mark.parametrize("family,key", [
    ("llama", "model.layers.1.mlp.up_proj.weight"),
    ("llama", "lm_head.weight"),
    ("qwen2", "model.layers.0.self_attn.q_proj.bias"),
    ("qwen3", "model.layers.2.self_attn.k_norm.weight"),
    ("gemma3", "model.embed_tokens.weight"),
    ("gemma3", "model.layers.0.post_feedforward_layernorm.weight"),
])
def test_missing_tensor(copy, family, key):
    d = copy(family)
    _rewrite(d / "model.safetensors", lambda t: t.pop(key))
    _refused(d, d, f"'{key}'", "missing")


def test_missing_tensor_sharded(copy):
    d = copy("sharded")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    key = "model.layers.2.self_attn.v_proj.weight"
    _rewrite(d / index["weight_map"][key], lambda t: t.pop(key))
    _refused(d, d, f"'{key}'", "missing")


def test_wrong_shape(copy):
    d = copy()
    key = "model.layers.0.self_attn.o_proj.weight"
    _rewrite(d / "model.safetensors", lambda t: t.__setitem__(key, t[key][:, :32].contiguous()))
    _refused(d, d / "model.safetensors", f"'{key}'", "[64, 32]", "[64, 64]", "config.json")


def test_wrong_shape_norm(copy):
    d = copy("qwen3")
    key = "model.layers.1.self_attn.q_norm.weight"
    _rewrite(d / "model.safetensors", lambda t: t.__setitem__(key, torch.ones(7)))
    _refused(d, d / "model.safetensors", f"'{key}'", "shape")


def test_integer_tensor(copy):
    d = copy()
    key = "model.layers.0.mlp.gate_proj.weight"
    _rewrite(d / "model.safetensors", lambda t: t.__setitem__(key, torch.zeros(96, 64, dtype=torch.int32)))
    _refused(d, d / "model.safetensors", f"'{key}'", "int32")


def test_tied_config_with_only_lm_head(copy):
    d = copy("qwen2")                      # tied embeddings in tests/hf.py
    _rewrite(d / "model.safetensors", lambda t: t.__setitem__("lm_head.weight", t.pop("model.embed_tokens.weight")))
    _refused(d, d, "tie_word_embeddings", "lm_head.weight")


def test_index_shard_deleted(copy):
    d = copy("sharded")
    index = json.loads((d / "model.safetensors.index.json").read_text())
    gone = d / sorted(set(index["weight_map"].values()))[1]
    gone.unlink()
    _refused(d, gone, "not found", "index")


def test_index_points_to_missing_shard(copy):
    d = copy("sharded")
    path = d / "model.safetensors.index.json"
    index = json.loads(path.read_text())
    index["weight_map"]["model.norm.weight"] = "model-99999-of-99999.safetensors"
    path.write_text(json.dumps(index))
    _refused(d, d / "model-99999-of-99999.safetensors", "not found")


@pytest.mark.parametrize("content", [b"{}", b"{oops"], ids=["no-weight_map", "not-json"])
def test_bad_index(copy, content):
    d = copy("sharded")
    (d / "model.safetensors.index.json").write_bytes(content)
    _refused(d, d / "model.safetensors.index.json")


def test_unknown_quant(copy):
    _refused(copy(), "'int3'", "int4", quant="int3")


def test_int4_group_size_names_the_weight(copy):
    # llama's down_proj has 96 inputs: not a multiple of 64
    _refused(copy(), "model.layers.0.mlp.down_proj", "group size 64", quant="int4", group_size=64)


# --- loading with int4 compression ---------------------------------------------------------------

@pytest.mark.parametrize("family", FAMILY_NAMES)
def test_int4_load(built, family):
    folder = built[family]
    ids = torch.randint(0, hf.BASE["vocab_size"], (2, 16), generator=torch.Generator().manual_seed(3))
    q = lcsb.load_model(folder, quant="int4", group_size=32)
    f = lcsb.load_model(folder)
    assert q.quant == "int4"
    weights = [m.weight for m in q.modules() if isinstance(m, (Linear, Embedding))]
    assert weights and all(isinstance(w, Int4) and w.group_size == 32 for w in weights)
    with torch.no_grad():
        exact = f(ids)
        got = q(ids)
        # the float model with the int4 model's weights, decompressed: the same function
        for mf, mq in zip(f.modules(), q.modules()):
            if isinstance(mf, (Linear, Embedding)):
                mf.weight = Dense(mq.weight.dequantize(torch.float32))
        deq = f(ids)
    assert hf.rel_diff(deq, got) < 1e-5
    # and close to the uncompressed model (loose: 4-bit random weights)
    assert hf.rel_diff(exact, got) < 0.6
    assert torch.nn.functional.cosine_similarity(exact.flatten(), got.flatten(), dim=0) > 0.9
