"""The `lcsb` command, in-process through `main` and once as `python -m lcsb`, on a tiny model whose
folder has a real byte-level BPE tokenizer with a ChatML template. Output is checked against
transformers: its tokenizer, its chat template rendering and its greedy generate."""

from __future__ import annotations

import os
import random
import shutil
import subprocess
import sys

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoModelForCausalLM, AutoTokenizer, PreTrainedTokenizerFast

import hf
import lcsb
from lcsb import cli
from lcsb.cli import main
from lcsb.model.core import CausalLM

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
PROMPT = "The model reads héllo wörld"
N = 12


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = "the a model token reply hello world héllo wörld café naïve 日本語 テキスト 🎉 data 42 3.14".split()
    return [" ".join(rng.choice(words) for _ in range(rng.randint(3, 12))) for _ in range(300)]


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A random Llama with a Qwen-like tokenizer (no BOS, eos <|im_end|>, ChatML)."""
    folder = tmp_path_factory.mktemp("model")
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=320, special_tokens=SPECIALS,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(_corpus(), trainer)
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    hf.make("llama", folder, seed=1, initializer_range=0.2, vocab_size=len(fast),
            bos_token_id=tok.token_to_id("<|endoftext|>"), eos_token_id=tok.token_to_id("<|im_end|>"),
            pad_token_id=tok.token_to_id("<|endoftext|>"))
    return folder


@pytest.fixture(scope="module")
def reference(model_dir):
    """Expected stdout of `lcsb generate` by transformers: greedy generate, decoded without special tokens."""
    tok = AutoTokenizer.from_pretrained(model_dir)
    model = AutoModelForCausalLM.from_pretrained(model_dir).eval()

    def expected(prompt_ids: list[int], n: int = N) -> str:
        ids = torch.tensor([prompt_ids])
        out = model.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n)
        return tok.decode(out[0, len(prompt_ids):], skip_special_tokens=True) + "\n"

    return tok, expected


class Recorder:
    """A stdout that records each write, in order with the model's forward calls."""

    def __init__(self, events):
        self.events = events

    def write(self, s):
        self.events.append(("write", s))
        return len(s)

    def flush(self):
        pass

    def text(self):
        return "".join(s for kind, s in self.events if kind == "write")


def record_stdout(monkeypatch) -> Recorder:
    """Replace stdout by a Recorder that also logs every step of the model (each LM head call). Call it
    in the test itself: pytest puts its own sys.stdout back between a fixture's setup and the test."""
    events = []
    logits = CausalLM.logits

    def counted(self, *args, **kw):
        events.append(("forward", None))
        return logits(self, *args, **kw)

    monkeypatch.setattr(CausalLM, "logits", counted)
    rec = Recorder(events)
    monkeypatch.setattr(sys, "stdout", rec)
    return rec


def run(*argv) -> int:
    """main(argv) -> exit status, argparse's SystemExit included."""
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def test_generate_streams_what_transformers_generates(model_dir, reference, monkeypatch):
    tok, expected = reference
    stdout = record_stdout(monkeypatch)
    assert run("generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", N) == 0
    text = stdout.text()
    assert text == expected(tok(PROMPT)["input_ids"])
    assert len(text.strip()) > 5
    # text is written between model steps as it is produced, not all at the end
    kinds = [k for k, s in stdout.events if k == "forward" or s]
    last_forward = len(kinds) - 1 - kinds[::-1].index("forward")
    assert kinds.count("forward") == N and kinds[:last_forward].count("write") >= 3


def test_generate_chat(model_dir, reference, monkeypatch):
    tok, expected = reference
    stdout = record_stdout(monkeypatch)
    argv = ["generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", N, "--chat"]
    assert run(*argv, "--system", "Be terse.") == 0
    messages = [{"role": "system", "content": "Be terse."}, {"role": "user", "content": PROMPT}]
    ids = tok.apply_chat_template(messages, add_generation_prompt=True, return_dict=False)
    assert stdout.text() == expected(ids)
    stdout.events.clear()
    assert run(*argv) == 0
    ids = tok.apply_chat_template(messages[1:], add_generation_prompt=True, return_dict=False)
    assert stdout.text() == expected(ids)


def test_generate_sampling_seeded(model_dir, capsys):
    argv = ["generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", N,
            "--temperature", "1.5", "--top-p", "0.95"]
    outs = []
    for seed in (1, 1, 2):
        assert run(*argv, "--seed", seed) == 0
        outs.append(capsys.readouterr().out)
    assert outs[0] == outs[1] != outs[2]


def test_generate_quantized(model_dir, capsys):
    assert run("generate", "--model", model_dir, "--prompt", PROMPT, "--max-new-tokens", 4, "--quant", "int8") == 0
    assert capsys.readouterr().out.endswith("\n")


def test_subprocess(model_dir, reference):
    tok, expected = reference
    env = dict(os.environ, OMP_NUM_THREADS="1")
    p = subprocess.run([sys.executable, "-m", "lcsb", "generate", "--model", str(model_dir), "--prompt", PROMPT,
                        "--max-new-tokens", "5"], capture_output=True, text=True, env=env, timeout=120)
    assert p.returncode == 0, p.stderr
    assert p.stdout == expected(tok(PROMPT)["input_ids"], 5)
    assert "Traceback" not in p.stderr


def _one_line_error(err: str) -> str:
    lines = err.strip("\n").split("\n")
    assert len(lines) == 1, err
    return lines[0]


def test_missing_model_folder(tmp_path, capsys):
    missing = tmp_path / "no-such-model"
    assert run("generate", "--model", missing, "--prompt", "hi") == 2
    captured = capsys.readouterr()
    line = _one_line_error(captured.err)
    assert line.startswith("lcsb: error: ") and str(missing) in line
    assert captured.out == ""


@pytest.mark.parametrize("where", ["before", "after"])
def test_debug_shows_traceback(tmp_path, capsys, where):
    argv = ["generate", "--model", tmp_path / "no-such-model", "--prompt", "hi"]
    argv = ["--debug", *argv] if where == "before" else [*argv, "--debug"]
    assert run(*argv) == 2
    err = capsys.readouterr().err
    assert "Traceback (most recent call last)" in err and "UserError" in err
    assert err.strip().split("\n")[-1].startswith("lcsb: error: ")


@pytest.mark.parametrize("option, value", [
    ("--top-p", "0"), ("--top-p", "1.5"), ("--top-p", "nan"), ("--top-p", "x"),
    ("--temperature", "-1"), ("--temperature", "inf"), ("--max-new-tokens", "0"), ("--max-new-tokens", "2.5"),
])
def test_bad_option_values(model_dir, capsys, option, value):
    assert run("generate", "--model", model_dir, "--prompt", "hi", option, value) == 2
    line = _one_line_error(capsys.readouterr().err)
    assert line.startswith("lcsb generate: error: ") and option in line and repr(value) in line


@pytest.mark.parametrize("argv, match", [
    ([], "required"),
    (["generate", "--prompt", "hi"], "--model"),
    (["nonsense"], "invalid choice"),
    (["generate", "--model", "x", "--prompt", "hi", "--quant", "int3"], "--quant"),
])
def test_usage_errors(capsys, argv, match):
    assert run(*argv) == 2
    assert match in _one_line_error(capsys.readouterr().err)


def test_system_needs_chat(model_dir, capsys):
    assert run("generate", "--model", model_dir, "--prompt", "hi", "--system", "Be terse.") == 2
    assert "--chat" in _one_line_error(capsys.readouterr().err)


def test_chat_without_template(model_dir, tmp_path, capsys):
    plain = tmp_path / "plain"
    shutil.copytree(model_dir, plain)
    (plain / "chat_template.jinja").unlink(missing_ok=True)
    cfg = plain / "tokenizer_config.json"
    cfg.write_text(cfg.read_text().replace('"chat_template"', '"unused_template"'))
    assert run("generate", "--model", plain, "--prompt", "hi", "--max-new-tokens", 2) == 0
    capsys.readouterr()
    assert run("generate", "--model", plain, "--prompt", "hi", "--chat") == 2
    line = _one_line_error(capsys.readouterr().err)
    assert "no chat template" in line and "--chat" in line


def test_keyboard_interrupt_is_quiet(model_dir, monkeypatch, capsys):
    def interrupted(*args, **kw):
        raise KeyboardInterrupt
        yield

    monkeypatch.setattr(cli, "generate_text", interrupted)
    assert run("generate", "--model", model_dir, "--prompt", "hi") == 130
    assert capsys.readouterr().err == ""


def test_version(capsys):
    assert run("--version") == 0
    assert capsys.readouterr().out.strip() == f"lcsb {lcsb.__version__}"
