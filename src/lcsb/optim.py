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
"""

from __future__ import annotations

import math

import torch

from .errors import UserError

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
                 inactive: str = "momentum", lr_scales: list[float] | None = None):
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

    def set_lr_factor(self, f: float):
        self.lr = self.base_lr * f

    @torch.no_grad()
    def step(self, trained: set[int]):
        """Apply one update; `trained` are the blocks whose parameters hold this step's gradients."""
        for b, params in enumerate(self.blocks):
            if b in trained:
                if self.inactive == "reset" and b not in self.last_trained:
                    for p in params:
                        self.state.pop(p, None)
                for p in params:
                    self._update(p, p.grad, self.lr_scales[b])   # a trained block without a gradient steps with zero
            elif self.inactive == "momentum":
                for p in params:
                    self._update(p, None, self.lr_scales[b])
        self.last_trained = set(trained)

    def _update(self, p, g, scale: float = 1.0):
        st = self.state.get(p)
        lr, wd = self.lr * scale if scale != 1.0 else self.lr, self.weight_decay
        if self.kind == "sgd":
            if wd:
                g = p.mul(wd) if g is None else g.add(p, alpha=wd)
            if self.momentum:
                if st is None:
                    st = self.state[p] = {"momentum_buffer": torch.zeros_like(p) if g is None else g.clone()}
                    buf = st["momentum_buffer"]
                else:
                    buf = st["momentum_buffer"].mul_(self.momentum)
                    if g is not None:
                        buf.add_(g)
                g = buf
            if g is not None:
                p.add_(g, alpha=-lr)
            return
        if st is None:
            st = self.state[p] = {"step": 0, "exp_avg": torch.zeros_like(p), "exp_avg_sq": torch.zeros_like(p)}
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


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the global L2 norm of the gradients present; returns the norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf")))
