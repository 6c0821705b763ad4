"""The tokenizer of a GGUF model file, built from the vocabulary in its metadata.

A `.gguf` file has no `tokenizer.json`: llama.cpp's converter stores the vocabulary as metadata
(`tokenizer.ggml.tokens`, `.merges` or `.scores`, `.token_type`, the special token ids, the BOS/EOS flags and
`tokenizer.chat_template`). `tokenizer_from_gguf(meta, source)` rebuilds the `tokenizers.Tokenizer` those
describe, with the special tokens, chat templates and stop ids (`tokenizer.tokenizer_from_gguf` wraps them in
lcsb's `Tokenizer`; this module sits below tokenizer.py so that `load_tokenizer` can read either). The reference is transformers'
`AutoTokenizer.from_pretrained(folder, gguf_file=name)` (transformers/integrations/gguf/gguf_tokenizer_mapping.py):
the same model, normalizer, pre-tokenizer, decoder, post-processor and added tokens, so the ids are the same.

Two vocabulary kinds (`tokenizer.ggml.model`):
- "gpt2": byte-level BPE with the file's merges. Tokens the file writes outside the byte-level alphabet (special
  tokens written as plain text) are spelled in it. The pre-tokenizer regex comes from `tokenizer.ggml.pre`:
  Llama 3's ("llama-bpe"), Qwen2's ("qwen2"), ... or GPT-2's ("default", "gpt2", "smollm").
- "llama": SentencePiece-style BPE over "▁"-spaced text with byte fallback. The file has scores but usually no
  merges; they are recovered from the vocabulary: every split of a token into two tokens is a merge, ranked by
  the token's score (for Gemma by the token's position in the file, as its scores do not follow merge order).
  Gemma writes a space-run token as spaces; it is spelled with "▁" so that merges reach it. Gemma replaces every
  space by "▁" and prepends none; other SentencePiece models prepend "▁" to the text unless
  `tokenizer.ggml.add_space_prefix` is false.

Token types (`tokenizer.ggml.token_type`): control (3) tokens are special added tokens, user-defined (4) are
non-special added tokens; both are matched whole in the text. BOS/EOS are added as
`tokenizer.ggml.add_bos_token` / `add_eos_token` say (BOS by default for "llama" vocabularies).

Where transformers and llama.cpp disagree (checked on the assets' 9672 strings):
- "smollm": llama.cpp, like SmolLM2's own tokenizer.json (how the model was trained), splits digits one by one
  before GPT-2's regex; transformers' GGUF loader does not, so whitespace before a digit groups differently
  ("\n\n1": "Ċ","Ċ","1" there, "ĊĊ","1" in llama.cpp; 47 strings differ). We follow the model's own
  tokenizer and llama.cpp, which serves the adapter: the tests compare with transformers' tokenizer given
  that pre-tokenizer back.
- Gemma (we follow transformers): llama.cpp matches the user-defined space-run tokens (up to 31 spaces) whole; here they come from merges,
  which give the same ids up to 31 spaces, but a run of 32 or more splits differently (16 + 16 here, 31 + 1 in
  llama.cpp; 21 strings differ).

Rebuilding the merges is the expensive part (Gemma 3: 262144 tokens, 1.2 million candidate splits, 515k merges):
it is done with 64-bit polynomial hashes of substrings in numpy and checked exactly, not in a Python loop.
"""

from __future__ import annotations

import gc
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np
import tokenizers
from tokenizers import AddedToken, Regex, decoders, normalizers, pre_tokenizers, processors
from tokenizers.models import BPE

from lcsb.errors import UserError
from lcsb.runtime import trim_heap

# llama.cpp's token types
NORMAL, UNKNOWN, CONTROL, USER_DEFINED, UNUSED, BYTE = 1, 2, 3, 4, 5, 6

# Pre-tokenizer regexes by `tokenizer.ggml.pre`, as transformers' GGUF loader splits text for them.
_LLAMA3_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}{1,3}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN2_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?\p{L}+|\p{N}"
    r"| ?[^\s\p{L}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_QWEN35_SPLIT = (
    r"(?i:'s|'t|'re|'ve|'m|'ll|'d)|[^\r\n\p{L}\p{N}]?[\p{L}\p{M}]+|\p{N}"
    r"| ?[^\s\p{L}\p{M}\p{N}]+[\r\n]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_TEKKEN_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*"
    r"|\p{N}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_GPT4O_SPLIT = (
    r"[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]*[\p{Ll}\p{Lm}\p{Lo}\p{M}]+(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|[^\r\n\p{L}\p{N}]?[\p{Lu}\p{Lt}\p{Lm}\p{Lo}\p{M}]+[\p{Ll}\p{Lm}\p{Lo}\p{M}]*(?i:'s|'t|'re|'ve|'m|'ll|'d)?"
    r"|\p{N}{1,3}| ?[^\s\p{L}\p{N}]+[\r\n/]*|\s*[\r\n]+|\s+(?!\S)|\s+"
)
_SPLITS = {
    **dict.fromkeys(("llama3", "llama-v3", "llama-bpe", "falcon3", "falcon-h1", "pixtral", "midm-2.0", "lfm2",
                     "jina-v5-nano", "dbrx", "smaug-bpe"), _LLAMA3_SPLIT),
    **dict.fromkeys(("qwen2", "deepseek-r1-qwen", "kormo", "f2llmv2", "megrez"), _QWEN2_SPLIT),
    "qwen35": _QWEN35_SPLIT,
    "tekken": _TEKKEN_SPLIT,
    **dict.fromkeys(("gpt-4o", "llama4", "kanana2", "talkie", "minimax-m2"), _GPT4O_SPLIT),
}
# Split with GPT-2's own regex (the ByteLevel pre-tokenizer's); "smollm" splits digits one by one first.
_GPT2_REGEX_PRES = ("default", "gpt2", "smollm")
_SUPPORTED_PRES = ", ".join(sorted([*_GPT2_REGEX_PRES, *_SPLITS]))

_GEMMA_ARCHS = ("gemma", "gemma2", "gemma3")
_SPECIAL_IDS = (("bos_token", "bos"), ("eos_token", "eos"), ("unk_token", "unknown"), ("pad_token", "padding"))


def vocab_from_gguf(meta: Mapping[str, Any], source: str, config_eos_token_ids: Sequence[int] = ()) -> dict:
    """The arguments of lcsb's `Tokenizer` (the backend first) for the vocabulary in a GGUF file's metadata `meta`
    (key -> str, int, float, bool, or a list / numpy array for arrays). `source` (the file) names the problems,
    each a one-line UserError.

    Its eos ids are the eos token, `tokenizer.ggml.eot_token_id` / `eom_token_id` (end of turn / message, which
    llama.cpp also stops on) when present, and `config_eos_token_ids`.
    """
    # The build makes a million small Python objects (merge pairs); the cyclic garbage collector would walk every
    # live object of the process many times over meanwhile (seconds in a big process), and none of them is garbage.
    enabled = gc.isenabled()
    gc.disable()
    try:
        return _build(meta, source, config_eos_token_ids)
    finally:
        if enabled:
            gc.enable()
        # those objects are freed now, but glibc keeps their heap resident (Gemma 3: 70 MB), where the training
        # step's tensors, which live in their own mappings, never reuse it
        trim_heap()


def _build(meta: Mapping[str, Any], source: str, config_eos_token_ids: Sequence[int]) -> dict:
    kind = meta.get("tokenizer.ggml.model")
    arch = str(meta.get("general.architecture", ""))
    tokens = meta.get("tokenizer.ggml.tokens")
    if kind not in ("gpt2", "llama"):
        raise UserError(f"{source}: tokenizer.ggml.model {kind!r} is not supported; lcsb builds 'gpt2' (byte-level "
                        "BPE) and 'llama' (SentencePiece BPE) vocabularies")
    if tokens is None or isinstance(tokens, str) or not len(tokens):
        raise UserError(f"{source}: the metadata has no tokenizer.ggml.tokens; the file carries no vocabulary, "
                        "convert the model again with llama.cpp")
    tokens = [str(t) for t in tokens]
    n = len(tokens)
    types = _int_array(meta, "tokenizer.ggml.token_type", n, source)

    ids: dict[str, int] = {}
    for name, key in _SPECIAL_IDS:
        value = meta.get(f"tokenizer.ggml.{key}_token_id")
        if value is None:
            continue
        if not _is_int(value) or not 0 <= int(value) < n:
            raise UserError(f"{source}: tokenizer.ggml.{key}_token_id is {value!r}, not a token id below {n}; "
                            "the file is corrupt")
        ids[name] = int(value)
    special_tokens = {name: tokens[i] for name, i in ids.items()}

    if kind == "gpt2":
        backend, vocab = _byte_level(meta, tokens, source)
        in_alphabet = set(_BYTE_ALPHABET)
        control = [t for t, k in zip(tokens, types) if k == CONTROL and set(t) <= in_alphabet]
        add_bos_default = False
    else:
        backend, vocab = _sentencepiece(meta, tokens, arch, special_tokens.get("unk_token"), source)
        control = [t for t, k in zip(tokens, types) if k == CONTROL]
        add_bos_default = True
        if arch in _GEMMA_ARCHS and "<mask>" in vocab:
            special_tokens["mask_token"] = "<mask>"  # GemmaTokenizer's default, which transformers keeps
    _add_tokens(backend, tokens, types, control, vocab, special_tokens)

    add_bos = bool(meta.get("tokenizer.ggml.add_bos_token", add_bos_default)) and "bos_token" in special_tokens
    add_eos = bool(meta.get("tokenizer.ggml.add_eos_token", False)) and "eos_token" in special_tokens
    backend.post_processor = _post_processor(backend, special_tokens, add_bos, add_eos)

    templates = {}
    if isinstance(meta.get("tokenizer.chat_template"), str):
        templates["default"] = meta["tokenizer.chat_template"]
    for name in meta.get("tokenizer.chat_templates") or ():  # llama.cpp's named templates (e.g. tool_use)
        if isinstance(meta.get(f"tokenizer.chat_template.{name}"), str):
            templates[str(name)] = meta[f"tokenizer.chat_template.{name}"]

    eos_ids = [int(v) for key in ("eot", "eom") if _is_int(v := meta.get(f"tokenizer.ggml.{key}_token_id"))
               and 0 <= int(v) < n]
    return dict(
        backend=backend,
        special_tokens=special_tokens,
        chat_templates=templates,
        config_eos_token_ids=[*eos_ids, *config_eos_token_ids],
        clean_up_tokenization_spaces=False,
        source=str(source),
    )


# --- the two vocabulary kinds ------------------------------------------------------------------------------


def _bytes_to_unicode() -> dict[int, str]:
    """GPT-2's byte -> character table of byte-level BPE (printable bytes stand for themselves)."""
    bs = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    cs = bs[:]
    extra = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + extra)
            extra += 1
    return {b: chr(c) for b, c in zip(bs, cs)}


_BYTE_TO_CHAR = _bytes_to_unicode()
_BYTE_ALPHABET = "".join(_BYTE_TO_CHAR.values())


def _byte_level(meta: Mapping[str, Any], tokens: list[str], source: str) -> tuple[tokenizers.Tokenizer, dict]:
    pre = meta.get("tokenizer.ggml.pre") or "default"
    if pre not in _SPLITS and pre not in _GPT2_REGEX_PRES:
        raise UserError(f"{source}: tokenizer.ggml.pre {pre!r} is not supported for a 'gpt2' vocabulary; "
                        f"supported: {_SUPPORTED_PRES}")
    raw_merges = meta.get("tokenizer.ggml.merges")
    if raw_merges is None or isinstance(raw_merges, str):
        raise UserError(f"{source}: a 'gpt2' vocabulary needs tokenizer.ggml.merges, which the metadata lacks; "
                        "convert the model again with llama.cpp")
    merges = [tuple(str(m).split(" ")) for m in raw_merges]
    if any(len(m) != 2 for m in merges):
        bad = next(m for m in raw_merges if len(str(m).split(" ")) != 2)
        raise UserError(f"{source}: tokenizer.ggml.merges has {bad!r}, not two tokens separated by one space; "
                        "the file is corrupt")
    # Special tokens are often written as plain text; spell anything outside the alphabet in it (as transformers).
    alphabet = set(_BYTE_ALPHABET)
    vocab = {
        t if set(t) <= alphabet else "".join(_BYTE_TO_CHAR[b] for b in t.encode("utf-8")): i
        for i, t in enumerate(tokens)
    }
    backend = _bpe(vocab, merges, source, continuing_subword_prefix="", end_of_word_suffix="", fuse_unk=False)
    if pre in _SPLITS:
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Split(Regex(_SPLITS[pre]), behavior="isolated"),
            pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=False),
        ])
    elif pre == "smollm":
        # digits one by one, then GPT-2's regex: SmolLM2's own tokenizer.json and llama.cpp (transformers'
        # GGUF loader leaves the digit split out, and groups whitespace before digits unlike the model's training)
        backend.pre_tokenizer = pre_tokenizers.Sequence([
            pre_tokenizers.Digits(individual_digits=True),
            pre_tokenizers.ByteLevel(add_prefix_space=False),
        ])
    else:
        backend.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    backend.decoder = decoders.ByteLevel()
    return backend, vocab


def _sentencepiece(
    meta: Mapping[str, Any], tokens: list[str], arch: str, unk: str | None, source: str
) -> tuple[tokenizers.Tokenizer, dict]:
    gemma = arch in _GEMMA_ARCHS
    if gemma:
        # Gemma writes its space-run tokens ("  ", ...) as spaces; the text they must match is "▁"-spaced.
        tokens = ["\u2581" * len(t) if " " in t and not t.strip() else t for t in tokens]
    vocab = dict(zip(tokens, range(len(tokens))))
    raw_merges = meta.get("tokenizer.ggml.merges")
    if raw_merges is not None and not isinstance(raw_merges, str):
        merges = [tuple(str(m).split(" ")) for m in raw_merges]
        if any(len(m) != 2 for m in merges):
            raise UserError(f"{source}: tokenizer.ggml.merges has an entry that is not two tokens separated by "
                            "one space; the file is corrupt")
    else:
        if gemma:
            # Gemma's scores do not follow its merge order; the order of the tokens in the file does.
            scores = -np.arange(len(tokens), dtype=np.float64)
        else:
            scores = _float_array(meta, "tokenizer.ggml.scores", len(tokens), source)
        merges = _merges_from_vocab(tokens, scores)
    backend = _bpe(vocab, merges, source, unk_token=unk if unk is not None else ("<unk>" if gemma else None),
                   fuse_unk=True, byte_fallback=True)
    if gemma:
        backend.normalizer = normalizers.Replace(" ", "\u2581")
        backend.pre_tokenizer = pre_tokenizers.Split(" ", behavior="merged_with_previous")
        backend.decoder = decoders.Sequence([decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()])
    else:
        prefix = bool(meta.get("tokenizer.ggml.add_space_prefix", True))
        backend.pre_tokenizer = pre_tokenizers.Metaspace(
            replacement="\u2581", prepend_scheme="first" if prefix else "never", split=False
        )
        steps = [decoders.Replace("\u2581", " "), decoders.ByteFallback(), decoders.Fuse()]
        if prefix:
            steps.append(decoders.Strip(content=" ", left=1, right=0))
        backend.decoder = decoders.Sequence(steps)
    return backend, vocab


def _bpe(vocab: dict[str, int], merges: list, source: str, **options: Any) -> tokenizers.Tokenizer:
    try:
        return tokenizers.Tokenizer(BPE(vocab=vocab, merges=merges, dropout=None, **options))
    except Exception as e:  # the Rust library raises a bare Exception, e.g. for a merge of an unknown token
        raise UserError(f"{source}: the vocabulary in the metadata is not a valid BPE vocabulary ({e})") from None


# --- merges recovered from a SentencePiece vocabulary --------------------------------------------------------

_HASH_BASE = 0x100000001B3  # odd, so invertible modulo 2**64


def _merges_from_vocab(tokens: list[str], scores: np.ndarray, chunk: int = 1 << 15) -> list[tuple[str, str]]:
    """The merges a BPE vocabulary without merges implies, ordered as transformers' `generate_merges` orders
    them: every split of a token into two tokens, best token score first, then the longer left piece, then the
    longer right piece, ties in token order. A duplicate token counts once, at its first position with the score
    of its last (as the dicts transformers builds do).

    A substring's hash is sum(c_j * B**(end-1-j)) modulo 2**64; with the prefix sums S of c_j * B**-(j+1) over the
    concatenated vocabulary it is B**end * (S[end] - S[start]), so every candidate piece hashes in a few vector
    operations. The pieces found are then compared character by character, so a hash collision cannot make a
    wrong merge (it sends the work to the plain Python loop instead).
    """
    if len(set(tokens)) == len(tokens):
        unique, score = tokens, np.asarray(scores, dtype=np.float64)
    else:
        score_of = dict(zip(tokens, scores.tolist()))
        unique = list(score_of)  # first-occurrence order
        score = np.fromiter(score_of.values(), dtype=np.float64, count=len(unique))
    try:
        codes = np.frombuffer("".join(unique).encode("utf-32-le"), dtype=np.uint32)
    except UnicodeEncodeError:  # a lone surrogate: no fixed-width code points
        return _merges_from_vocab_slow(unique, score)
    n = len(unique)
    lens = np.fromiter(map(len, unique), dtype=np.int64, count=n)
    ends = np.cumsum(lens)
    starts = ends - lens
    total = int(ends[-1])
    base = np.uint64(_HASH_BASE)
    inverse = np.uint64(pow(_HASH_BASE, -1, 1 << 64))
    with np.errstate(over="ignore"):
        # (in place where it can: Gemma 3's vocabulary is 1.9M characters, 15 MB per array)
        powers = np.full(total + 1, base, np.uint64)                              # B**p
        powers[0] = 1
        np.cumprod(powers, out=powers)
        inv_powers = np.full(total, inverse, dtype=np.uint64)                     # B**-(p+1)
        np.cumprod(inv_powers, out=inv_powers)
        terms = codes.astype(np.uint64)
        terms += np.uint64(1)
        terms *= inv_powers
        del inv_powers
        sums = np.zeros(total + 1, np.uint64)
        np.cumsum(terms, out=sums[1:])
        del terms

        def substring_hash(start: np.ndarray, end: np.ndarray) -> np.ndarray:
            return powers[end] * (sums[end] - sums[start])

        full = substring_hash(starts, ends)
        order = np.argsort(full)
        sorted_full = full[order]

        def lookup(h: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            # searching sorted hashes is twice as fast (memory locality), which pays for the sort
            by_hash = np.argsort(h)
            pos = np.empty(len(h), np.int64)
            pos[by_hash] = np.minimum(np.searchsorted(sorted_full, h[by_hash]), n - 1)
            return sorted_full[pos] == h, order[pos]

        # every split (token i, left length k) with 1 <= k < len(token i), k descending within a token; a block
        # of tokens at a time (all of Gemma 3's 1.65M candidate splits at once held ~150 MB of index arrays)
        kept = []
        for a in range(0, n, chunk):
            b = min(n, a + chunk)
            splits = np.maximum(lens[a:b] - 1, 0)
            rows = np.repeat(np.arange(a, b), splits)
            group_start = np.cumsum(splits) - splits
            k = lens[rows] - 1 - (np.arange(len(rows)) - group_start[rows - a])
            mid = starts[rows] + k
            found, left = lookup(substring_hash(starts[rows], mid))
            rows, k, mid, left = rows[found], k[found], mid[found], left[found]
            found, right = lookup(substring_hash(mid, ends[rows]))
            kept.append((rows[found], k[found], left[found], right[found]))
        rows, k, left, right = (np.concatenate(x) for x in zip(*kept))

    if not _pieces_match(codes, starts, lens, rows, k, left, right, 2 * chunk):
        return _merges_from_vocab_slow(unique, score)
    if not np.all(np.diff(score) < 0):  # else (Gemma's positions) the splits are in merge order already
        rank = np.lexsort((rows, k - lens[rows], -k, -score[rows]))  # the last key is the primary one
        left, right = left[rank], right[rank]
    left, right = left.tolist(), right.tolist()
    return list(zip(map(unique.__getitem__, left), map(unique.__getitem__, right)))


def _pieces_match(codes, starts, lens, rows, k, left, right, chunk: int = 1 << 16) -> bool:
    """Whether token `left` + token `right` spells token `rows` (split after `k` characters), for every merge.
    `chunk` merges at a time: all at once, Gemma 3's 515k merges made 4M-element index arrays (~200 MB)."""
    if not (np.array_equal(lens[left], k) and np.array_equal(lens[right], lens[rows] - k)):
        return False
    for a in range(0, len(rows), chunk):
        r, kk, lf, rt = rows[a:a + chunk], k[a:a + chunk], left[a:a + chunk], right[a:a + chunk]
        width = lens[r]
        within = np.arange(int(width.sum())) - np.repeat(np.cumsum(width) - width, width)
        k_each = np.repeat(kk, width)
        piece_start = np.where(within < k_each, np.repeat(starts[lf], width), np.repeat(starts[rt] - kk, width))
        if not np.array_equal(codes[np.repeat(starts[r], width) + within], codes[piece_start + within]):
            return False
    return True


def _merges_from_vocab_slow(unique: list[str], score: np.ndarray) -> list[tuple[str, str]]:
    """`_merges_from_vocab` as a plain loop over `unique` tokens with their `score`s (seconds for 262k tokens)."""
    vocab = set(unique)
    scores = score.tolist()
    found = [
        (-scores[i], -k, -(len(t) - k), i, t[:k], t[k:])
        for i, t in enumerate(unique)
        for k in range(len(t) - 1, 0, -1)
        if t[:k] in vocab and t[k:] in vocab
    ]
    found.sort(key=lambda f: f[:4])
    return [(f[4], f[5]) for f in found]


# --- added tokens and the post-processor ---------------------------------------------------------------------


def _add_tokens(
    backend: tokenizers.Tokenizer,
    tokens: list[str],
    types: np.ndarray,
    control: list[str],
    vocab: dict[str, int],
    special_tokens: dict[str, str],
) -> None:
    """Control tokens as special added tokens, user-defined ones (when the vocabulary spells them as the file
    does) as plain added tokens, and the named special tokens that are neither as special ones (new ids if
    they are not in the vocabulary), as transformers does."""
    backend.add_special_tokens([AddedToken(t, normalized=False, special=True) for t in control])
    user = [t for t, k in zip(tokens, types) if k == USER_DEFINED and t in vocab]
    if user:
        backend.add_tokens([AddedToken(t, normalized=False, special=False) for t in user])
    added = {t.content for t in backend.get_added_tokens_decoder().values()}
    missing = [t for t in dict.fromkeys(special_tokens.values()) if t not in added]
    if missing:
        backend.add_tokens([AddedToken(t, normalized=False, special=True) for t in missing])


def _post_processor(
    backend: tokenizers.Tokenizer, special_tokens: dict[str, str], add_bos: bool, add_eos: bool
) -> processors.TemplateProcessing:
    """BOS/EOS around a sequence, as transformers' `update_post_processor` writes them."""
    bos, eos = special_tokens.get("bos_token"), special_tokens.get("eos_token")
    single = f"{f'{bos}:0 ' if add_bos else ''}$A:0{f' {eos}:0' if add_eos else ''}"
    pair = f"{single}{f' {bos}:1' if add_bos else ''} $B:1{f' {eos}:1' if add_eos else ''}"
    specials = []
    if add_bos:
        specials.append((bos, backend.token_to_id(bos)))
    if add_eos:
        specials.append((eos, backend.token_to_id(eos)))
    return processors.TemplateProcessing(single=single, pair=pair, special_tokens=specials)


# --- metadata values ------------------------------------------------------------------------------------------


def _is_int(value: Any) -> bool:
    return isinstance(value, (int, np.integer)) and not isinstance(value, (bool, np.bool_))


def _array(meta: Mapping[str, Any], key: str, n: int, source: str, dtype, what: str) -> np.ndarray | None:
    """A numeric array of length `n` (a list or numpy array) as `dtype`, None when absent."""
    value = meta.get(key)
    if value is None:
        return None
    try:
        array = np.asarray(value, dtype=dtype)
    except (TypeError, ValueError):
        array = None
    if array is None or array.shape != (n,):
        raise UserError(f"{source}: {key} is not {n} {what}, one per token; the file is corrupt")
    return array


def _int_array(meta: Mapping[str, Any], key: str, n: int, source: str) -> np.ndarray:
    """Token types; absent means all normal."""
    array = _array(meta, key, n, source, np.int64, "integers")
    return np.full(n, NORMAL, dtype=np.int64) if array is None else array


def _float_array(meta: Mapping[str, Any], key: str, n: int, source: str) -> np.ndarray:
    array = _array(meta, key, n, source, np.float64, "numbers")
    if array is None:
        raise UserError(f"{source}: a 'llama' vocabulary without tokenizer.ggml.merges needs {key}, which the "
                        "metadata lacks; convert the model again with llama.cpp")
    return array
