"""Write the model card, MODEL/README.md, from what pretrain.py recorded (pretrain_summary.json, config.json).

    python scripts/model_card.py assets/model        # pretrain.py runs this itself at the end
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

COMMANDS = """\
apt-get install -y python3.11-doc wordnet-base perl-doc
python scripts/build_tasks.py
python scripts/build_corpus.py --out /tmp/lcsb-corpus
python scripts/pretrain.py --corpus /tmp/lcsb-corpus --out assets/model{extra}
python scripts/check_model.py assets/model"""


def write_card(folder: Path) -> str:
    s = json.loads((folder / "pretrain_summary.json").read_text())
    c = json.loads((folder / "config.json").read_text())
    a = s["args"]
    defaults = {"vocab": 4096, "hidden": 192, "intermediate": 512, "layers": 8, "heads": 4, "kv_heads": 2,
                "seq": 256, "batch": 8, "steps": 600, "warmup": 30, "lr": 3e-3, "min_lr": 3e-4,
                "weight_decay": 0.1, "threads": 1, "seed": 0}
    extra = "".join(f" --{k.replace('_', '-')} {a[k]}" for k, v in defaults.items() if k in a and a[k] != v)
    size = (folder / "model.safetensors").stat().st_size
    tokens = s["steps"] * a["batch"] * a["seq"]
    log = [json.loads(line) for line in (folder / "pretrain_log.jsonl").read_text().splitlines()]
    curve = ", ".join(f"step {r['step']}: {r['valid_loss']:.2f}"
                      for r in log if "valid_loss" in r and not r.get("final"))
    heads, kv, hidden = c["num_attention_heads"], c["num_key_value_heads"], c["hidden_size"]
    theta = c.get("rope_theta", c.get("rope_parameters", {}).get("rope_theta"))
    def cell(text: str) -> str:   # one line, escaped; GitHub tables need \| even inside code spans
        return "`" + json.dumps(text, ensure_ascii=False)[1:-1].replace("|", "\\|") + "`"
    samples = "\n".join(f"| {cell(x['prompt'])} | {cell(x['completion'])} |" for x in s["samples"])
    card = f"""# lcsb bundled model

A {s['parameters'] / 1e6:.2f} M-parameter Llama (`LlamaForCausalLM`) pretrained from scratch by
`scripts/pretrain.py` for {tokens / 1e6:.2f} M tokens, drawn from a {s['train_windows'] * a['seq'] / 1e6:.1f} M-token
corpus of freely licensed text (the Python 3.11 documentation and WordNet 3.0 glosses, from Debian packages; see
`../README.md` for the data and licences). It is the default model of `lcsb train`: small enough that a
fine-tuning step takes well under a second on a CPU, deep enough ({c['num_hidden_layers']} layers) that selecting
layer groups means something. Its pretraining took {s['train_seconds'] / 60:.0f} minutes of a shared 2-core CPU,
so it is far from converged: it has learned the shape of its corpus better than its content (see the samples
below), which leaves fine-tuning plenty to do.

## Architecture

| | |
| --- | --- |
| layers | {c['num_hidden_layers']} |
| hidden size | {c['hidden_size']} |
| attention heads / KV heads | {heads} / {kv} (head dim {hidden // heads}) |
| MLP (SwiGLU) intermediate size | {c['intermediate_size']} |
| vocabulary | {c['vocab_size']} (byte-level BPE), tied input/output embeddings |
| positions | RoPE, theta {theta}; trained on {a['seq']}-token windows |
| parameters | {s['parameters']:,} |
| weights | `model.safetensors`, bfloat16, {size / 1e6:.1f} MB |

Tokenizer: byte-level BPE trained on the same corpus; special tokens `<|endoftext|>` (end of document; the
tokenizer's eos and pad), `<|im_start|>`, `<|im_end|>` (end of a chat turn; config.json and generation_config.json
list both as eos ids). No BOS. The ChatML chat template renders `<|im_start|>role\\ncontent<|im_end|>\\n` per turn
and `<|im_start|>assistant\\n` as the generation prompt.

## Pretraining

AdamW (betas 0.9/0.95, weight decay {a['weight_decay']} on matrices), peak learning rate {a['lr']} after
{a['warmup']} warmup steps, cosine to {a['min_lr']}; gradient clipping 1.0; batch {a['batch']} x {a['seq']}
tokens; {s['steps']} steps = {tokens / 1e6:.2f} M tokens ({tokens / (s['train_windows'] * a['seq']):.0%} of
one epoch); fp32, seed {a['seed']}, {a['threads']} CPU thread(s). Training took {s['train_seconds'] / 60:.1f} min
on a shared 2-core CPU ({s['total_seconds'] / 60:.1f} min with tokenizer training and tokenization). The loss of
every {a['log_every']}th step is in `pretrain_log.jsonl`.

Validation (held-out {s['valid_windows']} windows, {s['valid_tokens']:,} tokens of documents never trained on,
with the bfloat16 weights as shipped): **loss {s['valid_loss']:.3f}, perplexity {s['valid_perplexity']:.1f}**.
{f"Validation loss during training (first 32 windows): {curve}." if curve else ""}

Greedy samples (40 new tokens):

| prompt | completion |
| --- | --- |
{samples}

## Rebuilding

```
{COMMANDS.format(extra=extra)}
```
Versions used: torch {s['torch']}, transformers {s['transformers']}, tokenizers {s['tokenizers']}, Python
{s['python']} ({s['machine']}).
"""
    (folder / "README.md").write_text(card)
    return card


if __name__ == "__main__":
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("folder", type=Path, nargs="?",
                    default=Path(__file__).resolve().parent.parent / "assets" / "model")
    print(write_card(ap.parse_args().folder))
