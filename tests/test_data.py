"""lcsb.data: JSONL formats to ids and labels (chat checked against transformers), validation, packing, batching."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from lcsb.data import IGNORE, Example, batches, epoch_order, load_dataset, num_batches, pack
from lcsb.errors import UserError
from lcsb.model.tokenizer import load_tokenizer

SPECIALS = ["<|begin_of_text|>", "<|endoftext|>", "<|im_start|>", "<|im_end|>"]

# ChatML, with {% generation %} around what an assistant turn adds, so transformers can compute its own
# assistant mask (return_assistant_tokens_mask) as the reference for ours.
CHATML = (
    "{% for m in messages %}"
    "{% if m.role == 'assistant' %}{{ '<|im_start|>assistant\n' }}"
    "{% generation %}{{ m.content + '<|im_end|>\n' }}{% endgeneration %}"
    "{% else %}{{ '<|im_start|>' + m.role + '\n' + m.content + '<|im_end|>\n' }}{% endif %}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)

CHATS = [
    [{"role": "user", "content": "Hello there"}, {"role": "assistant", "content": "General Kenobi."}],
    [
        {"role": "system", "content": "Be terse."},
        {"role": "user", "content": "What is 2+2?"},
        {"role": "assistant", "content": "It is 4."},
        {"role": "user", "content": "And 3+3?\n  "},
        {"role": "assistant", "content": "  6, of course 🎉"},
    ],
    [{"role": "user", "content": "héllo 日本"}, {"role": "assistant", "content": "naïve café"}],
]


@pytest.fixture(scope="module")
def backend() -> Tokenizer:
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    corpus = ["the model replies to the user", "hello world", "what is the answer", "data loss token 42"] * 20
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=SPECIALS, initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(corpus, trainer)
    return tok


def _tokenizer_dir(folder: Path, backend: Tokenizer, *, bos: bool, template: str | None, **special: str) -> Path:
    """A Hugging Face tokenizer folder (tokenizer.json + tokenizer_config.json) that transformers also loads."""
    folder.mkdir(parents=True, exist_ok=True)
    tok = Tokenizer.from_str(backend.to_str())
    if bos:  # Llama-like: the post-processor adds BOS
        b = "<|begin_of_text|>"
        tok.post_processor = processors.Sequence(
            [processors.ByteLevel(trim_offsets=False),
             processors.TemplateProcessing(single=f"{b} $A", special_tokens=[(b, tok.token_to_id(b))])]
        )
        special["bos_token"] = b
    else:
        # Untrimmed offsets: with trim_offsets=True transformers' return_assistant_tokens_mask loses a turn that
        # starts with a space (its first character maps to no token), and that mask is our reference here.
        tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.save(str(folder / "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", **special}
    if template is not None:
        config["chat_template"] = template
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    return folder


@pytest.fixture(scope="module")
def chatml_dir(tmp_path_factory: pytest.TempPathFactory, backend: Tokenizer) -> Path:
    # Qwen-like: no BOS, eos <|im_end|>, a pad token.
    return _tokenizer_dir(tmp_path_factory.mktemp("chatml"), backend, bos=False, template=CHATML,
                          eos_token="<|im_end|>", pad_token="<|endoftext|>")


@pytest.fixture(scope="module")
def plain_dir(tmp_path_factory: pytest.TempPathFactory, backend: Tokenizer) -> Path:
    # A base model: BOS from the post-processor, eos <|endoftext|>, no pad, no chat template.
    return _tokenizer_dir(tmp_path_factory.mktemp("plain"), backend, bos=True, template=None,
                          eos_token="<|endoftext|>")


@pytest.fixture(scope="module")
def chatml(chatml_dir: Path):
    return load_tokenizer(chatml_dir)


@pytest.fixture(scope="module")
def plain(plain_dir: Path):
    return load_tokenizer(plain_dir)


def _write(path: Path, lines: list) -> Path:
    """Write a JSONL file: dicts are dumped, str and bytes lines written as they are."""
    path.parent.mkdir(parents=True, exist_ok=True)
    out = b""
    for line in lines:
        if isinstance(line, bytes):
            out += line + b"\n"
        elif isinstance(line, str):
            out += line.encode() + b"\n"
        else:
            out += json.dumps(line, ensure_ascii=False).encode() + b"\n"
    path.write_bytes(out)
    return path


def _counted(tok, e: Example) -> str:
    """The text of the tokens that count in the loss (labels[0] is never predicted)."""
    assert len(e.ids) == len(e.labels)
    assert all(label in (IGNORE, i) for label, i in zip(e.labels, e.ids))
    return tok.decode([label for label in e.labels[1:] if label != IGNORE])


# --- formats ----------------------------------------------------------------------------------------------------


def test_text(tmp_path: Path, plain, chatml) -> None:
    texts = ["hello world", "the model replies <|endoftext|>", "  tabs\tand\nnewlines  "]
    f = _write(tmp_path / "train.jsonl", [{"text": t} for t in texts])
    splits = load_dataset(f, plain)
    assert [e.source for e in splits.train] == ["train.jsonl:1", "train.jsonl:2", "train.jsonl:3"]
    assert splits.valid == [] and splits.test == []
    eos, bos = plain.eos_token_id, plain.bos_token_id
    for e, text in zip(splits.train, texts):
        assert e.labels == e.ids  # all counted
        assert e.ids[0] == bos and e.ids[-1] == eos and e.ids[-2] != eos  # EOS appended once, never doubled
        assert e.ids == plain.encode(text) + ([] if text.endswith("<|endoftext|>") else [eos])
    e = load_dataset(f, chatml).train[0]  # no BOS
    assert e.ids == chatml.encode("hello world") + [chatml.eos_token_id]
    r = splits.report
    assert (r.records, r.examples, r.truncated, r.skipped) == (3, 3, 0, 0)
    assert r.tokens == sum(len(e) for e in splits.train) and r.trained_tokens == r.tokens - 3
    assert "train.jsonl: 3 records" in r.summary()


def test_prompt_completion_without_template(tmp_path: Path, plain) -> None:
    rows = [{"prompt": "what is the answer?", "completion": " 42"}, {"prompt": "", "completion": "hello world"}]
    splits = load_dataset(_write(tmp_path / "pc.jsonl", rows), plain)
    for e, row in zip(splits.train, rows):
        prompt = plain.encode(row["prompt"])
        completion = plain.encode(row["completion"], add_special_tokens=False) + [plain.eos_token_id]
        assert e.ids == prompt + completion
        assert e.labels == [IGNORE] * len(prompt) + completion
        assert _counted(plain, e) == row["completion"] + "<|endoftext|>"


def test_prompt_completion_with_template(tmp_path: Path, chatml, chatml_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(chatml_dir)
    row = {"prompt": "what is the answer?", "completion": "It is 42."}
    e = load_dataset(_write(tmp_path / "pc.jsonl", [row]), chatml).train[0]
    chat = [{"role": "user", "content": row["prompt"]}, {"role": "assistant", "content": row["completion"]}]
    assert e.ids == hf.apply_chat_template(chat, tokenize=True, return_dict=False)
    assert _counted(chatml, e) == "It is 42.<|im_end|>\n"


def test_chat_matches_transformers(tmp_path: Path, chatml, chatml_dir: Path) -> None:
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(chatml_dir)
    f = _write(tmp_path / "chat.jsonl", [{"messages": c} for c in CHATS])
    masked = load_dataset(f, chatml).train
    unmasked = load_dataset(f, chatml, mask_prompt=False).train
    for e, full, chat in zip(masked, unmasked, CHATS):
        ref = hf.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert e.ids == full.ids == ref["input_ids"]
        assert [label != IGNORE for label in e.labels] == [bool(m) for m in ref["assistant_masks"]]
        assert _counted(chatml, e) == "".join(m["content"] + "<|im_end|>\n" for m in chat if m["role"] == "assistant")
        assert full.labels == full.ids  # mask_prompt=False counts everything


def test_sharegpt_reads_as_chat(tmp_path: Path, chatml, chatml_dir: Path) -> None:
    """ShareGPT's {"conversations": [{"from", "value"}]} gives the ids and loss labels of the same chat as
    {"messages"}, checked against transformers' own rendering and assistant mask."""
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(chatml_dir)
    speaker = {"user": "human", "assistant": "gpt", "system": "system"}
    f = _write(tmp_path / "sharegpt.jsonl",
               [{"conversations": [{"from": speaker[m["role"]], "value": m["content"]} for m in c]} for c in CHATS])
    splits = load_dataset(f, chatml)
    assert splits.report.files[0].format == "sharegpt"
    for e, chat in zip(splits.train, CHATS):
        ref = hf.apply_chat_template(chat, tokenize=True, return_dict=True, return_assistant_tokens_mask=True)
        assert e.ids == ref["input_ids"]
        assert [label != IGNORE for label in e.labels] == [bool(m) for m in ref["assistant_masks"]]


def test_no_mask_prompt_counts_all(tmp_path: Path, plain) -> None:
    f = _write(tmp_path / "pc.jsonl", [{"prompt": "what is", "completion": " the answer"}])
    e = load_dataset(f, plain, mask_prompt=False).train[0]
    assert e.labels == e.ids and e.n_trained == len(e) - 1


def test_tools_and_tool_calls_accepted(tmp_path: Path, chatml) -> None:
    chat = [{"role": "user", "content": "add"}, {"role": "assistant", "content": "ok", "tool_calls": [{"id": 1}]}]
    f = _write(tmp_path / "chat.jsonl", [{"messages": chat, "tools": [{"name": "add"}], "id": 7}])
    assert _counted(chatml, load_dataset(f, chatml).train[0]) == "ok<|im_end|>\n"


# --- truncation and splits --------------------------------------------------------------------------------------


def test_truncation(tmp_path: Path, plain) -> None:
    long = "the model replies to the user " * 20
    f = _write(tmp_path / "t.jsonl", [{"text": long}, {"text": "hello"}])
    splits = load_dataset(f, plain, max_seq_len=16)
    a, b = splits.train
    assert a.ids == (plain.encode(long) + [plain.eos_token_id])[:16] and a.labels == a.ids
    assert len(b) < 16
    assert splits.report.truncated == 1 and splits.report.tokens == 16 + len(b)
    assert "1 truncated" in splits.report.summary()


def test_truncation_leaving_nothing_to_learn(tmp_path: Path, plain) -> None:
    rows = [{"prompt": "what is the answer " * 10, "completion": " 42"}, {"prompt": "hi", "completion": " 42"}]
    f = _write(tmp_path / "pc.jsonl", rows)
    with pytest.raises(UserError, match=r"pc\.jsonl:1: no token left to learn from after truncation"):
        load_dataset(f, plain, max_seq_len=8)
    with pytest.warns(UserWarning, match=r"skipped 1 of 2"):
        splits = load_dataset(f, plain, max_seq_len=8, on_error="skip")
    assert [e.source for e in splits.train] == ["pc.jsonl:2"]


def test_folder_splits(tmp_path: Path, plain) -> None:
    for name, n in (("train", 3), ("valid", 2), ("test", 1)):
        _write(tmp_path / f"{name}.jsonl", [{"text": f"{name} {i}"} for i in range(n)])
    splits = load_dataset(tmp_path, plain)
    assert [len(splits.train), len(splits.valid), len(splits.test)] == [3, 2, 1]
    assert splits.valid[1].source == "valid.jsonl:2" and splits.test[0].source == "test.jsonl:1"
    assert len(splits.report.files) == 3 and splits.report.records == 6
    assert splits.pad_token_id == plain.eos_token_id  # no pad token: eos
    (tmp_path / "valid.jsonl").unlink()
    assert splits.test and load_dataset(tmp_path, plain).valid == []
    assert len(load_dataset(tmp_path, plain, valid_fraction=0.34).valid) == 1  # no valid.jsonl: train is split


def test_single_file_split_by_fraction(tmp_path: Path, plain) -> None:
    f = _write(tmp_path / "all.jsonl", [{"text": f"hello {i}"} for i in range(20)])
    a = load_dataset(f, plain, valid_fraction=0.25, seed=1)
    b = load_dataset(f, plain, valid_fraction=0.25, seed=1)
    c = load_dataset(f, plain, valid_fraction=0.25, seed=2)
    assert len(a.train) == 15 and len(a.valid) == 5 and a.test == []
    src = lambda xs: [e.source for e in xs]  # noqa: E731
    assert src(a.valid) == src(b.valid) and src(a.train) == src(b.train)  # deterministic
    assert src(a.valid) != src(c.valid)  # depends on the seed
    assert sorted(src(a.train) + src(a.valid)) == sorted(f"all.jsonl:{i}" for i in range(1, 21))
    assert src(a.valid) == sorted(src(a.valid), key=lambda s: int(s.split(":")[1]))  # file order kept
    assert load_dataset(f, plain).valid == []
    with pytest.raises(UserError, match=r"one\.jsonl: 1 record.*cannot be split"):
        load_dataset(_write(tmp_path / "one.jsonl", [{"text": "hi"}]), plain, valid_fraction=0.5)


# --- packing ----------------------------------------------------------------------------------------------------


def test_pack(tmp_path: Path, plain) -> None:
    texts = ["hello", "the model replies to the user", "what is the answer", "data", "hello world", "42"]
    examples = load_dataset(_write(tmp_path / "t.jsonl", [{"text": t} for t in texts]), plain).train
    lengths = [len(e) for e in examples]
    max_len = max(lengths) + 4
    packed = pack(examples, max_len)
    assert len(packed) < len(examples)
    assert all(len(p) <= max_len for p in packed)
    assert [i for p in packed for i in p.ids] == [i for e in examples for i in e.ids]  # order and content kept
    assert sum(p.n_trained for p in packed) == sum(e.n_trained for e in examples)  # same tokens trained
    k = 0
    for p in packed:
        pieces = p.source.split("+")
        pos = 0
        for j, source in enumerate(pieces):
            e = examples[k]
            assert source == e.source
            # the first label of every later piece is masked: nothing is predicted across a boundary
            want = e.labels if j == 0 else [IGNORE] + e.labels[1:]
            assert p.labels[pos : pos + len(e)] == want
            pos, k = pos + len(e), k + 1
        assert pos == len(p)
    # greedy: the next example would not have fitted
    for p, nxt in zip(packed, packed[1:]):
        first_next = next(e for e in examples if e.source == nxt.source.split("+")[0])
        assert len(p) + len(first_next) > max_len
    with pytest.raises(ValueError, match="exceed max_seq_len"):
        pack(examples, 2)


# --- batching ---------------------------------------------------------------------------------------------------


def _toy(n: int) -> list[Example]:
    # example i: ids 100+i, 101+i, ... (1 to 4 tokens), all but the first counted
    ids = [list(range(100 + i, 101 + i + i % 4)) for i in range(n)]
    return [Example(x, [IGNORE] + x[1:], f"x:{i}") for i, x in enumerate(ids)]


def test_batches_pad_right() -> None:
    examples = _toy(10)
    seen = []
    order = epoch_order(10, seed=3, epoch=0)
    for b, (ids, labels) in enumerate(batches(examples, 4, seed=3, epoch=0, pad_token_id=7)):
        assert ids.dtype == labels.dtype == torch.long and ids.shape == labels.shape
        chunk = [examples[i] for i in order[4 * b : 4 * b + 4]]
        assert ids.shape == (len(chunk), max(len(e) for e in chunk))
        for row, e in enumerate(chunk):
            n = len(e)
            assert ids[row, :n].tolist() == e.ids and labels[row, :n].tolist() == e.labels
            assert (ids[row, n:] == 7).all() and (labels[row, n:] == IGNORE).all()
            seen.append(e.source)
    assert sorted(seen) == sorted(e.source for e in examples)  # each example once per epoch
    assert num_batches(10, 4) == 3 and num_batches(10, 4, drop_last=True) == 2
    assert [x.shape[0] for x, _ in batches(examples, 4, drop_last=True)] == [4, 4]


def test_batches_shuffle_and_resume() -> None:
    examples = _toy(23)

    def firsts(seed: int, epoch: int, start: int = 0) -> list[list[int]]:
        return [ids[:, 0].tolist() for ids, _ in batches(examples, 5, seed, epoch, start)]

    assert firsts(0, 0) == firsts(0, 0)  # deterministic
    assert firsts(0, 0) != firsts(1, 0) and firsts(0, 0) != firsts(0, 1)  # by seed and by epoch
    assert firsts(0, 2, start=3) == firsts(0, 2)[3:]  # resume at a batch index
    assert list(batches(examples, 5, start=5)) == []
    assert epoch_order(23, 0, 0) == epoch_order(23, 0, 0) != list(range(23))
    assert sorted(epoch_order(23, 5, 9)) == list(range(23))
    with pytest.raises(UserError, match="batch_size"):
        next(batches(examples, 0))


# --- bad input --------------------------------------------------------------------------------------------------

TEXT = {"text": "hello world"}
PC = {"prompt": "what is", "completion": " the answer"}
CHAT = {"messages": CHATS[0]}
SHAREGPT = {"conversations": [{"from": "human", "value": "Hello there"}, {"from": "gpt", "value": "General Kenobi."}]}

BAD_LINES = [
    (TEXT, b'{"text": "unterminated', "not valid JSON"),
    (TEXT, b'{"text": "caf\xe9"}', "not valid UTF-8 .*0xe9"),
    (TEXT, b'["text", "hello"]', "expected a JSON object, got a list"),
    (TEXT, b'"just a string"', "expected a JSON object, got a string"),
    (TEXT, b'{"content": "hello"}', "no known keys"),
    (TEXT, b'{"text": "a", "prompt": "b", "completion": "c"}', "keys of mixed formats"),
    (TEXT, b'{"text": 3}', '"text" must be a string, got a number'),
    (TEXT, b'{"text": ""}', '"text" is empty'),
    (PC, b'{"prompt": "hi"}', '"prompt" without "completion"'),
    (PC, b'{"prompt": "hi", "completion": ""}', '"completion" is empty'),
    (PC, b'{"prompt": ["hi"], "completion": "x"}', '"prompt" must be a string'),
    (CHAT, b'{"messages": "hello"}', '"messages" must be a non-empty list'),
    (CHAT, b'{"messages": []}', '"messages" must be a non-empty list'),
    (CHAT, b'{"messages": [{"content": "hi"}]}', r'messages\[0\] needs a string "role"'),
    (CHAT, b'{"messages": [{"role": "user", "content": 5}]}', r'messages\[0\] needs a string "content"'),
    (CHAT, b'{"messages": [["user", "hi"]]}', r"messages\[0\] must be an object"),
    (CHAT, b'{"messages": [{"role": "user", "content": "hi"}]}', 'no "assistant" message'),
    (SHAREGPT, b'{"conversations": [{"from": "bot", "value": "hi"}]}',
     r'conversations\[0\] has "from": \'bot\', not a known role; use one of human, user, gpt'),
    (SHAREGPT, b'{"conversations": [{"from": "human", "value": 3}, {"from": "gpt", "value": "x"}]}',
     r'conversations\[0\] needs a string "value"'),
    (SHAREGPT, b'{"conversations": [{"from": "human", "value": "hi"}]}', 'no "gpt" turn'),
    (SHAREGPT, b'{"conversations": []}', '"conversations" must be a non-empty list'),
]


@pytest.mark.parametrize("good, bad, message", BAD_LINES, ids=[m for _, _, m in BAD_LINES])
def test_bad_line(tmp_path: Path, chatml, good: dict, bad: bytes, message: str) -> None:
    f = _write(tmp_path / "train.jsonl", [good, "", bad, good])  # a blank line 2; the bad one is line 3
    with pytest.raises(UserError, match=rf"train\.jsonl:3: {message}") as e:
        load_dataset(tmp_path, chatml)
    assert "\n" not in str(e.value)
    with pytest.warns(UserWarning, match=r"train\.jsonl: skipped 1 of 3 records: .*train\.jsonl:3"):
        splits = load_dataset(f, chatml, on_error="skip")
    assert [e.source for e in splits.train] == ["train.jsonl:1", "train.jsonl:4"]
    assert splits.report.skipped == 1 and splits.report.records == 3 and len(splits.report.files[0].errors) == 1


def test_template_rejection_is_a_line_error(tmp_path: Path, backend: Tokenizer) -> None:
    loop = "{% for m in messages %}"
    strict = CHATML.replace(loop, loop + "{% if m.role == 'tool' %}{{ raise_exception('no tools') }}{% endif %}")
    folder = _tokenizer_dir(tmp_path / "tok", backend, bos=False, template=strict, eos_token="<|im_end|>")
    tok = load_tokenizer(folder)
    bad = {"messages": [{"role": "tool", "content": "x"}, {"role": "assistant", "content": "y"}]}
    f = _write(tmp_path / "d.jsonl", [CHAT, bad])
    with pytest.raises(UserError, match=r"d\.jsonl:2: .*rejected the conversation: no tools"):
        load_dataset(f, tok)
    with pytest.warns(UserWarning):
        assert len(load_dataset(f, tok, on_error="skip").train) == 1


def test_mixed_formats_across_lines(tmp_path: Path, chatml) -> None:
    f = _write(tmp_path / "train.jsonl", [TEXT, TEXT, PC])
    for on_error in ("stop", "skip"):  # a file-level problem: never skipped
        want = r'train\.jsonl:3: a \{"prompt","completion"\} record in a file of \{"text"\} records \(line 1\)'
        with pytest.raises(UserError, match=want):
            load_dataset(f, chatml, on_error=on_error)


def test_chat_without_template(tmp_path: Path, plain, plain_dir: Path) -> None:
    f = _write(tmp_path / "train.jsonl", [CHAT, CHAT])
    for on_error in ("stop", "skip"):
        with pytest.raises(UserError, match=r"train\.jsonl:1: .*chat template.*tokenizer_config\.json") as e:
            load_dataset(f, plain, on_error=on_error)
        assert str(plain_dir) in str(e.value) and "prompt" in str(e.value)


def test_missing_and_empty(tmp_path: Path, chatml) -> None:
    with pytest.raises(UserError, match=r"nowhere.*no such file or folder"):
        load_dataset(tmp_path / "nowhere", chatml)
    (tmp_path / "d").mkdir()
    with pytest.raises(UserError, match=r"d: no train\.jsonl"):
        load_dataset(tmp_path / "d", chatml)
    (tmp_path / "d" / "train.jsonl").write_bytes(b"")
    with pytest.raises(UserError, match=r"train\.jsonl: no records"):
        load_dataset(tmp_path / "d", chatml)
    _write(tmp_path / "d" / "train.jsonl", [TEXT])
    _write(tmp_path / "d" / "valid.jsonl", ["", "  "])  # blank lines only
    with pytest.raises(UserError, match=r"valid\.jsonl: no records"):
        load_dataset(tmp_path / "d", chatml)
    _write(tmp_path / "d" / "valid.jsonl", [TEXT])
    with pytest.raises(UserError, match="valid.jsonl and valid_fraction"):
        load_dataset(tmp_path / "d", chatml, valid_fraction=0.1)
    f = _write(tmp_path / "bad.jsonl", ["nope", "{}"])
    with pytest.warns(UserWarning), pytest.raises(UserError, match=r"bad\.jsonl: all 2 records are bad"):
        load_dataset(f, chatml, on_error="skip")


def test_bom_and_options(tmp_path: Path, chatml) -> None:
    f = tmp_path / "bom.jsonl"
    f.write_bytes(b"\xef\xbb\xbf" + json.dumps(TEXT).encode() + b"\r\n" + json.dumps(TEXT).encode() + b"\r\n")
    assert len(load_dataset(f, chatml).train) == 2
    for kwargs, what in (({"on_error": "ignore"}, "on_error"), ({"max_seq_len": 0}, "max_seq_len"),
                         ({"valid_fraction": 1.0}, "valid_fraction")):
        with pytest.raises(UserError, match=what):
            load_dataset(f, chatml, **kwargs)
