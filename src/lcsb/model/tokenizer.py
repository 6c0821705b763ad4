"""Tokenizer and chat template of a Hugging Face checkpoint folder or a GGUF file, without transformers.

`load_tokenizer(dir)` reads `tokenizer.json` with the `tokenizers` library, and the special tokens and chat
template from `tokenizer_config.json` / `chat_template.jinja`; `load_tokenizer(file.gguf)` builds the same
from the file's vocabulary metadata (gguf_vocab.py). Encoding and chat rendering follow what
transformers 5.x `AutoTokenizer.from_pretrained(dir)` does for a `PreTrainedTokenizerFast`, so token ids are
the same as with transformers.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from datetime import datetime
from functools import cached_property
from pathlib import Path
from typing import Any

import jinja2
import jinja2.ext
import jinja2.nodes
import jinja2.utils
import tokenizers
from jinja2.sandbox import ImmutableSandboxedEnvironment

from lcsb.errors import UserError

from . import gguf
from .gguf_vocab import vocab_from_gguf

Message = dict[str, Any]

# Named special tokens that transformers passes to the chat template (its SPECIAL_TOKENS_ATTRIBUTES).
_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "sep_token", "pad_token", "cls_token", "mask_token")
# Older names for a message's reasoning; transformers copies it under `thinking` and `reasoning_content`.
_REASONING_FIELDS = ("reasoning_content", "thinking", "reasoning")
_NO_TEMPLATE_HINT = 'use {"text"} or {"prompt","completion"} records instead of chat messages'


class Tokenizer:
    """A `tokenizers.Tokenizer` plus the special tokens, chat template and stop ids of a checkpoint."""

    def __init__(
        self,
        backend: tokenizers.Tokenizer,
        *,
        special_tokens: dict[str, str] | None = None,
        chat_template: str | None = None,
        chat_templates: dict[str, str] | None = None,
        config_eos_token_ids: Sequence[int] = (),
        clean_up_tokenization_spaces: bool = False,
        source: str = "tokenizer_config.json",
    ) -> None:
        """`special_tokens` maps names (bos_token, eos_token, ... and model-specific *_token) to token strings;
        `chat_templates` holds named templates ("default", "tool_use"); `source` names the file the template and
        special tokens came from, for error messages."""
        self.backend = backend
        # transformers encodes without the truncation/padding that tokenizer.json may carry.
        self.backend.no_truncation()
        self.backend.no_padding()
        self.special_tokens = dict(special_tokens or {})
        self.chat_templates = dict(chat_templates or {})
        if chat_template is not None:
            self.chat_templates["default"] = chat_template
        self.clean_up_tokenization_spaces = clean_up_tokenization_spaces
        self.source = source
        self._compiled: dict[str, jinja2.Template] = {}
        ids = [self.eos_token_id, *config_eos_token_ids]
        self.eos_token_ids: list[int] = list(dict.fromkeys(i for i in ids if i is not None))

    # --- special tokens -------------------------------------------------------------------------------------

    def _token_id(self, name: str) -> int | None:
        token = self.special_tokens.get(name)
        return None if token is None else self.backend.token_to_id(token)

    @property
    def bos_token(self) -> str | None:
        return self.special_tokens.get("bos_token")

    @property
    def eos_token(self) -> str | None:
        return self.special_tokens.get("eos_token")

    @property
    def bos_token_id(self) -> int | None:
        return self._token_id("bos_token")

    @property
    def eos_token_id(self) -> int | None:
        return self._token_id("eos_token")

    @property
    def pad_token_id(self) -> int | None:
        """The pad id, or the eos id when the model has no pad token (common for decoder-only checkpoints)."""
        pad = self._token_id("pad_token")
        return pad if pad is not None else self.eos_token_id

    @property
    def vocab_size(self) -> int:
        """Number of token ids, added tokens included (transformers' `len(tokenizer)`)."""
        return self.backend.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    # --- text -----------------------------------------------------------------------------------------------

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        """Token ids of `text`. With `add_special_tokens`, tokenizer.json's post-processor adds BOS/EOS.

        transformers 5 drops `add_bos_token`/`add_eos_token` from tokenizer_config.json when tokenizer.json
        exists and keeps its post-processor as the authority, so we do the same.
        """
        return self.backend.encode(text, add_special_tokens=add_special_tokens).ids

    def decode(self, ids: Sequence[int], skip_special_tokens: bool = False) -> str:
        text = self.backend.decode(list(ids), skip_special_tokens=skip_special_tokens)
        # transformers skips this cleanup for BPE models: it would delete real spaces before punctuation.
        if self.clean_up_tokenization_spaces and type(self.backend.model).__name__ != "BPE":
            text = _clean_up_tokenization(text)
        return text

    # --- chat -----------------------------------------------------------------------------------------------

    @property
    def has_chat_template(self) -> bool:
        return bool(self.chat_templates)

    def _template(self, tools: Any = None) -> jinja2.Template:
        # Like transformers' get_chat_template: a "tool_use" template wins when tools are given.
        if tools is not None and "tool_use" in self.chat_templates:
            name = "tool_use"
        elif "default" in self.chat_templates:
            name = "default"
        elif self.chat_templates:
            names = ", ".join(sorted(self.chat_templates))
            raise UserError(f"{self.source}: the model has chat templates ({names}) but none named 'default'")
        else:
            raise UserError(f"{self.source}: the model has no chat template; {_NO_TEMPLATE_HINT}")
        if name not in self._compiled:
            try:
                self._compiled[name] = _jinja_env().from_string(self.chat_templates[name])
            except jinja2.TemplateError as e:
                raise UserError(f"{self.source}: the chat template does not compile: {e}") from None
        return self._compiled[name]

    def render_chat(self, messages: Sequence[Message], add_generation_prompt: bool = False, **kwargs: Any) -> str:
        """The chat template rendered as transformers renders it (`apply_chat_template(tokenize=False)`)."""
        if not messages:
            raise ValueError("cannot apply a chat template to an empty conversation")
        return self._render(messages, add_generation_prompt, **kwargs)

    def _render(self, messages: Sequence[Message], add_generation_prompt: bool, **kwargs: Any) -> str:
        tools = kwargs.pop("tools", None)
        documents = kwargs.pop("documents", None)
        template = self._template(tools)
        # transformers drops None values (templates handle a missing key better than `content=None`) and
        # copies reasoning under the names templates read.
        chat = [_alias_reasoning({k: v for k, v in m.items() if v is not None}) for m in messages]
        variables = {**self.special_tokens, **kwargs}  # kwargs override the special tokens, as in transformers
        try:
            return template.render(
                messages=chat,
                tools=tools,
                documents=documents,
                add_generation_prompt=add_generation_prompt,
                **variables,
            )
        except jinja2.TemplateError as e:
            # Usually raise_exception() in the template rejecting the conversation (e.g. roles must alternate).
            raise UserError(f"{self.source}: the chat template rejected the conversation: {e}") from None

    def apply_chat_template(
        self,
        messages: Sequence[Message],
        add_generation_prompt: bool = False,
        tokenize: bool = True,
        **kwargs: Any,
    ) -> list[int] | str:
        """Rendered chat as token ids (tokenize=True) or as a string; extra kwargs go to the template."""
        text = self.render_chat(messages, add_generation_prompt, **kwargs)
        if not tokenize:
            return text
        # The template writes BOS itself when the model wants it, so transformers encodes without special tokens.
        return self.encode(text, add_special_tokens=False)

    def render_chat_with_mask(self, messages: Sequence[Message], **kwargs: Any) -> tuple[list[int], list[bool]]:
        """Token ids of the whole conversation, and a mask that is True on the tokens of assistant turns.

        An assistant turn's tokens are what its message adds to the rendered text after the generation prompt:
        its content and the template's end-of-turn text (e.g. "<|im_end|>"), so a model trained on the mask
        learns to stop. Found by the prefix approach: the turn of messages[i] starts where
        render(messages[:i], add_generation_prompt=True) ends and stops where render(messages[:i+1]) ends.
        Characters are mapped to tokens through the encoding's offsets, so a token that merges across a turn
        boundary is in the mask if it overlaps the turn. When the template renders earlier turns differently
        once later messages exist (e.g. it drops old reasoning), the turn is found by its content instead.
        """
        full = self.render_chat(messages, add_generation_prompt=False, **kwargs)
        spans = [
            self._assistant_span(messages, i, full, **kwargs)
            for i, message in enumerate(messages)
            if message.get("role") == "assistant"
        ]
        ids, offsets = self._encode_with_offsets(full)
        mask = [any(_overlaps(offset, span) for span in spans) for offset in offsets]
        return ids, mask

    def _assistant_span(self, messages: Sequence[Message], i: int, full: str, **kwargs: Any) -> tuple[int, int]:
        before = self._try_render(messages[:i], True, **kwargs)
        after = self._try_render(messages[: i + 1], False, **kwargs)
        if before is not None and after is not None and after.startswith(before) and full.startswith(after):
            return len(before), len(after)
        # Fallback: find the content after the generation prompt, then take the end-of-turn text that follows
        # the content in `after` if the full rendering has it there too.
        content = messages[i].get("content")
        prompt_end = len(before) if before is not None and full.startswith(before) else None
        found = full.find(content, prompt_end or 0) if isinstance(content, str) and content else -1
        if found < 0:
            raise UserError(f"{self.source}: cannot locate assistant message {i} in the chat the template renders")
        end = found + len(content)
        tail = after[after.rfind(content) + len(content) :] if after and content in after else ""
        if tail and full.startswith(tail, end):
            end += len(tail)
        return (found if prompt_end is None else prompt_end), end

    def _try_render(self, messages: Sequence[Message], add_generation_prompt: bool, **kwargs: Any) -> str | None:
        # Some templates refuse a partial conversation (e.g. one that does not start with a user turn).
        try:
            return self._render(messages, add_generation_prompt, **kwargs)
        except UserError:
            return None

    @cached_property
    def _offsets_backend(self) -> tokenizers.Tokenizer:
        # A copy without post-processor: a ByteLevel post-processor with trim_offsets shrinks the offsets of
        # tokens with spaces (leaving holes between tokens), and without special tokens it changes no id.
        backend = tokenizers.Tokenizer.from_str(self.backend.to_str())
        backend.post_processor = None
        return backend

    def _encode_with_offsets(self, text: str) -> tuple[list[int], list[tuple[int, int]]]:
        ids = self.encode(text, add_special_tokens=False)
        encoding = self._offsets_backend.encode(text, add_special_tokens=False)
        if encoding.ids != ids:  # cannot happen with the post-processors we know; never return a wrong mask
            raise RuntimeError("tokenizer offsets do not match its ids")
        return ids, encoding.offsets


def tokenizer_from_gguf(meta: dict[str, Any], source: str, config_eos_token_ids: Sequence[int] = ()) -> Tokenizer:
    """The tokenizer described by a GGUF file's metadata (gguf_vocab.vocab_from_gguf)."""
    return Tokenizer(**vocab_from_gguf(meta, source, config_eos_token_ids))


def load_tokenizer(path: str | Path) -> Tokenizer:
    """Load the tokenizer of a Hugging Face checkpoint folder (tokenizer.json is required) or a GGUF file."""
    folder = Path(path)
    if gguf.is_gguf(folder):
        return tokenizer_from_gguf(gguf.read_gguf(folder).meta, str(folder))
    tokenizer_file = folder / "tokenizer.json"
    if not tokenizer_file.is_file():
        raise UserError(
            f"{tokenizer_file} not found: a model folder needs the tokenizer.json of its Hugging Face checkpoint"
        )
    try:
        backend = tokenizers.Tokenizer.from_file(str(tokenizer_file))
    except Exception as e:  # the Rust library raises a bare Exception on bad JSON or an unknown format
        raise UserError(f"{tokenizer_file}: not a valid tokenizer.json ({e})") from None

    config_file = folder / "tokenizer_config.json"
    config = _read_json(config_file)
    special_tokens = _special_tokens(config)
    _add_missing_special_tokens(backend, config, special_tokens)

    # Named templates, as transformers reads them: chat_template.jinja wins over the config's template(s).
    templates: dict[str, str] = {}
    raw = config.get("chat_template")
    if isinstance(raw, str):
        templates["default"] = raw
    elif isinstance(raw, list):
        templates = {t["name"]: t["template"] for t in raw if isinstance(t, dict) and "name" in t and "template" in t}
    jinja_file = folder / "chat_template.jinja"
    source = config_file.name
    if jinja_file.is_file():
        templates = {"default": jinja_file.read_text(encoding="utf-8")}
        source = jinja_file.name

    eos_ids: list[int] = []
    for name in ("generation_config.json", "config.json"):
        cfg = _read_json(folder / name)
        eos_ids += _int_list(cfg.get("eos_token_id"))
        if name == "config.json" and "eos_token_id" not in cfg:
            # Multimodal checkpoints keep the language model's ids in text_config.
            eos_ids += _int_list((cfg.get("text_config") or {}).get("eos_token_id"))

    return Tokenizer(
        backend,
        special_tokens=special_tokens,
        chat_templates=templates,
        config_eos_token_ids=eos_ids,
        clean_up_tokenization_spaces=bool(config.get("clean_up_tokenization_spaces", False)),
        source=str(folder / source),
    )


# --- loading helpers --------------------------------------------------------------------------------------------


def _read_json(file: Path) -> dict[str, Any]:
    """A JSON object from `file`, {} when the file is absent."""
    if not file.is_file():
        return {}
    try:
        data = json.loads(file.read_text(encoding="utf-8"))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{file}: not valid JSON ({e}); restore it from the Hugging Face checkpoint") from None
    if not isinstance(data, dict):
        raise UserError(f"{file}: expected a JSON object; restore it from the Hugging Face checkpoint")
    return data


def _token_str(value: Any) -> str | None:
    """A special token from tokenizer_config.json: a string or an AddedToken dict with "content"."""
    if isinstance(value, str):
        return value
    if isinstance(value, dict) and isinstance(value.get("content"), str):
        return value["content"]
    return None


def _special_tokens(config: dict[str, Any]) -> dict[str, str]:
    """The special tokens transformers passes to the chat template (its `special_tokens_map`).

    Besides the standard names, transformers 5 also keeps model-specific string "*_token" entries (such as
    image_token) and the entries of an `extra_special_tokens` dict.
    """
    tokens: dict[str, str] = {}
    for name in _SPECIAL_TOKEN_NAMES:
        if (token := _token_str(config.get(name))) is not None:
            tokens[name] = token
    for name, value in config.items():
        if name.endswith("_token") and name not in _SPECIAL_TOKEN_NAMES and isinstance(value, str):
            tokens[name] = value
    extra = config.get("extra_special_tokens")
    if isinstance(extra, dict):
        tokens.update({k: t for k, v in extra.items() if (t := _token_str(v)) is not None})
    return tokens


def _add_missing_special_tokens(
    backend: tokenizers.Tokenizer, config: dict[str, Any], special_tokens: dict[str, str]
) -> None:
    """Make the config's special tokens added special tokens of the backend, as transformers does at load.

    A token already in the added vocabulary is kept as is; one only in the model vocabulary becomes a special
    added token with the same id (so it is matched whole in text); a new one gets the next id.
    """
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    new: list[tokenizers.AddedToken] = []
    # added_tokens_decoder entries from the config that tokenizer.json lacks, with their own flags.
    for _, entry in sorted((config.get("added_tokens_decoder") or {}).items(), key=lambda kv: int(kv[0])):
        if isinstance(entry, dict) and isinstance(entry.get("content"), str) and entry["content"] not in added:
            flags = {k: entry[k] for k in ("single_word", "lstrip", "rstrip", "normalized", "special") if k in entry}
            new.append(tokenizers.AddedToken(entry["content"], **flags))
            added.add(entry["content"])
    extra = config.get("extra_special_tokens") or config.get("additional_special_tokens") or []
    extra_tokens = extra.values() if isinstance(extra, dict) else extra
    for token in [*special_tokens.values(), *(t for v in extra_tokens if (t := _token_str(v)))]:
        if token not in added:
            new.append(tokenizers.AddedToken(token, special=True, normalized=False))
            added.add(token)
    if new:
        backend.add_tokens(new)


def _int_list(value: Any) -> list[int]:
    if isinstance(value, int) and not isinstance(value, bool):
        return [value]
    if isinstance(value, list):
        return [v for v in value if isinstance(v, int) and not isinstance(v, bool)]
    return []


# --- chat template helpers -----------------------------------------------------------------------------------


class _GenerationTag(jinja2.ext.Extension):
    """Accept `{% generation %}...{% endgeneration %}` (used by some templates for assistant masks) and just
    render its body; without it such templates would not compile."""

    tags = {"generation"}

    def parse(self, parser: Any) -> jinja2.nodes.Node:
        lineno = next(parser.stream).lineno
        body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
        return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

    def _body(self, caller: Any) -> str:
        return caller()


class _TemplateDict:
    # A `dict` global that cannot be used to reach Python internals from the sandbox (as in transformers).
    def __call__(self, *args: Any, **kwargs: Any) -> dict:
        return dict(*args, **kwargs)

    def fromkeys(self, *args: Any, **kwargs: Any) -> dict:
        return dict.fromkeys(*args, **kwargs)


class _TemplateNamespace(jinja2.utils.Namespace):
    # A `namespace` that refuses underscore attributes, which could reach CPython internals (as in transformers).
    def __init__(*args: Any, **kwargs: Any) -> None:
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _TemplateNamespace._check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)

    @staticmethod
    def _check_name(name: Any) -> None:
        if isinstance(name, str) and name.startswith("_"):
            raise jinja2.exceptions.SecurityError(f"chat templates cannot set underscore attributes ({name!r})")


def _raise_exception(message: str) -> None:
    raise jinja2.exceptions.TemplateError(message)


def _tojson(
    x: Any, ensure_ascii: bool = False, indent: Any = None, separators: Any = None, sort_keys: bool = False
) -> str:
    # Jinja's own tojson escapes HTML characters, which chat templates do not want.
    return json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _strftime_now(format: str) -> str:
    return datetime.now().strftime(format)


def _jinja_env() -> ImmutableSandboxedEnvironment:
    """The environment transformers renders chat templates in: sandboxed (templates are untrusted code from the
    Hub), trim_blocks and lstrip_blocks, loop controls, and the same globals and tojson filter."""
    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[_GenerationTag, jinja2.ext.loopcontrols]
    )
    env.filters["tojson"] = _tojson
    env.globals["raise_exception"] = _raise_exception
    env.globals["strftime_now"] = _strftime_now
    env.globals["dict"] = _TemplateDict()
    env.globals["namespace"] = _TemplateNamespace
    return env


def _alias_reasoning(message: Message) -> Message:
    reasoning = next((message[k] for k in _REASONING_FIELDS if message.get(k) is not None), None)
    if reasoning is None:
        return message
    return {"thinking": reasoning, **message, "reasoning_content": reasoning}


def _clean_up_tokenization(text: str) -> str:
    for old, new in ((" .", "."), (" ?", "?"), (" !", "!"), (" ,", ","), (" ' ", "'"), (" n't", "n't"),
                     (" 'm", "'m"), (" 's", "'s"), (" 've", "'ve"), (" 're", "'re")):  # fmt: skip
        text = text.replace(old, new)
    return text


def _common_prefix_len(a: str, b: str) -> int:
    n = 0
    for x, y in zip(a, b):
        if x != y:
            break
        n += 1
    return n


def _overlaps(offset: tuple[int, int], span: tuple[int, int]) -> bool:
    start, end = offset
    if start == end:  # a token with no characters of its own belongs where it stands
        return span[0] <= start < span[1]
    return start < span[1] and end > span[0]
