"""The `lcsb` command: argument parsing only; the work is done by the Python API.

Each subcommand is two small functions: `_add_<name>(sub)` declares its options and returns its
parser, `_run_<name>(args)` calls the API with them and returns the exit status. A new
subcommand (train, eval, export, convert, bench) is one more such pair and one line in COMMANDS.

Errors: a `UserError` prints `lcsb: error: <one line>` on stderr and exits 2 (`--debug` adds the
traceback); argparse errors exit 2 with one line as well; Ctrl-C exits 130 without a traceback.

Exit status: 0 done; 1 the reader of stdout went away; 2 bad input or a refused run (a file, a field,
an option, --max-memory), nothing written; 3 a non-finite loss or gradient (`lcsb train`: the step
and the last good checkpoint are named); 4 the run folder could not be written (disk full,
read-only, permission), the last complete checkpoint is intact; 130 interrupted (SIGINT/SIGTERM:
`lcsb train` finished the step and wrote a checkpoint).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import runpy
import sys
import time
import traceback

from pathlib import Path

from . import __version__, load_config, load_model
from .atomic import write_atomic
from .config import LoraConfig, TrainConfig
from .errors import UserError
from .runtime import install_allocator, tune_malloc
from .evaluate import encode_prompt, generate_text
from .model.tokenizer import load_tokenizer
from .quant.formats import FORMATS


class _Parser(argparse.ArgumentParser):
    def error(self, message):
        # one line, like every other lcsb error, instead of argparse's usage block
        self.exit(2, f"{self.prog}: error: {message} (see '{self.prog} --help')\n")


# --- option types: a bad value fails at parse time with the option's name -------------------------

def _positive_int(s: str) -> int:
    try:
        v = int(s)
    except ValueError:
        v = 0
    if v <= 0:
        raise argparse.ArgumentTypeError(f"expected a positive integer, got {s!r}")
    return v


def _non_negative_float(s: str) -> float:
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not 0 <= v < math.inf:
        raise argparse.ArgumentTypeError(f"expected a number >= 0, got {s!r}")
    return v


def _probability(s: str) -> float:
    """A probability mass in (0, 1]."""
    try:
        v = float(s)
    except ValueError:
        v = math.nan
    if not 0 < v <= 1:
        raise argparse.ArgumentTypeError(f"expected a number in (0, 1], got {s!r}")
    return v


# --- generate -------------------------------------------------------------------------------------

def _add_generate(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("generate", help="generate text from a prompt",
                       description="Generate text from a prompt, printing tokens as they are produced.")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face checkpoint folder or a folder made by `lcsb convert`")
    p.add_argument("--prompt", required=True, metavar="TEXT", help="the prompt text")
    p.add_argument("--chat", action="store_true",
                   help="wrap the prompt in the tokenizer's chat template as a user turn")
    p.add_argument("--system", metavar="TEXT", help="system turn before the prompt (needs --chat)")
    p.add_argument("--max-new-tokens", type=_positive_int, default=256, metavar="N",
                   help="stop after N new tokens (default: %(default)s)")
    p.add_argument("--temperature", type=_non_negative_float, default=0.0, metavar="T",
                   help="sampling temperature; 0 is greedy decoding (default: %(default)s)")
    p.add_argument("--top-p", type=_probability, default=1.0, metavar="P",
                   help="nucleus sampling: sample among the most likely tokens totalling P (default: %(default)s)")
    p.add_argument("--seed", type=int, metavar="S", help="seed of the sampling RNG (default: random)")
    p.add_argument("--quant", choices=FORMATS, help="compress base weights on load (default: as stored)")
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter folder (PEFT layout) to apply")
    return p


def _run_generate(args) -> int:
    load_config(args.model)         # a bad folder fails here, before the tokenizer and the weights load
    tokenizer = load_tokenizer(args.model)
    prompt_ids = encode_prompt(tokenizer, args.prompt, chat=args.chat, system=args.system)
    model = load_model(args.model, quant=args.quant, adapter=args.adapter)
    for piece in generate_text(model, tokenizer, prompt_ids, max_new_tokens=args.max_new_tokens,
                               temperature=args.temperature, top_p=args.top_p, seed=args.seed):
        sys.stdout.write(piece)
        sys.stdout.flush()
    sys.stdout.write("\n")
    sys.stdout.flush()
    return 0


# --- eval -----------------------------------------------------------------------------------------

def _add_eval(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("eval", help="loss, perplexity and token accuracy of a model (and adapter) on data",
                       description="Score a model, with a LoRA adapter or without, on a JSONL file: loss per "
                                   "counted token, perplexity, token accuracy. Prompts are masked as in training.")
    p.add_argument("--model", required=True, metavar="DIR",
                   help="Hugging Face checkpoint folder or a folder made by `lcsb convert`")
    p.add_argument("--adapter", metavar="RUN", help="run folder or adapter folder (PEFT layout) to apply")
    p.add_argument("--data", required=True, metavar="PATH",
                   help="a .jsonl file (every record is scored) or a data folder (its test.jsonl, else valid.jsonl)")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N",
                   help="sequences per batch (default: %(default)s)")
    p.add_argument("--max-seq-len", type=_positive_int, metavar="N",
                   help="truncate longer records to N tokens (default: 2048 or the model's context)")
    p.add_argument("--max-batches", type=_positive_int, metavar="N",
                   help="score only the first N batches (a fixed seeded order; default: all)")
    p.add_argument("--mask-prompt", action=argparse.BooleanOptionalAction, default=True,
                   help="count only completion / assistant tokens (default: on)")
    p.add_argument("--quant", choices=FORMATS, help="compress base weights on load (default: as stored)")
    p.add_argument("--json", action="store_true", help="print one JSON object instead of a line of text")
    return p


def _run_eval(args) -> int:
    from .evaluate import evaluate_data

    r = evaluate_data(args.model, args.data, adapter=args.adapter, batch_size=args.batch_size,
                      max_seq_len=args.max_seq_len, quant=args.quant, max_batches=args.max_batches or 0,
                      mask_prompt=args.mask_prompt, say=lambda line: print(line, file=sys.stderr, flush=True))
    if args.json:
        print(json.dumps({"loss": r["loss"], "perplexity": r["ppl"], "accuracy": r["accuracy"],
                          "tokens": r["tokens"], "records": r["records"], "data": r["file"],
                          "model": args.model, "adapter": args.adapter}))
    else:
        print(f"loss {r['loss']:.4f}  perplexity {r['ppl']:.3f}  token accuracy {r['accuracy']:.4f}  "
              f"({r['tokens']} tokens, {r['records']} records of {r['file']})")
    return 0


# --- export ---------------------------------------------------------------------------------------

def _add_export(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("export", help="write a run's adapter for PEFT or MLX-LM, or merged into the base model",
                       description="Write a run's LoRA adapter as a PEFT adapter folder, as an MLX-LM adapter "
                                   "folder, folded into the base weights as a Hugging Face checkpoint, or as a "
                                   "llama.cpp LoRA adapter file (GGUF).")
    # dest is not "run": that attribute holds the subcommand's function
    p.add_argument("source", metavar="RUN", help="run folder (or adapter folder) whose adapter to export")
    p.add_argument("--to", required=True, choices=("peft", "mlx", "merged", "gguf"),
                   help="output format (gguf: a llama.cpp LoRA adapter file for a GGUF base model)")
    p.add_argument("--out", metavar="PATH",
                   help="folder to create (default: RUN/export-<format>); for gguf, the file (default: RUN/adapter.gguf)")
    p.add_argument("--model", metavar="PATH",
                   help="merged: the base checkpoint; gguf: the base .gguf file "
                        "(default: the adapter's base_model_name_or_path)")
    p.add_argument("--dtype", choices=("float32", "float16", "bfloat16"),
                   help="merged: float type of the weights written (default: the base checkpoint's)")
    p.add_argument("--overwrite", action="store_true", help="replace the output folder if it exists")
    return p


def _run_export(args) -> int:
    import torch

    from .lora import export_adapter

    default = "adapter.gguf" if args.to == "gguf" else f"export-{args.to}"
    out = Path(args.out) if args.out else Path(args.source) / default
    dtype = getattr(torch, args.dtype) if args.dtype else None
    if dtype is not None and args.to != "merged":
        raise UserError(f"--dtype applies to --to merged only; {args.to} adapters are written in float32")
    export_adapter(args.source, args.to, out, model=args.model, dtype=dtype, overwrite=args.overwrite,
                   say=lambda line: print(line, file=sys.stderr, flush=True))
    print(out)
    return 0


# --- train ----------------------------------------------------------------------------------------

def _add_train(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("train", help="fine-tune a LoRA adapter (no arguments: the bundled model and chat task)",
                       description="Fine-tune a LoRA adapter. Every option can also be set in a YAML file "
                                   "given with --config. Precedence: flags, the file, a resumed run's settings, "
                                   "a first run's bundled settings, the defaults; the run prints each value's "
                                   "source. "
                                   "Data-parallel: `torchrun --nproc-per-node N -m lcsb train ...` (--batch-size "
                                   "is per rank; rank 0 writes the run folder).")
    for f in dataclasses.fields(TrainConfig):
        flag = "--" + f.name.replace("_", "-")
        help_ = f.metadata["help"] + ("" if f.default is None else f" (default: {_show(f.default)})")
        kind = f.type if isinstance(f.type, str) else f.type.__name__
        if kind == "bool":
            p.add_argument(flag, action=argparse.BooleanOptionalAction, default=argparse.SUPPRESS, help=help_)
        elif kind == "list":
            p.add_argument(flag, nargs="+", default=argparse.SUPPRESS, metavar=f.name.upper(), help=help_)
        else:
            conv = {"int": int, "float": float}.get(kind, str)
            choices = f.metadata.get("choices")
            p.add_argument(flag, type=conv, default=argparse.SUPPRESS, choices=choices,
                           metavar=None if choices else f.name.upper().replace("_", "-"), help=help_)
    return p


def _show(v):
    return " ".join(v) if isinstance(v, (list, tuple)) else v


def _train_config(args) -> TrainConfig:
    """The flags given, as a TrainConfig whose `given` fields are exactly those flags (settings.py fills the
    rest from --config, a resumed run and the defaults, and prints each value's source)."""
    names = [f.name for f in dataclasses.fields(TrainConfig)]
    return TrainConfig(**{k: getattr(args, k) for k in names if k in vars(args)})


def _run_train(args) -> int:
    from .trainer import train

    result = train(_train_config(args), given_as="flag")
    return 0 if not result.interrupted else 130


# --- convert --------------------------------------------------------------------------------------

def _add_convert(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("convert", help="compress a checkpoint's base weights once (int8, int4, nf4)",
                       description="Write a converted copy of a Hugging Face checkpoint folder whose base weights "
                                   "are compressed; `lcsb train/eval/generate --model DST` read it block by block.")
    p.add_argument("src", metavar="SRC", help="Hugging Face checkpoint folder or GGUF model file")
    p.add_argument("dst", metavar="DST", help="folder to write (must not exist unless --overwrite)")
    p.add_argument("--quant", choices=FORMATS, default="int4", help="format (default: %(default)s)")
    p.add_argument("--bits", type=int, choices=(4, 8), help="shorthand: 4 = int4, 8 = int8")
    p.add_argument("--group-size", type=_positive_int, default=64, metavar="N",
                   help="int4/nf4 group size: 32, 64 or 128 (default: %(default)s)")
    p.add_argument("--overwrite", action="store_true", help="replace DST if it exists")
    return p


def _run_convert(args) -> int:
    from .convert import convert

    quant = {4: "int4", 8: "int8"}[args.bits] if args.bits else args.quant
    t0 = time.perf_counter()

    def progress(done, total):
        print(f"\rconverting: {done}/{total} modules", end="", file=sys.stderr, flush=True)

    out = convert(args.src, args.dst, quant=quant, group_size=args.group_size, overwrite=args.overwrite,
                  progress=progress)
    size = sum(f.stat().st_size for f in Path(out).glob("*.safetensors")) / 2**20
    print(f"\nwrote {out} ({quant}, {size:.0f} MB) in {time.perf_counter() - t0:.0f}s", file=sys.stderr)
    return 0


# --- bench ----------------------------------------------------------------------------------------

BENCH_SCRIPTS = {"speed": "speed.py", "quality": "quality.py", "methods": "methods.py", "memory": "memory.py",
                 "gguf": "gguf_speed.py"}


def _add_bench(sub) -> argparse.ArgumentParser:
    p = sub.add_parser("bench", help="benchmarks: speed, quality, methods, memory, fidelity",
                       description="Benchmarks. `fidelity` compares each method's gradients with the exact ones; "
                                   "the others run the scripts in the repository's bench/ folder "
                                   "(their own --help lists their options).")
    p.add_argument("which", choices=sorted([*BENCH_SCRIPTS, "fidelity"]), help="which benchmark")
    p.add_argument("rest", nargs=argparse.REMAINDER, help="options of that benchmark")
    return p


def _run_bench(args) -> int:
    if args.which == "fidelity":
        return _bench_fidelity(args.rest)
    script = Path(__file__).resolve().parents[2] / "bench" / BENCH_SCRIPTS[args.which]
    if not script.exists():
        raise UserError(f"{script} not found: the benchmarks run from a source checkout of lcsb")
    sys.argv = [str(script), *args.rest]
    sys.path.insert(0, str(script.parent))
    runpy.run_path(str(script), run_name="__main__")
    return 0


def _bench_fidelity(argv) -> int:
    import torch

    from .data import batches, load_dataset
    from .engine.fidelity import default_selections, fidelity, format_table

    p = _Parser(prog="lcsb bench fidelity", description="Per block: each method's LoRA gradients on a batch "
                "compared with the exact ones (cosine similarity, relative norm).")
    p.add_argument("--model", required=True, metavar="DIR")
    p.add_argument("--data", required=True, metavar="FILE", help="JSONL file or data folder (its train split)")
    p.add_argument("--adapter", metavar="DIR", help="LoRA adapter to measure at (default: random non-zero LoRA)")
    p.add_argument("--batches", type=_positive_int, default=4, metavar="N")
    p.add_argument("--batch-size", type=_positive_int, default=1, metavar="N")
    p.add_argument("--max-seq-len", type=_positive_int, default=256, metavar="N")
    p.add_argument("--rank", type=_positive_int, default=16)
    p.add_argument("--quant", choices=FORMATS)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--detail", action="store_true", help="one line per block")
    p.add_argument("--json", metavar="FILE", help="also write every row (method, step, block, cosine, rel_norm) here")
    a = p.parse_args(argv)
    tok = load_tokenizer(a.model)
    splits = load_dataset(a.data, tok, max_seq_len=a.max_seq_len)
    torch.manual_seed(a.seed)
    model = load_model(a.model, quant=a.quant, adapter=a.adapter,
                       lora=None if a.adapter else LoraConfig(rank=a.rank))
    if not a.adapter:   # a fresh adapter has B = 0, which makes every A gradient zero: measure at a random point
        with torch.no_grad():
            for k, prm in model.lora_parameters().items():
                if "lora_B" in k:
                    prm.normal_(0, 0.02)
    data = list(batches(splits.train, a.batch_size, a.seed, 0, pad_token_id=tok.pad_token_id))[:a.batches]
    rows = fidelity(model, data, default_selections(model.config.num_layers, a.seed))
    print(format_table(rows, detail=a.detail))
    if a.json:
        settings = {k: v for k, v in vars(a).items() if k not in ("json", "detail")}
        text = json.dumps(dict(settings=settings, rows=rows), indent=2)
        write_atomic(a.json, lambda tmp: Path(tmp).write_text(text))
    return 0


COMMANDS = {
    "train": (_add_train, _run_train),
    "generate": (_add_generate, _run_generate),
    "eval": (_add_eval, _run_eval),
    "export": (_add_export, _run_export),
    "convert": (_add_convert, _run_convert),
    "bench": (_add_bench, _run_bench),
}


# --- the command ----------------------------------------------------------------------------------

def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="lcsb", description="LoRA fine-tuning in little memory with layer-cyclic "
                                              "selective backpropagation (LCSB).")
    parser.add_argument("--version", action="version", version=f"lcsb {__version__}")
    parser.add_argument("--debug", action="store_true", help="show the traceback of errors")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", required=True)
    for add, run in COMMANDS.values():
        p = add(sub)
        # --debug is also accepted after the subcommand; SUPPRESS keeps the global value otherwise
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help="show the traceback of errors")
        p.set_defaults(run=run)
    return parser


def main(argv: list[str] | None = None) -> int:
    """Run `lcsb` with `argv` (default sys.argv[1:]); return the exit status.

    argparse's own exits (--help, --version, bad options) raise SystemExit as usual.
    """
    args = build_parser().parse_args(argv)
    tune_malloc()      # the CLI owns its process: hand freed tensors back to the system (runtime.py)
    install_allocator()    # ... and reuse torch's large tensors instead of faulting in fresh pages
    try:
        return args.run(args)
    except UserError as e:
        if args.debug:
            traceback.print_exc()
        message = " ".join(str(e).split("\n"))
        print(f"lcsb: error: {message}", file=sys.stderr)
        return e.exit_code
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        # the reader went away (`lcsb generate ... | head`): stop quietly, and keep Python from
        # complaining again when it flushes stdout at exit
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        return 1
