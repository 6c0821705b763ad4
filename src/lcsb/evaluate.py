"""Evaluation and generation (DESIGN.md section 9): loss, perplexity and accuracy on held-out data
belong here next to text generation.

Evaluation is a forward pass per batch with the LM head walked in vocabulary chunks
(`engine.executor.eval_step`); loss and token accuracy count exactly the tokens training counts
(labels != -100, prompts masked by default), summed over the batches and divided once.

Generation keeps a KV cache: the prompt is run once (prefill), then every step feeds only the
token just produced. Sampling draws from its own `torch.Generator`, so a seed gives the same
tokens whatever else uses torch's global RNG.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path

import torch

from . import data as datalib
from .engine.executor import eval_step
from .lora import load_model
from .model import load_config
from .model.tokenizer import load_tokenizer
from .errors import UserError
from .model.core import CausalLM, KVCache


# ---------------------------------------------------------------- evaluation


def evaluate(model: CausalLM, examples, batch_size: int = 1, max_batches: int = 0, pad_id: int = 0) -> dict:
    """Loss, perplexity and token accuracy over (the first max_batches batches of) `examples`.

    Returns {"loss": mean loss per counted token, "ppl": exp(loss), "accuracy": share of counted
    tokens whose argmax prediction is right, "tokens": counted tokens}.
    """
    loss_sum = n = correct = 0
    # a fixed seeded order: with max_batches, every evaluation scores the same subset
    for i, (ids, labels) in enumerate(datalib.batches(examples, batch_size, seed=0, epoch=0, pad_token_id=pad_id)):
        if max_batches and i >= max_batches:
            break
        ls, c, k = eval_step(model, ids, labels)
        loss_sum, n, correct = loss_sum + ls, n + c, correct + k
    loss = loss_sum / max(n, 1)
    return {"loss": loss, "ppl": math.exp(min(loss, 50.0)), "accuracy": correct / max(n, 1), "tokens": n}


def eval_file(data: str | Path) -> Path:
    """The file `lcsb eval` scores: a .jsonl file as given; in a data folder test.jsonl, else valid.jsonl."""
    path = Path(data)
    if path.is_dir():
        for name in ("test.jsonl", "valid.jsonl"):
            if (path / name).is_file():
                return path / name
        raise UserError(f"{path}: no test.jsonl or valid.jsonl to evaluate; pass a .jsonl file with --data")
    if not path.is_file():
        raise UserError(f"{path}: no such file or folder; pass a .jsonl file or a data folder with --data")
    return path


def evaluate_data(model_path: str | Path, data: str | Path, adapter: str | Path | None = None, batch_size: int = 1,
                  max_seq_len: int | None = None, quant: str | None = None, max_batches: int = 0,
                  mask_prompt: bool = True, say=None) -> dict:
    """Load a model (and adapter), read a data file, and score it: the API behind `lcsb eval`.

    Args:
        model_path: Hugging Face checkpoint folder or `lcsb convert` folder.
        data: a .jsonl file (all its records are scored) or a data folder (its test.jsonl, else valid.jsonl).
        adapter: a run folder or adapter folder (PEFT layout); None scores the base model.
        max_seq_len: records longer than this are truncated (default: 2048 or the model's context).
        max_batches: score only the first N batches of the (seeded) order; 0 scores everything.
        say: called with the data summary line.
    Returns `evaluate`'s dict plus "file" and "records".
    """
    if batch_size <= 0:
        raise UserError(f"--batch-size must be positive, got {batch_size}")
    if max_batches < 0:
        raise UserError(f"--max-batches must not be negative, got {max_batches}")
    mcfg, _ = load_config(model_path)        # a bad folder fails here, before data and weights load
    context = mcfg.max_position_embeddings
    if max_seq_len is None:
        max_seq_len = min(2048, context)
    elif max_seq_len > context:
        raise UserError(f"--max-seq-len {max_seq_len} exceeds the model's context "
                        f"(max_position_embeddings={context} in {model_path}/config.json)")
    file = eval_file(data)
    tok = load_tokenizer(model_path)
    splits = datalib.load_dataset(file, tok, max_seq_len=max_seq_len, mask_prompt=mask_prompt)
    if say:
        say(splits.report.summary())
    model = load_model(model_path, quant=quant, adapter=adapter)
    r = evaluate(model, splits.train, batch_size, max_batches, splits.pad_token_id)
    return {**r, "file": str(file), "records": len(splits.train)}


# ---------------------------------------------------------------- generation


def check_sampling(max_new_tokens: int, temperature: float, top_p: float):
    """Refuse out-of-range sampling settings with one line naming the setting."""
    if isinstance(max_new_tokens, bool) or not hasattr(max_new_tokens, "__index__") or max_new_tokens <= 0:
        raise UserError(f"max_new_tokens must be a positive integer, got {max_new_tokens!r}")
    if not temperature >= 0:                       # also refuses NaN
        raise UserError(f"temperature must be >= 0 (0 is greedy), got {temperature!r}")
    if not 0 < top_p <= 1:
        raise UserError(f"top_p must be in (0, 1] (1 keeps every token), got {top_p!r}")


def top_p_filter(probs: torch.Tensor, top_p: float) -> torch.Tensor:
    """probs [V] with every token outside the nucleus set to 0.

    The nucleus is the smallest set of most likely tokens whose probability reaches top_p (never
    empty), as in transformers' TopPLogitsWarper.
    """
    p, idx = probs.sort(descending=True)
    keep = (p.cumsum(-1) - p) < top_p       # the mass of the tokens before it is still short of top_p
    keep[0] = True
    return probs * torch.zeros_like(keep).scatter(0, idx, keep)


def sample(logits: torch.Tensor, temperature: float = 0.0, top_p: float = 1.0,
           generator: torch.Generator | None = None) -> int:
    """One token id from logits [V]: argmax when temperature == 0, else temperature + nucleus sampling."""
    if temperature == 0:
        return int(logits.argmax())
    probs = torch.softmax(logits.float() / temperature, dim=-1)
    if top_p < 1.0:
        probs = top_p_filter(probs, top_p)
    return int(torch.multinomial(probs, 1, generator=generator))


def _device(model: CausalLM) -> torch.device:
    p = next(model.parameters(), None)
    return p.device if p is not None else torch.device("cpu")


def generate(model: CausalLM, prompt_ids: Sequence[int], max_new_tokens: int = 256, temperature: float = 0.0,
             top_p: float = 1.0, seed: int | None = None, eos_ids: Iterable[int] = ()) -> Iterator[int]:
    """Yield new token ids one at a time, as they are produced.

    Stops after an id in `eos_ids` (which is yielded, as transformers returns it), after
    `max_new_tokens`, or when the sequence fills the model's max_position_embeddings. Settings
    are checked here, before the first token is asked for.

    Args:
        model: a loaded model (`lcsb.load_model`).
        prompt_ids: the prompt's token ids, special tokens included.
        temperature: 0 is greedy decoding; > 0 samples from softmax(logits / temperature).
        top_p: nucleus sampling: sample only among the most likely tokens totalling top_p.
        seed: seed of the sampling RNG; None draws from torch's global RNG.
        eos_ids: token ids that end the generation.
    """
    check_sampling(max_new_tokens, temperature, top_p)
    prompt = [int(i) for i in prompt_ids]
    if not prompt:
        raise UserError("the prompt is empty: generation needs at least one prompt token")
    vocab = model.config.vocab_size
    if bad := [i for i in prompt if not 0 <= i < vocab]:
        raise UserError(f"prompt token id {bad[0]} is outside the model's vocabulary (vocab_size {vocab}); "
                        "use the tokenizer that comes with the model")
    limit = model.config.max_position_embeddings
    if len(prompt) >= limit:
        raise UserError(f"the prompt has {len(prompt)} tokens but the model takes at most {limit} positions "
                        "(max_position_embeddings); shorten the prompt")
    steps = min(int(max_new_tokens), limit - len(prompt))
    return _decode(model, prompt, steps, temperature, top_p, seed, set(eos_ids))


def _next_logits(model: CausalLM, ids: torch.Tensor, cache: KVCache) -> torch.Tensor:
    """Logits [V] after ids [1, S], appending their keys and values to the cache."""
    return model(ids, cache=cache, last_only=True)[0, -1]


@torch.no_grad()   # on a generator function: grad is off while it runs, not while the caller runs
def _decode(model: CausalLM, prompt: list[int], steps: int, temperature: float, top_p: float,
            seed: int | None, eos: set[int]) -> Iterator[int]:
    device = _device(model)
    generator = None
    if temperature > 0 and seed is not None:
        generator = torch.Generator(device=device)
        generator.manual_seed(seed)
    cache = KVCache(model.config.num_layers)
    ids = torch.tensor([prompt], dtype=torch.long, device=device)       # [1, S]: prefill once
    for _ in range(steps):
        logits = _next_logits(model, ids, cache)                         # [V] at the last position
        token = sample(logits, temperature, top_p, generator)
        yield token
        if token in eos:
            return
        ids = torch.tensor([[token]], dtype=torch.long, device=device)  # [1, 1]: one step


class TextStreamer:
    """Turns a stream of token ids into text increments.

    Each call decodes every id so far and returns the text past what was already returned, so
    merges across tokens (byte-level BPE splits a character over several tokens) come out right.
    A trailing "\\ufffd" means the last token ended inside a UTF-8 character: that tail is held
    back until the character is complete (or until `end`).
    """

    def __init__(self, tokenizer, skip_special_tokens: bool = True):
        self.tokenizer = tokenizer
        self.skip_special_tokens = skip_special_tokens
        self.ids: list[int] = []
        self.sent = 0            # characters of the decoded text returned so far

    def _decode(self) -> str:
        return self.tokenizer.decode(self.ids, skip_special_tokens=self.skip_special_tokens)

    def put(self, token: int) -> str:
        """Add one token; return the new text that is final so far (maybe "")."""
        self.ids.append(token)
        text = self._decode().rstrip("\ufffd")
        new = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return new

    def end(self) -> str:
        """Return whatever is left, incomplete characters included."""
        text = self._decode()
        new = text[self.sent:]
        self.sent = max(self.sent, len(text))
        return new


def encode_prompt(tokenizer, prompt: str, chat: bool = False, system: str | None = None) -> list[int]:
    """Token ids of a prompt: the plain text with the tokenizer's special tokens (BOS), or with
    `chat` a user turn (after an optional system turn) in the chat template, ending with the
    assistant's generation prompt."""
    if not chat:
        if system is not None:
            raise UserError("a system prompt needs the chat template: use chat mode (--chat) with --system")
        return tokenizer.encode(prompt)
    if not tokenizer.has_chat_template:
        raise UserError(f"{tokenizer.source}: the tokenizer has no chat template; "
                        "generate from the plain prompt instead (without --chat)")
    messages = ([{"role": "system", "content": system}] if system is not None else [])
    messages.append({"role": "user", "content": prompt})
    return tokenizer.apply_chat_template(messages, add_generation_prompt=True)


def generate_text(model: CausalLM, tokenizer, prompt_ids: Sequence[int], max_new_tokens: int = 256,
                  temperature: float = 0.0, top_p: float = 1.0, seed: int | None = None,
                  eos_ids: Iterable[int] | None = None) -> Iterator[str]:
    """`generate`, yielding text as it is produced instead of token ids.

    Stops at the tokenizer's and the model config's end-of-sequence ids unless `eos_ids` is given;
    end-of-sequence and other special tokens are not part of the text.
    """
    eos = list(eos_ids) if eos_ids is not None else [*tokenizer.eos_token_ids, *model.config.eos_token_id]
    streamer = TextStreamer(tokenizer, skip_special_tokens=True)
    for token in generate(model, prompt_ids, max_new_tokens, temperature, top_p, seed, eos):
        if token not in eos and (piece := streamer.put(token)):
            yield piece
    if piece := streamer.end():
        yield piece


# ---------------------------------------------------------------- task metrics (bench/quality.py)


def _prompt_ids(tokenizer, prompt: str) -> list[int]:
    """A prompt as training renders it: the user turn of the chat template with the generation prompt,
    or the plain text (special tokens added) when the tokenizer has no chat template."""
    if tokenizer.has_chat_template:
        return tokenizer.apply_chat_template([{"role": "user", "content": prompt}], add_generation_prompt=True)
    return tokenizer.encode(prompt)


def exact_match(model: CausalLM, tokenizer, records: Sequence[dict], max_new_tokens: int = 16,
                limit: int = 0, batch_size: int = 32) -> dict:
    """Share of chat records whose greedy answer equals the reference answer (both stripped).

    Each record is {"messages": [..., {"role": "assistant", "content": answer}]}: the turns before the last
    are rendered with the chat template and its generation prompt, the model answers greedily until an
    end-of-sequence id (the tokenizer's and the model config's) or `max_new_tokens`, and the stripped text
    (special tokens left out) is compared with the stripped answer. Prompts of equal length are decoded
    together (up to `batch_size` at a time, with a KV cache), which is greedy decoding of each prompt
    alone, batched. `limit` scores only the first N records (0: all). Returns {"exact_match", "n",
    "correct", "examples"}: the share right, how many were scored, right or not per scored record,
    and the first few (prompt, answer, generated) triples.
    """
    recs = list(records[:limit] if limit else records)
    eos = {*tokenizer.eos_token_ids, *model.config.eos_token_id}
    prompts = []
    for rec in recs:
        *context, _ = rec["messages"]
        prompts.append(tokenizer.apply_chat_template(list(context), add_generation_prompt=True))
    by_len: dict[int, list[int]] = {}
    for i, ids in enumerate(prompts):
        by_len.setdefault(len(ids), []).append(i)
    generated: list[list[int]] = [[] for _ in recs]
    was_training = model.training
    model.eval()
    try:
        with torch.no_grad():
            for length, members in sorted(by_len.items()):
                steps = min(max_new_tokens, model.config.max_position_embeddings - length)
                for lo in range(0, len(members), batch_size):
                    rows = members[lo:lo + batch_size]
                    cache = KVCache(model.config.num_layers)
                    ids = torch.tensor([prompts[i] for i in rows], dtype=torch.long, device=_device(model))
                    done = [False] * len(rows)
                    for _ in range(steps):
                        nxt = model(ids, cache=cache, last_only=True)[:, -1].argmax(-1)
                        for r, i in enumerate(rows):
                            if not done[r]:
                                t = int(nxt[r])
                                done[r] = t in eos
                                if not done[r]:
                                    generated[i].append(t)
                        if all(done):
                            break
                        ids = nxt[:, None]
    finally:
        model.train(was_training)
    correct, shown = [], []
    for rec, toks in zip(recs, generated):
        answer = rec["messages"][-1]["content"]
        text = tokenizer.decode(toks, skip_special_tokens=True)
        correct.append(text.strip() == answer.strip())
        if len(shown) < 5:
            shown.append({"prompt": rec["messages"][-2]["content"], "answer": answer, "generated": text})
    return {"exact_match": sum(correct) / max(len(recs), 1), "n": len(recs), "correct": correct,
            "examples": shown}


def _label_sequences(tokenizer, prompt: str, labels: Sequence[str]) -> tuple[int, list[list[int]]]:
    """(prompt length, [prompt + label token ids per label]) as training renders a {"prompt",
    "completion"} record (the chat template's user and assistant turns when there is one), cut after
    the label's own tokens (the end-of-turn text is not part of the label)."""
    prompt_ids = _prompt_ids(tokenizer, prompt)
    seqs = []
    for label in labels:
        if tokenizer.has_chat_template:
            full = tokenizer.render_chat([{"role": "user", "content": prompt},
                                          {"role": "assistant", "content": label}])
            before = tokenizer.render_chat([{"role": "user", "content": prompt}], add_generation_prompt=True)
            ids = tokenizer.encode(full[:len(before) + len(label)], add_special_tokens=False)
        else:
            ids = prompt_ids + tokenizer.encode(label, add_special_tokens=False)
        if ids[:len(prompt_ids)] != prompt_ids or len(ids) <= len(prompt_ids):
            raise UserError(f"label {label!r} does not tokenize as a continuation of the prompt {prompt!r}")
        seqs.append(ids)
    return len(prompt_ids), seqs


@torch.no_grad()
def _score_sequences(model: CausalLM, items: list[tuple[int, list[int]]]) -> list[float]:
    """Sum of log-probs of the tokens after position n of each (n, ids), in one right-padded batch; only the
    scored positions go through the LM head, in vocabulary chunks (CausalLM.token_logprobs)."""
    width = max(len(s) for _, s in items)
    batch = torch.zeros((len(items), width), dtype=torch.long)      # right padding: causal, never attended
    for i, (_, s) in enumerate(items):
        batch[i, :len(s)] = torch.tensor(s)
    device = _device(model)
    h = model.embed(batch.to(device))
    ctx = model.context(0, width, device)
    for block in model.model.layers:
        h = block(h, ctx)
    rows, targets, owner = [], [], []
    for i, (n, s) in enumerate(items):
        pos = torch.arange(n - 1, len(s) - 1)                       # position t predicts token t + 1
        rows.append(h[i, pos])
        targets.append(torch.tensor(s[n:]))
        owner += [i] * len(pos)
    logp = model.token_logprobs(torch.cat(rows), torch.cat(targets).to(device))
    out = torch.zeros(len(items)).index_add_(0, torch.tensor(owner), logp.cpu())
    return [float(v) for v in out]


def label_logprobs(model: CausalLM, tokenizer, prompt: str, labels: Sequence[str]) -> list[float]:
    """Sum of the log-probabilities of each label's tokens after the prompt (the end-of-turn text after
    the label is not scored)."""
    n, seqs = _label_sequences(tokenizer, prompt, labels)
    return _score_sequences(model, [(n, s) for s in seqs])


def label_accuracy(model: CausalLM, tokenizer, records: Sequence[dict], labels: Sequence[str],
                   limit: int = 0, batch_size: int = 16) -> dict:
    """Accuracy of choosing, for each {"prompt", "completion"} record, the label with the highest
    `label_logprobs` (`batch_size` records scored per forward pass); `limit` scores only the first N
    records (0: all). Returns {"accuracy", "n"}."""
    recs = list(records[:limit] if limit else records)
    was_training = model.training
    model.eval()
    hits = 0
    try:
        for lo in range(0, len(recs), batch_size):
            chunk = recs[lo:lo + batch_size]
            items = []
            for rec in chunk:
                n, seqs = _label_sequences(tokenizer, rec["prompt"], labels)
                items += [(n, s) for s in seqs]
            scores = _score_sequences(model, items)
            for j, rec in enumerate(chunk):
                mine = scores[j * len(labels):(j + 1) * len(labels)]
                pred = labels[max(range(len(labels)), key=mine.__getitem__)]
                hits += pred.strip() == rec["completion"].strip()
    finally:
        model.train(was_training)
    return {"accuracy": hits / max(len(recs), 1), "n": len(recs)}
