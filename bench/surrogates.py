"""Can a cheap surrogate stand in for a block's Jacobian? A research check behind the `topdown` method.

    python bench/surrogates.py --model SmolLM2-135M-Instruct.Q4_1.gguf --adapter RUN [--data assets/data/chat]

LCSB passes the gradient through a skipped block by the residual identity. Cheaper than an exact
VJP, but on SmolLM2-135M the trained blocks' gradients then point elsewhere (bench/results/
fidelity_smollm2_chat.json: cosine 0.0-0.3 below block 16). Two surrogates that cost a fraction of a
block's VJP might do better: keep the attention sublayer's Jacobian and drop the MLP's ("attn",
about a quarter of a Llama block's weights), or keep the MLP's and drop the attention's ("mlp").

For each group of blocks (the K=4 contiguous groups below the top one), the group is trained with
exact gradients, the blocks between it and the top `--top` blocks use the surrogate, the top blocks
are exact; the group's LoRA gradients (summed over --batches records) are compared with the exact
ones: cosine and relative norm per block. Plain autograd on the dequantized model (pre-norm
Llama/Qwen blocks: input_layernorm, self_attn, post_attention_layernorm, mlp). JSON to --out.
"""

from __future__ import annotations

import argparse
import json
import sys
import types
from pathlib import Path

import torch

REPO = Path(__file__).resolve().parents[1]
SURROGATES = ("skip", "attn", "mlp")


def surrogate_forward(block, mode: str):
    """The block's forward whose gradient is the surrogate's (the value is the exact block output)."""
    exact = types.MethodType(type(block).forward, block)

    def forward(h, ctx, cache=None):
        if mode == "exact":
            return exact(h, ctx)
        if mode == "skip":                      # identity Jacobian: LCSB
            with torch.no_grad():
                d = exact(h, ctx) - h
            return h + d
        if mode == "attn":                      # I + J_attn: the MLP's Jacobian dropped
            h1 = h + block.self_attn(block.input_layernorm(h), ctx)
            with torch.no_grad():
                d = block.mlp(block.post_attention_layernorm(h1))
            return h1 + d
        with torch.no_grad():                   # "mlp": the attention's Jacobian dropped
            a = block.self_attn(block.input_layernorm(h), ctx)
        h1 = h + a
        return h1 + block.mlp(block.post_attention_layernorm(h1))
    return forward


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--model", required=True)
    ap.add_argument("--adapter", help="measure at this trained adapter (default: random non-zero LoRA)")
    ap.add_argument("--data", default=str(REPO / "assets" / "data" / "chat"))
    ap.add_argument("--batches", type=int, default=6)
    ap.add_argument("--groups", type=int, default=4)
    ap.add_argument("--top", type=int, help="exact blocks at the top (default: the top group)")
    ap.add_argument("--out", default=str(REPO / "bench" / "results" / "surrogates.json"))
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    from lcsb import LoraConfig, load_model
    from lcsb.data import batches, load_dataset
    from lcsb.engine.selection import groups_of
    from lcsb.model.tokenizer import load_tokenizer

    tok = load_tokenizer(args.model)
    splits = load_dataset(args.data, tok, max_seq_len=256)
    torch.manual_seed(0)
    model = load_model(args.model, adapter=args.adapter, lora=None if args.adapter else LoraConfig(rank=16))
    params = {k: p.requires_grad_(True) for k, p in model.lora_parameters().items()}
    if not args.adapter:
        with torch.no_grad():
            for k, p in params.items():
                if "lora_B" in k:
                    p.normal_(0, 0.02)
    data = list(batches(splits.train, 1, 0, 0, pad_token_id=tok.pad_token_id))[:args.batches]
    layers = model.model.layers
    n = len(layers)
    if not all(hasattr(b, "post_attention_layernorm") and hasattr(b, "mlp") for b in layers):
        sys.exit(f"{args.model}: pre-norm Llama/Qwen blocks only")
    groups = groups_of(n, args.groups, "contiguous")
    top = args.top or len(groups[-1])
    keys = [[k for k in params if f".layers.{i}." in k] for i in range(n)]

    def block_grads(modes: dict[int, str]) -> list[torch.Tensor | None]:
        for i, b in enumerate(layers):
            b.forward = surrogate_forward(b, modes.get(i, "exact"))
        for p in params.values():
            p.grad = None
        for ids, labels in data:
            shifted = torch.full_like(labels, -100)
            shifted[:, :-1] = labels[:, 1:]
            logits = model(ids).float()
            torch.nn.functional.cross_entropy(logits.flatten(0, 1), shifted.flatten(), ignore_index=-100,
                                              reduction="sum").backward()
        out = []
        for ks in keys:
            gs = [params[k].grad for k in ks]
            out.append(None if any(g is None for g in gs) else torch.cat([g.flatten().double() for g in gs]))
        return out

    exact = block_grads({})
    rows = []
    for s in SURROGATES:
        for g in groups[:-1]:
            lo, hi = g[0], g[-1] + 1
            if hi >= n - top:
                continue                         # nothing between the group and the exact top
            got = block_grads({i: s for i in range(hi, n - top)})
            for i in range(lo, hi):
                cos = float(got[i] @ exact[i] / (got[i].norm() * exact[i].norm()))
                rows.append(dict(surrogate=s, block=i, surrogate_blocks=[hi, n - top], cosine=cos,
                                 rel_norm=float(got[i].norm() / exact[i].norm())))
        mine = [r for r in rows if r["surrogate"] == s]
        print(f"{s:>5}: cosine per block " + " ".join(f"{r['cosine']:.2f}" for r in mine) +
              f"  (mean {sum(r['cosine'] for r in mine) / max(len(mine), 1):.2f}); relative norm mean "
              f"{sum(r['rel_norm'] for r in mine) / max(len(mine), 1):.2f}", flush=True)
    Path(args.out).write_text(json.dumps(dict(model=str(args.model), adapter=args.adapter, batches=args.batches,
                                              top=top, rows=rows), indent=2).replace(str(REPO) + "/", ""))
    print(f"wrote {args.out}", file=sys.stderr)


if __name__ == "__main__":
    main()
