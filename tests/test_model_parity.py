"""Logits of lcsb's model families against transformers on the same checkpoint folder.

Every case builds a tiny random transformers model (tests/hf.py), saves it with save_pretrained,
reads the folder back with both transformers (fp32, eager attention) and `lcsb.load_model`, and
compares the logits: max |diff| / max |logit| < 1e-4 (DESIGN section 2).
"""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors import safe_open

import lcsb
from lcsb.model import KVCache

import hf

TOL = 1e-4
VOCAB = hf.BASE["vocab_size"]
LLAMA3 = dict(rope_type="llama3", rope_theta=10000.0, factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
              original_max_position_embeddings=16)

# id -> (family, sequence length, config overrides)
CASES = {
    "llama": ("llama", 12, {}),
    "llama-mha": ("llama", 12, dict(num_key_value_heads=4)),
    "llama-mqa": ("llama", 12, dict(num_key_value_heads=1)),
    "llama-tied": ("llama", 12, dict(tie_word_embeddings=True)),
    "llama-head_dim": ("llama", 12, dict(head_dim=24)),
    "llama-bias": ("llama", 12, dict(attention_bias=True, mlp_bias=True)),
    "llama-rope_llama3": ("llama", 48, dict(rope_parameters=dict(LLAMA3))),
    "llama-rope_linear": ("llama", 48, dict(rope_parameters=dict(rope_type="linear", rope_theta=10000.0, factor=4.0))),
    "mistral": ("mistral", 12, {}),
    "mistral-head_dim": ("mistral", 12, dict(head_dim=32, num_key_value_heads=1)),
    "qwen2": ("qwen2", 12, {}),
    "qwen2-mha-untied": ("qwen2", 12, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen2-mqa": ("qwen2", 12, dict(num_key_value_heads=1)),
    "qwen2-head_dim": ("qwen2", 12, dict(head_dim=24)),
    "qwen2-sliding": ("qwen2", 20, dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("qwen3", 12, {}),
    "qwen3-mha-untied": ("qwen3", 12, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "qwen3-mqa": ("qwen3", 12, dict(num_key_value_heads=1, head_dim=32)),
    "qwen3-bias": ("qwen3", 12, dict(attention_bias=True)),
    "qwen3-sliding": ("qwen3", 20, dict(use_sliding_window=True, sliding_window=3, max_window_layers=2)),
    "gemma3": ("gemma3", 12, {}),
    "gemma3-mha-untied": ("gemma3", 12, dict(num_key_value_heads=4, tie_word_embeddings=False)),
    "gemma3-mqa-head_dim": ("gemma3", 12, dict(num_key_value_heads=1, head_dim=24)),
    "gemma3-bias": ("gemma3", 12, dict(attention_bias=True)),
    "gemma3-past_window-softcap": ("gemma3", 24, dict(attn_logit_softcapping=5.0, final_logit_softcapping=3.0)),
    "gemma3-rope_linear": ("gemma3", 24, dict(rope_parameters={
        "full_attention": dict(rope_type="linear", rope_theta=1_000_000.0, factor=8.0),
        "sliding_attention": dict(rope_type="default", rope_theta=10_000.0)})),
}


def _ids(length: int, batch: int = 2, seed: int = 1) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, VOCAB, (batch, length), generator=g)


def _assert_parity(folder: Path, length: int, **load_kw) -> lcsb.model.CausalLM:
    ids = _ids(length)
    model = lcsb.load_model(folder, **load_kw)
    with torch.no_grad():
        want = hf.reference(folder)(ids).logits.float()
        got = model(ids)
    assert got.dtype == torch.float32 and got.shape == want.shape == (ids.shape[0], length, VOCAB)
    assert hf.rel_diff(want, got) < TOL
    return model


@pytest.mark.parametrize("case", list(CASES))
def test_logits_match_transformers(case, tmp_path):
    family, length, over = CASES[case]
    hf.make(family, tmp_path, **over)
    model = _assert_parity(tmp_path, length)
    cfg = model.config
    # the variant really is what the case says
    if "num_key_value_heads" in over:
        assert cfg.num_kv_heads == over["num_key_value_heads"]
    if "head_dim" in over:
        assert cfg.head_dim == over["head_dim"] != cfg.hidden_size // cfg.num_heads
    if "tie_word_embeddings" in over:
        assert (model.lm_head is None) == over["tie_word_embeddings"]
    if case == "llama-bias":
        assert model.layers[0].self_attn.o_proj.bias is not None and model.layers[0].mlp.up_proj.bias is not None
    if case == "qwen2-sliding":
        assert cfg.layer_types == ["full_attention", "sliding_attention", "sliding_attention"]
        assert length > cfg.sliding_window == 4
    if case == "qwen3-sliding":
        assert cfg.layer_types == ["full_attention", "full_attention", "sliding_attention"]
        assert length > cfg.sliding_window == 3
    if case.endswith("-bias"):
        assert model.layers[0].self_attn.q_proj.bias is not None
    if family == "gemma3":
        assert "sliding_attention" in cfg.layer_types and length > cfg.sliding_window
    if "rope_parameters" in over:
        assert not torch.equal(cfg.rope["full_attention"].inv_freq,
                               lcsb.config.rope_from_params({"rope_theta": 10000.0}, cfg.head_dim, "").inv_freq)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_sharded_checkpoint(family, tmp_path):
    hf.make(family, tmp_path, max_shard_size="20KB")
    index = json.loads((tmp_path / "model.safetensors.index.json").read_text())
    files = set(index["weight_map"].values())
    assert len(files) >= 3 and files == {p.name for p in tmp_path.glob("*.safetensors")}
    _assert_parity(tmp_path, 12)


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_bf16_checkpoint_loaded_as_fp32(family, tmp_path):
    hf.make(family, tmp_path, dtype=torch.bfloat16)
    with safe_open(str(tmp_path / "model.safetensors"), framework="pt") as f:
        assert {f.get_slice(k).get_dtype() for k in f.keys()} == {"BF16"}
    model = _assert_parity(tmp_path, 12, dtype=torch.float32)
    assert model.layers[0].self_attn.q_proj.weight.dequantize().dtype == torch.float32


@pytest.mark.parametrize("family", ["llama", "qwen2", "qwen3", "gemma3"])
def test_bf16_compute_close_to_fp32(family, tmp_path):
    hf.make(family, tmp_path)
    ids = _ids(12)
    with torch.no_grad():
        full = lcsb.load_model(tmp_path)(ids)
        half_model = lcsb.load_model(tmp_path, dtype=torch.bfloat16)
        half = half_model(ids)
    assert half_model.model.norm.weight.dtype == torch.bfloat16
    assert half.dtype == torch.float32
    assert hf.rel_diff(full, half) < 5e-2


# --- checkpoints as found on the Hub: rope_theta + rope_scaling instead of rope_parameters -------------

def _edit_config(folder: Path, **changes):
    path = folder / "config.json"
    cfg = json.loads(path.read_text())
    for k, v in changes.items():
        if v is None:
            cfg.pop(k, None)
        else:
            cfg[k] = v
    path.write_text(json.dumps(cfg, indent=2))


OLD_ROPE = {
    # Llama 3.1 style
    "llama3": ("llama", dict(rope_theta=50000.0, rope_scaling=dict(
        rope_type="llama3", factor=8.0, low_freq_factor=1.0, high_freq_factor=4.0,
        original_max_position_embeddings=16))),
    # llama3 without original_max_position_embeddings: transformers falls back to max_position_embeddings
    "llama3-no_original_max": ("llama", dict(max_position_embeddings=64, rope_theta=10000.0, rope_scaling=dict(
        rope_type="llama3", factor=4.0, low_freq_factor=1.0, high_freq_factor=4.0))),
    # a top-level original_max_position_embeddings wins over the one in rope_scaling (as in transformers)
    "llama3-top_level_original_max": ("llama", dict(original_max_position_embeddings=32, rope_theta=10000.0,
                                                    rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                                                                      high_freq_factor=4.0, original_max_position_embeddings=16))),
    # both formats present: rope_scaling wins (as in transformers)
    "both-formats": ("llama", dict(rope_theta=10000.0, rope_parameters=dict(rope_type="default", rope_theta=10000.0),
                                   rope_scaling=dict(rope_type="linear", factor=3.0))),
    # transformers 4.3x and older: "type" instead of "rope_type"
    "linear-type": ("llama", dict(rope_theta=10000.0, rope_scaling=dict(type="linear", factor=4.0))),
    # no scaling, just a non-default base (Qwen2.5 configs)
    "qwen2-theta": ("qwen2", dict(rope_theta=1000.0, rope_scaling=None)),
    # gemma-3-4b style: global theta + linear scaling, local base, a pattern instead of layer_types
    "gemma3": ("gemma3", dict(rope_theta=100_000.0, rope_local_base_freq=1000.0,
                              rope_scaling=dict(rope_type="linear", factor=8.0),
                              layer_types=None, sliding_window_pattern=2)),
}


@pytest.mark.parametrize("case", list(OLD_ROPE))
def test_old_rope_format_matches_transformers(case, tmp_path):
    family, changes = OLD_ROPE[case]
    hf.make(family, tmp_path)
    ids = _ids(40)
    with torch.no_grad():
        before = lcsb.load_model(tmp_path)(ids)
    _edit_config(tmp_path, **{"rope_parameters": None, **changes})
    assert "rope_scaling" in changes or "rope_theta" in changes
    model = _assert_parity(tmp_path, 40)
    with torch.no_grad():
        after = model(ids)
    assert hf.rel_diff(before, after) > 1e-3, "the edited rope fields changed nothing: the test would prove nothing"
    if family == "gemma3":
        assert model.config.layer_types == ["sliding_attention", "full_attention", "sliding_attention"]


# --- KV cache ---------------------------------------------------------------------------------------

KV_CASES = {
    "llama": ("llama", {}),
    "llama-mqa-rope_llama3": ("llama", dict(num_key_value_heads=1, rope_parameters=dict(LLAMA3))),
    "qwen2-sliding": ("qwen2", dict(use_sliding_window=True, sliding_window=4, max_window_layers=1)),
    "qwen3": ("qwen3", {}),
    "gemma3": ("gemma3", {}),
    "gemma3-softcap": ("gemma3", dict(final_logit_softcapping=3.0, tie_word_embeddings=False)),
}


@pytest.mark.parametrize("case", list(KV_CASES))
def test_kv_cache_matches_full_sequence(case, tmp_path):
    family, over = KV_CASES[case]
    hf.make(family, tmp_path, **over)
    model = lcsb.load_model(tmp_path)
    length = 18
    ids = _ids(length)
    with torch.no_grad():
        full = model(ids)
        cache = KVCache(model.config.num_layers)
        # a prefix, a multi-token chunk on top of the cache, then one token at a time
        steps = [(0, 3), (3, 7)] + [(i, i + 1) for i in range(7, length)]
        parts = []
        for a, b in steps:
            assert cache.length == a
            parts.append(model(ids[:, a:b], cache=cache))
        assert cache.length == length
    stepped = torch.cat(parts, dim=1)
    if model.config.sliding_window is not None and "sliding_attention" in model.config.layer_types:
        assert length > model.config.sliding_window + 7      # single steps well past the window
    assert hf.rel_diff(full, stepped) < TOL
    # and the full-sequence logits are transformers' (so the cached ones are too)
    with torch.no_grad():
        assert hf.rel_diff(hf.reference(tmp_path)(ids).logits, full) < TOL


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("name", ["silu", "gelu_pytorch_tanh", "gelu"])
def test_gated_activation_gradients_are_autograds_bit_for_bit(name, dtype):
    """core._GatedAct (act(gate) recomputed in backward, its derivative by the activation's own backward kernel)
    gives exactly autograd's gradients of act(gate) * up, on transposed views as the MLP passes them."""
    from lcsb.model.core import ACTIVATIONS, _GatedAct
    act = ACTIVATIONS[name]
    g = torch.Generator().manual_seed(int.from_bytes(__import__("os").urandom(2), "little"))
    gate, up, grad = (torch.randn(96, 40, generator=g).to(dtype).t() * s for s in (3, 1, 1))
    gate, up = gate.requires_grad_(), up.requires_grad_()
    got = torch.autograd.grad((_GatedAct.apply(gate, up, act) * grad).sum(), [gate, up])
    want = torch.autograd.grad((act(gate) * up * grad).sum(), [gate, up])
    assert all(torch.equal(a, b) for a, b in zip(got, want))
