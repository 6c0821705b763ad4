"""Configuration dataclasses: the model's shape (from config.json) and the LoRA adapter.

One set of defaults feeds the CLI, the YAML config and the Python API.
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, field, fields

import torch

from .errors import UserError

LORA_TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


@dataclass
class Rope:
    """Rotary embedding of one attention kind: inverse frequencies and the cos/sin scale."""

    inv_freq: torch.Tensor                    # [head_dim / 2], float32
    attention_scaling: float = 1.0


@dataclass
class ModelConfig:
    """What the engine needs to know of a checkpoint; parsed from config.json by the family file."""

    model_type: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    rope: dict[str, Rope]                     # layer type -> rotary embedding
    layer_types: list[str]                    # "full_attention" | "sliding_attention" per layer
    sliding_window: int | None = None
    qkv_bias: bool = False
    o_bias: bool = False
    mlp_bias: bool = False
    qk_norm: bool = False
    norm_offset: float = 0.0                  # Gemma norms scale by (1 + weight)
    embed_scale: float = 1.0                  # Gemma multiplies embeddings by sqrt(hidden)
    hidden_act: str = "silu"
    attn_scale: float = 0.0                   # softmax scale; head_dim ** -0.5 unless set
    attn_softcap: float | None = None
    final_softcap: float | None = None
    bos_token_id: int | None = None
    eos_token_id: list[int] = field(default_factory=list)
    raw: dict = field(default_factory=dict, repr=False)   # the config.json as read

    def __post_init__(self):
        if not self.attn_scale:
            self.attn_scale = self.head_dim ** -0.5


@dataclass
class LoraConfig:
    """LoRA on the chosen projections of every block: y = W x + (alpha / rank) B A dropout(x)."""

    rank: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    targets: tuple[str, ...] = LORA_TARGETS

    def __post_init__(self):
        self.targets = tuple(self.targets)
        if self.rank <= 0:
            raise UserError(f"LoRA rank must be a positive integer, got {self.rank}")
        if not 0.0 <= self.dropout < 1.0:
            raise UserError(f"LoRA dropout must be in [0, 1), got {self.dropout}")
        bad = [t for t in self.targets if t not in LORA_TARGETS]
        if bad or not self.targets:
            raise UserError(f"unknown LoRA target(s) {bad or '(none given)'}: choose from {', '.join(LORA_TARGETS)}")

    @property
    def scaling(self) -> float:
        return self.alpha / self.rank


def rope_from_params(params: dict, head_dim: int, where: str) -> Rope:
    """Inverse frequencies for one rope parameter dict ({"rope_type", "rope_theta", ...}) as transformers computes them."""
    rope_type = params.get("rope_type", params.get("type", "default"))

    def need(key):
        if params.get(key) is None:
            raise UserError(f"{where}: rope type {rope_type!r} needs {key!r} in rope_parameters (or rope_scaling); "
                            "restore it from the original checkpoint's config.json")
        return params[key]

    base = float(need("rope_theta"))
    dim = int(head_dim * params.get("partial_rotary_factor", 1.0))
    if dim != head_dim:
        raise UserError(f"{where}: partial_rotary_factor is not supported (rotary dim {dim} != head_dim {head_dim})")
    # float32 arithmetic in the same order as transformers, so positions far out agree bit for bit
    inv = 1.0 / (base ** (torch.arange(0, dim, 2, dtype=torch.int64).float() / dim))
    if rope_type == "default":
        pass
    elif rope_type == "linear":
        inv = inv / need("factor")
    elif rope_type == "llama3":
        factor, lo, hi = need("factor"), need("low_freq_factor"), need("high_freq_factor")
        old = need("original_max_position_embeddings")
        lo_wl, hi_wl = old / lo, old / hi
        wavelen = 2 * math.pi / inv
        scaled = torch.where(wavelen > lo_wl, inv / factor, inv)
        smooth = (old / wavelen - lo) / (hi - lo)
        smoothed = (1 - smooth) * scaled / factor + smooth * scaled
        medium = ~(wavelen < hi_wl) * ~(wavelen > lo_wl)
        inv = torch.where(medium, smoothed, scaled)
    else:
        raise UserError(
            f"{where}: rope type {rope_type!r} is not supported (supported: default, linear, llama3); "
            "remove the rope scaling or use a checkpoint without it"
        )
    return Rope(inv_freq=inv)


class RawConfig:
    """config.json with errors that name the file and the field."""

    def __init__(self, raw: dict, where: str):
        self.raw, self.where = raw, where

    def get(self, key, default=None):
        v = self.raw.get(key)
        return default if v is None else v

    def need(self, key, kind=int):
        if key not in self.raw or self.raw[key] is None:
            raise UserError(f"{self.where}: missing field {key!r}; the checkpoint's config.json must define it")
        v = self.raw[key]
        if kind is int and (isinstance(v, bool) or not isinstance(v, int) or v <= 0):
            raise UserError(f"{self.where}: field {key!r} must be a positive integer, got {v!r}")
        return v

    def refuse(self, key, supported, why: str):
        v = self.raw.get(key)
        if v is not None and v not in supported:
            raise UserError(f"{self.where}: {key}={v!r} is not supported ({why})")

    def rope_params(self, default_theta: float) -> dict:
        """One rope parameter dict from either transformers 5's rope_parameters or rope_theta/rope_scaling.

        Same precedence and defaults as transformers (`convert_rope_params_to_dict`,
        `standardize_rope_params`): a non-empty rope_scaling wins over rope_parameters; top-level
        rope_theta / partial_rotary_factor fill what the dict lacks; llama3 takes its
        original_max_position_embeddings from the top level, else from max_position_embeddings.
        """
        params = self.raw.get("rope_scaling") or self.raw.get("rope_parameters") or {}
        if not isinstance(params, dict):
            raise UserError(f"{self.where}: rope_parameters / rope_scaling must be a JSON object, got {params!r}")
        params = dict(params)
        params.setdefault("rope_theta", self.get("rope_theta", default_theta))
        if self.raw.get("partial_rotary_factor") is not None:
            params.setdefault("partial_rotary_factor", self.raw["partial_rotary_factor"])
        params.setdefault("rope_type", params.get("type", "default"))
        if params["rope_type"] in ("llama3", "yarn", "longrope"):
            if self.raw.get("original_max_position_embeddings") is not None:
                params["original_max_position_embeddings"] = self.raw["original_max_position_embeddings"]
            else:
                params.setdefault("original_max_position_embeddings", self.raw.get("max_position_embeddings"))
        return params

    def common(self, model_type: str, tie_default: bool, **extra) -> ModelConfig:
        """The fields every family shares, with the family's overrides in `extra`."""
        heads = self.need("num_attention_heads")
        hidden = self.need("hidden_size")
        head_dim = self.get("head_dim") or hidden // heads
        n = self.need("num_hidden_layers")
        eos = self.raw.get("eos_token_id")
        kw = dict(
            model_type=model_type,
            vocab_size=self.need("vocab_size"),
            hidden_size=hidden,
            intermediate_size=self.need("intermediate_size"),
            num_layers=n,
            num_heads=heads,
            num_kv_heads=self.need("num_key_value_heads") if self.raw.get("num_key_value_heads") is not None else heads,
            head_dim=head_dim,
            rms_norm_eps=float(self.get("rms_norm_eps", 1e-6)),
            max_position_embeddings=self.get("max_position_embeddings", 2048),
            tie_word_embeddings=bool(self.get("tie_word_embeddings", tie_default)),
            layer_types=["full_attention"] * n,
            hidden_act=self.get("hidden_act", self.get("hidden_activation", "silu")),
            bos_token_id=self.raw.get("bos_token_id"),
            eos_token_id=[] if eos is None else ([eos] if isinstance(eos, int) else list(eos)),
            raw=self.raw,
            rope={},
        )
        kw.update(extra)
        if kw["num_heads"] % kw["num_kv_heads"]:
            raise UserError(f"{self.where}: num_attention_heads ({heads}) must be a multiple of num_key_value_heads")
        if kw["hidden_act"] not in ("silu", "gelu_pytorch_tanh", "gelu"):
            raise UserError(f"{self.where}: hidden_act={kw['hidden_act']!r} is not supported (silu, gelu_pytorch_tanh, gelu)")
        if not kw["rope"]:
            kw["rope"] = {"full_attention": rope_from_params(self.rope_params(10000.0), head_dim, self.where)}
        return ModelConfig(**kw)


# --- validation rules, attached to the fields they check (checks.check_ranges applies them) -----------

def positive(v) -> str | None:
    return None if v > 0 else "must be positive"


def non_negative(v) -> str | None:
    return None if v >= 0 else "must not be negative"


def at_least(n: int):
    return lambda v: None if v >= n else f"must be at least {n}"


def in_unit(v) -> str | None:
    """[0, 1): a fraction or a probability of dropping."""
    return None if 0 <= v < 1 else "must be in [0, 1)"


# On --resume, a field either must equal the run's value ("keep": it changes what the run computes; changed
# only with --allow-changes), may change ("apply": cadence, budget, engine settings that are exact either way,
# and --steps / --epochs to extend a run), or is the run's control ("control": never compared).
KEEP, APPLY, CONTROL = "keep", "apply", "control"


def _opt(default, help: str, check=None, on_resume: str = KEEP, **kw):
    """A TrainConfig field: its default and help text feed the CLI, the YAML file and the API alike; `check`
    (a function of the value returning what is wrong, or None) is applied to every non-None value."""
    return field(default=default, metadata={"help": help, "check": check, "on_resume": on_resume, **kw})


def _tracks_given(cls):
    """Record which fields the caller set (constructor arguments, or assignment afterwards), so that the
    settings resolution (settings.py) tells "given" from "default" by what was given, never by comparing a
    value with its default: `TrainConfig(lr=1e-4)` is an lr of 1e-4 given, although 1e-4 is the default."""
    generated = cls.__init__
    names = [f.name for f in fields(cls)]

    @functools.wraps(generated)
    def __init__(self, *args, **kwargs):
        generated(self, *args, **kwargs)
        self.__dict__["_given"] = set(names[:len(args)]) | set(kwargs)

    def __setattr__(self, name, value):
        object.__setattr__(self, name, value)
        given = self.__dict__.get("_given")       # absent while the generated __init__ fills the defaults
        if given is not None:
            given.add(name)

    cls.__init__, cls.__setattr__ = __init__, __setattr__
    return cls


@_tracks_given
@dataclass
class TrainConfig:
    """Everything a training run needs. `lcsb train --help` lists the same fields as flags.

    Which fields the caller set is recorded (`given`): settings.resolve fills the others from the YAML file,
    the resumed run and the defaults, in that order."""

    # what to train on
    model: str = _opt(None, "Hugging Face checkpoint folder, `lcsb convert` folder or GGUF file (default: "
                            "SmolLM2-135M-Instruct when installed, else the bundled small model)")
    data: str = _opt(None, "folder with train.jsonl [valid.jsonl test.jsonl], or one .jsonl file "
                           "(default: the bundled chat task)")
    out: str = _opt(None, "run folder for the adapter, logs and checkpoints (default: runs/<method>-<time>)",
                    on_resume=CONTROL)
    config: str = _opt(None, "YAML file with any of these options (keys as in a run's config.yaml: underscores, "
                             "no dashes); flags override it", on_resume=CONTROL)
    resume: str = _opt(None, "continue the run in this folder from its last checkpoint", on_resume=CONTROL)
    allow_changes: bool = _opt(False, "with --resume: accept options that change what the run computes (method, "
                                      "lr, data, ...); without it they are refused", on_resume=CONTROL)
    # selection (DESIGN section 4)
    method: str = _opt("full", "selection method (full: what the measurements on real models support; README "
                               "\"Quality on a real model\")", choices=("full", "lcsb", "lcsb-exact", "random", "lisa", "badam", "freeze", "topdown"))
    groups: int = _opt(4, "lcsb: number of layer groups K; group (step // interval) mod K is trained", at_least(1))
    grouping: str = _opt("contiguous", "lcsb: how layers form groups", choices=("contiguous", "strided"))
    interval: int = _opt(1, "steps between selection switches (lcsb, lisa, badam)", at_least(1))
    active: int = _opt(None, "random/lisa/freeze/topdown: number of trained blocks (topdown: the top ones, every step; "
                             "default: a quarter of the layers)", at_least(1))
    full_every: int = _opt(4, "topdown: every N-th step trains every block", at_least(1))
    order: str = _opt("ascending", "badam: block order", choices=("ascending", "descending", "random"))
    inactive: str = _opt(None, "untrained blocks' LoRA: momentum (zero-grad AdamW step), frozen, reset (fresh "
                               "optimizer state on re-activation; default: reset for lisa and badam, as their papers, "
                               "momentum otherwise)", choices=("momentum", "frozen", "reset"))
    compensate: bool = _opt(False, "scale each block's learning rate by how rarely the method trains it (1/sqrt(share) "
                                   "for adamw with --inactive momentum, 1/share otherwise), so it moves as far as under "
                                   "full backprop")
    # the engine (DESIGN section 3): how, not what -- the same result either way, so a resume may change them
    quant: str = _opt(None, "compress base weights on load (default: keep the checkpoint's)", choices=("int8", "int4", "nf4"))
    group_size: int = _opt(64, "int4/nf4 group size (32, 64, 128)", positive)
    recompute: str = _opt("on", "on: recompute trained blocks in backward (least memory); off: keep their forward "
                                "graphs (faster, more memory)", choices=("on", "off"), on_resume=APPLY)
    activations: str = _opt("ram", "where the saved block inputs live (disk: a memory-mapped file, out of the resident set)",
                            choices=("ram", "disk"), on_resume=APPLY)
    decompress: str = _opt("block", "block: decompress a visited block once for its recompute and VJP; linear: one "
                                    "matrix at a time, again in the VJP (less memory, a little slower)",
                           choices=("block", "linear"), on_resume=APPLY)
    # LoRA (DESIGN section 5)
    rank: int = _opt(16, "LoRA rank", lambda v: None if v > 0 else "must be a positive integer (the LoRA rank, e.g. 8 or 16)")
    alpha: float = _opt(32.0, "LoRA alpha (scale alpha / rank)", lambda v: None if v > 0 else "must be positive (LoRA scales by alpha / rank)")
    dropout: float = _opt(0.0, "LoRA dropout", in_unit)
    targets: list = _opt(LORA_TARGETS, "projections to adapt", nargs="+")
    adapter: str = _opt(None, "start from this PEFT adapter folder instead of a fresh LoRA")
    # optimisation
    optimizer: str = _opt("adamw", "optimizer", choices=("adamw", "sgd"))
    lr: float = _opt(1e-4, "peak learning rate", positive)
    weight_decay: float = _opt(0.01, "decoupled weight decay", non_negative)
    momentum: float = _opt(0.0, "sgd momentum", in_unit)
    lora_dtype: str = _opt("float32", "type of the LoRA factors, their gradients and optimizer state: bfloat16 halves "
                                      "them (stochastic rounding of updates; not bit-exact with float32)",
                           choices=("float32", "bfloat16"))
    schedule: str = _opt("constant", "learning-rate schedule after warmup", choices=("constant", "linear", "cosine"))
    warmup: int = _opt(0, "linear warmup steps", non_negative)
    steps: int = _opt(None, "optimizer steps (default: --epochs over the training set)", positive, on_resume=APPLY)
    epochs: float = _opt(1.0, "passes over the training set when --steps is not given", positive, on_resume=APPLY)
    batch_size: int = _opt(1, "sequences per micro-batch", positive)
    grad_accum: int = _opt(1, "micro-batches per optimizer step", positive)
    clip: float = _opt(1.0, "clip the global gradient norm (0: off, and then, without --grad-accum, the optimizer "
                            "steps each block inside the backward: one block's gradients in memory, the same update)",
                       non_negative)
    # data (DESIGN section 6)
    max_seq_len: int = _opt(None, "truncate longer records to this many tokens (default: 2048 or the model's context)",
                            positive)
    mask_prompt: bool = _opt(True, "count only completion / assistant tokens in the loss")
    pack: bool = _opt(False, "pack short records into sequences of up to --max-seq-len")
    valid_fraction: float = _opt(0.0, "hold out this fraction of a single data file for evaluation", in_unit)
    skip_bad_lines: bool = _opt(False, "skip malformed data lines (counted) instead of stopping")
    # the run (DESIGN section 7)
    eval_every: int = _opt(0, "evaluate every N steps (0: only at the end)", non_negative, on_resume=APPLY)
    eval_batches: int = _opt(25, "batches per evaluation (0: the whole validation set)",
                             lambda v: None if v >= 0 else "must not be negative (0: all)", on_resume=APPLY)
    save_every: int = _opt(100, "write a checkpoint every N steps (0: only at the end)", non_negative, on_resume=APPLY)
    keep_checkpoints: int = _opt(2, "checkpoints kept in the run folder (the latest ones)",
                                 lambda v: None if v >= 0 else "must not be negative (0: keep all)", on_resume=APPLY)
    seed: int = _opt(0, "seed of data order, LoRA init, dropout and random selections")
    skip_nonfinite: bool = _opt(False, "skip steps with a non-finite loss or gradient instead of stopping",
                                on_resume=APPLY)
    max_memory: str = _opt(None, "refuse to start when the estimated peak memory exceeds this (e.g. 800MB, 2GB)",
                           on_resume=APPLY)
    log_every: int = _opt(1, "print a progress line every N steps when not on a terminal", at_least(1), on_resume=APPLY)
    preview: int = _opt(0, "at the end, print N held-out prompts (test or valid split) with the answers before "
                           "and after training (a run started from step 0)", non_negative, on_resume=APPLY)

    @property
    def given(self) -> frozenset[str]:
        """The fields the caller set; a value of None counts as not given ("use the default")."""
        return frozenset(k for k in self.__dict__.get("_given", ()) if getattr(self, k) is not None)

    @classmethod
    def field_help(cls) -> dict[str, dict]:
        return {f.name: dict(f.metadata) for f in fields(cls)}

