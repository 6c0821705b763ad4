"""Optimizers over the LoRA parameters, with a policy for blocks not trained this step, and
learning-rate schedules.

`--inactive` decides what happens to the parameters of blocks that got no gradient this step:
- `momentum` (default; the LCSB paper's implicit update): they are stepped with a zero gradient,
  so AdamW's moments decay, the bias-corrected momentum keeps moving them, and weight decay acts.
- `frozen`: no update and no state change at all.
- `reset` (LISA): frozen while inactive, and their optimizer state is cleared when the block is
  trained again.
The update itself is torch's AdamW / SGD, so the arithmetic is the reference one; this module
only decides which parameters get a zero gradient, none, or a fresh state.
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
    """AdamW or SGD over LoRA parameters grouped by block, with the inactive-block policy."""

    def __init__(self, blocks: list[list[torch.nn.Parameter]], lr: float, kind: str = "adamw",
                 weight_decay: float = 0.01, betas=(0.9, 0.999), eps: float = 1e-8, momentum: float = 0.0,
                 inactive: str = "momentum"):
        if lr <= 0:
            raise UserError(f"--lr must be positive, got {lr}")
        if inactive not in INACTIVE:
            raise UserError(f"--inactive must be one of {', '.join(INACTIVE)}, got {inactive!r}")
        self.blocks, self.inactive = blocks, inactive
        self.params = [p for b in blocks for p in b]
        if kind == "adamw":
            self.opt = torch.optim.AdamW(self.params, lr=lr, betas=betas, eps=eps, weight_decay=weight_decay)
        elif kind == "sgd":
            self.opt = torch.optim.SGD(self.params, lr=lr, momentum=momentum, weight_decay=weight_decay)
        else:
            raise UserError(f"unknown optimizer {kind!r}: choose adamw or sgd")
        self.base_lr = lr
        self.last_trained: set[int] = set()

    def set_lr_factor(self, f: float):
        for g in self.opt.param_groups:
            g["lr"] = self.base_lr * f

    @property
    def lr(self) -> float:
        return self.opt.param_groups[0]["lr"]

    def step(self, trained: set[int]):
        """Apply one update; `trained` are the blocks whose parameters hold this step's gradients."""
        for b, params in enumerate(self.blocks):
            if b in trained:
                if self.inactive == "reset" and b not in self.last_trained:
                    for p in params:
                        self.opt.state.pop(p, None)
                for p in params:
                    if p.grad is None:
                        p.grad = torch.zeros_like(p)
            else:
                for p in params:
                    p.grad = torch.zeros_like(p) if self.inactive == "momentum" else None
        self.opt.step()
        self.last_trained = set(trained)

    def zero_grad(self):
        for p in self.params:
            p.grad = None

    def state_dict(self) -> dict:
        return {"opt": self.opt.state_dict(), "last_trained": sorted(self.last_trained)}

    def load_state_dict(self, d: dict):
        self.opt.load_state_dict(d["opt"])
        self.last_trained = set(d["last_trained"])


def clip_grad_norm(params, max_norm: float) -> float:
    """Clip the global L2 norm of the gradients present; returns the norm before clipping."""
    grads = [p for p in params if p.grad is not None]
    if not grads:
        return 0.0
    return float(torch.nn.utils.clip_grad_norm_(grads, max_norm if max_norm > 0 else float("inf")))
