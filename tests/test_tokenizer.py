"""lcsb.model.tokenizer against transformers, on real byte-level BPE tokenizers trained here."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import AutoTokenizer, PreTrainedTokenizerFast

from lcsb.errors import UserError
from lcsb.model.tokenizer import load_tokenizer

SPECIALS = [
    "<|begin_of_text|>",
    "<|endoftext|>",
    "<|im_start|>",
    "<|im_end|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]

CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# Shaped like Llama 3's: bos_token from the config, headers, a default system turn, and raise_exception.
LLAMA3 = """{{- bos_token }}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "You are a helpful bot." %}
{%- endif %}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' + system_message + '<|eot_id|>' }}
{%- for message in messages %}
    {%- if (message['role'] == 'user') != (loop.index0 % 2 == 0) %}
        {{- raise_exception('Conversation roles must alternate user/assistant/user/assistant/...') }}
    {%- endif %}
    {{- '<|start_header_id|>' + message['role'] + '<|end_header_id|>\n\n' + message['content'] | trim + '<|eot_id|>' }}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\n\n' }}
{%- endif %}
"""

# Exercises the environment: tojson, namespace, loop controls, tools, a {% generation %} block, custom kwargs.
FEATURES = """{{ bos_token }}{% set ns = namespace(n=0) %}
{% for m in messages %}
  {% if loop.index0 > 3 %}{% break %}{% endif %}
  {% set ns.n = ns.n + 1 %}
  {% if m.role == 'assistant' %}{% generation %}{{ m | tojson }}{% endgeneration %}{% else %}{{ m | tojson }}{% endif %}
{% endfor %}
{% if tools is not none %}{{ tools | tojson(indent=2) }}{% endif %}
count={{ ns.n }} extra={{ extra | default('none') }} eos={{ eos_token }}
{% if add_generation_prompt %}<|im_start|>assistant
{% endif %}"""

# Renders the reasoning of the last assistant turn only, like Qwen3: earlier turns change once later turns
# exist, which defeats the plain prefix approach.
THINKING = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' and loop.last %}"
    "{{ '<|im_start|>assistant\n<think>' + (m.reasoning_content or '') + '</think>\n' + m.content + '<|im_end|>\n' }}"
    "{% else %}"
    "{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}"
    "{% endif %}{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

# The generation prompt " reply" and the content "ing ..." merge into one "replying" token.
MERGING = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}{{ m.content + '<|im_end|>\n' }}"
    "{% else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n reply' }}{% endif %}"
    "{% endfor %}"
)

TEXTS = [
    "Hello world",
    "  leading and trailing spaces  ",
    "tabs\tand\nnewlines\n\n\nand\r\nwindows",
    "héllo wörld, naïve café — «quotes»",
    "日本語のテキスト and 中文 mixed",
    "emoji 🎉🚀 and zero\u200bwidth",
    "special <|im_start|>user\nhi<|im_end|> inside text",
    "<|begin_of_text|>already has bos",
    "a<|endoftext|>b<|eot_id|>c",
    "",
    " ",
    "replying to the reply",
]

CHATS = [
    [{"role": "user", "content": "Hello there"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "Héllo 日本"}],
    [
        {"role": "system", "content": "Be nice."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?\n  "},
        {"role": "assistant", "content": "  6, of course 🎉"},
    ],
    [
        {"role": "user", "content": "one"},
        {"role": "assistant", "content": "two"},
        {"role": "user", "content": "three"},
    ],
]


def _corpus() -> list[str]:
    rng = random.Random(0)
    words = "the a model token reply replying hello world café naïve 日本語 テキスト 🎉 data loss 42 3.14".split()
    lines = [" ".join(rng.choice(words) for _ in range(rng.randint(3, 15))) for _ in range(400)]
    return lines + [m["content"] for chat in CHATS for m in chat] + TEXTS


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=700, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(_corpus(), trainer)
    return tok


def _save(folder: Path, tok: Tokenizer, template: str | None, **special: str) -> Path:
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, **special)
    if template is not None:
        hf.chat_template = template
    hf.save_pretrained(folder)
    return folder


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory: pytest.TempPathFactory, backend: Tokenizer) -> Path:
    # Qwen-like: no BOS, a ByteLevel post-processor that trims offsets, eos <|im_end|>.
    tok = Tokenizer.from_str(backend.to_str())
    tok.post_processor = processors.ByteLevel(trim_offsets=True)
    folder = _save(tmp_path_factory.mktemp("chatml"), tok, CHATML, eos_token="<|im_end|>", pad_token="<|endoftext|>")
    (folder / "generation_config.json").write_text(json.dumps({"eos_token_id": [3, 1]}))
    return folder


@pytest.fixture(scope="module")
def llama3_dir(tmp_path_factory: pytest.TempPathFactory, backend: Tokenizer) -> Path:
    # Llama-3-like: the post-processor adds BOS, the template writes bos_token itself.
    tok = Tokenizer.from_str(backend.to_str())
    bos = "<|begin_of_text|>"
    tok.post_processor = processors.Sequence(
        [
            processors.ByteLevel(trim_offsets=False),
            processors.TemplateProcessing(single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]),
        ]
    )
    folder = _save(tmp_path_factory.mktemp("llama3"), tok, LLAMA3, bos_token=bos, eos_token="<|eot_id|>")
    (folder / "config.json").write_text(json.dumps({"eos_token_id": [tok.token_to_id("<|endoftext|>")]}))
    return folder


def _hf(folder: Path):
    return AutoTokenizer.from_pretrained(folder)


def _hf_chat(hf, messages, **kwargs):
    return hf.apply_chat_template(messages, return_dict=False, **kwargs)


def _assistant_runs(tok, ids: list[int], mask: list[bool]) -> list[str]:
    """Decoded runs of consecutive masked tokens."""
    runs: list[list[int]] = []
    for i, (token, inside) in enumerate(zip(ids, mask)):
        if inside:
            if i == 0 or not mask[i - 1]:
                runs.append([])
            runs[-1].append(token)
    return [tok.decode(run) for run in runs]


# --- encoding ---------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["chatml_dir", "llama3_dir"])
def test_encode_decode_match_transformers(which: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(which)
    ours, hf = load_tokenizer(folder), _hf(folder)
    for text in TEXTS:
        assert ours.encode(text) == hf(text)["input_ids"] == hf.encode(text), text
        assert ours.encode(text, add_special_tokens=False) == hf.encode(text, add_special_tokens=False), text
        ids = ours.encode(text, add_special_tokens=False)
        assert ours.decode(ids) == text  # byte-level BPE is lossless
        full = ours.encode(text)
        for skip in (False, True):
            assert ours.decode(full, skip_special_tokens=skip) == hf.decode(full, skip_special_tokens=skip)


def test_special_token_ids(chatml_dir: Path, llama3_dir: Path) -> None:
    chatml, hf = load_tokenizer(chatml_dir), _hf(chatml_dir)
    assert chatml.bos_token_id is None
    assert chatml.eos_token_id == hf.eos_token_id == hf.convert_tokens_to_ids("<|im_end|>")
    assert chatml.pad_token_id == hf.pad_token_id
    assert chatml.vocab_size == len(hf)
    assert chatml.eos_token_ids == [chatml.eos_token_id, 1]  # generation_config ids [3, 1], deduplicated

    llama, hf = load_tokenizer(llama3_dir), _hf(llama3_dir)
    assert llama.bos_token_id == hf.bos_token_id == 0
    assert llama.encode("hi")[0] == llama.bos_token_id
    assert llama.pad_token_id == llama.eos_token_id == hf.convert_tokens_to_ids("<|eot_id|>")  # no pad: eos
    assert llama.eos_token_ids == [llama.eos_token_id, hf.convert_tokens_to_ids("<|endoftext|>")]


# --- chat templates ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("which", ["chatml_dir", "llama3_dir"])
def test_chat_template_matches_transformers(which: str, request: pytest.FixtureRequest) -> None:
    folder = request.getfixturevalue(which)
    ours, hf = load_tokenizer(folder), _hf(folder)
    assert ours.has_chat_template
    for chat in CHATS:
        for gen in (False, True):
            text = ours.apply_chat_template(chat, add_generation_prompt=gen, tokenize=False)
            assert text == _hf_chat(hf, chat, add_generation_prompt=gen, tokenize=False)
            ids = ours.apply_chat_template(chat, add_generation_prompt=gen)
            assert ids == _hf_chat(hf, chat, add_generation_prompt=gen, tokenize=True)
    if which == "llama3_dir":  # BOS comes from the template once, not from the post-processor again
        assert ids[0] == ours.bos_token_id and ids[1] != ours.bos_token_id


def test_template_features_match_transformers(tmp_path: Path, backend: Tokenizer) -> None:
    folder = _save(tmp_path, backend, FEATURES, bos_token="<|begin_of_text|>", eos_token="<|endoftext|>")
    ours, hf = load_tokenizer(folder), _hf(folder)
    chat = CHATS[2] + [{"role": "user", "content": 'quotes " and <html> & é'}]
    tools = [{"type": "function", "function": {"name": "add", "parameters": {"a": "int"}}}]
    for kwargs in ({}, {"tools": tools}, {"extra": "x", "add_generation_prompt": True}):
        assert ours.apply_chat_template(chat, tokenize=False, **kwargs) == _hf_chat(hf, chat, tokenize=False, **kwargs)
        assert ours.apply_chat_template(chat, **kwargs) == _hf_chat(hf, chat, **kwargs)


def test_template_sources(tmp_path: Path, chatml_dir: Path, backend: Tokenizer) -> None:
    # save_pretrained writes chat_template.jinja; move the template into tokenizer_config.json instead.
    folder = _save(tmp_path / "a", backend, None, eos_token="<|im_end|>")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    chat = CHATS[2]
    want = load_tokenizer(chatml_dir).apply_chat_template(chat, tokenize=False)

    config["chat_template"] = CHATML
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(folder).apply_chat_template(chat, tokenize=False) == want == _hf_chat(
        _hf(folder), chat, tokenize=False
    )

    config["chat_template"] = [{"name": "tool_use", "template": "tools!"}, {"name": "default", "template": CHATML}]
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    assert load_tokenizer(folder).apply_chat_template(chat, tokenize=False) == want
    assert load_tokenizer(folder).apply_chat_template(chat, tokenize=False, tools=[]) == "tools!"

    # chat_template.jinja wins over the config's template, as in transformers.
    (folder / "chat_template.jinja").write_text(LLAMA3)
    text = load_tokenizer(folder).apply_chat_template(chat, tokenize=False)
    assert text.startswith("<|start_header_id|>system") and text == _hf_chat(_hf(folder), chat, tokenize=False)


def test_template_errors(llama3_dir: Path, tmp_path: Path, backend: Tokenizer) -> None:
    bad = [{"role": "user", "content": "a"}, {"role": "user", "content": "b"}]
    with pytest.raises(UserError, match="roles must alternate"):
        load_tokenizer(llama3_dir).apply_chat_template(bad)

    folder = _save(tmp_path, backend, None, eos_token="<|im_end|>")
    tok = load_tokenizer(folder)
    assert not tok.has_chat_template
    with pytest.raises(UserError, match=r"tokenizer_config\.json.*no chat template.*prompt"):
        tok.apply_chat_template(CHATS[0])
    with pytest.raises(UserError, match="no chat template"):
        tok.render_chat_with_mask(CHATS[2])


# --- assistant masks --------------------------------------------------------------------------------------------


def test_mask_chatml(chatml_dir: Path) -> None:
    tok = load_tokenizer(chatml_dir)
    chat = CHATS[2]
    ids, mask = tok.render_chat_with_mask(chat)
    assert ids == tok.apply_chat_template(chat) and len(mask) == len(ids)
    # The mask covers each assistant content and its end of turn, nothing else.
    contents = [m["content"] for m in chat if m["role"] == "assistant"]
    assert _assistant_runs(tok, ids, mask) == [c + "<|im_end|>\n" for c in contents]
    unmasked = tok.decode([t for t, m in zip(ids, mask) if not m])
    assert all(c not in unmasked for c in contents) and "What is 2+2?" in unmasked


def test_mask_llama3(llama3_dir: Path) -> None:
    tok = load_tokenizer(llama3_dir)
    chat = CHATS[2]
    ids, mask = tok.render_chat_with_mask(chat)
    # The template trims contents, so the masked text is the trimmed content.
    contents = [m["content"].strip() for m in chat if m["role"] == "assistant"]
    assert _assistant_runs(tok, ids, mask) == [c + "<|eot_id|>" for c in contents]
    assert not mask[0]  # BOS


def test_mask_without_assistant_and_assistant_first(chatml_dir: Path) -> None:
    tok = load_tokenizer(chatml_dir)
    ids, mask = tok.render_chat_with_mask(CHATS[1])
    assert len(ids) == len(mask) and not any(mask)
    chat = [{"role": "assistant", "content": "I start."}, {"role": "user", "content": "ok"}]
    ids, mask = tok.render_chat_with_mask(chat)
    assert _assistant_runs(tok, ids, mask) == ["I start.<|im_end|>\n"]


def test_mask_when_template_rewrites_earlier_turns(tmp_path: Path, backend: Tokenizer) -> None:
    tok = load_tokenizer(_save(tmp_path, backend, THINKING, eos_token="<|im_end|>"))
    last = {"role": "assistant", "content": "done", "reasoning_content": "hm"}
    chat = CHATS[2][:3] + [{"role": "user", "content": "more"}, last]
    ids, mask = tok.render_chat_with_mask(chat)
    assert _assistant_runs(tok, ids, mask) == ["It is 4.<|im_end|>\n", "<think>hm</think>\ndone<|im_end|>\n"]


def test_mask_token_merging_across_boundary(tmp_path: Path, backend: Tokenizer) -> None:
    tok = load_tokenizer(_save(tmp_path, backend, MERGING, eos_token="<|im_end|>"))
    chat = [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "ing to you"}]
    ids, mask = tok.render_chat_with_mask(chat)
    assert tok.backend.token_to_id("Ġreplying") in ids, "the test needs ' replying' to be one token"
    # The token that straddles the prompt and the content is in the mask.
    assert _assistant_runs(tok, ids, mask) == [" replying to you<|im_end|>\n"]


# --- loading errors ---------------------------------------------------------------------------------------------


def test_missing_tokenizer_json(tmp_path: Path) -> None:
    with pytest.raises(UserError, match=r"tokenizer\.json not found"):
        load_tokenizer(tmp_path)


def test_corrupt_files(tmp_path: Path, chatml_dir: Path) -> None:
    for name in ("tokenizer.json", "tokenizer_config.json"):
        folder = tmp_path / name
        folder.mkdir()
        for f in chatml_dir.iterdir():
            (folder / f.name).write_bytes(f.read_bytes())
        (folder / name).write_text("{not json")
        with pytest.raises(UserError, match=name.replace(".", r"\.")):
            load_tokenizer(folder)


def test_special_tokens_from_dict_config(tmp_path: Path, chatml_dir: Path) -> None:
    # AddedToken-style dicts, and a special token missing from tokenizer.json (transformers adds it).
    for f in chatml_dir.iterdir():
        (tmp_path / f.name).write_bytes(f.read_bytes())
    config = json.loads((tmp_path / "tokenizer_config.json").read_text())
    config["eos_token"] = {"content": "<|im_end|>", "special": True, "__type": "AddedToken"}
    config["bos_token"] = "<|brand_new|>"
    (tmp_path / "tokenizer_config.json").write_text(json.dumps(config))
    ours, hf = load_tokenizer(tmp_path), _hf(tmp_path)
    assert ours.eos_token_id == hf.eos_token_id
    assert ours.bos_token_id == hf.bos_token_id is not None
    text = "x <|brand_new|> y"
    assert ours.encode(text) == hf.encode(text)
    assert len(ours) == len(hf)
