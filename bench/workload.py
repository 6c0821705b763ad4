"""The reference workload of DESIGN section 10: the Qwen2.5-0.5B shape with random weights.

`build(...)` makes the model directly in lcsb's formats, one weight at a time, so building it never
holds the float model; `run_config(...)` times training steps of one configuration in this
process and returns its numbers (the benchmark scripts call it in a fresh subprocess per
configuration, so peak RSS is that configuration's own).
"""

from __future__ import annotations

import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from datetime import date
from pathlib import Path

import torch

from lcsb.config import LoraConfig, RawConfig
from lcsb.engine.executor import block_lora_params, run_step
from lcsb.engine.selection import Selection
from lcsb.model.lora import add_lora
from lcsb.model import qwen2
from lcsb.model.core import CausalLM
from lcsb.model.linear import Embedding, Linear
from lcsb.optim import BlockOptimizer
from lcsb.quant.formats import quantize

QWEN25_05B = dict(model_type="qwen2", vocab_size=151936, hidden_size=896, intermediate_size=4864,
                  num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                  max_position_embeddings=32768, rope_theta=1000000.0, rms_norm_eps=1e-6,
                  tie_word_embeddings=True)


def build(layers: int = 24, quant: str | None = "int4", group_size: int = 64, rank: int = 16, seed: int = 0,
          **over) -> CausalLM:
    raw = dict(QWEN25_05B, num_hidden_layers=layers, **over)
    cfg = qwen2.parse_config(RawConfig(raw, "<qwen2.5-0.5b shape>"))
    with torch.device("meta"):
        model = CausalLM(cfg, qwen2.Block)
    g = torch.Generator().manual_seed(seed)
    for name, m in model.named_modules():
        if isinstance(m, (Linear, Embedding)):
            rows, cols = (m.out_features, m.in_features) if isinstance(m, Linear) else \
                (m.num_embeddings, m.embedding_dim)
            w = torch.randn(rows, cols, generator=g) * 0.02
            m.weight = quantize(w, quant, group_size)
            del w
    for name, p in list(model.named_parameters()):
        mod, _, attr = name.rpartition(".")
        t = torch.ones(p.shape) if "norm" in attr or "norm" in mod else torch.randn(p.shape, generator=g) * 0.02
        model.get_submodule(mod)._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)
    add_lora(model, LoraConfig(rank=rank, alpha=2 * rank))
    with torch.no_grad():   # non-zero B, as after some training, so every gradient path is exercised
        for k, p in model.lora_parameters().items():
            if "lora_B" in k:
                p.normal_(0, 0.01, generator=g)
    model.quant = quant
    return model


def parse_method(spec: str) -> Selection:
    """'full', 'lcsb:4', 'lcsb:4:strided', 'lcsb-exact:4', 'lisa:2', 'badam', 'freeze:6', 'random:6'."""
    name, *args = spec.split(":")
    if name in ("lcsb", "lcsb-exact"):
        return Selection(name, groups=int(args[0]) if args else 4, grouping=args[1] if len(args) > 1 else "contiguous")
    if name in ("lisa", "random", "freeze"):
        return Selection(name, active=int(args[0]) if args else 2, interval=1)
    if name == "badam":
        return Selection(name, interval=1)
    return Selection(name)


def load(model_dir: str, quant: str | None, rank: int, seed: int = 0) -> CausalLM:
    """A checkpoint or converted folder with a rank-`rank` LoRA whose B is random (as after training)."""
    from lcsb import load_model
    model = load_model(model_dir, quant=quant, lora=LoraConfig(rank=rank, alpha=2 * rank))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in model.lora_parameters().items():
            if "lora_B" in k:
                p.normal_(0, 0.01, generator=g)
    return model


def split_spec(spec: str) -> tuple[str, dict]:
    """'lcsb:4@recompute=off@decompress=linear' -> ('lcsb:4', {'recompute': False, 'decompress': 'linear'})."""
    method, *opts = spec.split("@")
    kw = {}
    for o in opts:
        k, _, v = o.partition("=")
        if k not in ("recompute", "decompress", "activations"):
            raise SystemExit(f"{spec}: unknown option {k!r} (recompute, decompress, activations)")
        kw[k] = (v == "on") if k == "recompute" else v
    return method, kw


def prepare_config(method: str, layers: int, seq: int, quant: str | None, rank: int = 16,
                   threads: int | None = None, activations: str = "ram", recompute: bool = True,
                   model_dir: str | None = None, decompress: str = "block"):
    """Load one lcsb configuration; return (step, summary): step() runs one training step and returns
    its timings, summary(rows) the configuration's numbers over the timed steps' rows. With model_dir
    the model is loaded from that folder (a converted folder is memory-mapped, as users run it);
    otherwise it is built in memory with `build`. `method` may carry options: 'lcsb:4@recompute=off'
    (split_spec)."""
    spec = method
    method, opts = split_spec(method)
    recompute = opts.get("recompute", recompute)
    decompress = opts.get("decompress", decompress)
    activations = opts.get("activations", activations)
    from lcsb.runtime import install_allocator, tune_malloc
    tune_malloc()       # as the lcsb command does
    install_allocator()
    if threads:
        torch.set_num_threads(threads)
    quant = None if quant in (None, "fp32", "none", "stored") else quant
    if model_dir:
        model = load(model_dir, quant, rank)
        layers = model.config.num_layers
    else:
        model = build(layers, quant=quant, rank=rank)
    built_rss = peak_rss_mb()
    sel = parse_method(method).validate(layers)
    opt = BlockOptimizer([block_lora_params(b) for b in model.model.layers], lr=1e-4)
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=g)
    state = dict(step=0, loss=float("nan"))

    def step() -> dict:
        roles = sel.roles(state["step"], layers)
        state["step"] += 1
        t0 = time.perf_counter()
        res = run_step(model, ids, ids, roles, activations, recompute=recompute, decompress=decompress)
        t1 = time.perf_counter()
        opt.step({i for i, r in enumerate(roles) if r == "train"})
        opt.zero_grad()
        t2 = time.perf_counter()
        state["loss"] = res.loss
        return dict(total=t2 - t0, optimizer=t2 - t1, **res.timings)

    def summary(rows: list[dict]) -> dict:
        med = {k: statistics.median(r[k] for r in rows) for k in rows[0]}
        return dict(method=spec, quant=getattr(model, "quant", None) or "fp32", layers=layers, seq=seq,
                    steps=len(rows), rank=rank, recompute=recompute, decompress=decompress,
                    activations=activations, step_time=med["total"],
                    breakdown={k: v for k, v in med.items() if k != "total"}, tokens_per_s=seq / med["total"],
                    peak_rss_mb=peak_rss_mb(), rss_after_load_mb=built_rss, **proc_status(), loss=state["loss"])

    return step, summary


def run_config(method: str, layers: int, seq: int, steps: int, warmup: int, quant: str | None, **kw) -> dict:
    """Time `steps` training steps (after `warmup`) of one configuration in this process
    (prepare_config's arguments)."""
    return _timed(*prepare_config(method, layers, seq, quant, **kw), warmup, steps)


def _timed(step, summary, warmup: int, steps: int) -> dict:
    rows = [step() for _ in range(warmup + steps)]
    return summary(rows[warmup:])


def proc_status() -> dict:
    """VmHWM (peak resident), and resident anonymous / file-backed memory now, in MB."""
    out = {}
    try:
        for line in open("/proc/self/status"):
            k, _, v = line.partition(":")
            if k in ("VmHWM", "RssAnon", "RssFile"):
                out[k.lower() + "_mb"] = int(v.split()[0]) / 1024
    except OSError:
        pass
    return out


def peak_rss_mb() -> float:
    """VmHWM: this process's own peak (ru_maxrss would include the parent's, carried across fork/exec)."""
    from lcsb.memory import peak_rss
    return peak_rss() / (1 << 20)


def in_subprocess(func: str, **kw) -> dict:
    """Run bench.workload.<func>(**kw) in a fresh interpreter; return its JSON result."""
    code = (f"import json, sys; sys.path.insert(0, 'bench'); import workload; "
            f"print('RESULT' + json.dumps(workload.{func}(**json.loads(sys.argv[1]))))")
    out = subprocess.run([sys.executable, "-c", code, json.dumps(kw)], capture_output=True, text=True)
    if out.returncode != 0:
        raise RuntimeError(f"{func}({kw}) failed:\n{out.stderr[-3000:]}")
    line = [l for l in out.stdout.splitlines() if l.startswith("RESULT")][-1]
    return json.loads(line[len("RESULT"):])


def machine() -> dict:
    cpu = "unknown"
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return dict(cpu=cpu, cores=os.cpu_count(), torch=torch.__version__, python=platform.python_version(),
                date=str(date.today()), threads=torch.get_num_threads())


def import_baseline() -> dict:
    import lcsb  # noqa: F401
    return dict(peak_rss_mb=peak_rss_mb(), **proc_status())


# ------------------------------------------------------------------ transformers + PEFT, the baseline


def prepare_hf(model_dir: str, seq: int, checkpointing: bool, rank: int = 16, threads: int | None = None):
    """What a user would run instead: transformers + PEFT in fp32, LoRA on all seven projections,
    torch AdamW, on the same checkpoint and tokens as the lcsb configurations. Returns (step,
    summary) as prepare_config."""
    import peft
    import transformers

    if threads:
        torch.set_num_threads(threads)
    path = Path(model_dir)
    if path.suffix == ".gguf":          # transformers dequantizes a GGUF file to float (gguf-py) as it loads
        model = transformers.AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name,
                                                                  dtype=torch.float32)
    else:
        model = transformers.AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    if checkpointing:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        model.enable_input_require_grads()
    model = peft.get_peft_model(model, peft.LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=[
        "q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]))
    model.train()
    opt = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4, weight_decay=0.01)
    loaded = peak_rss_mb()
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(0, model.config.vocab_size, (1, seq), generator=g)
    state = dict(loss=float("nan"))

    def step() -> dict:
        t0 = time.perf_counter()
        loss = model(input_ids=ids, labels=ids).loss
        loss.backward()
        opt.step()
        opt.zero_grad(set_to_none=True)
        state["loss"] = float(loss)
        return dict(total=time.perf_counter() - t0)

    def summary(rows: list[dict]) -> dict:
        med = statistics.median(r["total"] for r in rows)
        return dict(method="transformers+peft" + (" +ckpt" if checkpointing else ""), quant="fp32", seq=seq,
                    steps=len(rows), rank=rank, step_time=med, tokens_per_s=seq / med, peak_rss_mb=peak_rss_mb(),
                    rss_after_load_mb=loaded, **proc_status(), loss=state["loss"])

    return step, summary


def run_hf(model_dir: str, seq: int, steps: int, warmup: int, checkpointing: bool, **kw) -> dict:
    return _timed(*prepare_hf(model_dir, seq, checkpointing, **kw), warmup, steps)


# ------------------------------------------------------------------ interleaved: configurations side by side


def serve(func: str, kw: dict) -> None:
    """A child of `Interleaved`: prepare `func`(**kw), then answer stdin's commands on stdout, one JSON
    line each: 'step' runs one step and answers its timings, 'summary N' the summary of the last N
    steps, after which the child exits."""
    step, summary = globals()[func](**kw)
    rows = []
    print("READY", flush=True)
    for line in sys.stdin:
        cmd, *arg = line.split()
        if cmd == "step":
            rows.append(step())
            print("RESULT" + json.dumps(rows[-1]), flush=True)
        elif cmd == "summary":
            print("RESULT" + json.dumps(summary(rows[-int(arg[0]):])), flush=True)
            return


class Interleaved:
    """Configurations loaded side by side, one process each, stepped in turn: step 1 of every
    configuration, then step 2 of every one, and so on, the order rotating each round. A slow minute
    of this shared machine then falls on every configuration alike instead of on whichever ran then,
    so the ratios between them hold much better than with one configuration after another. Each
    process's peak RSS is still its own. `add(name, func, **kw)` starts a child running
    serve(func, kw); `run(warmup, steps)` returns {name: summary}."""

    def __init__(self):
        self.children: dict[str, subprocess.Popen] = {}

    def add(self, name: str, func: str, env: dict | None = None, **kw) -> None:
        """env: extra environment variables of the child (PYTHONPATH=<another checkout>/src times
        that code side by side with this one: a before/after measurement)."""
        code = "import json, sys; sys.path.insert(0, 'bench'); import workload; " \
               "workload.serve(sys.argv[1], json.loads(sys.argv[2]))"
        err = tempfile.TemporaryFile("w+")      # a file, not a pipe: a chatty child never blocks on it
        p = subprocess.Popen([sys.executable, "-c", code, func, json.dumps(kw)], stdin=subprocess.PIPE,
                             stdout=subprocess.PIPE, stderr=err, text=True, env={**os.environ, **(env or {})},
                             cwd=str(Path(__file__).resolve().parent.parent))
        p.err = err
        self.children[name] = p
        self._reply(name, "READY")          # loaded one after another: no two loads overlap

    def _reply(self, name: str, tag: str = "RESULT"):
        p = self.children[name]
        for line in p.stdout:
            if line.startswith(tag):
                return json.loads(line[len(tag):]) if tag == "RESULT" else None
        p.wait()
        p.err.seek(0)
        msg = p.err.read()[-3000:]
        self.close()
        raise RuntimeError(f"{name} failed (exit {p.returncode}):\n{msg}")

    def _ask(self, name: str, cmd: str):
        self.children[name].stdin.write(cmd + "\n")
        self.children[name].stdin.flush()
        return self._reply(name)

    def run(self, warmup: int, steps: int) -> dict[str, dict]:
        """Every step's time goes to stderr as it is taken."""
        names = list(self.children)
        for r in range(warmup + steps):
            k = r % len(names)
            tag = "warm-up" if r < warmup else f"step {r - warmup + 1}/{steps}"
            for name in names[k:] + names[:k]:
                t = self._ask(name, "step")
                print(f"  {tag} {name}: {t['total']:.2f} s", file=sys.stderr, flush=True)
        out = {name: self._ask(name, f"summary {steps}") for name in names}
        self.close()
        return out

    def close(self) -> None:
        for p in self.children.values():
            if p.poll() is None:
                p.kill()
            p.wait()
            p.err.close()
        self.children = {}


# ------------------------------------------------------------------ the machine's limit


def machine_rates(threads: int | None = None) -> dict:
    """This machine's fp32 matmul rate (GFLOP/s, a 2048^3 sgemm) and memory bandwidth (GB/s, a
    256 MB copy counted as read + write), best of a few tries."""
    if threads:
        torch.set_num_threads(threads)
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        a @ b
        best = min(best, time.perf_counter() - t0)
    gflops = 2 * 2048 ** 3 / best / 1e9
    x = torch.empty(64 << 20)
    y = torch.empty_like(x)
    best = float("inf")
    for _ in range(5):
        t0 = time.perf_counter()
        y.copy_(x)
        best = min(best, time.perf_counter() - t0)
    return dict(matmul_gflops=gflops, bandwidth_gbs=2 * x.numel() * 4 / best / 1e9)


def step_cost(cfg: dict, roles: list[str], seq: int, rank: int, quant: str | None, recompute: bool = True) -> dict:
    """Matmul FLOPs of one step and bytes of weights it decompresses, counted from the shape.

    Forward: every block's linears and attention, the LM head. Head backward: softmax @ W. Each
    visited block: its recompute (when on) without down_proj's output, which the VJP never reads
    (linear.output_unused), and its input-gradient VJP (one more linear pass, less the input
    gradients of the lowest visited block's q/k/v/gate/up, which nothing needs); `train` blocks
    also the LoRA weight gradients. Decompression: the block's compressed bytes read and float bytes
    written, once per pass that decompresses it."""
    h, f, v = cfg["hidden_size"], cfg["intermediate_size"], cfg["vocab_size"]
    heads, kv = cfg["num_attention_heads"], cfg["num_key_value_heads"]
    d = cfg.get("head_dim") or h // heads                                    # Gemma 3: 256, not h // heads
    T = seq
    lin = h * heads * d + 2 * h * kv * d + heads * d * h + 3 * h * f          # params of a block's linears
    lora = rank * ((h + heads * d) * 2 + 2 * (h + kv * d) + 3 * (h + f))     # LoRA params of a block
    attn = 2 * 2 * T * T * heads * d / 2                                      # QK^T and PV, causal half
    fwd_block = 2 * T * (lin + lora) + attn
    bits = {"int4": 4 + 64 / 64, "int8": 8 + 32 / h, "nf4": 4 + 32 / 64}.get(quant, 32)
    low = roles.index("train") if "train" in roles else len(roles)
    visited = [i for i, r in enumerate(roles) if i >= low and r != "skip"]
    flops = len(roles) * fwd_block + 2 * (2 * T * v * h)                      # forward + head (logits, grad)
    reads_input = h * heads * d + 2 * h * kv * d + 2 * h * f                 # q, k, v, gate, up
    for i in visited:
        flops += (fwd_block - 2 * T * h * f if recompute else 0) + 2 * T * lin + 2 * attn  # recompute, VJP
        if i == low:
            flops -= 2 * T * reads_input                                     # no gradient below `low`
        if roles[i] == "train":
            flops += 2 * 2 * T * lora                                        # LoRA A and B gradients
    passes = len(roles) + len(visited)
    dq_bytes = passes * lin * (bits / 8 + 4) + v * h * (bits / 8 + 4)         # blocks + the head once
    return dict(flops=flops, decompress_bytes=dq_bytes if quant else 0.0)
