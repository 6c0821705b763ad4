"""Gradient fidelity: how close each selection method's LoRA gradients are to the exact ones.

None of the papers reports this. For every method we take the roles it uses at a step, compute
the LoRA gradients of the blocks it trains (`lora_gradients`, averaged over the batches) and
compare them, block by block, with the exact gradients of the same blocks (every role `train`):
cosine similarity and relative norm |g_method| / |g_exact| over the block's LoRA parameters
concatenated, plus one `all` row per method over every (step, block) it trained.

What to expect: a trained block gets its exact gradient whenever no block above it is `skip`
(the gradient reaching it went through every block above). So `full`, `lcsb-exact`, `lisa`,
`badam` and `freeze` are exact by construction; `lcsb` is exact for its top group when groups
are contiguous (for strided groups, only the top block) and approximate below; `random` is
approximate for any block with a skipped one above.

Mind the adapter: a fresh LoRA has B = 0, which makes every A gradient zero and says little.
Measure a trained adapter, or one with random non-zero B.
"""

from __future__ import annotations

import math

import torch

from .executor import block_lora_params, lora_gradients
from .selection import Selection


def default_selections(n: int, seed: int = 0) -> dict[str, Selection]:
    """A representative set of methods for a model with n blocks."""
    quarter = max(1, n // 4)
    k2, k4 = min(2, n), min(4, n)
    return {
        "full": Selection("full"),
        f"lcsb K={k2} contiguous": Selection("lcsb", groups=k2, grouping="contiguous"),
        f"lcsb K={k2} strided": Selection("lcsb", groups=k2, grouping="strided"),
        f"lcsb K={k4} contiguous": Selection("lcsb", groups=k4, grouping="contiguous"),
        f"lcsb K={k4} strided": Selection("lcsb", groups=k4, grouping="strided"),
        f"lcsb-exact K={k4}": Selection("lcsb-exact", groups=k4),
        f"random k={quarter}": Selection("random", active=quarter, seed=seed),
        f"lisa k={k2}": Selection("lisa", active=k2, seed=seed),
        "badam": Selection("badam"),
        f"freeze {quarter}": Selection("freeze", active=quarter),
        f"topdown top {quarter}, all every 4": Selection("topdown", active=quarter, full_every=4),
    }


def _steps(sel: Selection, step: int) -> list[int]:
    # lcsb trains one group per interval: evaluate the K groups in turn so every block is covered
    if sel.method in ("lcsb", "lcsb-exact"):
        return [step + j * sel.interval for j in range(sel.groups)]
    if sel.method == "topdown":      # a step that trains every block and one that trains the top ones
        return [step - step % sel.full_every, step - step % sel.full_every + 1] if sel.full_every > 1 else [step]
    return [step]


def _mean_grads(model, batches, roles, seed: int) -> dict[str, torch.Tensor]:
    total: dict[str, torch.Tensor] = {}
    for b, (ids, labels) in enumerate(batches):
        # same RNG for every method: LoRA dropout masks are then identical to the exact run's
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed + b)
            _, grads = lora_gradients(model, ids, labels, roles)
        for k, g in grads.items():
            g = g.double()
            total[k] = g if k not in total else total[k].add_(g)
    return {k: g / len(batches) for k, g in total.items()}


def _compare(g: torch.Tensor, ref: torch.Tensor) -> tuple[float, float]:
    ng, nr = float(g.norm()), float(ref.norm())
    cosine = float(g @ ref) / (ng * nr) if ng > 0 and nr > 0 else math.nan
    rel = ng / nr if nr > 0 else math.nan
    return cosine, rel


def fidelity(model, batches: list[tuple[torch.Tensor, torch.Tensor]], selections: dict[str, Selection] | None = None,
             step: int = 0, seed: int = 0) -> list[dict]:
    """Compare each method's LoRA gradients with the exact ones.

    Args:
        model: a CausalLM with LoRA adapters (B non-zero, see the module note).
        batches: (input_ids [B, S], labels [B, S]) pairs; gradients are averaged over them.
        selections: {name: Selection}; default `default_selections(n)`. lcsb and lcsb-exact are
            evaluated at steps step, step + interval, ... (each of their K groups once), topdown at
            a step that trains every block and the one after it, the other methods at `step`.
        step: the step whose roles are used.
        seed: RNG seed for LoRA dropout, the same for the method and the exact run.

    Returns:
        rows {"method", "step", "block", "cosine", "rel_norm"}: one per (step, trained block),
        then one with block "all" over the concatenation of all of them (step None there).
    """
    layers = model.model.layers
    n = len(layers)
    if selections is None:
        selections = default_selections(n)
    key_of = {id(p): k for k, p in model.lora_parameters().items()}
    block_keys = [[key_of[id(p)] for p in block_lora_params(block)] for block in layers]

    exact = _mean_grads(model, batches, ["train"] * n, seed)
    exact_blocks = [torch.cat([exact[k].flatten() for k in keys]) for keys in block_keys]

    rows = []
    for name, sel in selections.items():
        sel.validate(n)
        cache: dict[tuple, dict] = {}
        got, ref = [], []
        for t in _steps(sel, step):
            roles = sel.roles(t, n)
            if tuple(roles) not in cache:
                cache[tuple(roles)] = exact if roles == ["train"] * n else _mean_grads(model, batches, roles, seed)
            grads = cache[tuple(roles)]
            for b in (i for i, r in enumerate(roles) if r == "train"):
                g = torch.cat([grads[k].flatten() for k in block_keys[b]])
                cosine, rel = _compare(g, exact_blocks[b])
                rows.append(dict(method=name, step=t, block=b, cosine=cosine, rel_norm=rel))
                got.append(g)
                ref.append(exact_blocks[b])
        cosine, rel = _compare(torch.cat(got), torch.cat(ref))
        rows.append(dict(method=name, step=None, block="all", cosine=cosine, rel_norm=rel))
    return rows


def format_table(rows: list[dict], detail: bool = False) -> str:
    """One line per method: blocks trained, min / mean cosine over them, mean relative norm, and
    the cosine and relative norm over all of them concatenated. detail=True adds a line per block."""
    methods = list(dict.fromkeys(r["method"] for r in rows))
    width = max([len("method")] + [len(m) for m in methods])
    head = f"{'method':<{width}}  {'blocks':>6}  {'cos min':>8}  {'cos mean':>8}  {'rel mean':>8}  {'cos all':>8}  {'rel all':>8}"
    lines = [head, "-" * len(head)]
    for m in methods:
        per = [r for r in rows if r["method"] == m and r["block"] != "all"]
        overall = [r for r in rows if r["method"] == m and r["block"] == "all"]
        cos = [r["cosine"] for r in per]
        rel = [r["rel_norm"] for r in per]
        line = (f"{m:<{width}}  {len(per):>6}  {_fmt(min(cos, default=math.nan))}  {_fmt(_mean(cos))}  "
                f"{_fmt(_mean(rel))}")
        if overall:
            line += f"  {_fmt(overall[0]['cosine'])}  {_fmt(overall[0]['rel_norm'])}"
        lines.append(line)
        if detail:
            for r in sorted(per, key=lambda r: r["block"]):
                lines.append(f"{'':<{width}}    block {r['block']:>3} (step {r['step']}): "
                             f"cos {r['cosine']:.6f}  rel {r['rel_norm']:.4f}")
    return "\n".join(lines)


def _mean(xs) -> float:
    return sum(xs) / len(xs) if xs else math.nan


def _fmt(x: float) -> str:
    return f"{x:>8.4f}"
