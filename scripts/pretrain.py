"""Pretrain the bundled default model (DESIGN.md section 11): a byte-level BPE tokenizer and a small Llama.

    python scripts/build_tasks.py && python scripts/build_corpus.py --out /tmp/lcsb-corpus
    python scripts/pretrain.py --corpus /tmp/lcsb-corpus --out assets/model       # ~25 min on a shared 2-core CPU

Steps: (1) train a 4096-token byte-level BPE on the corpus with `tokenizers` and save it with transformers'
PreTrainedTokenizerFast, plus a ChatML chat template; (2) tokenize the corpus into one stream, documents
separated by <|endoftext|>, cut into 256-token windows, shuffled; (3) train transformers' LlamaForCausalLM
from scratch with AdamW and a cosine schedule, fp32, logging to OUT/pretrain_log.jsonl; (4) save in bfloat16 with
save_pretrained, load it back, and with that measure validation perplexity on the held-out slice, take greedy
samples and write the model card (scripts/model_card.py). Seeded: the same corpus, arguments and torch build give
the same model.
`--measure N` only times N steps (to size --steps to a time budget) and saves nothing.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import random
import sys
import time
from pathlib import Path

os.environ.setdefault("RAYON_NUM_THREADS", "2")     # tokenizers' thread pool; this machine has 2 cores
os.environ.setdefault("TOKENIZERS_PARALLELISM", "true")

import numpy as np
import tokenizers
import torch
import transformers
from tokenizers import decoders, models, pre_tokenizers, processors, trainers
from transformers import GenerationConfig, LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

SPECIALS = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\\n' + message['content'] + '<|im_end|>' + '\\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\\n' }}{% endif %}"
)
SAMPLE_PROMPTS = [
    "The json module",
    "A list is",
    "dog (noun):",
    "happy (adjective):",
    "<|im_start|>user\nWhat does 'river' mean?<|im_end|>\n<|im_start|>assistant\n",
]


def read_docs(path: Path) -> list[str]:
    with open(path, encoding="utf-8") as f:
        return [json.loads(line)["text"] for line in f]


def train_tokenizer(docs: list[str], vocab_size: int) -> PreTrainedTokenizerFast:
    tok = tokenizers.Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=SPECIALS, min_frequency=2,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(), show_progress=False)
    tok.train_from_iterator(docs, trainer=trainer, length=len(docs))
    # eos <|endoftext|> ends a document (what lcsb and MLX-LM append to {"text"} records); a chat turn ends with
    # <|im_end|>, which config.json and generation_config.json list as a second end-of-sequence id.
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, eos_token="<|endoftext|>", pad_token="<|endoftext|>",
                                   additional_special_tokens=SPECIALS[1:], model_max_length=2048)
    fast.chat_template = CHATML
    return fast


def save_tokenizer(tok: PreTrainedTokenizerFast, folder: Path) -> None:
    """save_pretrained, with the chat template inside tokenizer_config.json and the config readable by transformers
    4.x too: v5 writes tokenizer_class "TokenizersBackend" and a list under extra_special_tokens (4.x wants a
    dict there); its PreTrainedTokenizerFast alias and additional_special_tokens load the same in both."""
    tok.save_pretrained(folder, save_jinja_files=False)
    (folder / "chat_template.jinja").unlink(missing_ok=True)    # a stale one would override the config's template
    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    for key in ("is_local", "local_files_only"):          # load-time bookkeeping, if tok was loaded from disk
        cfg.pop(key, None)
    extra = cfg.pop("extra_special_tokens", None)
    if isinstance(extra, list):
        cfg["additional_special_tokens"] = extra
    elif extra:
        cfg["extra_special_tokens"] = extra
    path.write_text(json.dumps(cfg, indent=2, ensure_ascii=False) + "\n")


def token_windows(tok: PreTrainedTokenizerFast, docs: list[str], seq: int) -> torch.Tensor:
    """[n, seq + 1] windows of the stream `doc <|endoftext|> doc <|endoftext|> ...`, in order."""
    eos = tok.convert_tokens_to_ids("<|endoftext|>")
    ids: list[int] = []
    for enc in tok.backend_tokenizer.encode_batch(docs, add_special_tokens=False):
        ids.extend(enc.ids)
        ids.append(eos)
    n = (len(ids) - 1) // seq
    stream = torch.tensor(np.asarray(ids[: n * seq + 1], dtype=np.int64))
    # windows overlap by one token so every token (but the first) is a target exactly once
    return torch.stack([stream[i * seq: i * seq + seq + 1] for i in range(n)])


def lm_loss(model: LlamaForCausalLM, w: torch.Tensor) -> torch.Tensor:
    # w: [B, S+1]; every one of the S positions predicts the next token
    logits = model(input_ids=w[:, :-1]).logits                                # [B, S, V]
    return torch.nn.functional.cross_entropy(logits.flatten(0, 1).float(), w[:, 1:].flatten())


@torch.no_grad()
def evaluate(model: LlamaForCausalLM, windows: torch.Tensor, batch: int) -> float:
    model.eval()
    total, count = 0.0, 0
    for i in range(0, len(windows), batch):
        w = windows[i: i + batch]
        loss = lm_loss(model, w)
        total += loss.item() * w.shape[0]
        count += w.shape[0]
    model.train()
    return total / count


def lr_at(step: int, steps: int, warmup: int, lr: float, min_lr: float) -> float:
    if step < warmup:
        return lr * (step + 1) / warmup
    progress = (step - warmup) / max(1, steps - warmup)
    return min_lr + 0.5 * (lr - min_lr) * (1 + math.cos(math.pi * progress))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--corpus", type=Path, default=Path("/tmp/lcsb-corpus"))
    ap.add_argument("--out", type=Path, default=Path(__file__).resolve().parent.parent / "assets" / "model")
    ap.add_argument("--vocab", type=int, default=4096)
    ap.add_argument("--hidden", type=int, default=192)
    ap.add_argument("--intermediate", type=int, default=512)
    ap.add_argument("--layers", type=int, default=8)
    ap.add_argument("--heads", type=int, default=4)
    ap.add_argument("--kv-heads", type=int, default=2)
    ap.add_argument("--seq", type=int, default=256)
    ap.add_argument("--batch", type=int, default=8)
    ap.add_argument("--steps", type=int, default=600)
    ap.add_argument("--warmup", type=int, default=30)
    ap.add_argument("--lr", type=float, default=3e-3)
    ap.add_argument("--min-lr", type=float, default=3e-4)
    ap.add_argument("--weight-decay", type=float, default=0.1)
    ap.add_argument("--log-every", type=int, default=10)
    ap.add_argument("--eval-every", type=int, default=100)
    ap.add_argument("--eval-windows", type=int, default=160, help="validation windows for the final perplexity")
    # One thread: on this shared 2-core machine a 2-thread step ran 3-4x slower than a 1-thread one once other
    # processes held the cores (the threads wait on each other at every op).
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--measure", type=int, default=0, help="only time this many steps, save nothing")
    ap.add_argument("--finish-only", action="store_true",
                    help="only redo the final validation, samples and model card of the run saved in --out")
    args = ap.parse_args()
    if args.finish_only:
        return finish_only(args)

    torch.set_num_threads(args.threads)
    random.seed(args.seed)
    torch.manual_seed(args.seed)
    t0 = time.time()

    # 1. tokenizer
    train_docs, valid_docs = read_docs(args.corpus / "train.jsonl"), read_docs(args.corpus / "valid.jsonl")
    tok = train_tokenizer(train_docs, args.vocab)
    print(f"tokenizer: {len(tok)} tokens ({time.time() - t0:.0f}s)", flush=True)

    # 2. data
    train = token_windows(tok, train_docs, args.seq)
    valid = token_windows(tok, valid_docs, args.seq)
    g = torch.Generator().manual_seed(args.seed)
    train = train[torch.randperm(len(train), generator=g)]
    valid = valid[torch.randperm(len(valid), generator=g)][: args.eval_windows]
    n_chars = sum(map(len, train_docs))
    print(f"data: {len(train)} train windows ({len(train) * args.seq / 1e6:.2f} M tokens, "
          f"{n_chars / (len(train) * args.seq):.2f} chars/token), {len(valid)} valid windows "
          f"({time.time() - t0:.0f}s)", flush=True)

    # 3. model
    eos_ids = [tok.convert_tokens_to_ids(t) for t in ("<|endoftext|>", "<|im_end|>")]
    config = LlamaConfig(
        vocab_size=len(tok), hidden_size=args.hidden, intermediate_size=args.intermediate,
        num_hidden_layers=args.layers, num_attention_heads=args.heads, num_key_value_heads=args.kv_heads,
        max_position_embeddings=2048, rope_theta=10000.0, rms_norm_eps=1e-5, tie_word_embeddings=True,
        bos_token_id=None, eos_token_id=eos_ids, pad_token_id=eos_ids[0], initializer_range=0.02,
    )
    model = LlamaForCausalLM(config)
    n_params = sum(p.numel() for p in model.parameters())
    print(f"model: {n_params / 1e6:.2f} M parameters", flush=True)
    decay = [p for n, p in model.named_parameters() if p.dim() >= 2]
    no_decay = [p for n, p in model.named_parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": args.weight_decay},
                             {"params": no_decay, "weight_decay": 0.0}], lr=args.lr, betas=(0.9, 0.95), eps=1e-8)

    steps = args.measure or args.steps
    if steps * args.batch > len(train):
        print(f"note: {steps * args.batch} windows requested, {len(train)} available: data repeats", flush=True)
    args.out.mkdir(parents=True, exist_ok=True)
    log = None if args.measure else open(args.out / "pretrain_log.jsonl", "w")
    model.train()
    t_train = time.time()
    for step in range(steps):
        lr = lr_at(step, steps, args.warmup, args.lr, args.min_lr)
        for group in opt.param_groups:
            group["lr"] = lr
        idx = torch.arange(step * args.batch, (step + 1) * args.batch) % len(train)
        w = train[idx]
        loss = lm_loss(model, w)
        loss.backward()
        gnorm = torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        opt.zero_grad(set_to_none=True)
        if (step + 1) % args.log_every == 0 or step == 0 or step + 1 == steps:
            elapsed = time.time() - t_train
            rec = {"step": step + 1, "loss": round(loss.item(), 4), "lr": round(lr, 6),
                   "grad_norm": round(gnorm.item(), 3), "elapsed_s": round(elapsed, 1),
                   "tokens_per_s": round((step + 1) * args.batch * args.seq / elapsed)}
            if log and ((step + 1) % args.eval_every == 0) and step + 1 != steps:
                rec["valid_loss"] = round(evaluate(model, valid[:32], args.batch), 4)
            print(json.dumps(rec), flush=True)
            if log:
                log.write(json.dumps(rec) + "\n")
                log.flush()
    train_s = time.time() - t_train
    print(f"{steps} steps in {train_s:.0f}s ({steps / train_s:.3f} steps/s)", flush=True)
    if args.measure:
        return

    # 4. save in bfloat16; measure and sample the model as loaded back from disk, exactly what ships. (Not the
    # in-memory model cast to bfloat16 and back: that also rounds RoPE's inv_freq buffer, which a load recomputes.)
    log.close()
    model.to(torch.bfloat16).save_pretrained(args.out)
    GenerationConfig(eos_token_id=eos_ids, pad_token_id=eos_ids[0], do_sample=False).save_pretrained(args.out)
    save_tokenizer(tok, args.out)
    meta = {"args": {k: str(v) if isinstance(v, Path) else v for k, v in vars(args).items()},
            "parameters": n_params, "train_windows": len(train), "chars_per_token": n_chars / (len(train) * args.seq),
            "steps": steps, "train_seconds": round(train_s), "prepare_seconds": round(t_train - t0)}
    finish(args.out, valid, meta)


def finish(out: Path, valid: torch.Tensor, meta: dict) -> None:
    """Final validation loss, greedy samples, pretrain_summary.json, the final line of pretrain_log.jsonl and the
    model card, from the saved folder."""
    t0 = time.time()
    model = LlamaForCausalLM.from_pretrained(out, dtype=torch.float32).eval()
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    batch = meta["args"]["batch"]
    valid_loss = evaluate(model, valid, batch)
    final = {"final": True, "steps": meta["steps"], "train_seconds": meta["train_seconds"],
             "valid_windows": len(valid), "valid_tokens": valid.shape[0] * (valid.shape[1] - 1),
             "valid_loss": round(valid_loss, 4), "valid_perplexity": round(math.exp(valid_loss), 2)}
    print(json.dumps(final), flush=True)
    log_path = out / "pretrain_log.jsonl"
    lines = [line for line in log_path.read_text().splitlines() if '"final"' not in line]
    log_path.write_text("\n".join([*lines, json.dumps(final)]) + "\n")

    eos_ids = list(model.generation_config.eos_token_id)
    samples = []
    for prompt in SAMPLE_PROMPTS:
        ids = torch.tensor([tok.encode(prompt)])
        gen = model.generate(ids, max_new_tokens=40, do_sample=False, eos_token_id=eos_ids, pad_token_id=eos_ids[0])
        samples.append({"prompt": prompt, "completion": tok.decode(gen[0, ids.shape[1]:])})
        print(json.dumps(samples[-1]), flush=True)
    meta = {**meta, **final, "samples": samples,
            "total_seconds": meta["prepare_seconds"] + meta["train_seconds"] + round(time.time() - t0),
            "torch": torch.__version__, "transformers": transformers.__version__,
            "tokenizers": tokenizers.__version__,
            "python": sys.version.split()[0], "machine": platform.machine()}
    (out / "pretrain_summary.json").write_text(json.dumps(meta, indent=1, ensure_ascii=False) + "\n")
    sys.path.insert(0, str(Path(__file__).resolve().parent))
    from model_card import write_card
    write_card(out)
    print(f"saved to {out}, with README.md", flush=True)


def finish_only(args: argparse.Namespace) -> None:
    """--finish-only: redo step 4 for a saved run, with the arguments it recorded (pretrain_summary.json)."""
    meta = json.loads((args.out / "pretrain_summary.json").read_text())
    a = meta["args"]
    torch.set_num_threads(args.threads)
    tok = PreTrainedTokenizerFast.from_pretrained(args.out)
    valid = token_windows(tok, read_docs(args.corpus / "valid.jsonl"), a["seq"])
    g = torch.Generator().manual_seed(a["seed"])
    torch.randperm(meta["train_windows"], generator=g)    # the draw that shuffled the training windows
    valid = valid[torch.randperm(len(valid), generator=g)][: a["eval_windows"]]
    meta.setdefault("prepare_seconds", meta.get("total_seconds", 0) - meta["train_seconds"])
    finish(args.out, valid, {k: v for k, v in meta.items() if k not in ("final", "samples")})


if __name__ == "__main__":
    main()
