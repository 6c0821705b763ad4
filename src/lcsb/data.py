"""JSONL data to token ids and loss labels; packing and batching.

Design note. A data folder holds train.jsonl and optionally valid.jsonl / test.jsonl; a single .jsonl
file is split into train/valid by `valid_fraction`. One record per line, in MLX-LM's formats, one format
per file:

  {"text": ...}                     every token counted. Encoded with the tokenizer's special tokens (BOS
                                    when its post-processor adds one); EOS appended unless already last.
  {"prompt": ..., "completion": ...}
                                    with a chat template (as MLX-LM does): rendered as the chat
                                    [user: prompt, assistant: completion], so the counted tokens are the
                                    completion and the template's end of turn. Without a chat template:
                                    encode(prompt) + encode(completion, no special tokens) + [EOS], the
                                    completion and EOS counted.
  {"messages": [{"role", "content"}, ...]}  (optional "tools")
                                    rendered with the model's own chat template; the tokens of assistant
                                    turns (content + end of turn) counted (`Tokenizer.render_chat_with_mask`).
  {"conversations": [{"from", "value"}, ...]}
                                    ShareGPT's chat records, read as {"messages"}: from human/user -> user,
                                    gpt/assistant -> assistant, system, tool/observation -> tool; any other
                                    "from" is refused with the line and the role named.

With mask_prompt=False every token is counted. Labels are aligned with ids (the transformers convention:
labels[t] == ids[t] or -100, and the engine shifts, so position t-1 predicts labels[t]); labels[0] is
never predicted. Records longer than max_seq_len keep their first max_seq_len tokens.

Every problem is reported as one line naming the file and line. With on_error="stop" the first bad line
raises `UserError` before any training; with on_error="skip" bad lines are dropped, counted in the report
and summarised in a warning. Some problems concern the whole file and always stop: a missing or empty
file, chat records with a tokenizer that has no chat template, and a file mixing formats.
"""

from __future__ import annotations

import json
import math
import random
import warnings
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from .errors import UserError

IGNORE = -100                                   # label of a token that is not counted in the loss
SPLITS = ("train", "valid", "test")
FORMATS = {"text": '{"text"}', "completions": '{"prompt","completion"}', "chat": '{"messages"}',
           "sharegpt": '{"conversations"}'}
_FORMAT_HINT = ('one JSON object per line: {"text": ...}, {"prompt": ..., "completion": ...}, {"messages": [...]} '
                'or {"conversations": [...]}')
# ShareGPT's speakers as chat roles
SHAREGPT_ROLES = {"human": "user", "user": "user", "gpt": "assistant", "assistant": "assistant", "system": "system",
                  "tool": "tool", "observation": "tool"}
_MAX_LISTED = 5                                 # skipped lines quoted in the warning


@dataclass
class Example:
    """One training sequence: token ids, labels aligned with them (-100 = not counted), and where it came from."""

    ids: list[int]
    labels: list[int]
    source: str                                 # "train.jsonl:12" (packed: "train.jsonl:12+train.jsonl:13")

    def __len__(self) -> int:
        return len(self.ids)

    @property
    def n_trained(self) -> int:
        """Tokens that count in the loss: labels[1:] not -100 (labels[0] has no position to predict it)."""
        return sum(label != IGNORE for label in self.labels[1:])


@dataclass
class FileReport:
    """What reading one JSONL file gave."""

    file: str
    format: str | None = None                   # "text" | "completions" | "chat"
    records: int = 0                            # non-blank lines read
    examples: int = 0                           # records kept
    truncated: int = 0                          # kept records cut to max_seq_len
    skipped: int = 0                            # bad lines dropped (on_error="skip")
    tokens: int = 0                             # tokens of the kept records, after truncation
    trained_tokens: int = 0                     # of which counted in the loss
    errors: list[str] = field(default_factory=list)  # the one-line message of each skipped line


@dataclass
class DataReport:
    """Counts over all files read."""

    files: list[FileReport] = field(default_factory=list)

    def _sum(self, name: str) -> int:
        return sum(getattr(f, name) for f in self.files)

    records = property(lambda self: self._sum("records"))
    examples = property(lambda self: self._sum("examples"))
    truncated = property(lambda self: self._sum("truncated"))
    skipped = property(lambda self: self._sum("skipped"))
    tokens = property(lambda self: self._sum("tokens"))
    trained_tokens = property(lambda self: self._sum("trained_tokens"))

    def summary(self) -> str:
        lines = []
        for f in self.files:
            line = (f"{f.file}: {f.records} records ({FORMATS.get(f.format or '', '?')}), {f.tokens} tokens, "
                    f"{f.trained_tokens} trained")
            if f.truncated:
                line += f", {f.truncated} truncated"
            if f.skipped:
                line += f", {f.skipped} skipped"
            lines.append(line)
        return "\n".join(lines)


@dataclass
class DataSplits:
    train: list[Example]
    valid: list[Example]
    test: list[Example]
    report: DataReport
    pad_token_id: int = 0                       # the tokenizer's pad id (its eos when it has no pad)


class _LineError(Exception):
    """A bad line: fatal or skipped according to on_error."""


# --- loading ----------------------------------------------------------------------------------------------------


def load_dataset(
    path: str | Path,
    tokenizer: Any,
    max_seq_len: int = 2048,
    mask_prompt: bool = True,
    valid_fraction: float = 0.0,
    seed: int = 0,
    on_error: str = "stop",
) -> DataSplits:
    """Read, validate and tokenize a data folder or a single .jsonl file.

    Args:
        path: a folder with train.jsonl (and optional valid.jsonl, test.jsonl), or one .jsonl file.
        tokenizer: an `lcsb.model.tokenizer.Tokenizer`.
        max_seq_len: records longer than this keep their first max_seq_len tokens (counted in the report).
        mask_prompt: count only completions / assistant turns in the loss; False counts every token.
        valid_fraction: share of records held out as the valid split, for a single file or a folder
            without valid.jsonl (shuffled by `seed` first; each split keeps file order).
        seed: seed of that shuffle.
        on_error: "stop" raises UserError at the first bad line; "skip" drops bad lines with a warning.
    """
    if on_error not in ("stop", "skip"):
        raise UserError(f'on_error must be "stop" or "skip", got {on_error!r}')
    if isinstance(max_seq_len, bool) or not isinstance(max_seq_len, int) or max_seq_len < 2:
        raise UserError(f"max_seq_len must be an integer >= 2, got {max_seq_len!r}")
    if isinstance(valid_fraction, bool) or not isinstance(valid_fraction, (int, float)) or not 0 <= valid_fraction < 1:
        raise UserError(f"valid_fraction must be in [0, 1), got {valid_fraction!r}")

    root = Path(path)
    if root.is_dir():
        files = {name: root / f"{name}.jsonl" for name in SPLITS}
        if not files["train"].is_file():
            raise UserError(f"{root}: no train.jsonl in this folder; a data folder holds train.jsonl and "
                            "optionally valid.jsonl and test.jsonl")
        files = {name: f for name, f in files.items() if f.is_file()}
        if "valid" in files and valid_fraction > 0:
            raise UserError(f"{root} has valid.jsonl and valid_fraction is {valid_fraction}: drop one of the two")
    elif root.is_file():
        files = {"train": root}
    else:
        raise UserError(f"{root}: no such file or folder; give a folder with train.jsonl or a single .jsonl file")

    reader = _Reader(tokenizer, max_seq_len, mask_prompt, on_error)
    report = DataReport()
    splits: dict[str, list[Example]] = {name: [] for name in SPLITS}
    for name, file in files.items():
        examples, file_report = reader.read(file)
        splits[name] = examples
        report.files.append(file_report)
    if valid_fraction > 0:
        splits["train"], splits["valid"] = _split(splits["train"], valid_fraction, seed, files["train"])
    pad = tokenizer.pad_token_id
    return DataSplits(**splits, report=report, pad_token_id=0 if pad is None else pad)


def _split(examples: list[Example], fraction: float, seed: int, file: Path) -> tuple[list[Example], list[Example]]:
    """Hold out round(n * fraction) examples (at least 1) chosen by a seeded shuffle; both keep file order."""
    n = len(examples)
    n_valid = max(1, round(n * fraction))
    if n_valid >= n:
        raise UserError(f"{file}: {n} record(s) cannot be split with valid_fraction {fraction}: "
                        "no training records would remain; add records or lower valid_fraction")
    order = list(range(n))
    random.Random(seed).shuffle(order)          # an int seed: the same order in every process and run
    held = set(order[:n_valid])
    return ([e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held])


class _Reader:
    def __init__(self, tokenizer: Any, max_seq_len: int, mask_prompt: bool, on_error: str) -> None:
        self.tok = tokenizer
        self.max_seq_len = max_seq_len
        self.mask_prompt = mask_prompt
        self.on_error = on_error

    def read(self, file: Path) -> tuple[list[Example], FileReport]:
        report = FileReport(file=str(file))
        examples: list[Example] = []
        first: tuple[str, int] | None = None    # (format, line) of the first good record
        with open(file, "rb") as fh:
            for lineno, raw in enumerate(fh, 1):
                where = f"{file}:{lineno}"
                if not raw.strip():             # a blank line is no record
                    continue
                report.records += 1
                try:
                    record = _parse(raw, lineno, where)
                    fmt = _check_shape(record, where)
                    if first is None:
                        first = (fmt, lineno)
                        report.format = fmt
                        self._check_tokenizer(fmt, where)
                    elif fmt != first[0]:       # a file-level problem: never skipped
                        raise UserError(f"{where}: a {FORMATS[fmt]} record in a file of {FORMATS[first[0]]} records "
                                        f"(line {first[1]}); use one format per file, as MLX-LM requires")
                    ids, labels = self._tokenize(fmt, record, where)
                    if len(ids) > self.max_seq_len:
                        ids, labels = ids[: self.max_seq_len], labels[: self.max_seq_len]
                        truncated = True
                    else:
                        truncated = False
                    example = Example(ids, labels, f"{file.name}:{lineno}")
                    if example.n_trained == 0:
                        cut = f" after truncation to max_seq_len {self.max_seq_len}" if truncated else ""
                        raise _LineError(f"{where}: no token left to learn from{cut} (all masked out of the loss); "
                                         "check the record or raise max_seq_len")
                except _LineError as e:
                    if self.on_error == "stop":
                        raise UserError(f"{e} (or skip bad lines: --skip-bad-lines, on_error='skip' in the API)") from None
                    report.skipped += 1
                    report.errors.append(str(e))
                    continue
                examples.append(example)
                report.examples += 1
                report.truncated += truncated
                report.tokens += len(ids)
                report.trained_tokens += example.n_trained
        if report.skipped:
            listed = " | ".join(report.errors[:_MAX_LISTED]) + (" | ..." if report.skipped > _MAX_LISTED else "")
            warnings.warn(f"{file}: skipped {report.skipped} of {report.records} records: {listed}", stacklevel=3)
        if not examples:
            if report.records == 0:
                raise UserError(f"{file}: no records (the file is empty); {_FORMAT_HINT}")
            raise UserError(f"{file}: all {report.records} records are bad (first: {report.errors[0]})")
        return examples, report

    def _check_tokenizer(self, fmt: str, where: str) -> None:
        """Once per file, at its first record: chat records need the model's chat template."""
        if fmt in ("chat", "sharegpt") and not self.tok.has_chat_template:
            source = getattr(self.tok, "source", "tokenizer_config.json")
            raise UserError(f'{where}: {FORMATS[fmt]} records need a chat template, but {source} has none; '
                            'add a "chat_template" to it (or a chat_template.jinja beside it), or use '
                            '{"text"} or {"prompt","completion"} records')

    def _tokenize(self, fmt: str, record: dict, where: str) -> tuple[list[int], list[int]]:
        tok = self.tok
        eos = tok.eos_token_id
        if fmt == "text":
            ids = tok.encode(record["text"], add_special_tokens=True)
            if eos is not None and (not ids or ids[-1] != eos):
                ids.append(eos)                 # as MLX-LM: the model learns to stop
            return ids, list(ids)
        tools = record.get("tools")
        if fmt == "completions" and not tok.has_chat_template:
            if tools is not None:
                raise _LineError(f'{where}: "tools" needs a chat template and the model has none; drop the field')
            prompt = tok.encode(record["prompt"], add_special_tokens=True)
            completion = tok.encode(record["completion"], add_special_tokens=False) + ([] if eos is None else [eos])
            ids = prompt + completion
            labels = [IGNORE] * len(prompt) + completion if self.mask_prompt else list(ids)
            return ids, labels
        if fmt == "completions":
            messages = [{"role": "user", "content": record["prompt"]},
                        {"role": "assistant", "content": record["completion"]}]
        elif fmt == "sharegpt":
            messages = [{"role": SHAREGPT_ROLES[m["from"]], "content": m["value"]} for m in record["conversations"]]
        else:
            messages = record["messages"]
        kwargs = {} if tools is None else {"tools": tools}
        try:
            ids, mask = tok.render_chat_with_mask(messages, **kwargs)
        except UserError as e:                  # e.g. the template's raise_exception("roles must alternate")
            raise _LineError(f"{where}: {e}") from None
        labels = [t if m else IGNORE for t, m in zip(ids, mask)] if self.mask_prompt else list(ids)
        return ids, labels


def _parse(raw: bytes, lineno: int, where: str) -> dict:
    """The JSON object of one line."""
    if lineno == 1 and raw.startswith(b"\xef\xbb\xbf"):    # a UTF-8 byte order mark
        raw = raw[3:]
    try:
        line = raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise _LineError(f"{where}: not valid UTF-8 (byte 0x{raw[e.start]:02x} at column {e.start + 1}); "
                         "save the file as UTF-8") from None
    try:
        record = json.loads(line)
    except json.JSONDecodeError as e:
        raise _LineError(f"{where}: not valid JSON ({e.msg} at column {e.colno}); {_FORMAT_HINT}") from None
    if not isinstance(record, dict):
        raise _LineError(f"{where}: expected a JSON object, got {_json_type(record)}; {_FORMAT_HINT}")
    return record


def _check_shape(record: dict, where: str) -> str:
    """The record's format, after checking its keys and value types."""
    present = [fmt for fmt, keys in (("text", ("text",)), ("completions", ("prompt", "completion")),
                                     ("chat", ("messages",)), ("sharegpt", ("conversations",)))
               if any(k in record for k in keys)]
    if not present:
        found = ", ".join(sorted(record)[:5]) or "none"
        raise _LineError(f"{where}: no known keys (found: {found}); {_FORMAT_HINT}")
    if len(present) > 1:
        raise _LineError(f"{where}: keys of mixed formats ({' and '.join(FORMATS[f] for f in present)}); "
                         "a record has one format")
    fmt = present[0]
    if fmt == "text":
        _check_text(record, "text", where)
    elif fmt == "completions":
        for key in ("prompt", "completion"):
            if key not in record:
                other = "completion" if key == "prompt" else "prompt"
                raise _LineError(f'{where}: "{other}" without "{key}"; a record needs both')
        if not isinstance(record["prompt"], str):
            raise _LineError(f'{where}: "prompt" must be a string, got {_json_type(record["prompt"])}')
        _check_text(record, "completion", where)
    elif fmt == "chat":
        _check_messages(record["messages"], where)
    else:
        _check_conversations(record["conversations"], where)
    if fmt != "text" and "tools" in record and not isinstance(record["tools"], (list, type(None))):
        raise _LineError(f'{where}: "tools" must be a list, got {_json_type(record["tools"])}')
    return fmt


def _check_text(record: dict, key: str, where: str) -> None:
    value = record[key]
    if not isinstance(value, str):
        raise _LineError(f'{where}: "{key}" must be a string, got {_json_type(value)}')
    if not value.strip():
        raise _LineError(f'{where}: "{key}" is empty; remove the record or fill it in')


def _check_messages(messages: Any, where: str) -> None:
    if not isinstance(messages, list) or not messages:
        got = "an empty list" if messages == [] else _json_type(messages)
        raise _LineError(f'{where}: "messages" must be a non-empty list of {{"role", "content"}} objects, got {got}')
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise _LineError(f'{where}: messages[{i}] must be an object {{"role", "content"}}, got {_json_type(m)}')
        if not isinstance(m.get("role"), str):
            raise _LineError(f'{where}: messages[{i}] needs a string "role", got {_json_type(m.get("role"))}')
        content = m.get("content")
        # An assistant turn that only calls tools may have no content.
        if not isinstance(content, str) and not (content is None and m.get("tool_calls")):
            raise _LineError(f'{where}: messages[{i}] needs a string "content", got {_json_type(content)}')
    if not any(m["role"] == "assistant" for m in messages):
        raise _LineError(f'{where}: no "assistant" message: nothing to learn from; add the reply to train on')


def _check_conversations(turns: Any, where: str) -> None:
    if not isinstance(turns, list) or not turns:
        got = "an empty list" if turns == [] else _json_type(turns)
        raise _LineError(f'{where}: "conversations" must be a non-empty list of {{"from", "value"}} objects, got {got}')
    for i, m in enumerate(turns):
        if not isinstance(m, dict):
            raise _LineError(f'{where}: conversations[{i}] must be an object {{"from", "value"}}, got {_json_type(m)}')
        role = m.get("from")
        if role not in SHAREGPT_ROLES:
            shown = repr(role) if isinstance(role, str) else _json_type(role)
            raise _LineError(f'{where}: conversations[{i}] has "from": {shown}, not a known role; use one of '
                             f'{", ".join(SHAREGPT_ROLES)}')
        if not isinstance(m.get("value"), str):
            raise _LineError(f'{where}: conversations[{i}] needs a string "value", got {_json_type(m.get("value"))}')
    if not any(SHAREGPT_ROLES[m["from"]] == "assistant" for m in turns):
        raise _LineError(f'{where}: no "gpt" turn: nothing to learn from; add the reply to train on')


def _json_type(value: Any) -> str:
    if value is None:
        return "null"
    return {bool: "a boolean", int: "a number", float: "a number", str: "a string", list: "a list",
            dict: "an object"}.get(type(value), type(value).__name__)


# --- packing ----------------------------------------------------------------------------------------------------


def pack(examples: Sequence[Example], max_seq_len: int) -> list[Example]:
    """Greedily join consecutive examples into sequences of at most max_seq_len tokens.

    Each piece keeps its labels, except the first label of every piece after the first, which becomes -100:
    after the engine's shift that label is what the last token of the *previous* piece would predict, so no
    token is trained to predict across a document boundary. The counted tokens are exactly those of the
    pieces (a piece's labels[0] was never counted). Attention is not blocked between pieces: a later piece
    sees the earlier ones as context, as in plain concatenation.
    """
    packed: list[Example] = []
    ids: list[int] = []
    labels: list[int] = []
    sources: list[str] = []
    for e in examples:
        if len(e) > max_seq_len:
            raise ValueError(f"{e.source}: {len(e)} tokens exceed max_seq_len {max_seq_len}; truncate before packing")
        if ids and len(ids) + len(e) > max_seq_len:
            packed.append(Example(ids, labels, "+".join(sources)))
            ids, labels, sources = [], [], []
        labels += ([IGNORE] + e.labels[1:]) if ids else e.labels
        ids += e.ids
        sources.append(e.source)
    if ids:
        packed.append(Example(ids, labels, "+".join(sources)))
    return packed


# --- batching ---------------------------------------------------------------------------------------------------


def epoch_order(n_examples: int, seed: int, epoch: int) -> list[int]:
    """The order examples are visited in an epoch: a permutation fixed by (seed, epoch).

    Seeded with a string, which `random` hashes with SHA-512 (not Python's randomised hash), so the order is
    the same in every process and run: a trainer saves (epoch, batch index) and resumes exactly.
    """
    order = list(range(n_examples))
    random.Random(f"lcsb-data:{seed}:{epoch}").shuffle(order)
    return order


def num_batches(n_examples: int, batch_size: int, drop_last: bool = False) -> int:
    return n_examples // batch_size if drop_last else -(-n_examples // batch_size)


def batches(
    examples: Sequence[Example],
    batch_size: int,
    seed: int = 0,
    epoch: int = 0,
    start: int = 0,
    *,
    pad_token_id: int = 0,
    drop_last: bool = False,
) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    """Yield (input_ids, labels), both LongTensor [B, S], in `epoch_order(len(examples), seed, epoch)`,
    starting at batch index `start`.

    Each batch is padded on the right to its longest example with pad_token_id, labels -100. Right padding
    needs no attention mask: the model is causal, so real tokens never attend to the padding after them, and
    padded positions are never counted. With drop_last the final short batch is left out.
    """
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size <= 0:
        raise UserError(f"batch_size must be a positive integer, got {batch_size!r}")
    order = epoch_order(len(examples), seed, epoch)
    for b in range(start, num_batches(len(examples), batch_size, drop_last)):
        yield collate([examples[i] for i in order[b * batch_size : (b + 1) * batch_size]], pad_token_id)


def collate(chunk: Sequence[Example], pad_token_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(input_ids, labels) [B, S] of examples right-padded to the longest (labels -100 on the padding)."""
    width = max(len(e) for e in chunk)
    input_ids = torch.full((len(chunk), width), pad_token_id, dtype=torch.long)
    labels = torch.full((len(chunk), width), IGNORE, dtype=torch.long)
    for row, e in enumerate(chunk):
        input_ids[row, : len(e)] = torch.tensor(e.ids, dtype=torch.long)
        labels[row, : len(e)] = torch.tensor(e.labels, dtype=torch.long)
    return input_ids, labels


class Batches:
    """The training run's micro-batches: this rank's rows of each global micro-batch (batch_size rows per
    rank, `world` ranks) in `epoch_order` of each epoch, endless, resumable from (epoch, batch index in
    global micro-batches). One process is world 1, rank 0: its batches are those of `batches()`. `next()`
    gives (None, None) when this rank's share of an epoch's short last batch is empty."""

    def __init__(self, examples: Sequence[Example], batch_size: int, seed: int, epoch: int = 0, batch: int = 0,
                 pad_token_id: int = 0, world: int = 1, rank: int = 0):
        self.examples, self.bs, self.world, self.rank = examples, batch_size, world, rank
        self.seed, self.pad, self.epoch, self.batch = seed, pad_token_id, epoch, batch
        self.per_epoch = math.ceil(len(examples) / (batch_size * world))
        self._order = None

    def next(self) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        if self.batch >= self.per_epoch:
            self.epoch, self.batch, self._order = self.epoch + 1, 0, None
        if self._order is None:
            self._order = epoch_order(len(self.examples), self.seed, self.epoch)
        lo = self.batch * self.bs * self.world
        rows = self._order[lo: lo + self.bs * self.world][self.rank * self.bs: (self.rank + 1) * self.bs]
        self.batch += 1
        if not rows:
            return None, None
        return collate([self.examples[i] for i in rows], self.pad)
