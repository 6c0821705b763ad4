"""Data-parallel training over torch.distributed (DESIGN section 8).

Design note
-----------
Launch. `torchrun --nproc-per-node N -m lcsb train ...` (or `--nnodes/--rdzv-*` across machines)
sets RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR and MASTER_PORT in every worker; `setup()` reads
them and joins the process group: gloo for CPU tensors (the engine computes on the CPU), nccl when
the gradients live on a CUDA device. Without them it returns a world of one, and every hook below
is either a no-op or the single-process arithmetic: the trainer has one code path.

Data. The run walks *global* micro-batches of world x batch_size sequences in the seeded epoch order
(`data.epoch_order`, the same on every rank); rank r takes rows [r*b, (r+1)*b) of each and pads them
to their own longest. N ranks x batch b thus see, step by step, the sequences of one process with
batch N*b (or batch b and grad-accum N), and a checkpoint's data position (epoch, global batch index)
means the same for any number of ranks. A resumed run keeps its global batch: on a different number
of ranks, batch_size becomes global / ranks.

Selection. Roles are pure functions of (seed, step): every rank trains the same blocks, with nothing
to communicate.

Gradients. Each micro-batch's backward runs with loss_scale = its counted tokens, so .grad holds the
*sum* of the per-token gradients. At the end of the step the .grad of the LoRA parameters of the
trained blocks only are concatenated into one flat buffer, followed by four scalars (counted tokens,
summed loss, tokens, a stop flag); one all_reduce(SUM); the gradients are divided by the global count
of counted tokens and handed back as views of the buffer. The gradient is the mean over every counted
token of the step, however the step is split into ranks and micro-batches, and the single-process
path divides the same way (`reduce_step` with a world of one). Blocks not trained this step send
nothing: LCSB with K groups all-reduces about 1/K of full backprop's bytes.

Agreement. After the reduce every rank holds the same gradients, loss and stop flag, so clipping, the
non-finite check, the optimizer step (momentum steps of the blocks not trained included) and the
decision to stop on a signal are the same everywhere: LoRA parameters stay identical without being
sent. `check_replicas` proves it at every checkpoint: the sha256 of each rank's LoRA parameters,
all-gathered; a difference stops the run before the checkpoint is written.

Rank 0 alone writes (log, checkpoints, adapter, plot, TensorBoard) and prints; other ranks print only
errors. LoRA dropout: every rank reseeds torch's RNG from (seed, step, rank) at each step, so masks
differ across ranks and a resumed run draws the same ones (a run of one process keeps its saved RNG).
"""

from __future__ import annotations

import atexit
import hashlib
import json
import os
import signal
import warnings
from dataclasses import dataclass

import torch

from . import data as datalib
from .errors import UserError

STOP_SIGNAL = signal.SIGTERM    # what a rank that got no signal itself reports when another one did

NO_TOKENS = "a step has no tokens to learn from (every label is -100); check the loss masking"


class ReplicaMismatch(UserError):
    """The ranks' LoRA parameters differ: the data-parallel invariant is broken, the run stops."""

    exit_code = 5


@dataclass
class StepTotals:
    """One step, summed over its micro-batches and ranks."""

    loss: float          # mean loss over the step's counted tokens
    counted: int         # counted (label != -100) tokens
    tokens: int          # tokens fed (padding included)
    comm_bytes: int      # bytes all-reduced this step (0 in a single process)


def counted_tokens(labels: torch.Tensor) -> int:
    """Positions that count in the loss: labels[:, 1:] not -100 (as the executor shifts them)."""
    return int((labels[:, 1:] != datalib.IGNORE).sum())


class World:
    """This process's place in the data-parallel group (a world of one when not launched by torchrun)."""

    def __init__(self, rank: int = 0, size: int = 1, local_rank: int = 0, device: torch.device | None = None):
        self.rank, self.size, self.local_rank = rank, size, local_rank
        self.device = device or torch.device("cpu")
        self._late_signal = None

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes and prints."""
        return self.rank == 0

    def seed_step(self, seed: int, step: int):
        """Seed torch's RNG (LoRA dropout) from (seed, step, rank): distinct masks on every rank, the same
        ones after a resume. A single process keeps its own (checkpointed) RNG stream."""
        if self.size > 1:
            digest = hashlib.sha256(f"lcsb-dropout:{seed}:{step}:{self.rank}".encode()).digest()
            torch.manual_seed(int.from_bytes(digest[:8], "little") >> 1)

    def reduce_step(self, blocks, trained, loss_sum: float, counted: int, tokens: int, stop=None) -> StepTotals:
        """Turn this rank's summed gradients into the step's token-weighted mean over all ranks.

        blocks: the LoRA parameters of each block; trained: the blocks trained this step (only theirs are
        sent); loss_sum: summed per-token loss; counted: counted tokens; tokens: tokens fed; stop: the
        trainer's signal catcher: afterwards its `.signal` is set on every rank if any rank got one before
        the reduce, and cleared on every rank otherwise (a later one counts at the next step)."""
        params = [p for b in sorted(trained) for p in blocks[b]]
        if self.size == 1:
            if counted == 0:
                raise UserError(NO_TOKENS)
            for p in params:
                if p.grad is not None:
                    p.grad.div_(float(counted))
            return StepTotals(loss_sum / counted, counted, tokens, 0)

        import torch.distributed as dist

        local = None if stop is None else (stop.signal or self._late_signal)
        dtype = torch.promote_types(params[0].dtype, torch.float32) if params else torch.float32
        n = sum(p.numel() for p in params)
        flat = torch.empty(n + 4, dtype=dtype, device=self.device)
        o = 0
        for p in params:
            if p.grad is None:       # an empty shard: this rank adds nothing
                flat[o: o + p.numel()].zero_()
            else:
                flat[o: o + p.numel()].copy_(p.grad.reshape(-1))
            o += p.numel()
        flat[n:] = torch.tensor([counted, loss_sum, tokens, 1.0 if local else 0.0], dtype=dtype)
        dist.all_reduce(flat, op=dist.ReduceOp.SUM)
        total = int(round(flat[n].item()))
        if total == 0:
            raise UserError("a step has no tokens to learn from on any rank (every label is -100)")
        grads = flat[:n].div_(float(total))
        o = 0
        for p in params:
            p.grad = grads[o: o + p.numel()].view_as(p).to(p.dtype)
            o += p.numel()
        if stop is not None:
            agreed = flat[n + 3].item() > 0
            with _signals_blocked():
                late, stop.signal = stop.signal if local is None else None, None
                self._late_signal = None if agreed else late
                if agreed:
                    stop.signal = local or late or STOP_SIGNAL
        return StepTotals(flat[n + 1].item() / total, total, int(round(flat[n + 2].item())),
                          flat.numel() * flat.element_size())

    def check_replicas(self, params: dict[str, torch.Tensor], step: int, log=None, last_checkpoint=None) -> str:
        """sha256 of this rank's LoRA parameters; with several ranks, all-gathered and compared: they must be
        identical, or the run stops (ReplicaMismatch on every rank). Rank 0 records the check in `log`."""
        h = hashlib.sha256()
        for k, p in params.items():
            h.update(k.encode())
            h.update(p.detach().cpu().contiguous().view(-1).view(torch.uint8).numpy().tobytes())
        if self.size == 1:
            return h.hexdigest()
        import torch.distributed as dist

        mine = torch.tensor(list(h.digest()), dtype=torch.uint8, device=self.device)
        every = [torch.empty_like(mine) for _ in range(self.size)]
        dist.all_gather(every, mine)
        hexes = [bytes(t.cpu().tolist()).hex() for t in every]
        differ = [r for r, x in enumerate(hexes) if x != hexes[0]]
        if log is not None and self.main:
            log.write(json.dumps({"step": step, "replicas": self.size, "identical": not differ,
                                  "params_sha256": hexes[0]}) + "\n")
            log.flush()
        if differ:
            raise ReplicaMismatch(
                f"LoRA parameters differ across ranks at step {step}: rank(s) {differ} do not match rank 0 "
                f"(sha256 {hexes[0][:12]} on rank 0); the data-parallel run is broken, so no checkpoint was "
                f"written; last good checkpoint: {last_checkpoint or 'none yet'}")
        return hexes[0]


class _signals_blocked:
    """SIGINT and SIGTERM held back while the stop decision is swapped (where the OS allows it)."""

    def __enter__(self):
        self.old = (signal.pthread_sigmask(signal.SIG_BLOCK, {signal.SIGINT, signal.SIGTERM})
                    if hasattr(signal, "pthread_sigmask") else None)

    def __exit__(self, *exc):
        if self.old is not None:
            signal.pthread_sigmask(signal.SIG_SETMASK, self.old)


def setup(device: str | torch.device = "cpu") -> World:
    """This process's World: from an initialised process group, from torchrun's environment (joining the
    group), or a world of one."""
    device = torch.device(device)
    local_rank = int(os.environ.get("LOCAL_RANK", "0") or 0)
    try:
        import torch.distributed as dist
    except ImportError:     # a torch built without distributed support
        dist = None
    if dist is not None and dist.is_available() and dist.is_initialized():
        return _world(dist.get_rank(), dist.get_world_size(), local_rank, device)
    size = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if size <= 1:
        return World()
    missing = [v for v in ("RANK", "MASTER_ADDR", "MASTER_PORT") if not os.environ.get(v)]
    if missing:
        raise UserError(f"WORLD_SIZE={size} is set but {', '.join(missing)} is not: launch data-parallel runs "
                        "with torchrun (torchrun --nproc-per-node N -m lcsb train ...)")
    if dist is None or not dist.is_available():
        raise UserError(f"WORLD_SIZE={size} is set but this torch build has no torch.distributed")
    backend = "nccl" if device.type == "cuda" else "gloo"
    if backend == "nccl":
        torch.cuda.set_device(local_rank)
        device = torch.device("cuda", local_rank)
    rank = int(os.environ["RANK"])
    dist.init_process_group(backend, init_method="env://", rank=rank, world_size=size)
    atexit.register(_close)
    return _world(rank, size, local_rank, device)


def _world(rank: int, size: int, local_rank: int, device) -> World:
    if rank != 0:
        # rank 0 reports; the others stay quiet but for errors and lcsb's own warnings ("lcsb: the
        # dequantization kernel could not be built ..."), which can differ from rank to rank
        warnings.filterwarnings("ignore")
        warnings.filterwarnings("default", message="lcsb: ")
    return World(rank, size, local_rank, device)


def _close():
    import torch.distributed as dist

    if dist.is_initialized():
        dist.destroy_process_group()
