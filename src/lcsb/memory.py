"""The peak memory of a training run, estimated before any weight is loaded, and `--max-memory`.

Design note
-----------
A user on a phone-class budget sets `--max-memory 800MB`; the run must refuse before it loads
gigabytes, not die of an OOM kill an hour in. So the trainer estimates the peak resident set of
the whole process from numbers it has before loading weights: config.json's shapes, the
quantization, the selection (how many blocks the backward visits), recompute on/off, the LoRA
rank and targets, the optimizer, and the longest batch of the tokenized data.

What is resident at the step's peak (executor.py's design note says why each exists):
- runtime: the interpreter, torch, the tokenizer and the tokenized data. Measured, not guessed:
  the process's resident set when the estimate is made, after paying the first step's lazy
  imports (`warm_up`); a bare `import torch` alone is ~220 MB on one machine and different on the next.
- base weights, compressed: all of them when they were loaded into RAM; for a folder made by
  `lcsb convert` (memory-mapped, pages released after use) only one block's (one matrix's with
  decompress="linear") and one vocabulary chunk of the LM head.
- the decompression workspace (linear.Workspace, one buffer reused for the whole run): one block's
  float weights (`materialized` decompresses a block once for its forward, and again for its
  recompute and VJP), or with decompress="linear" its largest matrix; at least one vocabulary chunk
  of the head. Nothing for float32 weights: their "decompression" is the weight.
- block-boundary checkpoints: the input of every block the backward visits, [B, S, hidden] each
  (recompute on; none with activations="disk", whose pages leave the resident set); with recompute
  off, every visited block's autograd graph instead, kept through the head pass.
- one block's autograd activations during its recompute + VJP (what autograd saves, counted
  tensor by tensor in `estimate`, plus the gradient buffers alive at the VJP's widest).
- the LM head pass: the chunk's logits and exps for the counted tokens, and the hidden state with
  its gradient.
- LoRA parameters, their gradients (of the blocks trained in the step only) and the optimizer's state
  (AdamW: two moments; SGD: a momentum buffer when momentum > 0).
- allocator slack: glibc keeps freed memory for reuse up to a trim threshold it raises to twice
  the largest block freed (at most 64 MB), unless the process fixed its thresholds; lcsb's caching
  allocator keeps a phase's freed blocks until the phase ends: one largest temporary.
The step's peak is what persists plus the larger of the backward's and the head's transients;
quantize-on-load has its own peak, and the estimate is the larger of the two (writing a checkpoint
holds one LoRA factor's float32 copy at a time, nothing that counts).

Sizes are binary: 1 MB = 2**20 bytes, the unit the run's log reports peak RSS in. Against the peak
RSS that bench/memory.py measures in the real shapes of Qwen2.5 0.5B-7B and Gemma 3 4B (full and
lcsb, float32 and bfloat16 state, AdamW and SGD; bench/results/memory_shapes.json, checked by
tests/test_memory.py) it is within 10% on every row. What its parts do not count (a few MB of library
pages the first step touches beyond `warm_up`, glibc heap the small tensors leave behind, 10 MB with
bfloat16 state on the 0.5B shape, the caching allocator's blocks of a phase beyond its largest one) is
one measured term, UNCOUNTED.
"""

from __future__ import annotations

import math
import re
import resource
import sys
from dataclasses import dataclass, field, replace
from types import SimpleNamespace

import torch

from .config import LoraConfig, ModelConfig
from .errors import UserError
from .model.linear import ROW_CHUNK_BYTES, VOCAB_CHUNK
from .optim import fuses_step
from .quant.formats import CHUNK_ELEMENTS, quantize

MB = 1 << 20
_UNITS = {"": MB, "b": 1, "k": 1 << 10, "kb": 1 << 10, "kib": 1 << 10, "m": MB, "mb": MB, "mib": MB,
          "g": 1 << 30, "gb": 1 << 30, "gib": 1 << 30, "t": 1 << 40, "tb": 1 << 40, "tib": 1 << 40}
F32 = 4
# What the parts below do not count, measured on bench/memory.py's shapes (Qwen2.5 0.5B-7B, Gemma 3 4B): glibc
# heap the small tensors leave behind, library pages the first step touches beyond warm_up, the caching
# allocator's freed blocks of a phase beyond its largest. Without it the estimate was 2-7% under every row,
# 13-25 MB on the Qwen shapes and 39-42 on Gemma 3 4B.
UNCOUNTED = 16 * (1 << 20)


def parse_size(value, option: str = "--max-memory") -> int:
    """'800MB', '2GB', '1.5G', '512m', 800 or '800' (a plain number is MB) -> bytes."""
    hint = "expected a size such as 800MB, 2GB or 1.5G (a plain number is MB)"
    if isinstance(value, bool) or not isinstance(value, (int, float, str)):
        raise UserError(f"{option} {value!r}: {hint}")
    if isinstance(value, str):
        m = re.fullmatch(r"\s*([0-9]*\.?[0-9]+(?:[eE][+-]?[0-9]+)?)\s*([A-Za-z]*)\s*", value)
        if not m or m.group(2).lower() not in _UNITS:
            raise UserError(f"{option} {value!r}: {hint}")
        number, unit = float(m.group(1)), _UNITS[m.group(2).lower()]
    else:
        number, unit = float(value), MB
    size = number * unit
    if not math.isfinite(size) or size < MB:
        raise UserError(f"{option} {value!r}: {hint}, and at least 1MB")
    return int(size)


def peak_rss() -> int:
    """Peak resident set of this process, in bytes: VmHWM, the high-water mark of this address space.
    Not ru_maxrss: Linux carries that over from the parent across fork and exec, so a run started by a
    big process (a test runner, a notebook) would report the parent's peak as its own."""
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith("VmHWM:"):
                    return int(line.split()[1]) * 1024
    except (OSError, ValueError, IndexError):
        pass
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


def current_rss() -> int:
    """Resident set of this process now, in bytes (its high-water mark where /proc is missing)."""
    try:
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * resource.getpagesize()
    except (OSError, ValueError, IndexError):
        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024


@dataclass
class MemoryEstimate:
    total: int                                          # bytes
    parts: dict[str, int] = field(default_factory=dict)   # bytes by what holds them

    def line(self) -> str:
        parts = ", ".join(f"{k} {v / MB:.0f}" for k, v in self.parts.items())
        return f"estimated peak memory: {self.total / MB:.0f} MB ({parts})"


def _weight_bytes(fmt: str | None, out: int, inp: int, group_size: int, name: str, bits: float = 0.0) -> int:
    """Bytes of one [out, inp] base weight stored as `fmt` (None: dense float32; "gguf": `bits` per weight,
    as the file says)."""
    if fmt is None or fmt == "dense":
        return out * inp * F32
    if fmt == "gguf":
        return int(out * inp * bits / 8)
    try:
        row = quantize(torch.zeros(1, inp), fmt, group_size).tensors()   # the format's bytes for one row
    except UserError as e:
        raise UserError(f"{name}: {e}") from None
    return out * sum(t.numel() * t.element_size() for t in row.values())


def block_linears(mcfg: ModelConfig) -> dict[str, tuple[int, int]]:
    """The projections of one block: name -> (in, out)."""
    h, i = mcfg.hidden_size, mcfg.intermediate_size
    dq, dkv = mcfg.num_heads * mcfg.head_dim, mcfg.num_kv_heads * mcfg.head_dim
    return {"q_proj": (h, dq), "k_proj": (h, dkv), "v_proj": (h, dkv), "o_proj": (dq, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def estimate(mcfg: ModelConfig, *, fmt: str | None, group_size: int, mapped: bool, lora: LoraConfig,
             visited: int, recompute: bool, batch: int, seq: int, counted: int, optimizer: str,
             momentum: float, runtime: int, vocab_chunk: int | None = None,
             malloc_tuned: bool = False, decompress: str = "block", activations: str = "ram",
             caching: bool = False, weight_bits: dict | None = None, lora_dtype: str = "float32",
             trained: int | None = None, fused_step: bool = False) -> MemoryEstimate:
    """Peak resident bytes of a training run (see the design note).

    Args:
        mcfg: the model's shape.
        fmt: base weight format in memory (None: float32); mapped: a `lcsb convert` folder.
        lora: rank and targets of the adapter.
        visited: the most blocks the backward visits in one step (selection).
        batch, seq: the longest micro-batch [B, S]; counted: the most loss-counted tokens in one.
        runtime: resident bytes of the process before the model loads (measured).
        malloc_tuned: glibc's thresholds are fixed (`lcsb.runtime.tune_malloc`), so freed tensors go
            back to the system and no allocator slack is added.
        caching: lcsb's caching allocator is installed (`lcsb.runtime.install_allocator`): freed
            blocks stay cached until the end of a step's phase; one largest temporary is added.
        decompress: "block" (a block's float weights at once) or "linear" (one matrix at a time).
        activations: "ram", or "disk" (checkpoints leave the resident set once written).
        weight_bits: fmt "gguf": bits per weight of the block matrices, the embedding and the head
            ({"block", "embed", "head"}), from the file.
        lora_dtype: "float32" or "bfloat16": the type of the LoRA factors, their gradients and the
            optimizer's state (model.lora.set_lora_dtype).
        trained: the most blocks trained in one step (default: visited); only they hold gradients.
        fused_step: the optimizer steps each block inside the backward (optim.fuses_step): one block's
            gradients exist at a time.
    """
    L, H, V, I = mcfg.num_layers, mcfg.hidden_size, mcfg.vocab_size, mcfg.intermediate_size
    dq, dkv = mcfg.num_heads * mcfg.head_dim, mcfg.num_kv_heads * mcfg.head_dim
    tokens = batch * seq
    linears = block_linears(mcfg)

    # base weights
    bits = weight_bits or {}
    packed = [_weight_bytes(fmt, o, i, group_size, f"model.layers.0.*.{n}.weight", bits.get("block", 0))
              for n, (i, o) in linears.items()]
    block_packed = sum(packed)
    table = _weight_bytes(fmt, V, H, group_size, "model.embed_tokens.weight", bits.get("embed", 0))
    head = table if mcfg.tie_word_embeddings else _weight_bytes(fmt, V, H, group_size, "lm_head.weight",
                                                                bits.get("head", 0))
    small = F32 * (L * (6 * H + dq + 2 * dkv + 2 * mcfg.head_dim) + H)      # norms and biases, kept float
    # one matrix at a time (decompress="linear", or recompute off with every block visited: no block is
    # materialized), or a block's weights at once
    by_linear = decompress == "linear" or (not recompute and visited == L)
    # the head's vocabulary chunk: VOCAB_CHUNK rows, or by linear no more than a matrix's row chunk (executor.run_step)
    c = min(V, vocab_chunk or (max(256, ROW_CHUNK_BYTES // (H * F32)) if by_linear else VOCAB_CHUNK))
    if mapped:   # file-backed: a Linear releases its pages after it runs (by linear), a materialized block
        # when it is done, the head after each chunk (measured, Qwen2.5-7B by linear: RssFile at the step's
        # peak is one MLP matrix, 41 MB, above its level between blocks, not a block's 131 MB)
        one = max(packed) if by_linear else block_packed
        base = one + head * c // V + small
    else:
        base = L * block_packed + table + (0 if mcfg.tie_word_embeddings else head) + small
    dense = fmt is None or fmt == "dense"
    # the decompression workspace: a block's float weights, or by linear one row chunk of a matrix; the
    # head's chunks use it too
    # (core.streamed_linear decompresses a matrix ROW_CHUNK_BYTES of rows at a time: 4 MB, not the 86 MB of
    # Qwen2.5-3B's MLP matrix; the estimate counted the whole matrix and came 9% over at 3B)
    block_float = 0 if dense else F32 * (max(min(o, max(1, ROW_CHUNK_BYTES // (i * F32))) * i
                                             for i, o in linears.values()) if by_linear
                                         else sum(i * o for i, o in linears.values()))
    block_float = 0 if dense else max(block_float, F32 * c * H)

    # what autograd keeps of one block, per token (tests/test_memory.py counts it with saved-tensor hooks):
    # the input norm's output, the residual after attention and the post-attention norm's output; q after
    # rotary, k and v (repeated to every head under GQA), the attention output (which is also o_proj's
    # input), the softmax statistics and the norms' scales; the MLP's gate, up and product (core._GatedAct
    # recomputes the activation);
    # LoRA's rank-r intermediates
    rep = mcfg.num_heads // mcfg.num_kv_heads
    kv_saved = 2 * (dq if rep > 1 else dkv)
    saved = 3 * H + 2 * dq + kv_saved + mcfg.num_heads + 2 + 3 * I + 7 * lora.rank
    extra_norms = 2 * H if mcfg.norm_offset else 0       # Gemma's pre/post feed-forward norms
    if mcfg.qk_norm:                                     # Qwen3's and Gemma 3's q/k norms: their inputs and scales
        extra_norms += dq + dkv + mcfg.num_heads + mcfg.num_kv_heads
    saved += extra_norms
    grads_alive = 2 * I + 2 * H                          # the VJP's gradient buffers at its widest
    scores = 0
    windowed = any(t == "sliding_attention" for t in mcfg.layer_types) and (mcfg.sliding_window or seq) < seq
    if mcfg.attn_softcap is not None or windowed:        # explicit [heads, S, S] scores (softmax, its grad)
        scores = 3 * batch * mcfg.num_heads * seq * seq
    if recompute:    # inputs of the visited blocks persist; one block's graph exists at a time
        checkpoints = 0 if activations == "disk" else visited * tokens * H * F32
        activations = (tokens * (saved + grads_alive) + scores) * F32
    else:            # every visited block's graph persists through the head pass; the VJP's buffers on top
        checkpoints = visited * (tokens * (saved + H) + scores) * F32
        activations = tokens * grads_alive * F32

    # the head pass: a float chunk of the head (and its decompression), the chunk's logits, exps and
    # shifted logits for the counted tokens, their running sums and gradient rows, and h with its gradient
    lm_head = F32 * (c * H * (1 if dense else 0) + 3 * counted * c + 5 * counted * H + 2 * tokens * H)

    per_block = sum(lora.rank * (i + o) for n, (i, o) in linears.items() if n in lora.targets)
    n_lora = L * per_block
    states = 2 if optimizer == "adamw" else (1 if momentum else 0)
    nbytes = {"float32": F32, "bfloat16": 2}[lora_dtype]
    trained = visited if trained is None else trained    # a block not trained this step has no gradient buffer
    lora_bytes = nbytes * (n_lora * (1 + states) + per_block * (min(trained, 1) if fused_step else trained))
    # saving a checkpoint, after the step, adds nothing that counts: safetensors (0.4 on) writes from the
    # tensors' own memory, and lora.save_adapter converts bfloat16 factors to float32 one at a time

    # glibc keeps freed memory for reuse up to its trim threshold, which it raises to twice the largest
    # block freed so far (at most 2 x 32 MB): the resident set runs that much above the live tensors
    largest = max(F32 * counted * c, F32 * c * H, F32 * tokens * I,
                  0 if dense or mapped else F32 * min(CHUNK_ELEMENTS, V * H))
    slack = 0 if malloc_tuned else min(2 * largest, 64 * MB)
    if caching:      # blocks a phase freed and has not reused yet (measured: 8-21 MB on Qwen2.5-0.5B)
        slack = max(slack, largest)

    persistent = runtime + base + lora_bytes + checkpoints + 2 * tokens * H * F32   # + h and g between blocks
    step = persistent + block_float + max(activations, lm_head)
    # quantize-on-load: a row slice of the matrix being compressed, cast and quantized (three copies)
    load = runtime + base + (0 if dense or mapped else 3 * F32 * min(CHUNK_ELEMENTS, V * H))
    parts = {"runtime": runtime, "base weights": base, "block float weights": block_float,
             "block inputs" if recompute else "saved graphs": checkpoints, "block activations": activations,
             "LM head pass": lm_head, "LoRA + optimizer": lora_bytes, "allocator slack": slack}
    parts["heap, library pages"] = UNCOUNTED
    return MemoryEstimate(int(max(step, load) + slack + UNCOUNTED), {k: int(v) for k, v in parts.items()})


def max_visited(selection, n: int, steps: int) -> int:
    """The most blocks the backward visits in any of the first `steps` steps (every step's roles
    are a function of the step; the cyclic methods repeat within a few hundred steps)."""
    most = 0
    for t in range(min(steps, 512)):
        most = max(most, len(selection.plan(t, n).visited))      # the step's Plan, as the executor runs it
        if most == n:
            break
    return most


def max_trained(selection, n: int, steps: int) -> int:
    """The most blocks trained in any of the first `steps` steps: only they hold gradient buffers."""
    return max((len(selection.plan(t, n).trained) for t in range(min(steps, 512))), default=0)


def warm_up(lora_dtype: str = "float32"):
    """Pay now what the first training step pays once, so the measured runtime includes it: lazy imports,
    and the pages of torch's libraries that its kernels run from (matmul, attention, softmax and norms,
    forward and backward, in float32, the compute type; with bfloat16 LoRA state its casts): 6 MB of file
    pages here that a bare autograd call does not touch. Tiny shapes reach the same code as real ones
    (Qwen2.5-0.5B's add 0.3 MB); bfloat16 matmuls would add 5 MB that a float32 step never touches.
    It asks autograd exactly as the executor's _vjp does: with grad_outputs, autograd.grad would import
    torch.fx's symbolic shapes and sympy (about 40 MB and a second here), which the step never does."""
    import torch.nn.functional as F
    x = torch.randn(8, 64, requires_grad=True)
    w, a = torch.randn(128, 64), torch.randn(16, 64, requires_grad=True)
    if lora_dtype == "bfloat16":
        a = a.to(torch.bfloat16).float()
    q = torch.randn(1, 2, 8, 32, requires_grad=True)
    y = F.silu(x @ w.t()) * (x @ w.t()) + (x @ a.t()).sum()
    norm = x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + 1e-6)
    attn = F.scaled_dot_product_attention(q, q, q, is_causal=True)
    loss = torch.log_softmax(y, -1).sum() + norm.sum() + attn.sum()
    torch.autograd.grad(loss, [x, q])      # as the executor's _vjp: no grad_outputs, so no sympy


def _malloc_tuned() -> bool:
    """Whether this process fixed glibc's malloc thresholds (lcsb.runtime.tune_malloc, when it was used)."""
    return bool(getattr(sys.modules.get("lcsb.runtime"), "_done", False))


def _caching() -> bool:
    """Whether this process runs lcsb's caching allocator (lcsb.runtime.install_allocator)."""
    rt = sys.modules.get("lcsb.runtime")
    return rt is not None and rt.allocator_stats() is not None


def estimate_run(cfg, mcfg: ModelConfig, lora: LoraConfig, selection, examples, steps: int,
                 runtime: int | None = None, world: int = 1) -> MemoryEstimate:
    """`estimate` for a TrainConfig and its tokenized training examples (`world` processes); the runtime is
    this process's resident set after `warm_up`, unless given."""
    if runtime is None:
        warm_up(getattr(cfg, "lora_dtype", "float32"))
    stored = mcfg.raw.get("quantization")
    fmt = stored.get("format") if isinstance(stored, dict) else cfg.quant
    group = stored.get("group_size", 64) if isinstance(stored, dict) else cfg.group_size
    b = cfg.batch_size
    seq = max((len(e) for e in examples), default=cfg.max_seq_len)
    counted = sum(sorted((e.n_trained for e in examples), reverse=True)[:b])
    # quantize-on-load maps its compressed copy like a converted folder (model.checkpoint.quantize_on_load)
    return estimate(mcfg, fmt=fmt, group_size=group, mapped=bool(stored) or cfg.quant is not None, lora=lora,
                    visited=max_visited(selection, mcfg.num_layers, steps), recompute=cfg.recompute == "on",
                    batch=b, seq=seq, counted=max(1, counted), optimizer=cfg.optimizer, momentum=cfg.momentum,
                    runtime=current_rss() if runtime is None else runtime, malloc_tuned=_malloc_tuned(),
                    decompress=cfg.decompress, activations=cfg.activations, caching=_caching(),
                    weight_bits=stored.get("bits_per_weight") if isinstance(stored, dict) else None,
                    lora_dtype=getattr(cfg, "lora_dtype", "float32"),
                    trained=max_trained(selection, mcfg.num_layers, steps),
                    fused_step=fuses_step(getattr(cfg, "clip", 1.0), getattr(cfg, "grad_accum", 1), world,
                                          getattr(cfg, "skip_nonfinite", False)))


# settings that lower the peak, cheapest in what they change first: the same gradients (recompute,
# decompression, checkpoints on disk), then nearly the same training (bfloat16 LoRA state; no gradient
# clipping, which lets the optimizer step run inside the backward: optim.fuses_step), then a different one
_FIT_LADDER = (("recompute", "on", "--recompute on"), ("decompress", "linear", "--decompress linear"),
               ("activations", "disk", "--activations disk"), ("lora_dtype", "bfloat16", "--lora-dtype bfloat16"),
               ("clip", 0.0, "--clip 0"), ("batch_size", 1, "--batch-size 1"))


def fit_suggestion(cfg, mcfg: ModelConfig, lora: LoraConfig, selection, examples, steps: int, limit: int,
                   runtime: int, world: int = 1) -> tuple[str, MemoryEstimate] | None:
    """The fewest flags, taken in `_FIT_LADDER`'s order and then halving --rank (down to 4), under which
    `estimate_run` fits `limit` bytes: (flags, their estimate), or None when even all of them do not fit.
    `cfg` is only read (a TrainConfig or anything with its fields); `runtime` as measured for the run."""
    changes, flags = {}, []
    for key, value, flag in _FIT_LADDER:
        if getattr(cfg, key, None) == value or (key == "batch_size" and cfg.batch_size <= 1):
            continue
        changes[key] = value
        flags.append(flag)
        est = estimate_run(SimpleNamespace(**{**vars(cfg), **changes}), mcfg, lora, selection, examples, steps, runtime,
                           world)
        if est.total <= limit:
            return " ".join(flags), est
    rank = lora.rank
    while rank > 4:
        rank //= 2
        small = replace(lora, rank=rank, alpha=lora.alpha * rank / lora.rank)    # the same scaling alpha / r
        est = estimate_run(SimpleNamespace(**{**vars(cfg), **changes}), mcfg, small, selection, examples, steps, runtime,
                           world)
        if est.total <= limit:
            return " ".join([*flags, f"--rank {rank} --alpha {small.alpha:g}"]), est
    return None


def check_budget(est: MemoryEstimate, limit: int, option: str = "--max-memory",
                 suggestion: tuple[str, MemoryEstimate] | None = None):
    """Refuse a run whose estimate exceeds `limit` bytes: one line with the parts and what helps; with
    `suggestion` (fit_suggestion's answer), the flags that would make this run fit."""
    if est.total <= limit:
        return
    parts = ", ".join(f"{k} {v / MB:.0f}" for k, v in est.parts.items())
    head = f"estimated peak memory {est.total / MB:.0f} MB exceeds {option} {limit / MB:.0f} MB ({parts}); "
    if suggestion is not None:
        flags, fits = suggestion
        raise UserError(head + f"add {flags} to fit (estimated {fits.total / MB:.0f} MB), or raise {option}")
    raise UserError(head + "lower --max-seq-len or --batch-size, compress the base weights (--quant int4, or "
                    "`lcsb convert`), keep --recompute on, train fewer blocks per step (--method lcsb with more "
                    f"--groups), or raise {option}")
