"""Optimizers over the LoRA parameters, with a policy for blocks not trained this step, and
learning-rate schedules.

`--inactive` decides what happens to the parameters of blocks that got no gradient this step:
- `momentum` (default; the LCSB paper's implicit update): they are stepped with a zero gradient,
  so AdamW's moments decay, the bias-corrected momentum keeps moving them, and weight decay acts.
- `frozen`: no update and no state change at all.
- `reset` (LISA): frozen while inactive, and their optimizer state is cleared when the block is
  trained again.
The update is torch's AdamW / SGD arithmetic, op for op (tests compare bit for bit with
torch.optim); this module decides which parameters get a zero gradient, none, or a fresh state.

LoRA factors stored in bfloat16 (`--lora-dtype bfloat16`, model.lora.set_lora_dtype) keep their gradients
and optimizer state in bfloat16 too. Their update is the same arithmetic on float32 copies of one
tensor at a time, rounded back *stochastically*: round-to-nearest would lose every update smaller than
half a bfloat16 step (0.2% of the weight: at lr 1e-4 nearly all of them) and AdamW's v <- 0.999 v
would never move. The rounding bits of a tensor come from a generator seeded by the tensor's own
bits (and its index and `seed`): no state to save, a resumed run rounds exactly as an uninterrupted
one, and data-parallel ranks, whose parameters are equal, round alike.
"""

from __future__ import annotations

import math

import torch

from .errors import UserError
from .runtime import packed

INACTIVE = ("momentum", "frozen", "reset")
SCHEDULES = ("constant", "linear", "cosine")


def schedule_factor(kind: str, step: int, total: int, warmup: int) -> float:
    """LR multiplier at `step` (0-based), as transformers' get_{constant,linear,cosine}_schedule_with_warmup."""
    if kind not in SCHEDULES:
        raise UserError(f"unknown schedule {kind!r}: choose one of {', '.join(SCHEDULES)}")
    if step < warmup:
        return step / max(1, warmup)
    if kind == "constant":
        return 1.0
    if kind == "linear":   # transformers' expression: also 0 at step == total when warmup == total
        return max(0.0, (total - step) / max(1, total - warmup))
    progress = (step - warmup) / max(1, total - warmup)
    return max(0.0, 0.5 * (1.0 + math.cos(math.pi * progress)))


class BlockOptimizer:
    """AdamW or SGD over LoRA parameters grouped by block, with the inactive-block policy.

    The update is written out here, op for op as torch.optim.AdamW / SGD do it on the CPU (their
    single-tensor path), so results equal torch's bit for bit; we do not use torch.optim itself
    because constructing it imports torch._dynamo: 77 MB of resident memory and seconds of start-up
    in a tool whose budget is 450 MB. A `momentum` block's zero gradient is never materialised:
    with g = 0 the moment updates reduce to m <- lerp(m, 0, 1 - b1) and v <- b2 v.
    """

    def __init__(self, blocks: list[list[torch.nn.Parameter]], lr: float, kind: str = "adamw",
                 weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 inactive: str = "momentum", lr_scales: list[float] | None = None, seed: int = 0):
        if lr <= 0:
            raise UserError(f"--lr must be positive, got {lr}")
        if inactive not in INACTIVE:
            raise UserError(f"--inactive must be one of {', '.join(INACTIVE)}, got {inactive!r}")
        if kind not in ("adamw", "sgd"):
            raise UserError(f"unknown optimizer {kind!r}: choose adamw or sgd")
        self.blocks, self.inactive, self.kind = blocks, inactive, kind
        # per block, a factor on the learning rate (selection.lr_scales with --compensate); 1 by default
        self.lr_scales = list(lr_scales) if lr_scales is not None else [1.0] * len(blocks)
        if len(self.lr_scales) != len(blocks):
            raise ValueError(f"lr_scales has {len(self.lr_scales)} values for {len(blocks)} blocks")
        self.params = [p for b in blocks for p in b]
        self.base_lr = self.lr = lr
        self.weight_decay, self.betas, self.eps, self.momentum = weight_decay, tuple(betas), eps, momentum
        self.state: dict[torch.nn.Parameter, dict] = {}
        self.last_trained: set[int] = set()
        self._zero = torch.zeros(())
        self.seed, self._gen = seed, torch.Generator()      # stochastic rounding of bfloat16 state
        self._index = {p: i for i, p in enumerate(self.params)}

    def set_lr_factor(self, f: float):
        self.lr = self.base_lr * f

    @torch.no_grad()
    def step(self, trained: set[int], done=()):
        """Apply one update; `trained` are the blocks whose parameters hold this step's gradients. `done`: blocks
        already updated this step by `step_block` (fused into the backward)."""
        for b in range(len(self.blocks)):
            if b not in done:
                self.step_block(b, trained)
        self.last_trained = set(trained)

    @torch.no_grad()
    def step_block(self, b: int, trained: set[int]):
        """Block b's part of `step(trained)`. It reads nothing of the other blocks (the stochastic rounding is
        seeded per parameter), so the executor may run it as soon as the block's gradients are complete."""
        params = self.blocks[b]
        if b in trained:
            if self.inactive == "reset" and b not in self.last_trained:
                for p in params:
                    self.state.pop(p, None)
            self._fresh_state(params)
            for p in params:
                self._update(p, p.grad, self.lr_scales[b])   # a trained block without a gradient steps with zero
        elif self.inactive == "momentum":
            self._fresh_state(params)
            for p in params:
                self._update(p, None, self.lr_scales[b])

    def _fresh_state(self, params):
        """AdamW's zero moments for the parameters of a block that have none yet, each moment of the block in
        one allocation (runtime.packed: small long-lived tensors made mid-run would fragment glibc's heap)."""
        new = [p for p in params if p not in self.state] if self.kind == "adamw" else []
        for p, m, v in zip(new, packed(new), packed(new)):
            self.state[p] = {"step": 0, "exp_avg": m.zero_(), "exp_avg_sq": v.zero_()}

    def _update(self, p, g, scale: float = 1.0):
        lr = self.lr * scale if scale != 1.0 else self.lr
        st = self.state.get(p)
        if p.dtype != torch.bfloat16:         # float32 (float64 in tests): in place, torch's arithmetic
            st = self._apply(p, g, st, lr)
            if st is not None:
                self.state[p] = st
            return
        # a low-precision parameter: the same arithmetic on float32 copies, rounded back stochastically
        # into the parameter's and the state's own tensors. They are made once, before any temporary, and
        # then written in place: a fresh state tensor every step, allocated among the float32 copies, left
        # glibc's heap full of holes it could not trim (+24 MB resident on Qwen2.5-0.5B at rank 16, where
        # most factors are under the 64 KB that go to their own mapping; bench/memory.py).
        if st is None and self.kind == "adamw":   # AdamW's fresh state is zeros (SGD's momentum starts at g)
            st = self.state[p] = {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        bits = int(p.detach().view(torch.int16).sum(dtype=torch.int64))
        self._gen.manual_seed((bits * 1_000_003 + self._index[p] * 7919 + self.seed) % (1 << 63))
        w = p.float()
        new = self._apply(w, None if g is None else g.float(), None if st is None else
                          {k: v.float() if torch.is_tensor(v) else v for k, v in st.items()}, lr)
        p.copy_(stochastic_round(w, p.dtype, self._gen))
        if new is None:
            return
        if st is None:                            # SGD's first momentum buffer
            st = self.state[p] = {k: torch.empty_like(p) if torch.is_tensor(v) else v for k, v in new.items()}
        for k, v in new.items():                  # the same draws in the same order as rounding into new tensors
            if torch.is_tensor(v):
                st[k].copy_(stochastic_round(v, p.dtype, self._gen))
            else:
                st[k] = v

    def _apply(self, p, g, st: dict | None, lr: float) -> dict | None:
        """Update `p` in place with gradient `g` (None: zero) and state `st` (None: fresh), as torch.optim
        does; returns the state."""
        wd = self.weight_decay
        if self.kind == "sgd":
            if wd:
                g = p.mul(wd) if g is None else g.add(p, alpha=wd)
            if self.momentum:
                if st is None:
                    st = {"momentum_buffer": torch.zeros_like(p) if g is None else g.clone()}
                    buf = st["momentum_buffer"]
                else:
                    buf = st["momentum_buffer"].mul_(self.momentum)
                    if g is not None:
                        buf.add_(g)
                g = buf
            if g is not None:
                p.add_(g, alpha=-lr)
            return st
        if st is None:
            st = {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
        b1, b2 = self.betas
        st["step"] += 1
        p.mul_(1 - lr * wd)
        m, v = st["exp_avg"], st["exp_avg_sq"]
        if g is None:
            m.lerp_(self._zero.to(m.dtype), 1 - b1)
            v.mul_(b2)
        else:
            m.lerp_(g, 1 - b1)
            v.mul_(b2).addcmul_(g, g, value=1 - b2)
        bias1 = 1 - b1 ** st["step"]
        bias2 = 1 - b2 ** st["step"]
        denom = (v.sqrt() / math.sqrt(bias2)).add_(self.eps)
        p.addcdiv_(m, denom, value=-(lr / bias1))
        return st

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        """{"state": {param index: {name: tensor or number}}, "last_trained": [...], "lr", "base_lr"}."""
        index = {p: i for i, p in enumerate(self.params)}
        return {"state": {index[p]: dict(st) for p, st in self.state.items()}, "last_trained": sorted(self.last_trained),
                "lr": self.lr, "base_lr": self.base_lr}

    def load_state_dict(self, d: dict):
        self.state = {self.params[int(i)]: dict(st) for i, st in d["state"].items()}
        for st in self.state.values():
            if "step" in st:
                st["step"] = int(st["step"])
        self.last_trained = set(d["last_trained"])
        self.lr, self.base_lr = d.get("lr", self.lr), d.get("base_lr", self.base_lr)
        for p, st in self.state.items():       # the state keeps the parameter's type (float32 or bfloat16)
            for k, v in st.items():
                if torch.is_tensor(v) and v.is_floating_point() and v.dtype != p.dtype:
                    st[k] = v.to(p.dtype)


def stochastic_round(x: torch.Tensor, dtype: torch.dtype, gen: torch.Generator) -> torch.Tensor:
    """float32 `x` rounded to bfloat16 up or down at random, up with probability equal to the distance
    from the lower neighbour over the step: E[result] = x. Adds 16 random bits below bfloat16's last
    mantissa bit and truncates (bfloat16 is the top half of a float32)."""
    if dtype == torch.float32:
        return x
    if dtype != torch.bfloat16:
        raise ValueError(f"stochastic rounding to {dtype} is not implemented (float32 or bfloat16)")
    noise = torch.randint(0, 1 << 16, x.shape, generator=gen, dtype=torch.int32)
    return ((x.contiguous().view(torch.int32) + noise) & -65536).view(torch.float32).to(dtype)


def fuses_step(clip: float, grad_accum: int, world: int, skip_nonfinite: bool) -> bool:
    """Whether the optimizer step may run inside the backward, each block's as soon as its gradients are
    complete (`BlockOptimizer.step_block`), with the same result: only when nothing needs every block's
    gradients first (clipping by the global norm, accumulation over micro-batches, data parallelism's
    all-reduce, skipping a step whose gradients are not finite). Then a block's gradients never outlive
    its VJP: one block's instead of every trained block's (3B full, float32 state: 3 MB, not 114)."""
    return clip == 0 and grad_accum == 1 and world == 1 and not skip_nonfinite


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the global L2 norm of the gradients present; returns the norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf")))
