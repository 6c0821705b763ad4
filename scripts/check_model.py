"""Check the bundled model folder against transformers and show what it generates.

    python scripts/check_model.py assets/model

1. transformers' AutoModelForCausalLM / AutoTokenizer load it;
2. lcsb.load_model gives the same logits (fp32, max |diff| / max |logit| < 1e-4) on a text and a chat sample;
3. lcsb's tokenizer renders and encodes every chat record of assets/data/chat/valid.jsonl as transformers does,
   and encodes the other tasks' records the same;
4. greedy generations, with lcsb and with transformers (which must agree), from a few prompts.
Exits non-zero if a check fails.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

import lcsb
from lcsb.evaluate import encode_prompt, generate
from lcsb.model.tokenizer import load_tokenizer

ROOT = Path(__file__).resolve().parent.parent
PROMPTS = [
    ("The json module", False),
    ("To open a file, use", False),
    ("river (noun):", False),
    ("What does 'river' mean?", True),
    ("What kind of thing is 'oak' (a tree of the genus Quercus)? Answer with one word.", True),
]


def read_jsonl(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text(encoding="utf-8").splitlines() if line.strip()]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("model", type=Path, nargs="?", default=ROOT / "assets" / "model")
    ap.add_argument("--data", type=Path, default=ROOT / "assets" / "data")
    ap.add_argument("--max-new-tokens", type=int, default=30)
    args = ap.parse_args()
    torch.set_num_threads(1)
    failures = []

    hf = AutoModelForCausalLM.from_pretrained(args.model, dtype=torch.float32, attn_implementation="eager").eval()
    hf_tok = AutoTokenizer.from_pretrained(args.model)
    model = lcsb.load_model(args.model)
    tok = load_tokenizer(args.model)
    n = sum(p.numel() for p in hf.parameters())
    print(f"transformers: {type(hf).__name__}, {n:,} parameters, {hf.config.num_hidden_layers} layers; "
          f"tokenizer {type(hf_tok).__name__}, {len(hf_tok)} tokens")

    # logits parity on real text and on a rendered chat
    chat = read_jsonl(args.data / "chat" / "valid.jsonl")
    domain = read_jsonl(args.data / "domain" / "valid.jsonl")
    for name, ids in [("domain text", hf_tok(domain[0]["text"])["input_ids"][:200]),
                      ("chat record", hf_tok.apply_chat_template(chat[0]["messages"], tokenize=True,
                                                                 return_dict=False))]:
        ids = torch.tensor([list(ids)])
        with torch.no_grad():
            want = hf(ids).logits.float()
            got = model(ids)
        rel = ((want - got).abs().max() / want.abs().max()).item()
        print(f"logits {name} ({ids.shape[1]} tokens): max|diff|/max|logit| = {rel:.2e}")
        if rel >= 1e-4:
            failures.append(f"logits {name}: {rel:.2e}")

    # tokenizer and chat template parity
    bad = 0
    for r in chat:
        for gen in (False, True):
            msgs = r["messages"][:1] if gen else r["messages"]
            a = tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            b = hf_tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=False)
            ia = tok.apply_chat_template(msgs, add_generation_prompt=gen)
            ib = list(hf_tok.apply_chat_template(msgs, add_generation_prompt=gen, tokenize=True, return_dict=False))
            bad += (a != b) + (ia != ib)
    texts = [r["text"] for r in domain] + [r["prompt"] + r["completion"]
                                           for r in read_jsonl(args.data / "classify" / "valid.jsonl")]
    bad_text = sum(tok.encode(t) != hf_tok(t)["input_ids"] for t in texts)
    print(f"chat template: {len(chat)} records x (full, generation prompt): {bad} mismatches; "
          f"encode: {len(texts)} texts: {bad_text} mismatches")
    print("rendered:", json.dumps(tok.apply_chat_template(chat[0]["messages"], tokenize=False)))
    if bad or bad_text:
        failures.append(f"tokenizer: {bad} chat, {bad_text} text mismatches")

    # greedy samples, lcsb vs transformers
    eos = [*tok.eos_token_ids, *model.config.eos_token_id]
    for prompt, is_chat in PROMPTS:
        ids = encode_prompt(tok, prompt, chat=is_chat)
        ours = list(generate(model, ids, args.max_new_tokens, eos_ids=eos))
        theirs = hf.generate(torch.tensor([ids]), max_new_tokens=args.max_new_tokens, do_sample=False,
                             eos_token_id=eos, pad_token_id=tok.pad_token_id)[0, len(ids):].tolist()
        print(f"{'[chat] ' if is_chat else ''}{prompt!r} -> {tok.decode(ours, skip_special_tokens=False)!r}")
        if ours != theirs:
            failures.append(f"generation differs for {prompt!r}: {tok.decode(theirs)!r}")

    if failures:
        raise SystemExit("FAILED:\n  " + "\n  ".join(failures))
    print("all checks passed")


if __name__ == "__main__":
    main()
