"""Data-parallel training (DESIGN section 8) with 2 gloo processes on this machine, on the tiny 4-layer
model: 2 ranks x batch 1 end with the adapter of 1 process with batch 2 and of 1 process with grad-accum 2
(same data order, token-weighted mean gradients), for full and lcsb; the bytes all-reduced per step are
logged and lcsb K=4 sends a quarter of full's; a 2-rank run stopped by a signal on one rank resumes on
1 process and ends with the uninterrupted 2-rank run's adapter; under --inactive momentum the replicas
stay identical (checked and logged at every checkpoint), and different replicas stop the run.

One 2-rank run goes through the real launcher (`python -m torch.distributed.run ... -m lcsb train`); the
others are forked by one fresh interpreter that imports torch and lcsb once and sets torchrun's variables
(RANK, WORLD_SIZE, LOCAL_RANK, MASTER_ADDR, MASTER_PORT) in each child. The 1-process references run in
this process meanwhile.
"""

from __future__ import annotations

import json
import warnings
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

import tiny
from lcsb import distributed
from lcsb import data as datalib
from lcsb.cli import main

STEPS = 10
COMMON = ["--steps", STEPS, "--save-every", 5, "--rank", 4, "--alpha", 8, "--lr", 1e-2, "--clip", 0.3,
          "--targets", "q_proj", "v_proj", "--eval-batches", 2, "--groups", 4, "--inactive", "momentum"]

# Forks one child per (job, rank) with torchrun's environment; a child runs `lcsb train ARGV`, or the
# replica check on parameters that differ on rank 1. `term`: [rank, n]: that rank sends itself SIGTERM
# at its n-th micro-batch; `nan`: [rank, n]: that rank's n-th micro-batch reports a NaN loss. Prints the
# children's wait statuses, in job and rank order.
LAUNCHER = r"""
import dataclasses, json, os, signal, sys, traceback
import torch
torch.set_num_threads(1)
import lcsb.cli, lcsb.distributed, lcsb.trainer

def mismatch(rank):
    world = lcsb.distributed.setup()
    try:
        world.check_replicas({"x": torch.arange(6.0) + (1e-6 if rank == 1 else 0.0)}, 7)
    except lcsb.distributed.ReplicaMismatch as e:
        print(e, file=sys.stderr)
        return e.exit_code
    return 0

pids = []
for job in json.loads(sys.argv[1]):
    for rank in range(job["world"]):
        pid = os.fork()
        if pid:
            pids.append(pid)
            continue
        os.dup2(os.open(f"{job['stderr']}.{rank}", os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        os.environ.update(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(job["world"]),
                          MASTER_ADDR="127.0.0.1", MASTER_PORT=str(job["port"]))
        if job.get("term") and job["term"][0] == rank:
            calls, run_step = [0], lcsb.trainer.run_step
            def run_step_then_term(*a, **kw):
                calls[0] += 1
                if calls[0] == job["term"][1]:
                    os.kill(os.getpid(), signal.SIGTERM)
                return run_step(*a, **kw)
            lcsb.trainer.run_step = run_step_then_term
        if job.get("nan") and job["nan"][0] == rank:
            calls, run_step = [0], lcsb.trainer.run_step
            def run_step_nan(*a, **kw):
                calls[0] += 1
                res = run_step(*a, **kw)
                return dataclasses.replace(res, loss=float("nan")) if calls[0] == job["nan"][1] else res
            lcsb.trainer.run_step = run_step_nan
        try:
            code = lcsb.cli.main(job["argv"]) if "argv" in job else mismatch(rank)
        except BaseException:
            traceback.print_exc()
            code = 1
        sys.stderr.flush()
        os._exit(code)
print(json.dumps([os.waitpid(pid, 0)[1] for pid in pids]), flush=True)
"""


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run(*argv) -> int:
    return main([str(a) for a in argv])


def steps_of(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "loss" in r]


def checks_of(run_dir: Path) -> list[dict]:
    return [r for r in map(json.loads, (run_dir / "log.jsonl").read_text().splitlines()) if "replicas" in r]


def adapter(run_dir: Path) -> dict[str, torch.Tensor]:
    return load_file(str(run_dir / "adapter_model.safetensors"))


def assert_same_adapter(a: Path, b: Path, exact: bool = False):
    ta, tb = adapter(a), adapter(b)
    assert ta.keys() == tb.keys()
    assert any(t.abs().max() > 1e-3 for k, t in ta.items() if "lora_B" in k)     # it did train
    for k in ta:
        if exact:
            assert torch.equal(ta[k], tb[k]), k
        else:   # fp32 rounding of batched vs separate sequences, which AdamW's normalisation can magnify
            # (1.09e-5 on one element of 256 at worst; an averaging bug would be off by the gradient's size)
            torch.testing.assert_close(ta[k], tb[k], rtol=1e-5, atol=3e-5, msg=lambda m: f"{k}: {m}")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny4):
    """The 2-rank runs (full through torchrun; lcsb, lcsb stopped at step 4 by a SIGTERM to rank 1 only, and
    the replica check forked), and the 1-process references (batch 2; batch 1 x grad-accum 2) run here."""
    root = tmp_path_factory.mktemp("ddp")
    # text records of 3-12 words: counted tokens differ between records, so a mean of per-sequence means
    # would not match; the token-weighted mean does
    data = tiny.make_text_data(root / "text")
    common = [str(a) for a in ["--model", tiny4, "--data", data, *COMMON]]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    for var in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(var, None)
    out = {name: root / name for name in ("full-2", "lcsb-2", "stopped-2", "full-b2", "full-ga2", "lcsb-b2",
                                          "lcsb-ga2")}
    torchrun = subprocess.Popen(
        [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node", "2", "--master-addr", "127.0.0.1",
         "--master-port", str(free_port()), "-m", "lcsb", "train", *common, "--method", "full",
         "--batch-size", "1", "--out", str(out["full-2"])],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    jobs = [dict(world=2, port=free_port(), stderr=str(root / "lcsb-2.err"),
                 argv=["train", *common, "--method", "lcsb", "--batch-size", "1", "--out", str(out["lcsb-2"])]),
            dict(world=2, port=free_port(), stderr=str(root / "stopped-2.err"), term=[1, 4],
                 argv=["train", *common, "--method", "lcsb", "--batch-size", "1", "--out", str(out["stopped-2"])]),
            dict(world=2, port=free_port(), stderr=str(root / "mismatch.err")),
            dict(world=2, port=free_port(), stderr=str(root / "nan-2.err"), nan=[1, 3],
                 argv=["train", *common, "--steps", "4", "--out", str(root / "nan-2")])]
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(jobs)], env=env, text=True,
                                stdout=subprocess.PIPE, start_new_session=True)
    try:
        for method in ("full", "lcsb"):
            assert run("train", *common, "--method", method, "--batch-size", 2, "--out", out[f"{method}-b2"]) == 0
            assert run("train", *common, "--method", method, "--batch-size", 1, "--grad-accum", 2,
                       "--out", out[f"{method}-ga2"]) == 0
        statuses = json.loads(launcher.communicate(timeout=300)[0])
        torchrun_out, torchrun_err = torchrun.communicate(timeout=300)
    finally:
        for p in (launcher, torchrun):
            if p.poll() is None:
                os.killpg(p.pid, 9)
                p.wait()
    codes = [os.WEXITSTATUS(s) if os.WIFEXITED(s) else -os.WTERMSIG(s) for s in statuses]
    errs = {f"{job['stderr']}.{r}": Path(f"{job['stderr']}.{r}").read_text() for job in jobs for r in range(2)}
    return dict(out=out, codes=codes, errs=errs, root=root,
                torchrun=(torchrun.returncode, torchrun_out, torchrun_err))


@pytest.mark.parametrize("method", ["full", "lcsb"])
def test_two_ranks_equal_one_process(runs, method):
    """2 ranks x batch 1 == 1 process x batch 2 == 1 process x batch 1 x grad-accum 2, step by step."""
    out = runs["out"]
    if method == "full":
        code, _, err = runs["torchrun"]
        assert code == 0, err[-3000:]
        assert err.count("adapter: ") == 1 and err.count("config: ") == 1     # rank 0 alone reports
    else:
        assert runs["codes"][:2] == [0, 0], runs["errs"]
        assert runs["errs"][f"{runs['root'] / 'lcsb-2.err'}.1"] == ""       # rank 1 prints nothing
    two = out[f"{method}-2"]
    assert_same_adapter(two, out[f"{method}-b2"])
    # bit for bit: rank 0 + rank 1 in the all-reduce is grad-accum's g1 + g2, then the same division
    assert_same_adapter(two, out[f"{method}-ga2"], exact=True)
    s2, sb, sg = steps_of(two), steps_of(out[f"{method}-b2"]), steps_of(out[f"{method}-ga2"])
    assert [l["step"] for l in s2] == list(range(1, STEPS + 1))
    for a, b, c in zip(s2, sb, sg):
        assert a["trained"] == b["trained"] == c["trained"]
        assert a["loss"] == pytest.approx(b["loss"], rel=1e-5) and a["loss"] == pytest.approx(c["loss"], rel=1e-5)
        assert a["grad_norm"] == pytest.approx(b["grad_norm"], rel=1e-4)
        assert b["allreduce_bytes"] == c["allreduce_bytes"] == 0 < a["allreduce_bytes"]
    assert any(l["grad_norm"] > 0.3 for l in s2)                          # clipping acted on the reduced gradients
    # the replica check at every checkpoint (steps 5 and 10), recorded in the log
    assert [(c["step"], c["replicas"], c["identical"]) for c in checks_of(two)] == [(5, 2, True), (10, 2, True)]
    assert not checks_of(out[f"{method}-b2"])
    assert not list(two.glob("**/*.tmp*"))


def test_allreduce_bytes(runs):
    """Only trained blocks' LoRA gradients (plus 4 scalars) are sent: lcsb K=4 on 4 layers sends a quarter."""
    full, lcsb = steps_of(runs["out"]["full-2"]), steps_of(runs["out"]["lcsb-2"])
    n_lora = sum(t.numel() for t in adapter(runs["out"]["full-2"]).values())
    assert {l["allreduce_bytes"] for l in full} == {4 * (n_lora + 4)}
    assert {l["allreduce_bytes"] for l in lcsb} == {4 * (n_lora // 4 + 4)}
    assert 0.2 <= lcsb[0]["allreduce_bytes"] / full[0]["allreduce_bytes"] <= 0.3


def test_signal_on_one_rank_then_resume_on_one_process(runs, capsys):
    """SIGTERM to rank 1 alone during step 4: both ranks finish step 4, check replicas, checkpoint, exit 130.
    Resumed by 1 process (batch 2 keeps the global batch of 2): the uninterrupted 2-rank run's adapter."""
    out, codes = runs["out"], runs["codes"]
    assert codes[2:4] == [130, 130], runs["errs"]
    stopped = out["stopped-2"]
    err0 = runs["errs"][f"{runs['root'] / 'stopped-2.err'}.0"]
    assert "stopped by signal 15 after step 4" in err0
    assert runs["errs"][f"{runs['root'] / 'stopped-2.err'}.1"] == ""
    assert [l["step"] for l in steps_of(stopped)] == [1, 2, 3, 4]
    assert json.loads((stopped / "checkpoints" / "latest.json").read_text())["step"] == 4
    assert not (stopped / "adapter_model.safetensors").exists()

    assert run("train", "--resume", stopped) == 0
    err = capsys.readouterr().err
    assert "--batch-size 2 on each of 1 rank(s) keeps the run's global batch of 2" in err
    assert "resumed from" in err and "(step 4)" in err
    assert_same_adapter(stopped, out["lcsb-2"])
    steps, ref = steps_of(stopped), steps_of(out["lcsb-2"])
    assert [l["step"] for l in steps] == list(range(1, STEPS + 1))
    assert [l["trained"] for l in steps] == [l["trained"] for l in ref]
    assert [l["loss"] for l in steps] == pytest.approx([l["loss"] for l in ref], rel=1e-5)
    assert [l["allreduce_bytes"] for l in steps[4:]] == [0] * 6       # one process: nothing sent


def test_different_replicas_stop_the_run(runs):
    codes, errs = runs["codes"][4:6], [runs["errs"][f"{runs['root'] / 'mismatch.err'}.{r}"] for r in (0, 1)]
    assert codes == [distributed.ReplicaMismatch.exit_code] * 2, errs
    for e in errs:
        assert "LoRA parameters differ across ranks at step 7: rank(s) [1] do not match rank 0" in e


def test_non_finite_on_one_rank_stops_every_rank(runs):
    """A NaN loss on rank 1 alone at step 3: every rank sees the reduced NaN and stops there, none steps."""
    codes, errs = runs["codes"][6:8], [runs["errs"][f"{runs['root'] / 'nan-2.err'}.{r}"] for r in (0, 1)]
    assert codes == [3, 3], errs
    for e in errs:
        assert "non-finite loss at step 3" in e
    assert [l["step"] for l in steps_of(runs["root"] / "nan-2")] == [1, 2]


def test_shards_cover_the_global_batches(tmp_path):
    """Rank r's rows of global batch g are rows [r*b, (r+1)*b) of the 1-process batch g of size N*b, in every
    epoch, including an epoch's short last batch (where a rank may get none); world 1 is data.batches."""
    ex = [datalib.Example(list(range(1, 2 + i % 5)), list(range(1, 2 + i % 5)), f"x:{i}") for i in range(10)]
    ref = list(datalib.batches(ex, 4, seed=3, epoch=0, pad_token_id=0)) + \
        list(datalib.batches(ex, 4, seed=3, epoch=1, pad_token_id=0))
    shards = [datalib.Batches(ex, 2, 3, 0, 0, 0, world=2, rank=r) for r in (0, 1)]
    for ids, labels in ref:
        parts = [s.next() for s in shards]
        got = [p for p in parts if p[0] is not None]
        assert sum(p[0].shape[0] for p in got) == ids.shape[0]
        rows = [row[row != 0].tolist() for p in got for row in p[0]]
        assert rows == [row[row != 0].tolist() for row in ids]
    assert shards[0].epoch == 1 and shards[0].batch == 3 and parts[1] == (None, None)   # 10 = 4 + 4 + 2
    one = datalib.Batches(ex, 4, 3, 0, 1, 0)                 # one process, resumed at batch 1: batches()'s own
    for a, b in zip([one.next() for _ in range(4)], ref[1:5], strict=True):
        assert torch.equal(a[0], b[0]) and torch.equal(a[1], b[1])


def test_other_ranks_keep_lcsb_warnings():
    """Ranks other than 0 stay quiet but for errors and lcsb's own warnings (a kernel that failed to build on
    one machine of several is news from that machine)."""
    with warnings.catch_warnings(record=True) as seen:
        warnings.simplefilter("always")
        distributed._world(1, 2, 0, torch.device("cpu"))
        warnings.warn("some library's deprecation", DeprecationWarning)
        warnings.warn("lcsb: the dequantization kernel could not be built (cc: not found); using ...", RuntimeWarning)
        warnings.warn("a library's user warning")
    assert [str(w.message)[:33] for w in seen] == ["lcsb: the dequantization kernel c"]
