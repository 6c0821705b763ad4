"""The training step: MeBP's block-wise checkpointing with LCSB's per-block roles.

Design note
-----------
Each block has a role this step: `train` (LoRA gradients wanted), `through` (no LoRA gradients,
but the gradient must flow exactly to blocks below) or `skip` (gradient passes by the residual
identity: g_l = g_{l+1}). Let `low` be the lowest `train` block; the backward visits exactly the
blocks l >= low whose role is not `skip`, and nothing below `low`.

Forward (no autograd anywhere): embed; for each block, if the backward will visit it save its
input h_l (in RAM, or in a memory-mapped file with activations="disk"), then decompress the
block's weights once, run it, drop the weights. Only block-boundary tensors are kept: no
activation inside a block survives its forward.

Head: final norm, LM head and masked cross-entropy for the counted positions only (labels shifted
inside, -100 ignored). The vocabulary is walked in chunks with an online softmax, so the
[tokens x vocab] logits never exist and the head weight is decompressed one chunk at a time and
only once: each chunk adds its share of the loss normaliser and of softmax @ W to running sums
(rescaled when the running max moves, as in flash attention). That yields the loss and
g_N = dL/dh_N in one pass. The step appends tokens to its sequence (label -100) up to a multiple of
TOKEN_MULTIPLE, and the head pads its counted tokens with zero columns likewise: CPU BLAS is
1.3-1.6x slower at other token counts, and causal attention keeps appended tokens from changing
anything before them.

Backward, l = N-1 down to low: `skip` leaves g alone (no recompute, no decompression); `train` and
`through` decompress the block once and reuse that copy for the recompute under autograd and its
VJP: g_l = g_{l+1} + J_l^T g_{l+1}, plus the LoRA gradients for `train`. LoRA dropout masks are
replayed by restoring the RNG state saved before the block's forward. The lowest block needs no
input gradient, so none is asked for. With decompress="linear" no block is decompressed whole:
each Linear decompresses its weight into the model's workspace when it runs and again in the VJP,
so one matrix is resident instead of a block, for one more decompression per visited Linear.
Below STREAM_TOKENS tokens a step runs that way whatever `decompress` says: with few tokens a
matmul is too short to hide reading a block's float weights back from memory, and a cache-sized
chunk of rows decompressed twice costs less than one read of them from memory (less memory, too).

Checkpoints on disk (activations="disk") are written to an unlinked scratch file mapped shared;
each one's pages leave the resident set as soon as it is written (the page cache holds them, and
can write them out under pressure) and come back when the backward reads them.

With lcsb's caching allocator installed (runtime.py), the step empties its cache at the end of
the forward, the head and the backward, and sizes it for one block's temporaries: the blocks one
block frees serve the next one, and no phase's leftovers stay resident in the next.

With every block `train` the gradients are exactly those of plain autograd on the same
(dequantized) model; the loss is the same in every mode because the forward never changes.
"""

from __future__ import annotations

import contextlib
import mmap
import os
import tempfile
import time
from dataclasses import dataclass, field

import torch

from ..errors import UserError
from ..runtime import limit_cache, packed, release_cached
from ..model.core import CausalLM
from ..model.linear import ROW_CHUNK_BYTES, materialized, output_unused, softcap, vocab_chunks
from .selection import ROLES, Plan
# below this many tokens (batch x seq) a step decompresses one matrix at a time, a few MB of rows
# at once, even with decompress="block": a short matmul cannot hide reading a block's float weights
# back from memory (60 MB on Qwen2.5-0.5B, past the cache), and a cache-sized chunk decompressed
# twice is cheaper than one read from memory (README "The engine": the measured crossover)
STREAM_TOKENS = 128
# MKL's sgemm runs 1.3-1.6x slower when the token dimension is not a multiple of 16 (1 thread, 1024 x
# 896 weight: 57-72 GFLOP/s at 57, 63, 127 tokens, 91-98 at 48, 64, 80, 96, 128); a step pads its
# sequence, and the head its counted tokens, up to one (README "The engine")
TOKEN_MULTIPLE = 16
DECOMPRESS = ("block", "linear")


@dataclass
class StepResult:
    loss: float                      # mean over counted tokens
    tokens: int                      # counted (label != -100) tokens
    visited: list[int]               # blocks the backward recomputed
    timings: dict[str, float] = field(default_factory=dict)


class _BlockInputs:
    """The saved inputs of the blocks the backward visits (MeBP's block-boundary checkpoints; not run
    checkpoints, not model checkpoints), for one step, in RAM or in a memory-mapped scratch file."""

    def __init__(self, mode: str, count: int, shape, dtype):
        self.mode, self.slots = mode, {}
        self.file = None
        if mode == "disk" and count:
            numel = int(torch.Size(shape).numel())
            nbytes = numel * dtype.itemsize
            self.stride = -(-nbytes // mmap.PAGESIZE) * mmap.PAGESIZE      # each slot on its own pages
            self.shape, self.dtype, self.nbytes = tuple(shape), dtype, nbytes
            fd, path = tempfile.mkstemp(prefix="lcsb-act-", suffix=".bin")
            try:
                os.unlink(path)        # the mapping keeps the data alive; nothing is left behind on a crash
                os.ftruncate(fd, count * self.stride)
                self.file = mmap.mmap(fd, count * self.stride, mmap.MAP_SHARED)
            finally:
                os.close(fd)
        elif mode not in ("ram", "disk"):
            raise UserError(f"activations must be 'ram' or 'disk', got {mode!r}")

    def _slot(self, i: int) -> torch.Tensor:
        return torch.frombuffer(self.file, dtype=self.dtype, count=self.nbytes // self.dtype.itemsize,
                                offset=i * self.stride).view(self.shape)

    def put(self, layer: int, h: torch.Tensor):
        if self.file is None:
            self.slots[layer] = h
        else:
            i = len(self.slots)
            self._slot(i).copy_(h)
            if hasattr(mmap, "MADV_DONTNEED"):       # shared file mapping: the data stays in the page cache
                self.file.madvise(mmap.MADV_DONTNEED, i * self.stride, self.stride)
            self.slots[layer] = i

    def get(self, layer: int) -> torch.Tensor:
        s = self.slots.pop(layer)
        if self.file is None:
            return s
        out = self._slot(s).clone()
        if hasattr(mmap, "MADV_DONTNEED"):
            self.file.madvise(mmap.MADV_DONTNEED, s * self.stride, self.stride)
        return out


def validate_roles(roles, n: int) -> list[str]:
    roles = list(roles)
    if len(roles) != n or any(r not in ROLES for r in roles):
        raise ValueError(f"roles must be a list of {n} values from {ROLES}, got {roles}")
    return roles


def block_lora_params(block) -> list[torch.nn.Parameter]:
    return [p for n, p in block.named_parameters() if ".lora_" in n or n.startswith("lora_")]


def _draws_random(block) -> bool:
    """Whether the block's forward draws random numbers (a dropout module in training mode, LoRA's): its
    recompute in the backward pass must then replay the RNG state of the forward."""
    return any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in block.modules())


def streams(model: CausalLM, tokens: int) -> bool:
    """Whether a step over `tokens` tokens decompresses one matrix at a time whatever `decompress`
    says (STREAM_TOKENS): only when a block's matrices are larger than one chunk of rows, so that
    streaming changes anything."""
    c = model.config
    largest = c.hidden_size * max(c.intermediate_size, c.num_heads * c.head_dim)
    return tokens < STREAM_TOKENS and largest * model.dtype.itemsize > ROW_CHUNK_BYTES


def _padded(n: int) -> int:
    return -(-n // TOKEN_MULTIPLE) * TOKEN_MULTIPLE


def _sequence_padding(model: CausalLM, S: int) -> int:
    """Tokens to append to a batch of length S so that S is a multiple of TOKEN_MULTIPLE. Appended
    tokens change nothing before them (causal attention) and count for nothing (label -100), so the
    loss and gradients are those of the batch as given. None while a dropout draws random numbers:
    its masks would then be drawn over a longer sequence than a seeded run's."""
    if any(isinstance(m, torch.nn.Dropout) and m.p > 0 and m.training for m in model.modules()):
        return 0
    return _padded(S) - S


def head_loss_and_grad(model: CausalLM, hn: torch.Tensor, targets: torch.Tensor, chunk: int | None = None):
    """Cross-entropy summed over rows of hn [T, H] with targets [T], and d(sum)/d(hn), in one pass
    over vocabulary chunks (online softmax) of `chunk` rows, linear.VOCAB_CHUNK unless given (`vocab_chunks`,
    the loop evaluation and generation share). Returns (loss_sum, grad_hn [T, H])."""
    W = model.head_weight()
    cap = model.config.final_softcap
    T, Tp = hn.shape[0], _padded(hn.shape[0])
    # tokens along columns: W_j hn^T runs 15-30% faster than hn W_j^T on CPU BLAS at these shapes
    # (linear.Linear.forward_t); 1.69 -> 1.45 s for Qwen2.5-0.5B's head over 256 tokens on 2 cores.
    # Zero columns pad the tokens to a multiple of TOKEN_MULTIPLE (63 tokens: 0.66 -> 0.43 s on one
    # thread); each column's softmax is its own, so they are dropped at the end and change nothing
    hnt = hn.new_zeros(hn.shape[1], Tp)                             # [H, Tp]
    hnt[:, :T] = hn.t()
    m = torch.full((Tp,), float("-inf"), dtype=torch.float32)
    s = torch.zeros(Tp, dtype=torch.float32)
    acc = torch.zeros(hn.shape[1], Tp, dtype=torch.float32)         # [H, Tp]
    for _, _, Wj in vocab_chunks(W, hn.dtype, model.workspace, chunk, hn.device):   # Wj [c, H], decompressed once
        z = (Wj @ hnt).float()                                      # [c, T] logits of this chunk
        if cap is not None:
            t = torch.tanh(z / cap)
            z, dz = t * cap, 1 - t * t                              # capped logits and their slope
        new_m = torch.maximum(m, z.amax(dim=0))
        rescale = torch.exp(m - new_m)
        e = torch.exp(z - new_m)
        e_w = e * dz if cap is not None else e
        acc = acc * rescale + (Wj.t() @ e_w.to(hn.dtype)).float()
        s = s * rescale + e.sum(dim=0)
        m = new_m
    lse = (m + torch.log(s))[:T]
    acc, s = acc[:, :T], s[:T]
    Wt = W.rows(targets, hn.dtype)                                  # [T, H] rows of the targets
    W.release()
    zt = (hn * Wt).sum(-1).float()
    if cap is not None:
        tt = torch.tanh(zt / cap)
        zt, dzt = tt * cap, 1 - tt * tt
        Wt = Wt * dzt[:, None].to(hn.dtype)
    loss_sum = (lse - zt).sum()
    grad = (acc / s).t() - Wt.float()
    return loss_sum, grad.to(hn.dtype)


def _vjp(out: torch.Tensor, inputs: list[torch.Tensor], g: torch.Tensor):
    """J^T g for `inputs`, as the gradient of the scalar <out, g>: the same numbers as
    autograd.grad(out, inputs, g), without the shape checks of grad_outputs, which import sympy on
    first use (42 MB of resident memory and a second of start-up)."""
    with torch.enable_grad():
        return torch.autograd.grad((out * g).sum(), inputs)


def run_step(model: CausalLM, input_ids: torch.Tensor, labels: torch.Tensor, roles, activations: str = "ram",
             loss_scale: float = 1.0, recompute: bool = True, decompress: str = "block",
             after_block=None) -> StepResult:
    """One forward and selective backward. LoRA gradients of `train` blocks are *accumulated* into
    `.grad` (scaled by loss_scale, for gradient accumulation); returns the unscaled mean loss.
    `roles`: the step's `selection.Plan`, or a list of one role per block.

    recompute=False keeps the forward graph of every visited block instead of recomputing it in
    backward: it trades the memory of those blocks' activations for one block forward each. The
    base weights are not kept in float: each Linear saves its compressed weight for backward and
    decompresses it there (`linear._CompressedLinearFn`), so decompressions per pass stay the same.

    decompress="block" decompresses a block's weights once for its forward and once for its
    recompute and VJP together (one block's float weights resident); "linear" decompresses one
    Linear at a time when it runs, and again in the VJP: the largest matrix is resident instead of
    the block (43 MB less on Qwen2.5-0.5B) for one more decompression per visited Linear. Below
    STREAM_TOKENS tokens (batch x seq) "block" runs as "linear" (faster there: `streams`).

    after_block(i), when given, is called once block i's LoRA gradients are complete (its VJP done),
    before the blocks below it run theirs: an optimizer step fused into the backward, which may
    update the block's parameters and drop its gradients (the blocks below never read them)."""
    if decompress not in DECOMPRESS:
        raise UserError(f"decompress must be one of {', '.join(DECOMPRESS)}, got {decompress!r}")
    pad = _sequence_padding(model, input_ids.shape[1])
    if pad:         # BLAS-friendly length (TOKEN_MULTIPLE); nothing before the appended tokens changes
        input_ids = torch.cat([input_ids, input_ids.new_zeros(input_ids.shape[0], pad)], dim=1)
        labels = torch.cat([labels, labels.new_full((labels.shape[0], pad), -100)], dim=1)
    B, S = input_ids.shape
    by_block = decompress == "block" and not streams(model, B * S)
    ws = model.workspace
    ws_seconds = ws.seconds
    layers = model.model.layers
    n = len(layers)
    plan = roles if isinstance(roles, Plan) else Plan(tuple(validate_roles(roles, n)))
    if len(plan.roles) != n:
        raise ValueError(f"the plan has {len(plan.roles)} roles for a model of {n} blocks")
    low, visit = plan.lowest, list(plan.visited)
    visit_set = set(visit)
    timings = dict(forward=0.0, head=0.0, backward=0.0, decompress=0.0)
    dev = input_ids.device

    # labels are aligned with input_ids; position t predicts labels[t + 1]
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    counted = shifted != -100
    n_tokens = int(counted.sum())
    if n_tokens == 0:
        raise UserError("a batch has no tokens to learn from (every label is -100); check the loss masking of the data")

    # the caching allocator keeps what one block's temporaries need (a few [tokens x intermediate]
    # tensors; 32 MB was too little on Qwen2.5-0.5B, 64 MB enough), so block after block reuses them
    widest = max(model.config.intermediate_size, model.config.hidden_size)
    limit_cache(max(64 << 20, 8 * B * S * widest * model.dtype.itemsize))
    t0 = time.perf_counter()
    inputs = _BlockInputs(activations, len(visit) if recompute else 0, (B, S, model.config.hidden_size), model.dtype)
    rng_states, graphs = {}, {}
    with torch.no_grad():
        h = model.embed(input_ids)
        ctx = model.context(0, S, dev)
        for i, block in enumerate(layers):
            if i in visit_set and not recompute:
                x = h.detach().requires_grad_(i > low)
                with torch.enable_grad():
                    out = block(x, ctx)
                graphs[i] = (x, out)
                h = out.detach()
                continue
            if i in visit_set:
                inputs.put(i, h)
                if _draws_random(block):
                    rng_states[i] = torch.get_rng_state()
            with materialized(block, model.dtype, workspace=ws) if by_block else contextlib.nullcontext():
                h = block(h, ctx)
    release_cached()              # the caching allocator's blocks of this phase's shapes (runtime.py)
    t1 = time.perf_counter()
    timings["forward"] = t1 - t0

    # head: loss and dL/dh_N over the counted positions only
    h = h.detach().requires_grad_(bool(visit))
    with torch.enable_grad():
        hn = model.model.norm(h)[counted]                        # [T, H]
    # by linear, the head's chunks are no bigger than a matrix's (linear.ROW_CHUNK_BYTES): the workspace stays small
    head_chunk = None if by_block else max(256, ROW_CHUNK_BYTES // (hn.shape[1] * hn.element_size()))
    loss_sum, g_hn = head_loss_and_grad(model, hn.detach(), shifted[counted], head_chunk)
    loss = loss_sum.item() / n_tokens
    g = None
    if visit:
        g_hn = g_hn * (loss_scale / n_tokens)
        (g,) = _vjp(hn, [h], g_hn)
    del hn, h
    release_cached()
    t2 = time.perf_counter()
    timings["head"] = t2 - t1

    for i in reversed(visit):
        block = layers[i]
        params = block_lora_params(block) if plan.roles[i] == "train" else []
        need_input_grad = i > low
        if i in graphs:
            x, out = graphs.pop(i)
            grads = _vjp(out, ([x] if need_input_grad else []) + params, g)
        else:
            x = inputs.get(i)
            x.requires_grad_(need_input_grad)
            fork = torch.random.fork_rng(devices=[]) if i in rng_states else contextlib.nullcontext()
            whole = materialized(block, model.dtype, workspace=ws) if by_block else contextlib.nullcontext()
            # only the VJP is wanted: the block's last matmul (its output's) is not recomputed
            with fork, whole, output_unused(block), torch.enable_grad():
                if i in rng_states:
                    torch.set_rng_state(rng_states[i])
                out = block(x, ctx)
                grads = _vjp(out, ([x] if need_input_grad else []) + params, g)
        if need_input_grad:
            g, grads = grads[0], grads[1:]
        if params and all(p.grad is None for p in params):    # the block's gradients in one allocation
            for p, gp, buf in zip(params, grads, packed(params)):
                p.grad = buf.copy_(gp)
        else:
            for p, gp in zip(params, grads):
                p.grad = gp if p.grad is None else p.grad.add_(gp)
        del out, x, grads
        if params and after_block is not None:
            after_block(i)
    release_cached()
    timings["backward"] = time.perf_counter() - t2
    timings["decompress"] = ws.seconds - ws_seconds
    return StepResult(loss=loss, tokens=n_tokens, visited=visit, timings=timings)


def lora_gradients(model: CausalLM, input_ids: torch.Tensor, labels: torch.Tensor, roles,
                   activations: str = "ram", decompress: str = "block") -> tuple[float, dict[str, torch.Tensor]]:
    """Loss and LoRA gradients of one batch under `roles` (one of train/through/skip per block).

    Returns (mean loss over counted tokens, {PEFT key: gradient}) for the LoRA parameters of the
    `train` blocks. `.grad` of the model's parameters is left untouched.
    """
    params = model.lora_parameters()
    saved = {k: p.grad for k, p in params.items()}
    for p in params.values():
        p.grad = None
    try:
        res = run_step(model, input_ids, labels, roles, activations, decompress=decompress)
        grads = {k: p.grad.clone() for k, p in params.items() if p.grad is not None}
    finally:
        for k, p in params.items():
            p.grad = saved[k]
    return res.loss, grads


@torch.no_grad()
def eval_step(model: CausalLM, input_ids: torch.Tensor, labels: torch.Tensor) -> tuple[float, int, int]:
    """Forward only: (summed loss, counted tokens, correctly predicted tokens) of one batch, with the
    LM head walked in vocabulary chunks like the training step."""
    shifted = torch.full_like(labels, -100)
    shifted[:, :-1] = labels[:, 1:]
    counted = shifted != -100
    h = model.embed(input_ids)
    ctx = model.context(0, input_ids.shape[1], input_ids.device)
    for block in model.model.layers:
        with materialized(block, model.dtype, workspace=model.workspace):
            h = block(h, ctx)
    hn = model.model.norm(h)[counted]
    targets = shifted[counted]
    cap = model.config.final_softcap
    best = torch.full((hn.shape[0],), float("-inf"))
    arg = torch.zeros(hn.shape[0], dtype=torch.long)
    m = torch.full((hn.shape[0],), float("-inf"))
    s = torch.zeros(hn.shape[0])
    zt = torch.zeros(hn.shape[0])
    for lo, hi, Wj in vocab_chunks(model.head_weight(), hn.dtype, model.workspace, device=hn.device):
        z = softcap((hn @ Wj.T).float(), cap)
        cmax, carg = z.max(dim=1)
        better = cmax > best
        best, arg = torch.where(better, cmax, best), torch.where(better, carg + lo, arg)
        new_m = torch.maximum(m, cmax)
        s = s * torch.exp(m - new_m) + torch.exp(z - new_m[:, None]).sum(1)
        m = new_m
        inside = (targets >= lo) & (targets < hi)
        zt[inside] = z[inside, targets[inside] - lo]
    loss_sum = float((m + torch.log(s) - zt).sum())
    release_cached()
    return loss_sum, int(counted.sum()), int((arg == targets).sum())
