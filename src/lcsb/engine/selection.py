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
"""

from __future__ import annotations

import random
from dataclasses import dataclass

from ..errors import UserError

METHODS = ("full", "lcsb", "lcsb-exact", "random", "lisa", "badam", "freeze")
GROUPINGS = ("contiguous", "strided")
ORDERS = ("ascending", "descending", "random")


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

    def validate(self, n: int) -> "Selection":
        if self.method not in METHODS:
            raise UserError(f"unknown method {self.method!r}: choose one of {', '.join(METHODS)}")
        if self.method in ("lcsb", "lcsb-exact"):
            if self.grouping not in GROUPINGS:
                raise UserError(f"--grouping must be one of {', '.join(GROUPINGS)}, got {self.grouping!r}")
            if not 1 <= self.groups <= n:
                raise UserError(f"--groups {self.groups} is out of range: the model has {n} layers, choose 1..{n}")
        if self.method in ("random", "lisa", "freeze") and not 1 <= self.active <= n:
            raise UserError(f"--active {self.active} is out of range: the model has {n} layers, choose 1..{n}")
        if self.method == "badam" and self.order not in ORDERS:
            raise UserError(f"--order must be one of {', '.join(ORDERS)}, got {self.order!r}")
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
        raise UserError(f"unknown method {m!r}")

    def roles(self, step: int, n: int) -> list[str]:
        """The role of every block at `step`: "train", "through" or "skip"."""
        chosen = set(self.trained(step, n))
        rest = "through" if self.method in ("lcsb-exact", "lisa", "badam") else "skip"
        low = min(chosen)
        return ["train" if i in chosen else (rest if i > low else "skip") for i in range(n)]
