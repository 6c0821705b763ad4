"""A tiny but complete model folder (random Llama + real byte-level BPE tokenizer with a ChatML
template) and small JSONL data sets, for tests of the run: train, resume, eval, export."""

from __future__ import annotations

import json
import random
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
from transformers import PreTrainedTokenizerFast

import hf

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>\\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
WORDS = "the a cat dog sat on mat red blue green one two three yes no what is colour of sky grass".split()


def corpus(n: int = 300, seed: int = 0) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(3, 12))) for _ in range(n)]


def make_model(folder: Path, family: str = "llama", layers: int = 4, seed: int = 0, **over) -> Path:
    """Tokenizer (vocab ~300) and a random `family` model with a matching vocabulary, saved in `folder`."""
    folder = Path(folder)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    tok.train_from_iterator(corpus(), trainers.BpeTrainer(vocab_size=300, special_tokens=SPECIALS,
                                                          initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|im_end|>", pad_token="<|endoftext|>",
                                   clean_up_tokenization_spaces=False)
    fast.chat_template = CHATML
    fast.save_pretrained(folder)
    kw = dict(num_hidden_layers=layers, vocab_size=len(fast), bos_token_id=tok.token_to_id("<|endoftext|>"),
              eos_token_id=tok.token_to_id("<|im_end|>"), pad_token_id=tok.token_to_id("<|endoftext|>"))
    kw.update(over)
    hf.make(family, folder, seed=seed, **kw)
    return folder


def shared_model(base: Path, layers: int) -> Path:
    """make_model's `layers`-deep Llama in `base`/tiny-llama-<layers>, built once per test session."""
    folder = Path(base) / f"tiny-llama-{layers}"
    if not (folder / "config.json").exists():
        make_model(folder, layers=layers)
    return folder


def write_jsonl(path: Path, records) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    return path


def make_chat_data(folder: Path, n_train: int = 40, n_valid: int = 8, seed: int = 0) -> Path:
    """A learnable chat task: "what is colour of X" -> a fixed colour per X."""
    rng = random.Random(seed)
    answers = {"sky": "blue", "grass": "green", "cat": "red", "dog": "blue", "mat": "green"}

    def rec():
        k = rng.choice(sorted(answers))
        return {"messages": [{"role": "user", "content": f"what is colour of {k}"},
                             {"role": "assistant", "content": answers[k]}]}

    write_jsonl(Path(folder) / "train.jsonl", [rec() for _ in range(n_train)])
    write_jsonl(Path(folder) / "valid.jsonl", [rec() for _ in range(n_valid)])
    return Path(folder)


def make_text_data(folder: Path, n_train: int = 40, n_valid: int = 8) -> Path:
    write_jsonl(Path(folder) / "train.jsonl", [{"text": t} for t in corpus(n_train, seed=1)])
    write_jsonl(Path(folder) / "valid.jsonl", [{"text": t} for t in corpus(n_valid, seed=2)])
    return Path(folder)
