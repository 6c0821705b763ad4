"""Selection policies: which blocks are trained, carried through or skipped at each step.

Every policy is a pure function of (seed, step, number of layers), so a resumed run and every
rank of a distributed run pick the same blocks without talking to each other.

| method     | roles per step                                                                  |
|------------|---------------------------------------------------------------------------------|
| full       | all train (MeBP)                                                                |
| lcsb       | group (t // interval) mod K train, the rest skip (LCSB)                         |
| lcsb-exact | as lcsb, blocks above the lowest trained one through: exact gradients           |
| random     | k blocks drawn each step train, the rest skip (the LCSB paper's ablation)       |
| lisa       | k blocks drawn every `interval` steps train, the rest through (LISA)            |
| badam      | one block, switched every `interval` steps, train; the rest through (BAdam)     |
| freeze     | the top k blocks always train (MLX-LM --num-layers, the paper's Freeze)          |
| topdown    | the top k blocks train every step, every block every `full_every`-th step       |

`topdown` is ours. Every block it visits it trains, and it never skips a block above one it
trains, so every gradient it computes is exact (no residual-identity surrogate, whose bias made
LCSB lose most of full's gain on a 30-layer pretrained model). It saves time by how deep the
backward goes: down to the top k blocks on most steps, through the whole stack every
`full_every`-th step.

`train_frequency` is the share of steps each block is trained. AdamW moves a parameter trained on
a share f of the steps, and stepped with zero gradients in between (`--inactive momentum`), about
sqrt(f) as far as one trained every step (its second moment averages over the steps without a
gradient), and f as far when frozen in between; SGD moves it f as far either way (each gradient
adds the same displacement). `--compensate` scales such a block's learning rate by the inverse
(optim.BlockOptimizer), so every block moves at full backprop's pace.
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import UserError

METHODS = ("full", "lcsb", "lcsb-exact", "random", "lisa", "badam", "freeze", "topdown")
GROUPINGS = ("contiguous", "strided")
ORDERS = ("ascending", "descending", "random")
ROLES = ("train", "through", "skip")


@dataclass(frozen=True)
class Plan:
    """One step's work, computed once: each block's role, and what follows from the roles -- the blocks
    trained (their LoRA gets gradients and, under torchrun, is all-reduced), the lowest trained block, and
    the blocks the backward visits (train or through, from the lowest trained block up; the rest of the
    stack is never touched). The executor runs it, the trainer steps the optimizer by it, the memory
    estimate sizes the step by it."""

    roles: tuple[str, ...]

    def __post_init__(self):
        if any(r not in ROLES for r in self.roles):
            raise ValueError(f"roles must be values from {ROLES}, got {list(self.roles)}")

    @property
    def trained(self) -> tuple[int, ...]:
        return tuple(i for i, r in enumerate(self.roles) if r == "train")

    @property
    def lowest(self) -> int:
        """The lowest trained block; the number of blocks when none is trained (the backward stops at once)."""
        return next((i for i, r in enumerate(self.roles) if r == "train"), len(self.roles))

    @property
    def visited(self) -> tuple[int, ...]:
        return tuple(i for i in range(self.lowest, len(self.roles)) if self.roles[i] != "skip")


def groups_of(n: int, k: int, grouping: str) -> list[list[int]]:
    """Split layers 0..n-1 into k groups: contiguous runs (sizes differ by at most one, larger
    first) or strided (layer l in group l mod k)."""
    if grouping == "strided":
        return [list(range(g, n, k)) for g in range(k)]
    size, extra = divmod(n, k)
    out, lo = [], 0
    for g in range(k):
        hi = lo + size + (g < extra)
        out.append(list(range(lo, hi)))
        lo = hi
    return out


def _rng(seed: int, *key: int) -> random.Random:
    # random.Random seeded with a string is stable across processes and Python versions (sha512)
    return random.Random(":".join(str(x) for x in (seed, *key)))


@dataclass(frozen=True)
class Selection:
    method: str = "lcsb"
    groups: int = 4
    grouping: str = "contiguous"
    interval: int = 1
    active: int = 1
    order: str = "ascending"
    seed: int = 0
    full_every: int = 4

    def validate(self, n: int) -> "Selection":
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method in ("lcsb", "lcsb-exact"):
            if self.grouping not in GROUPINGS:
                raise UserError(f"--grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}")
            if not 1 <= self.groups <= n:
                raise UserError(f"--groups {self.groups} is out of range: the model has {n} layers, choose 1..{n}")
        if self.method in ("random", "lisa", "freeze", "topdown") and not 1 <= self.active <= n:
            raise UserError(f"--active {self.active} is out of range: the model has {n} layers, choose 1..{n}")
        if self.method == "badam" and self.order not in ORDERS:
            raise UserError(f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")
        if self.method == "topdown" and self.full_every < 1:
            raise UserError(f"--full-every must be at least 1, got {self.full_every}")
        if self.interval < 1:
            raise UserError(f"--interval must be at least 1, got {self.interval}")
        return self

    def trained(self, step: int, n: int) -> list[int]:
        """Blocks whose LoRA parameters get gradients at `step` (0-based)."""
        m = self.method
        if m == "full":
            return list(range(n))
        if m in ("lcsb", "lcsb-exact"):
            return groups_of(n, self.groups, self.grouping)[(step // self.interval) % self.groups]
        if m == "random":
            return sorted(_rng(self.seed, step).sample(range(n), self.active))
        if m == "lisa":
            return sorted(_rng(self.seed, step // self.interval).sample(range(n), self.active))
        if m == "badam":
            switch = step // self.interval
            cycle, pos = divmod(switch, n)
            if self.order == "ascending":
                return [pos]
            if self.order == "descending":
                return [n - 1 - pos]
            perm = list(range(n))
            _rng(self.seed, cycle).shuffle(perm)   # a fresh permutation each pass over the blocks
            return [perm[pos]]
        if m == "freeze":
            return list(range(n - self.active, n))
        if m == "topdown":
            return list(range(0 if step % self.full_every == 0 else n - self.active, n))
        raise UserError(f"unknown method {m!r}")

    def plan(self, step: int, n: int) -> Plan:
        """This step's Plan: the roles, and the trained / lowest / visited blocks that follow from them."""
        return Plan(tuple(self.roles(step, n)))

    def roles(self, step: int, n: int) -> list[str]:
        """The role of every block at `step`: "train", "through" or "skip"."""
        chosen = set(self.trained(step, n))
        rest = "through" if self.method in ("lcsb-exact", "lisa", "badam") else "skip"   # topdown: nothing above is left
        low = min(chosen)
        return ["train" if i in chosen else (rest if i > low else "skip") for i in range(n)]

    def train_frequency(self, n: int) -> list[float]:
        """The share of steps each block is trained (in expectation for the random methods)."""
        m = self.method
        if m in ("random", "lisa"):
            return [self.active / n] * n
        if m == "badam":
            return [1 / n] * n
        if m == "topdown":
            return [1.0 if i >= n - self.active else 1 / self.full_every for i in range(n)]
        # full, freeze and lcsb / lcsb-exact: deterministic cycles, counted over one
        cycle = self.groups * self.interval if m in ("lcsb", "lcsb-exact") else 1
        counts = [0] * n
        for t in range(cycle):
            for i in self.trained(t, n):
                counts[i] += 1
        return [c / cycle for c in counts]

    def lr_scales(self, n: int, inactive: str, optimizer: str = "adamw") -> list[float]:
        """Per block, the learning-rate factor under which the optimizer moves it as far per step as
        full backprop would: 1 / sqrt(f) for AdamW with `momentum` between its trained steps, 1 / f
        for AdamW `frozen` or `reset` and for SGD (f = train_frequency; 1 for a block never trained)."""
        power = 0.5 if optimizer == "adamw" and inactive == "momentum" else 1.0
        return [1.0 if f == 0 else f ** -power for f in self.train_frequency(n)]
