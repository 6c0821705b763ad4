"""Robustness (issue 9): bad input gets one clear line, interrupted runs and numerical faults never lose work.

Bad input, through the CLI (`lcsb.cli.main` in-process): each case below writes one bad file (or passes one
bad option) and checks the exit status 2, a single `lcsb...: error:` line naming the file, line or field,
no traceback, and that no run folder was created (or, for `--resume`, that the run folder is byte for
byte as it was). The message variants of each kind are unit-tested where the check lives:
  - malformed JSONL (bad JSON, non-UTF-8, wrong shape, empty text, masked-out records), every variant:
    tests/test_data.py::test_bad_line, ::test_truncation_leaving_nothing_to_learn, ::test_mixed_formats_across_lines;
    empty / missing data files: tests/test_data.py::test_missing_and_empty; bad JSON through `lcsb train`
    (message, exit status, no run folder): tests/test_trainer.py::test_bad_data_stops_before_training
  - config.json missing or unsupported fields, truncated or corrupt safetensors, every family and variant:
    tests/test_model_errors.py (test_missing_required_field, test_unsupported_model_type,
    test_unsupported_rope_type, test_truncated_safetensors, test_corrupt_header, ...)
  - a tokenizer without a chat template: tests/test_data.py::test_chat_without_template (data),
    tests/test_cli.py::test_chat_without_template (`lcsb generate --chat`)
  - generate's option ranges: tests/test_cli.py::test_bad_option_values; eval/export errors:
    tests/test_export.py::test_errors
This file adds each kind once through `lcsb train` (the run-folder contract), the adapter mismatches for
train, eval and generate, `--max-seq-len` above the context, training options out of range, wrong
types in a YAML config, and failed resumes.

Interruption: 20 runs of a tiny 2-layer model are killed with SIGKILL at random moments -- half at a
random time in the run, half at a random point inside a checkpoint write (the child's checkpoint writes
are slowed down to widen the window), some killed again while resuming -- and each is resumed to the
end: every one ends with the uninterrupted run's adapter (torch.equal) and log numbers. After every
kill, each `step-*` checkpoint on disk is complete and readable. SIGINT finishes the step, checkpoints
and exits 130. A full disk (a small tmpfs mounted here) and a read-only file system stop the run with
exit status 4 and a line naming the run folder and its last complete checkpoint, which resumes to the
same adapter once space is back.

Numerical faults are injected by monkeypatching `trainer.run_step` (no production hook): a NaN loss or
an inf gradient stops with exit status 3, the step and the last good checkpoint named, and that
checkpoint resumes to the uninterrupted run; with --skip-nonfinite the steps are skipped and counted.
"""

from __future__ import annotations

import dataclasses
import errno
import hashlib
import json
import math
import os
import random
import shutil
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file, save_file

import tiny
from lcsb import runstate, trainer
from lcsb.cli import main
from lcsb.config import LoraConfig
from lcsb.lora import save_adapter
from lcsb.model import load_model

STEPS, SAVE_EVERY = 12, 2
SETTINGS = ["--steps", STEPS, "--save-every", SAVE_EVERY, "--method", "lcsb", "--groups", 2, "--dropout", 0.1, "--batch-size", 2,
            "--lr", 1e-2, "--rank", 4, "--alpha", 8, "--targets", "q_proj", "v_proj", "--keep-checkpoints", 2,
            "--eval-batches", 2, "--log-every", 100]


@pytest.fixture(scope="module")
def model2(tmp_path_factory) -> Path:
    return tiny.shared_model(tmp_path_factory.getbasetemp(), 2)


def cli(capsys, *argv) -> tuple[int, str]:
    """Run `lcsb argv` in-process: (exit status, stderr)."""
    capsys.readouterr()
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def error_line(err: str) -> str:
    """The one error line of a failed command; there is no traceback and no second error line."""
    assert "Traceback" not in err, err
    errors = [line for line in err.splitlines() if line.startswith("lcsb") and "error:" in line]
    assert len(errors) == 1, err
    assert err.rstrip("\n").splitlines()[-1] == errors[0], err       # the last thing printed
    return errors[0]


def train_args(model, data, out, *extra) -> list:
    return ["train", "--model", model, "--data", data, "--out", out, *SETTINGS, *extra]


def snapshot(folder: Path) -> dict[str, tuple[str, int]]:
    """Every file under `folder`: content hash and modification time."""
    return {str(p.relative_to(folder)): (hashlib.sha256(p.read_bytes()).hexdigest(), p.stat().st_mtime_ns)
            for p in sorted(folder.rglob("*")) if p.is_file()}


def step_numbers(run: Path) -> list[dict]:
    """The fields of the step lines that a resumed run reproduces exactly."""
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    return [{k: r[k] for k in ("step", "loss", "lr", "trained", "tokens", "grad_norm", "skipped")}
            for r in lines if "loss" in r]


def assert_same_adapter(ref: Path, other: Path):
    a, b = load_file(str(ref / "adapter_model.safetensors")), load_file(str(other / "adapter_model.safetensors"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a), other


def assert_same_run(ref: Path, other: Path):
    assert_same_adapter(ref, other)
    assert step_numbers(other) == step_numbers(ref), other


def assert_checkpoints_complete(run: Path):
    """Every checkpoint folder on disk is whole: its four files read back."""
    ck = run / "checkpoints"
    for d in sorted(ck.glob("step-*")) if ck.exists() else []:
        state = json.loads((d / "state.json").read_text())
        assert state["step"] == int(d.name.removeprefix("step-"))
        load_file(str(d / "adapter_model.safetensors"))
        load_file(str(d / "optimizer.safetensors"))
        json.loads((d / "adapter_config.json").read_text())


@pytest.fixture(scope="module")
def reference(tmp_path_factory, model2, chat_data) -> Path:
    """The uninterrupted run every interrupted one must end up equal to."""
    out = tmp_path_factory.mktemp("reference") / "run"
    assert main([str(a) for a in train_args(model2, chat_data, out)]) == 0
    return out


# ---------------------------------------------------------------- bad input: one line, exit 2, nothing written

def _chat_line(content="what is colour of sky", answer="blue") -> dict:
    return {"messages": [{"role": "user", "content": content}, {"role": "assistant", "content": answer}]}


def _data(tmp, lines: list[bytes], valid=True) -> Path:
    d = tmp / "data"
    d.mkdir(exist_ok=True)
    (d / "train.jsonl").write_bytes(b"".join(line + b"\n" for line in lines))
    if valid:
        tiny.write_jsonl(d / "valid.jsonl", [_chat_line()])
    return d


GOOD = json.dumps(_chat_line()).encode()


def case_non_utf8(tmp, m2, m4, chat_data):
    d = _data(tmp, [GOOD, b'{"messages": [{"role": "user", "content": "caf\xe9"}]}'])
    return train_args(m2, d, tmp / "run"), [f"{d / 'train.jsonl'}:2", "UTF-8"]


def case_wrong_shape(tmp, m2, m4, chat_data):
    d = _data(tmp, [GOOD, GOOD, b'{"question": "hi", "answer": "there"}'])
    return train_args(m2, d, tmp / "run"), [f"{d / 'train.jsonl'}:3", "no known keys"]


def case_empty_text(tmp, m2, m4, chat_data):
    d = _data(tmp, [b'{"text": "the cat sat"}', b'{"text": "  "}'])
    return train_args(m2, d, tmp / "run"), [f"{d / 'train.jsonl'}:2", '"text" is empty']


def case_nothing_to_learn(tmp, m2, m4, chat_data):
    long_prompt = " ".join(["what is colour of the sky"] * 20)
    d = _data(tmp, [json.dumps({"prompt": "sky", "completion": " blue"}).encode(),
                    json.dumps({"prompt": long_prompt, "completion": " blue"}).encode()], valid=False)
    return (train_args(m2, d, tmp / "run", "--max-seq-len", 24),
            [f"{d / 'train.jsonl'}:2", "no token left to learn from", "max_seq_len 24"])


def case_empty_file(tmp, m2, m4, chat_data):
    d = _data(tmp, [])
    return train_args(m2, d, tmp / "run"), [f"{d / 'train.jsonl'}", "no records"]


def case_missing_data(tmp, m2, m4, chat_data):
    return train_args(m2, tmp / "nowhere", tmp / "run"), [f"{tmp / 'nowhere'}", "no such file or folder"]


def _model_copy(tmp, m2) -> Path:
    m = tmp / "model"
    shutil.copytree(m2, m)
    return m


def case_config_missing_field(tmp, m2, m4, chat_data):
    m = _model_copy(tmp, m2)
    cfg = json.loads((m / "config.json").read_text())
    del cfg["num_attention_heads"]
    (m / "config.json").write_text(json.dumps(cfg))
    return train_args(m, chat_data, tmp / "run"), [f"{m / 'config.json'}", "'num_attention_heads'", "missing"]


def case_config_unsupported(tmp, m2, m4, chat_data):
    m = _model_copy(tmp, m2)
    cfg = json.loads((m / "config.json").read_text())
    cfg["rope_parameters"] = {"rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}
    (m / "config.json").write_text(json.dumps(cfg))
    return train_args(m, chat_data, tmp / "run"), [f"{m / 'config.json'}", "'dynamic'", "not supported"]


def case_truncated_weights(tmp, m2, m4, chat_data):
    m = _model_copy(tmp, m2)
    w = m / "model.safetensors"
    w.write_bytes(w.read_bytes()[: w.stat().st_size * 2 // 3])
    return train_args(m, chat_data, tmp / "run"), [f"{w}", "truncated or corrupt"]


def case_no_chat_template(tmp, m2, m4, chat_data):
    m = _model_copy(tmp, m2)
    (m / "chat_template.jinja").unlink(missing_ok=True)
    tc = m / "tokenizer_config.json"
    tc.write_text(tc.read_text().replace('"chat_template"', '"unused_template"'))
    return train_args(m, chat_data, tmp / "run"), [f"{chat_data / 'train.jsonl'}:1", "chat template", str(m)]


def case_seq_len_over_context(tmp, m2, m4, chat_data):
    return (train_args(m2, chat_data, tmp / "run", "--max-seq-len", 4096),
            ["--max-seq-len 4096", "max_position_embeddings=256", f"{m2}/config.json"])


def case_eval_seq_len_over_context(tmp, m2, m4, chat_data):
    return (["eval", "--model", m2, "--data", chat_data, "--max-seq-len", 300],
            ["--max-seq-len 300", "max_position_embeddings=256", f"{m2}/config.json"])


def _adapter(folder: Path, model: Path, rank=4, targets=("q_proj", "v_proj")) -> Path:
    torch.manual_seed(0)
    save_adapter(load_model(model, lora=LoraConfig(rank, 8, targets=targets)), folder, base_model=str(model))
    return folder


def case_adapter_more_layers(tmp, m2, m4, chat_data):       # made for the 4-layer model, used on the 2-layer one
    a = _adapter(tmp / "adapter", m4)
    return (train_args(m2, chat_data, tmp / "run", "--adapter", a),
            [f"{a / 'adapter_model.safetensors'}", "4 layers", "has 2", "num_hidden_layers", f"{m2}/config.json"])


def case_adapter_fewer_layers(tmp, m2, m4, chat_data):
    a = _adapter(tmp / "adapter", m2)
    return (["eval", "--model", m4, "--adapter", a, "--data", chat_data],
            [f"{a / 'adapter_model.safetensors'}", "layer(s) 2, 3", "4", f"{m4}/config.json"])


def case_adapter_rank(tmp, m2, m4, chat_data):
    a = _adapter(tmp / "adapter", m2)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["r"] = 8
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return (["generate", "--model", m2, "--adapter", a, "--prompt", "hi"],
            [f"{a / 'adapter_model.safetensors'}", "rank 4", "r=8", f"{a / 'adapter_config.json'}"])


def case_adapter_targets(tmp, m2, m4, chat_data):
    a = _adapter(tmp / "adapter", m2)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["target_modules"] = ["q_proj", "k_proj", "v_proj"]
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return (train_args(m2, chat_data, tmp / "run", "--adapter", a),
            [f"{a / 'adapter_config.json'}", "k_proj, q_proj, v_proj", "q_proj, v_proj"])


def case_adapter_size(tmp, m2, m4, chat_data):                # a projection of another model's width
    a = _adapter(tmp / "adapter", m2)
    w = a / "adapter_model.safetensors"
    t = load_file(str(w))
    t["base_model.model.model.layers.1.self_attn.q_proj.lora_A.weight"] = torch.zeros(4, 48)
    save_file(t, str(w))
    return (["eval", "--model", m2, "--adapter", a, "--data", chat_data],
            [f"{w}", "layers.1.self_attn.q_proj.lora_A", "size 48", "has 64", f"{m2}/config.json"])


def case_adapter_bad_rank_field(tmp, m2, m4, chat_data):
    a = _adapter(tmp / "adapter", m2)
    cfg = json.loads((a / "adapter_config.json").read_text())
    cfg["r"] = "four"
    (a / "adapter_config.json").write_text(json.dumps(cfg))
    return (["generate", "--model", m2, "--adapter", a, "--prompt", "hi"],
            [f"{a / 'adapter_config.json'}", "'r'", "positive integer"])


def case_yaml_wrong_type(tmp, m2, m4, chat_data):
    conf = tmp / "run.yaml"
    conf.write_text(yaml.safe_dump({"model": str(m2), "data": str(chat_data), "lr": "fast", "out": str(tmp / "run")}))
    return ["train", "--config", conf], ["--lr", "`lr` in a config file", "a number", "'fast'"]


def case_yaml_wrong_choice(tmp, m2, m4, chat_data):
    conf = tmp / "run.yaml"
    conf.write_text(yaml.safe_dump({"model": str(m2), "data": str(chat_data), "method": "magic", "out": str(tmp / "run")}))
    return ["train", "--config", conf], ["--method", "'magic'", "lcsb"]


def case_yaml_targets_not_a_list(tmp, m2, m4, chat_data):
    conf = tmp / "run.yaml"
    conf.write_text(yaml.safe_dump({"model": str(m2), "data": str(chat_data), "targets": 7, "out": str(tmp / "run")}))
    return ["train", "--config", conf], ["--targets", "a list of strings", "7"]


def case_out_is_a_file(tmp, m2, m4, chat_data):
    (tmp / "notes.txt").write_text("not a run")
    return train_args(m2, chat_data, tmp / "notes.txt"), [f"--out {tmp / 'notes.txt'}", "is a file"]


CASES = {name.removeprefix("case_"): fn for name, fn in dict(globals()).items() if name.startswith("case_")}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input(case, tmp_path, model2, tiny4, chat_data, capsys):
    argv, needles = CASES[case](tmp_path, model2, tiny4, chat_data)
    rc, err = cli(capsys, *argv)
    line = error_line(err)
    assert rc == 2, err
    for n in needles:
        assert str(n) in line, f"{n!r} not in {line!r}"
    assert not (tmp_path / "run").exists()                 # no run folder, not even an empty one


OPTIONS = [
    (["--method", "lcsb", "--groups", 3], "--groups 3", "2 layers"),
    (["--method", "random", "--active", 3], "--active 3", "2 layers"),
    (["--rank", 0], "--rank", "positive"),
    (["--lr", 0], "--lr", "positive"),
    (["--lr", "nan"], "--lr", "finite"),
    (["--batch-size", 0], "--batch-size", "positive"),
    (["--grad-accum", 0], "--grad-accum", "positive"),
    (["--steps", -1], "--steps", "positive"),
    (["--alpha", 0], "--alpha", "positive"),
    (["--dropout", 1], "--dropout", "[0, 1)"),
    (["--interval", 0], "--interval", "at least 1"),
    (["--warmup", -2], "--warmup", "negative"),
    (["--keep-checkpoints", -1], "--keep-checkpoints", "negative"),
    (["--valid-fraction", 1.5], "--valid-fraction", "[0, 1)"),
    (["--targets", "qproj"], "--targets qproj", "q_proj"),
    (["--quant", "int4", "--group-size", 48], "--group-size 48", "hidden_size=64"),
    (["--max-memory", "lots"], "--max-memory 'lots'", "800MB"),
    (["--max-memory", "0.5MB"], "--max-memory '0.5MB'", "at least 1MB"),
    (["--rank", "x"], "--rank", "invalid int value"),       # argparse's own one-line error
]


@pytest.mark.parametrize("flags, option, what", OPTIONS, ids=[" ".join(map(str, o[0])) for o in OPTIONS])
def test_option_out_of_range(flags, option, what, tmp_path, model2, chat_data, capsys, monkeypatch):
    monkeypatch.setattr(trainer, "load_model", lambda *a, **k: pytest.fail("loaded the weights"))
    rc, err = cli(capsys, *train_args(model2, chat_data, tmp_path / "run"), *flags)
    line = error_line(err)
    assert rc == 2 and option in line and what in line, line
    assert not (tmp_path / "run").exists()


def test_failed_resume_leaves_the_run_folder_as_it_was(reference, tmp_path, chat_data, capsys):
    """A resume refused for bad input (an option, the memory budget, a broken data file) writes nothing."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    shutil.rmtree(run / "checkpoints" / f"step-{STEPS:07d}")       # as if killed after step 10's checkpoint
    before = snapshot(run)
    bad_data = _data(tmp_path, [GOOD, b"{oops"])
    for extra, needle in ((["--lr", "-1"], "--lr"), (["--max-memory", "10MB"], "exceeds --max-memory 10 MB"),
                          (["--data", bad_data], "--allow-changes"),
                          (["--data", bad_data, "--allow-changes"], f"{bad_data / 'train.jsonl'}:2"),
                          (["--max-seq-len", 9999], "--max-seq-len 9999")):
        rc, err = cli(capsys, "train", "--resume", run, *extra)
        assert rc == 2 and needle in error_line(err), err
        assert snapshot(run) == before
    rc, err = cli(capsys, "train", "--resume", tmp_path / "not-a-run")
    assert rc == 2 and "config.yaml not found" in error_line(err)
    assert not (tmp_path / "not-a-run").exists()


# ---------------------------------------------------------------- interruption: SIGINT, SIGKILL, failed writes

def test_sigint_finishes_the_step_and_checkpoints(reference, model2, chat_data, tmp_path, monkeypatch, capsys):
    run, calls, run_step = tmp_path / "run", [0], trainer.run_step

    def interrupt_in_step_5(*args, **kw):
        calls[0] += 1
        if calls[0] == 5:                                   # Ctrl-C in the middle of step 5
            os.kill(os.getpid(), signal.SIGINT)
        return run_step(*args, **kw)

    monkeypatch.setattr(trainer, "run_step", interrupt_in_step_5)
    rc, err = cli(capsys, *train_args(model2, chat_data, run))
    assert rc == 130 and calls[0] == 5                      # the step was finished, no other begun
    assert "stopped by signal 2 after step 5" in err and f"lcsb train --resume {run}" in err
    assert runstate.latest_checkpoint(run).name == "step-0000005"
    assert not (run / "adapter_model.safetensors").exists()
    monkeypatch.setattr(trainer, "run_step", run_step)
    rc, err = cli(capsys, "train", "--resume", run)
    assert rc == 0 and "resumed from" in err
    assert_same_run(reference, run)


# One interpreter imports torch and lcsb once, then forks a child per command it reads on stdin (one
# JSON object per line: argv, stderr file, and `slow`: seconds to sleep before each file operation of a
# checkpoint write, with "begin N" / "end N" marks around each checkpoint written to `marks`). It prints
# the child's pid, waits for it, and prints its wait status.
LAUNCHER = r"""
import json, os, shutil, sys, time
import torch
torch.set_num_threads(1)
import lcsb.cli, lcsb.runstate as R, lcsb.trainer as T
from lcsb.memory import warm_up
warm_up()                      # the first step's lazy imports, paid once here instead of in every child
import matplotlib              # and the end-of-run plot's
matplotlib.use("Agg")
import matplotlib.pyplot
print("ready", flush=True)


def slow_checkpoints(delay, marks):
    fd = os.open(marks, os.O_WRONLY | os.O_CREAT | os.O_APPEND)

    def slowed(f):
        def g(*a, **k):
            time.sleep(delay)
            return f(*a, **k)
        return g

    class Slowed:                          # a module whose chosen functions sleep first
        def __init__(self, mod, names):
            self.mod, self.names = mod, names

        def __getattr__(self, name):
            f = getattr(self.mod, name)
            return slowed(f) if name in self.names else f

    for name in ("save_adapter", "_save_tensors", "write_json", "_fsync_dir"):
        setattr(R, name, slowed(getattr(R, name)))
    R.shutil, R.os = Slowed(shutil, {"rmtree"}), Slowed(os, {"replace"})
    save = T.save_checkpoint

    def save_checkpoint(run, model, opt, pos, *a, **k):
        os.write(fd, f"begin {pos.step}\n".encode())
        path = save(run, model, opt, pos, *a, **k)
        os.write(fd, f"end {pos.step}\n".encode())
        return path
    T.save_checkpoint = save_checkpoint


for line in sys.stdin:
    cmd = json.loads(line)
    pid = os.fork()
    if pid == 0:
        null = os.open(os.devnull, os.O_RDWR)
        os.dup2(null, 0)
        os.dup2(null, 1)
        os.dup2(os.open(cmd["stderr"], os.O_WRONLY | os.O_CREAT | os.O_APPEND), 2)
        if cmd["slow"]:
            slow_checkpoints(cmd["slow"], cmd["marks"])
        try:
            code = lcsb.cli.main(cmd["argv"])
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:
            import traceback
            traceback.print_exc()
            code = 99
        sys.stderr.flush()
        os._exit(code)
    print(pid, flush=True)
    print(os.waitpid(pid, 0)[1], flush=True)
"""


class Launcher:
    def __init__(self):
        env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
        # its own process group: whatever happens, the launcher and its children can go together
        self.p = subprocess.Popen([sys.executable, "-c", LAUNCHER], env=env, text=True, stdin=subprocess.PIPE,
                                  stdout=subprocess.PIPE, start_new_session=True)

    def ready(self):
        assert self.p.stdout.readline().strip() == "ready"

    def start(self, argv, stderr: Path, slow: float = 0.0, marks: Path | None = None) -> int:
        self.p.stdin.write(json.dumps({"argv": [str(a) for a in argv], "stderr": str(stderr), "slow": slow,
                                       "marks": str(marks)}) + "\n")
        self.p.stdin.flush()
        return int(self.p.stdout.readline())

    def status(self) -> int:
        return int(self.p.stdout.readline())

    def close(self):
        try:
            self.p.stdin.close()
            self.p.wait(timeout=30)
        finally:
            try:
                os.killpg(self.p.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
            self.p.wait()


def _wait_for_mark(marks: Path, mark: str, pid: int, timeout: float = 60):
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if marks.exists() and mark in marks.read_text().splitlines():
            return
        try:                                   # a zombie (exited, not yet reaped) means it never got there
            if Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] == "Z":
                raise AssertionError(f"the run exited before {mark!r}")
        except FileNotFoundError:
            raise AssertionError(f"the run exited before {mark!r}") from None
        time.sleep(0.001)
    raise AssertionError(f"{mark!r} not reached in {timeout}s")


def kill(pid: int):
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:                 # it finished first (and was reaped): a kill after the end
        pass


def _kill_and_resume(launcher: Launcher, i: int, rng: random.Random, duration: float, root: Path, ref: Path,
                     model2: Path, chat_data: Path) -> dict:
    """Run i: killed with SIGKILL (odd i: inside a checkpoint write; even i: at a random time), killed again
    while resuming when i % 3 == 0, then resumed to the end and compared with the uninterrupted run."""
    slow = 0.004                               # per file operation of a checkpoint write: a ~50 ms window
    run, err, marks = root / f"run{i}", root / f"run{i}.err", root / f"run{i}.marks"
    fresh = train_args(model2, chat_data, run)
    if i % 2:                                  # inside the write of a random checkpoint, at a random point
        step = SAVE_EVERY * rng.randint(1, STEPS // SAVE_EVERY)
        pid = launcher.start(fresh, err, slow, marks)
        _wait_for_mark(marks, f"begin {step}", pid)
        time.sleep(rng.uniform(0, 11 * slow))
    else:                                      # at a random time in the run, setup included
        pid = launcher.start(fresh, err)
        time.sleep(rng.uniform(0, duration))
    kill(pid)
    killed = os.WIFSIGNALED(launcher.status())
    in_checkpoint = bool(i % 2 and killed and f"end {step}" not in marks.read_text().splitlines())
    assert_checkpoints_complete(run)
    at = runstate.latest_checkpoint(run) if run.exists() else "no run folder"
    restarted = False

    def resume():
        nonlocal restarted
        if (run / "config.yaml").exists():
            return ["train", "--resume", run]
        restarted = True                       # killed before the run folder had its config: run it again
        return fresh

    if i % 3 == 0:                             # killed again while resuming
        pid = launcher.start(resume(), err)
        time.sleep(rng.uniform(0, duration / 2))
        kill(pid)
        launcher.status()
        assert_checkpoints_complete(run)
    launcher.start(resume(), err)
    assert launcher.status() == 0, err.read_text()[-3000:]
    assert_same_run(ref, run)
    return dict(run=i, killed=killed, in_checkpoint=in_checkpoint, restarted=restarted, at=str(at))


def test_sigkill_at_random_moments(tmp_path, model2, chat_data):
    """20 runs killed with SIGKILL (10 at a random time, 10 inside a checkpoint write; every third one
    killed again while resuming), each resumed to the end: all equal the uninterrupted run. Two launchers
    take ten runs each, side by side."""
    launchers = [Launcher(), Launcher()]
    try:
        ref = tmp_path / "reference"           # in-process, while the launchers import torch
        assert main([str(a) for a in train_args(model2, chat_data, ref)]) == 0
        for launcher in launchers:
            launcher.ready()
        # the same run in each child: how long a run takes side by side, and a child's run equals ours
        t0 = time.monotonic()
        for k, launcher in enumerate(launchers):
            launcher.start(train_args(model2, chat_data, tmp_path / f"timing{k}"), tmp_path / f"timing{k}.err")
        for k, launcher in enumerate(launchers):
            assert launcher.status() == 0, (tmp_path / f"timing{k}.err").read_text()
            assert_same_run(ref, tmp_path / f"timing{k}")
        duration = time.monotonic() - t0

        results, failures = [], []

        def work(k: int):
            rng = random.Random(9 + k)
            try:
                for i in range(k, 20, 2):
                    results.append(_kill_and_resume(launchers[k], i, rng, duration, tmp_path, ref, model2, chat_data))
            except BaseException as e:         # reported by the main thread
                failures.append(e)

        threads = [threading.Thread(target=work, args=(k,)) for k in range(2)]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
        if failures:
            raise failures[0]
        assert sorted(r["run"] for r in results) == list(range(20))
        report = sorted(results, key=lambda r: r["run"])
        # most of the targeted kills landed inside a checkpoint write, and most kills left a checkpoint to
        # resume from (the others came before the first one, some even before the run folder had a config)
        assert sum(r["in_checkpoint"] for r in results) >= 5, report
        assert sum("step-" in r["at"] for r in results) >= 10, report
    finally:
        for launcher in launchers:
            launcher.close()


def _mount_tmpfs(path: Path, size: str):
    path.mkdir()
    if shutil.which("mount") is None:
        pytest.skip("no mount command to make a small file system")
    p = subprocess.run(["mount", "-t", "tmpfs", "-o", f"size={size}", "tmpfs", str(path)], capture_output=True,
                       text=True)
    if p.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs here (needs root or CAP_SYS_ADMIN): {p.stderr.strip()}")


def _fill(fs: Path, leave: int) -> Path:
    """Fill the file system `fs`, then give back about `leave` bytes."""
    filler = fs / "filler"
    with open(filler, "wb") as f:
        try:
            while True:
                f.write(b"\0" * 65536)
                f.flush()
        except OSError as e:
            assert e.errno == errno.ENOSPC
    os.truncate(filler, max(0, filler.stat().st_size - leave))
    return filler


def _open_files_under(folder: Path) -> list[str]:
    """This process's open file descriptors that point into `folder`."""
    links = []
    for fd in Path("/proc/self/fd").iterdir():
        try:
            links.append(os.readlink(fd))
        except OSError:
            continue
    return [t for t in links if t.startswith(str(folder))]


def test_a_stopped_run_closes_its_files(model2, chat_data, tmp_path, monkeypatch, capsys):
    """Exit 3 (a NaN) and exit 4 (a checkpoint that cannot be written) close the log and the TensorBoard
    writer as a finished run does: a notebook or a test that goes on is not left holding them."""
    closed = []

    class Writer:                                     # TensorBoard's SummaryWriter, as far as the run uses it
        def add_scalar(self, *a):
            pass

        def close(self):
            closed.append(True)

    monkeypatch.setattr(trainer, "_tensorboard", lambda run: Writer())
    calls, run_step = [0], trainer.run_step

    def nan_at_step_3(*args, **kw):
        calls[0] += 1
        res = run_step(*args, **kw)
        return dataclasses.replace(res, loss=float("nan")) if calls[0] == 3 else res

    monkeypatch.setattr(trainer, "run_step", nan_at_step_3)
    rc, err = cli(capsys, *train_args(model2, chat_data, tmp_path / "nan"))
    assert rc == 3 and "non-finite loss at step 3" in error_line(err)
    assert _open_files_under(tmp_path) == [] and closed == [True]
    monkeypatch.setattr(trainer, "run_step", run_step)

    def denied(path, tensors):
        raise PermissionError(errno.EACCES, "Permission denied", str(path))

    monkeypatch.setattr(runstate, "_save_tensors", denied)
    rc, err = cli(capsys, *train_args(model2, chat_data, tmp_path / "denied"))
    assert rc == 4 and "Permission denied" in error_line(err)
    assert _open_files_under(tmp_path) == [] and closed == [True, True]


def test_ctrl_c_through_a_pipe_that_broke(model2, chat_data, tmp_path):
    """`lcsb train ... 2>&1 | tee log` and Ctrl-C: the terminal's SIGINT stops tee as well, so the run's
    next write meets a broken pipe. The run still finishes its step, writes the checkpoint and exits 130;
    resumed, it completes."""
    run = tmp_path / "run"
    argv = [sys.executable, "-m", "lcsb", *map(str, [*train_args(model2, chat_data, run), "--steps", 400,
                                                     "--log-every", 1, "--save-every", 0])]
    proc = subprocess.Popen(argv, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, cwd=tmp_path)
    for line in proc.stdout:                          # the run is stepping (and printing a line per step)
        if line.startswith(b"step 3/"):
            break
    proc.stdout.close()                               # tee is gone: every later write is EPIPE
    proc.send_signal(signal.SIGINT)
    assert proc.wait(timeout=300) == 130
    last = runstate.latest_checkpoint(run)
    step = json.loads((last / "state.json").read_text())["step"] if last else 0
    assert step >= 3
    done = subprocess.run([sys.executable, "-m", "lcsb", "train", "--resume", str(run), "--steps", str(step)],
                          capture_output=True, text=True, cwd=tmp_path, timeout=300)
    assert done.returncode == 0 and "nothing to do" in done.stderr, done.stderr


def test_disk_full_and_read_only(reference, tmp_path, model2, chat_data, monkeypatch, capsys):
    """Disk full in the middle of a run: the checkpoint write fails cleanly (exit 4, run folder and previous
    checkpoint named, no temporary folder left), and once space is back the run resumes to the same
    adapter. A run folder on a file system made read-only: resuming fails the same way, writes nothing,
    and continues once it is writable again."""
    fs = tmp_path / "fs"
    _mount_tmpfs(fs, "2m")
    try:
        calls, run_step = [0], trainer.run_step

        def at_step(n, action):
            def step(*args, **kw):
                calls[0] += 1
                if calls[0] == n:
                    action()
                return run_step(*args, **kw)
            return step

        # the disk fills up during step 5: step 5's log line still fits, checkpoint 6 does not
        run = fs / "run"
        filler = []
        monkeypatch.setattr(trainer, "run_step", at_step(5, lambda: filler.append(_fill(fs, leave=6000))))
        rc, err = cli(capsys, *train_args(model2, chat_data, run))
        line = error_line(err)
        assert rc == 4, err
        previous = run / "checkpoints" / "step-0000004"
        assert "No space left on device" in line and str(run) in line and str(previous) in line, line
        assert "cannot write checkpoint step 6" in line and f"lcsb train --resume {run}" in line, line
        assert not list((run / "checkpoints").glob(".*")) and not list(run.glob("*.tmp"))   # nothing half-written
        assert runstate.latest_checkpoint(run) == previous
        assert_checkpoints_complete(run)
        filler[0].unlink()                                   # space is back
        monkeypatch.setattr(trainer, "run_step", run_step)
        rc, err = cli(capsys, "train", "--resume", run)
        assert rc == 0 and f"resumed from {previous} (step 4)" in err, err
        assert_same_run(reference, run)

        # the run folder on a file system that became read-only: resuming writes nothing and says so
        run = fs / "run-ro"
        shutil.copytree(reference, run)
        for p in ("adapter_model.safetensors", "adapter_config.json", f"checkpoints/step-{STEPS:07d}"):
            shutil.rmtree(run / p) if (run / p).is_dir() else (run / p).unlink()   # as if killed after step 10
        before = snapshot(run)
        subprocess.run(["mount", "-o", "remount,ro", str(fs)], check=True)
        try:
            rc, err = cli(capsys, "train", "--resume", run)
        finally:
            subprocess.run(["mount", "-o", "remount,rw", str(fs)], check=True)
        line = error_line(err)
        assert rc == 4 and "Read-only file system" in line, line
        assert str(run / "checkpoints" / f"step-{STEPS - 2:07d}") in line and f"--resume {run}" in line, line
        assert snapshot(run) == before
        rc, err = cli(capsys, "train", "--resume", run)
        assert rc == 0, err
        assert_same_run(reference, run)
    finally:
        subprocess.run(["umount", "-l", str(fs)], capture_output=True)


def test_failed_checkpoint_write_cleans_up(reference, tmp_path, model2, chat_data, monkeypatch, capsys):
    """Permission denied half-way through a checkpoint (as a non-root user would meet it): the temporary
    folder is removed, the message names the run folder and the previous checkpoint, exit status 4."""
    run, save_tensors = tmp_path / "run", runstate._save_tensors

    def denied_at_step_8(path, tensors):
        if path.parent.name == ".tmp-step-0000008":
            path.write_bytes(b"partial")
            raise PermissionError(errno.EACCES, "Permission denied", str(path))
        return save_tensors(path, tensors)

    monkeypatch.setattr(runstate, "_save_tensors", denied_at_step_8)
    rc, err = cli(capsys, *train_args(model2, chat_data, run))
    line = error_line(err)
    assert rc == 4 and "Permission denied" in line and str(run / "checkpoints" / "step-0000006") in line, line
    assert sorted(p.name for p in (run / "checkpoints").iterdir()) == ["latest.json", "step-0000004", "step-0000006"]
    monkeypatch.setattr(runstate, "_save_tensors", save_tensors)
    assert cli(capsys, "train", "--resume", run)[0] == 0
    assert_same_run(reference, run)


# ---------------------------------------------------------------- numerical faults

def _fault(monkeypatch, faults: dict[int, str]):
    """Make step k's loss ("loss") or one of its LoRA gradients ("grad") non-finite."""
    calls, run_step = [0], trainer.run_step

    def faulty(model, *args, **kw):
        calls[0] += 1
        res = run_step(model, *args, **kw)
        kind = faults.get(calls[0])
        if kind == "loss":
            res = dataclasses.replace(res, loss=math.nan)
        elif kind == "grad":
            p = next(p for p in model.lora_parameters().values() if p.grad is not None)
            p.grad[0, 0] = math.inf
        return res

    monkeypatch.setattr(trainer, "run_step", faulty)
    return run_step


@pytest.mark.parametrize("kind, step, last", [("loss", 5, "step-0000004"), ("grad", 1, None)])
def test_nonfinite_stops_with_step_and_checkpoint(kind, step, last, reference, tmp_path, model2, chat_data,
                                                  monkeypatch, capsys):
    run = tmp_path / "run"
    run_step = _fault(monkeypatch, {step: kind})
    rc, err = cli(capsys, *train_args(model2, chat_data, run))
    line = error_line(err)
    assert rc == 3
    what = "loss" if kind == "loss" else "gradient"
    assert f"non-finite {what} at step {step}" in line and "--skip-nonfinite" in line, line
    assert (f"last good checkpoint: {run / 'checkpoints' / last}" if last else "none yet") in line, line
    assert runstate.latest_checkpoint(run) == (run / "checkpoints" / last if last else None)
    assert not (run / "adapter_model.safetensors").exists()
    # the fault gone (a transient glitch, or a lower --lr), the last good checkpoint continues exactly
    monkeypatch.setattr(trainer, "run_step", run_step)
    rc, err = cli(capsys, "train", "--resume", run)
    assert rc == 0, err
    assert (f"resumed from {run / 'checkpoints' / last}" if last else f"{run} has no checkpoint yet") in err
    assert_same_run(reference, run)


def test_skip_nonfinite_counts_and_finishes(tmp_path, model2, chat_data, monkeypatch, capsys):
    run = tmp_path / "run"
    _fault(monkeypatch, {3: "grad", 6: "loss"})
    rc, err = cli(capsys, *train_args(model2, chat_data, run, "--skip-nonfinite"))
    assert rc == 0, err
    assert "skipped 2 step(s) with a non-finite loss or gradient" in err
    lines = [json.loads(line) for line in (run / "log.jsonl").read_text().splitlines()]
    steps = [r for r in lines if "loss" in r]
    assert [r["step"] for r in steps] == list(range(1, STEPS + 1))
    assert [r["step"] for r in steps if r["skipped"]] == [3, 6]
    assert [r["skipped_total"] for r in steps] == [0, 0, 1, 1, 1, 2, 2, 2, 2, 2, 2, 2]
    last = json.loads((runstate.latest_checkpoint(run) / "state.json").read_text())
    assert last["stats"]["skipped_nonfinite"] == 2
    adapter = load_file(str(run / "adapter_model.safetensors"))
    assert all(torch.isfinite(t).all() for t in adapter.values())


def test_new_folder_is_all_or_nothing(tmp_path):
    """atomic.new_folder (conversions, exports): a failure inside leaves the old folder as it was and no
    temporary folder; success replaces it whole; without overwrite an existing folder is refused."""
    from lcsb.atomic import new_folder
    from lcsb.errors import UserError

    out = tmp_path / "out"
    out.mkdir()
    (out / "old.txt").write_text("old")
    with pytest.raises(UserError, match="already exists; choose another output folder or pass --overwrite"):
        with new_folder(out):
            pass
    with pytest.raises(RuntimeError, match="midway"):
        with new_folder(out, overwrite=True) as tmp:
            (tmp / "new.txt").write_text("new")
            raise RuntimeError("midway")
    assert [p.name for p in tmp_path.iterdir()] == ["out"] and (out / "old.txt").read_text() == "old"
    with new_folder(out, overwrite=True) as tmp:
        (tmp / "new.txt").write_text("new")
        (tmp / "sub").mkdir()
        (tmp / "sub" / "deep.txt").write_text("deep")
    assert sorted(p.name for p in out.iterdir()) == ["new.txt", "sub"] and [p.name for p in tmp_path.iterdir()] == ["out"]
