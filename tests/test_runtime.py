"""The caching CPU allocator (lcsb.runtime.install_allocator, alloc.cpp).

It replaces torch's allocator for the rest of a process, so every test runs in a fresh one. The
reference is torch's own allocator (LCSB_ALLOCATOR=0) on the same run: training must give the same
losses and the same adapter, while blocks are really reused.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from safetensors.torch import load_file

import tiny


def run_py(code: str, env: dict | None = None, check: bool = True) -> subprocess.CompletedProcess:
    r = subprocess.run([sys.executable, "-c", code], env=dict(os.environ, **(env or {})), capture_output=True,
                       text=True, timeout=600)
    if check:
        assert r.returncode == 0, r.stderr[-3000:]
    return r


@pytest.fixture(scope="module", autouse=True)
def allocator_available():
    r = run_py("from lcsb import runtime; print(runtime.install_allocator())", check=False)
    if r.stdout.strip() != "True":
        pytest.skip(f"no C++ compiler: the allocator is not built here ({r.stderr.strip()[-200:]})")


def test_blocks_are_reused_released_and_bounded():
    code = """
import threading, torch
from lcsb import runtime
before = torch.randn(1 << 18)                  # from torch's allocator, freed under ours below
assert runtime.install_allocator(small=64 * 1024, limit=3 << 20)
st = runtime.allocator_stats
x = torch.empty(1 << 18)                       # 1 MB
p = x.data_ptr()
assert st()["in_use"] == 1 << 20 and st()["maps"] == 1, st()
del x
assert st()["cached"] == 1 << 20 and st()["in_use"] == 0
y = torch.ones(1 << 18)                        # the same size: the same block, rewritten
assert y.data_ptr() == p and st()["hits"] == 1 and (y == 1).all()
z = torch.empty(9000)                          # 36 KB: under `small`, torch's usual path
assert st()["in_use"] == 1 << 20
del y, z, before
runtime.release_cached()
assert st()["cached"] == 0 and st()["held"] == 0 and st()["unmaps"] >= 1
xs = [torch.empty(1 << 18) for _ in range(5)]
del xs                                         # 5 MB freed, at most 3 MB kept
assert st()["cached"] == 3 << 20 and st()["held"] == st()["cached"], st()
runtime.limit_cache(1 << 20)                   # a lower limit evicts at once
assert st()["cached"] == 1 << 20 and st()["held"] == 1 << 20, st()
runtime.limit_cache(3 << 20)
def work():
    for i in range(300):
        t = torch.full((20000 + i % 7 * 1000,), 2.0)
        assert float((t * t).sum()) == 4.0 * t.numel()
threads = [threading.Thread(target=work) for _ in range(4)]
[t.start() for t in threads]; [t.join() for t in threads]
assert st()["in_use"] == 0 and st()["hits"] > 1000, st()
print("ok")
"""
    assert run_py(code).stdout.strip() == "ok"


def test_out_of_memory_is_a_runtime_error():
    """As with torch's allocator: a RuntimeError that says so, and the process goes on."""
    code = """
import resource, torch
from lcsb import runtime
assert runtime.install_allocator()
vm = int(next(l for l in open("/proc/self/status") if l.startswith("VmSize")).split()[1]) * 1024
resource.setrlimit(resource.RLIMIT_AS, (vm + (512 << 20), resource.RLIM_INFINITY))
try:
    torch.empty(1 << 29)                       # 2 GB
except RuntimeError as e:
    print(str(e).splitlines()[0])
print(float(torch.ones(1 << 18).sum()))
"""
    out = run_py(code).stdout.splitlines()
    assert out == ["lcsb CPU allocator: not enough memory: you tried to allocate 2147483648 bytes.", "262144.0"]


def test_training_is_unchanged_and_reuses_blocks(tmp_path):
    """`lcsb train` with the allocator (every tensor of 4 KB or more through it) gives the same losses
    and adapter as with torch's allocator, and most large allocations reuse a block."""
    model = tiny.make_model(tmp_path / "model", layers=2)
    data = tiny.make_chat_data(tmp_path / "data", n_train=24)
    code = """
import json, sys, torch
from lcsb import cli, runtime
runtime.install_allocator(small=4096)         # cli.main's own call keeps these settings
rc = cli.main(sys.argv[1:-1])
json.dump(runtime.allocator_stats(), open(sys.argv[-1], "w"))
sys.exit(rc)
"""
    runs = {}
    for flag in ("1", "0"):
        out = tmp_path / f"run{flag}"
        argv = ["train", "--model", model, "--data", data, "--out", out, "--steps", 6, "--batch-size", 2,
                "--method", "lcsb", "--groups", 2, "--quant", "int4", "--group-size", 32, "--eval-every", 3, "--eval-batches", 2,
                "--save-every", 0, "--seed", 5, tmp_path / f"stats{flag}.json"]
        r = subprocess.run([sys.executable, "-c", code, *map(str, argv)], capture_output=True, text=True,
                           env=dict(os.environ, LCSB_ALLOCATOR=flag, OMP_NUM_THREADS="1"), timeout=600)
        assert r.returncode == 0, r.stderr[-3000:]
        log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
        runs[flag] = ([(e["step"], e["loss"]) for e in log if "loss" in e],
                      [e["eval_loss"] for e in log if "eval_loss" in e],
                      load_file(str(out / "adapter_model.safetensors")))
    stats = json.loads((tmp_path / "stats1.json").read_text())
    assert json.loads((tmp_path / "stats0.json").read_text()) is None          # LCSB_ALLOCATOR=0: not installed
    assert stats["hits"] > 2 * stats["maps"], stats      # reused, not faulted in again (2 layers: little to reuse)
    (loss1, ev1, ad1), (loss0, ev0, ad0) = runs["1"], runs["0"]
    assert len(loss1) == 6 and len(ev1) >= 2
    for (s1, l1), (s0, l0) in zip(loss1, loss0):
        assert s1 == s0 and l1 == pytest.approx(l0, rel=1e-5, abs=1e-6)
    assert ev1 == pytest.approx(ev0, rel=1e-5)
    assert ad1.keys() == ad0.keys()
    for k in ad1:
        assert torch.allclose(ad1[k], ad0[k], rtol=1e-4, atol=1e-6), k


def test_no_compiler_falls_back_with_one_warning(tmp_path):
    code = """
import warnings, torch
from lcsb import runtime
with warnings.catch_warnings(record=True) as w:
    warnings.simplefilter("always")
    ok = runtime.install_allocator()
    again = runtime.install_allocator()
print(ok, again, len(w), str(w[0].message)[:46] if w else "")
print(float(torch.ones(1 << 18).sum()), runtime.allocator_stats())
runtime.release_cached()
"""
    r = run_py(code, env=dict(CXX="/nonexistent/c++", LCSB_CACHE=str(tmp_path)))
    first, second = r.stdout.splitlines()
    assert first == "False False 1 lcsb: the caching allocator could not be built"
    assert second == "262144.0 None"


def test_disabled_by_environment():
    """LCSB_ALLOCATOR=0: not installed, and the engine's calls to it do nothing."""
    code = ("import torch; from lcsb import runtime; print(runtime.install_allocator(), runtime.allocator_stats());"
            "runtime.limit_cache(1); runtime.release_cached(); x = torch.ones(1 << 18); del x;"
            "print(runtime.allocator_stats(), float(torch.ones(1 << 18).sum()))")
    r = run_py(code, env=dict(LCSB_ALLOCATOR="0"))
    assert r.stdout.splitlines() == ["False None", "None 262144.0"]
