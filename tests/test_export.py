"""Adapters leave lcsb and come back: the adapter a run writes against PEFT on the transformers model,
the merged checkpoint against transformers, the MLX-LM layout against the PEFT tensors, a PEFT-made
adapter trained on in lcsb; `lcsb generate` and `lcsb eval` with a run folder, against PEFT."""

from __future__ import annotations

import json

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer

import hf
import tiny
from lcsb import data as datalib
from lcsb import load_model
from lcsb.cli import main
from lcsb.model.tokenizer import load_tokenizer
from lcsb.convert import convert_model
from lcsb.config import TrainConfig
from lcsb.trainer import train

TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
RANK, ALPHA = 4, 8.0
PROMPT = "what is colour of sky"


@pytest.fixture(scope="module")
def run_dir(tmp_path_factory, tiny4, chat_data):
    """A finished run: lr 1e-2 for a few steps, so every B is non-zero."""
    out = tmp_path_factory.mktemp("runs") / "run"
    train(TrainConfig(model=str(tiny4), data=str(chat_data), out=str(out), method="full", steps=6, lr=1e-2,
                      rank=RANK, alpha=ALPHA, dropout=0.05, batch_size=4, save_every=0), quiet=True)
    return out


@pytest.fixture(scope="module")
def ids():
    g = torch.Generator().manual_seed(0)
    return torch.randint(3, 250, (2, 24), generator=g)


@pytest.fixture(scope="module")
def lcsb_logits(tiny4, run_dir, ids):
    with torch.no_grad():
        return load_model(tiny4, adapter=run_dir)(ids)


def peft_model(tiny4, adapter):
    return PeftModel.from_pretrained(hf.reference(tiny4), str(adapter)).eval()


def logits_of(model, ids):
    with torch.no_grad():
        return model(input_ids=ids).logits.float()


def run(*argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_run_adapter_loads_in_peft(tiny4, run_dir, ids, lcsb_logits):
    weights = load_file(str(run_dir / "adapter_model.safetensors"))
    assert all(t.abs().max() > 0 for k, t in weights.items() if "lora_B" in k)
    ref = logits_of(peft_model(tiny4, run_dir), ids)
    assert hf.rel_diff(ref, lcsb_logits) < 1e-4
    base = logits_of(hf.reference(tiny4), ids)
    assert hf.rel_diff(ref, base) > 1e-3               # the adapter matters: the parity above means something


def test_export_peft(tiny4, run_dir, tmp_path, ids, lcsb_logits, capsys):
    out = tmp_path / "peft"
    assert run("export", run_dir, "--to", "peft", "--out", out) == 0
    assert capsys.readouterr().out.strip() == str(out)
    assert sorted(p.name for p in out.iterdir()) == ["adapter_config.json", "adapter_model.safetensors"]
    assert hf.rel_diff(logits_of(peft_model(tiny4, out), ids), lcsb_logits) < 1e-4
    # the output folder is not overwritten unless asked, and nothing is left behind
    assert run("export", run_dir, "--to", "peft", "--out", out) == 2
    assert "--overwrite" in capsys.readouterr().err
    assert run("export", run_dir, "--to", "peft", "--out", out, "--overwrite") == 0
    assert sorted(p.name for p in tmp_path.iterdir()) == ["peft"]


def test_export_merged(tiny4, run_dir, tmp_path, ids, lcsb_logits):
    out = tmp_path / "merged"
    assert run("export", run_dir, "--to", "merged", "--out", out) == 0     # base: base_model_name_or_path
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config and config["num_hidden_layers"] == 4
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    assert hf.rel_diff(logits_of(merged, ids), lcsb_logits) < 1e-4
    # the same names and shapes as the original checkpoint, and the tokenizer comes along
    a, b = load_file(str(tiny4 / "model.safetensors")), load_file(str(out / "model.safetensors"))
    assert {k: v.shape for k, v in a.items()} == {k: v.shape for k, v in b.items()}
    assert torch.equal(a["model.norm.weight"], b["model.norm.weight"])
    assert AutoTokenizer.from_pretrained(out)(PROMPT)["input_ids"] == AutoTokenizer.from_pretrained(tiny4)(PROMPT)["input_ids"]


def test_export_merged_from_converted_base(tiny4, run_dir, tmp_path, ids, capsys):
    """A quantized `lcsb convert` base: merged into its dequantized weights, and the user is told."""
    converted = convert_model(tiny4, tmp_path / "int8", quant="int8")
    out = tmp_path / "merged"
    assert run("export", run_dir, "--to", "merged", "--model", converted, "--out", out) == 0
    err = capsys.readouterr().err
    assert "quantized" in err and "dequantized" in err
    config = json.loads((out / "config.json").read_text())
    assert "quantization" not in config
    merged = AutoModelForCausalLM.from_pretrained(out, dtype=torch.float32, attn_implementation="eager").eval()
    with torch.no_grad():
        expected = load_model(converted, adapter=run_dir)(ids)
    assert hf.rel_diff(logits_of(merged, ids), expected) < 1e-4


def test_export_mlx(run_dir, tmp_path, capsys):
    out = tmp_path / "mlx"
    assert run("export", run_dir, "--to", "mlx", "--out", out) == 0
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["fine_tune_type"] == "lora" and config["num_layers"] == 4
    lp = config["lora_parameters"]
    assert lp["rank"] == RANK and lp["scale"] == ALPHA / RANK and lp["dropout"] == 0.05
    assert lp["keys"] == ["self_attn.q_proj", "self_attn.k_proj", "self_attn.v_proj", "self_attn.o_proj",
                          "mlp.gate_proj", "mlp.up_proj", "mlp.down_proj"]
    mlx = load_file(str(out / "adapters.safetensors"))
    peft = load_file(str(run_dir / "adapter_model.safetensors"))
    names = [f"model.layers.{i}.{key}" for i in range(4) for key in lp["keys"]]
    assert sorted(mlx) == sorted(f"{n}.lora_{ab}" for n in names for ab in "ab")
    for n in names:
        A, B = peft[f"base_model.model.{n}.lora_A.weight"], peft[f"base_model.model.{n}.lora_B.weight"]
        a, b = mlx[f"{n}.lora_a"], mlx[f"{n}.lora_b"]
        assert a.shape == (A.shape[1], RANK) and b.shape == (RANK, B.shape[0])   # (in, r), (r, out)
        assert torch.equal(a.T, A) and torch.equal(b.T, B)
        # MLX-LM's LoRALinear: scale * (x @ lora_a) @ lora_b == PEFT's (alpha / r) * B A x
        x = torch.randn(3, A.shape[1])
        torch.testing.assert_close(lp["scale"] * (x @ a) @ b, (ALPHA / RANK) * x @ A.T @ B.T)


def test_peft_adapter_trains_in_lcsb(tiny4, chat_data, tmp_path):
    """An adapter made by PEFT (random A and B) loads into training; step 1's loss is PEFT's forward loss."""
    cfg = PeftLoraConfig(r=RANK, lora_alpha=ALPHA, lora_dropout=0.0, target_modules=["q_proj", "v_proj", "down_proj"],
                         init_lora_weights=False, task_type="CAUSAL_LM")
    peft = get_peft_model(hf.reference(tiny4), cfg).eval()
    made = tmp_path / "made-by-peft"
    peft.save_pretrained(made)
    start = load_file(str(made / "adapter_model.safetensors"))

    # the first batch of the run: seed 0, epoch 0, as the trainer draws it
    tok = load_tokenizer(tiny4)
    splits = datalib.load_dataset(chat_data, tok, max_seq_len=256)
    batch_ids, labels = next(datalib.batches(splits.train, 2, seed=0, epoch=0, pad_token_id=splits.pad_token_id))
    with torch.no_grad():
        expected = peft(input_ids=batch_ids, labels=labels).loss.item()

    out = tmp_path / "run"
    res = train(TrainConfig(model=str(tiny4), data=str(chat_data), out=str(out), adapter=str(made), steps=3,
                            lr=1e-2, batch_size=2, save_every=0, method="lcsb", groups=4), quiet=True)
    first = json.loads((out / "log.jsonl").read_text().splitlines()[0])
    assert first["step"] == 1 and first["trained"] == [0]       # lcsb, K=4: block 0 first
    assert first["loss"] == pytest.approx(expected, rel=1e-5)
    saved = json.loads((out / "adapter_config.json").read_text())
    assert saved["r"] == RANK and saved["lora_alpha"] == ALPHA
    assert sorted(saved["target_modules"]) == ["down_proj", "q_proj", "v_proj"]
    trained = load_file(str(out / "adapter_model.safetensors"))
    assert trained.keys() == start.keys()
    assert not torch.equal(trained["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"],
                           start["base_model.model.model.layers.0.self_attn.q_proj.lora_B.weight"])
    assert res.steps == 3


def test_generate_with_run_folder(tiny4, run_dir, monkeypatch, capsys):
    """`lcsb generate --adapter RUN` prints what PEFT's greedy generate gives with the run's adapter."""
    tok = AutoTokenizer.from_pretrained(tiny4)
    prompt = tok.apply_chat_template([{"role": "user", "content": PROMPT}], add_generation_prompt=True,
                                     return_dict=False)
    ids = torch.tensor([prompt])

    def greedy(model):
        out = model.generate(input_ids=ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=6)
        return tok.decode(out[0, len(prompt):], skip_special_tokens=True) + "\n"

    expected = greedy(peft_model(tiny4, run_dir))
    assert expected != greedy(hf.reference(tiny4))     # the adapter changes the answer
    assert run("generate", "--model", tiny4, "--adapter", run_dir, "--prompt", PROMPT, "--chat",
               "--max-new-tokens", 6) == 0
    assert capsys.readouterr().out == expected


def reference_metrics(model, examples) -> dict:
    """Token-weighted loss and argmax accuracy of a transformers model over `examples`, one at a time."""
    loss_sum = n = correct = 0
    with torch.no_grad():
        for e in examples:
            ids, labels = torch.tensor([e.ids]), torch.tensor(e.labels[1:])
            logits = model(input_ids=ids).logits[0, :-1].float()
            keep = labels != -100
            loss_sum += torch.nn.functional.cross_entropy(logits[keep], labels[keep], reduction="sum").item()
            correct += int((logits[keep].argmax(-1) == labels[keep]).sum())
            n += int(keep.sum())
    return {"loss": loss_sum / n, "accuracy": correct / n, "tokens": n}


def test_eval(tiny4, run_dir, chat_data, tmp_path, capsys):
    """`lcsb eval`: a data folder scores test.jsonl if present, else valid.jsonl; a file scores all its records."""
    tok = load_tokenizer(tiny4)
    valid = datalib.load_dataset(chat_data / "valid.jsonl", tok, max_seq_len=256).train
    expected = reference_metrics(peft_model(tiny4, run_dir), valid)

    assert run("eval", "--model", tiny4, "--adapter", run_dir, "--data", chat_data, "--batch-size", 3,
               "--json") == 0
    got = json.loads(capsys.readouterr().out)
    assert got["data"] == str(chat_data / "valid.jsonl") and got["records"] == len(valid)
    assert got["tokens"] == expected["tokens"]
    assert got["loss"] == pytest.approx(expected["loss"], rel=1e-5)
    assert got["perplexity"] == pytest.approx(torch.tensor(expected["loss"]).exp().item(), rel=1e-5)
    assert got["accuracy"] == pytest.approx(expected["accuracy"])

    # a folder with test.jsonl scores it; a single file scores every record; text output on one line
    data = tmp_path / "data"
    tiny.make_chat_data(data, n_train=4, n_valid=3, seed=1)
    tiny.write_jsonl(data / "test.jsonl", [json.loads(l) for l in (chat_data / "valid.jsonl").read_text().splitlines()])
    assert run("eval", "--model", tiny4, "--adapter", run_dir, "--data", data, "--batch-size", 3) == 0
    line = capsys.readouterr().out.strip()
    assert "\n" not in line and f"loss {expected['loss']:.4f}" in line and "perplexity" in line
    assert "token accuracy" in line and str(data / "test.jsonl") in line and f"({expected['tokens']} tokens" in line
    assert run("eval", "--model", tiny4, "--data", data / "train.jsonl", "--json") == 0
    assert json.loads(capsys.readouterr().out)["records"] == 4
    # --max-batches: the first N batches of the fixed order
    assert run("eval", "--model", tiny4, "--adapter", run_dir, "--data", chat_data, "--batch-size", 3,
               "--max-batches", 1, "--json") == 0
    assert json.loads(capsys.readouterr().out)["tokens"] < expected["tokens"]


@pytest.mark.parametrize("argv, match", [
    (["eval", "--model", "{model}", "--data", "{missing}"], "no such file or folder"),
    (["export", "{missing}", "--to", "mlx"], "adapter folder not found"),
    (["export", "{unfinished}", "--to", "peft"], "latest checkpoint"),
    (["export", "{run}", "--to", "merged", "--model", "{missing}", "--out", "{out}"], "base model folder not found"),
])
def test_errors(tiny4, run_dir, tmp_path, capsys, argv, match):
    unfinished = tmp_path / "unfinished"
    (unfinished / "checkpoints" / "step-0000005").mkdir(parents=True)
    (unfinished / "checkpoints" / "step-0000005" / "state.json").write_text("{}")
    names = dict(model=tiny4, missing=tmp_path / "missing", run=run_dir, out=tmp_path / "out",
                 unfinished=unfinished)
    assert run(*[a.format(**names) for a in argv]) == 2
    err = capsys.readouterr().err.strip()
    assert "\n" not in err and err.startswith("lcsb: error: ") and match in err
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_adapter_file_is_safetensors_own_bytes_written_a_tensor_at_a_time(tiny4, tmp_path, monkeypatch, dtype):
    """save_adapter converts each factor to float32 as it writes it (bfloat16 factors once made a float32 copy of
    the whole adapter at every checkpoint): the file is byte for byte what safetensors' save_file writes for the
    float32 tensors, and no more than one factor is converted at a time."""
    from safetensors.torch import save_file
    from lcsb.config import LoraConfig
    from lcsb.lora import save_adapter
    from lcsb.model import load_model
    from lcsb.model.lora import set_lora_dtype
    model = load_model(tiny4, lora=LoraConfig(8, alpha=16))
    with torch.no_grad():
        for p in model.lora_parameters().values():
            p.copy_(torch.randn(p.shape) * 0.1)
    set_lora_dtype(model, dtype)
    want = tmp_path / "want.safetensors"
    save_file({k: p.detach().float() for k, p in model.lora_parameters().items()}, str(want), metadata={"format": "pt"})
    live, most, to = [0], [0], torch.Tensor.to

    def counting_to(t, *a, **k):              # float32 copies alive at once, while the file is written
        out = to(t, *a, **k)
        if out.dtype == torch.float32 and out.data_ptr() != t.data_ptr():
            live[0] += 1
            most[0] = max(most[0], live[0])
            __import__("weakref").finalize(out, lambda: live.__setitem__(0, live[0] - 1))
        return out

    monkeypatch.setattr(torch.Tensor, "to", counting_to)
    save_adapter(model, tmp_path / "adapter")
    monkeypatch.undo()
    assert (tmp_path / "adapter" / "adapter_model.safetensors").read_bytes() == want.read_bytes()
    assert most[0] <= 1
