"""GGUF files (llama.cpp's format): read a model as it is, write a llama.cpp LoRA adapter.

Design note. A `.gguf` file is one header and one data section. The header holds typed key/value
metadata (the architecture's hyperparameters, the tokenizer's vocabulary, the chat template) and,
for every tensor, its name, dimensions (ne0 first: the input dimension of a matrix), ggml type and
offset. The data section is memory-mapped copy-on-write, as lcsb's converted folders are: every
matrix stays in its own ggml block type (`quant.ggml`) as a zero-copy view of the mapping and is
decompressed block by block like any compressed weight (DESIGN section 3); `release()` hands its
pages back. Norms and biases (F32) are copied into RAM.

The reader is our own rather than gguf-py's GGUFReader: that one builds a numpy object per
vocabulary entry and takes 11 s on Gemma 3's 262k-token vocabulary; this one reads the same
metadata in well under a second and words every problem as one line naming the file. The tests
check it against gguf-py (`tests/test_gguf.py`).

Names and layouts follow llama.cpp's converter (convert_hf_to_gguf.py) in reverse:
- tensors `blk.N.attn_q.weight` ... map to Hugging Face names (`gguf_names`), so LoRA keys, PEFT
  export and the rest of lcsb see the usual `model.layers.N.self_attn.q_proj`;
- for the llama architecture the converter permutes the rows of q and k within each head (rotary
  pairs interleaved instead of split in halves); the weight keeps the file's rows and reads them
  through a row order (`llama_qk_rows`), so no copy is made;
- Gemma stores its (1 + w) norm weights with the 1 added; we subtract it, as transformers does.
"""

from __future__ import annotations

import mmap
import os
import struct
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch

from ..atomic import write_atomic
from ..errors import UserError
from ..quant.ggml import GGMLWeight, tensor_nbytes
from .checkpoint import _Fd, _FileBacked, _page_ranges, quantize_on_load
from .linear import Embedding, Linear

MAGIC = b"GGUF"
DEFAULT_ALIGNMENT = 32

# metadata value types: (struct code, size) for the scalars
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4), 6: ("<f", 4),
            7: ("<?", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "?", 10: "<u8", 11: "<i8",
          12: "<f8"}
STRING, ARRAY = 8, 9

# architectures lcsb runs -> Hugging Face model_type
ARCHITECTURES = {"llama": "llama", "qwen2": "qwen2", "qwen3": "qwen3", "gemma3": "gemma3_text"}

# per-block tensor names: llama.cpp -> Hugging Face (the prefix model.layers.N. added)
_BLOCK_NAMES = {
    "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj", "attn_q_norm": "self_attn.q_norm", "attn_k_norm": "self_attn.k_norm",
    "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj", "ffn_down": "mlp.down_proj",
    "attn_norm": "input_layernorm",
}
# the norm after attention and the one before the MLP differ between Llama-style blocks and Gemma's
_NORM_NAMES = {
    "gemma3": {"post_attention_norm": "post_attention_layernorm", "ffn_norm": "pre_feedforward_layernorm",
               "post_ffw_norm": "post_feedforward_layernorm"},
    "default": {"ffn_norm": "post_attention_layernorm"},
}
_TOP_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


@dataclass
class TensorInfo:
    name: str
    ne: tuple[int, ...]          # ggml dimensions, ne0 (contiguous, a matrix's input dimension) first
    ggml_type: int
    start: int                   # absolute byte offset in the file
    nbytes: int = 0

    @property
    def shape(self) -> tuple[int, ...]:
        """torch order: [out, in] for a matrix."""
        return tuple(reversed(self.ne))


@dataclass
class GGUFFile:
    path: Path
    version: int
    meta: dict
    tensors: dict[str, TensorInfo] = field(default_factory=dict)
    data_start: int = 0
    size: int = 0
    _mm: mmap.mmap | None = None
    _fd: _Fd | None = None

    @property
    def arch(self) -> str:
        return self.meta.get("general.architecture", "")

    def get(self, key: str, default=None):
        """Metadata `<arch>.key` (e.g. "block_count"), or `default`."""
        return self.meta.get(f"{self.arch}.{key}", default)

    @property
    def mm(self) -> mmap.mmap:
        if self._mm is None:
            with open(self.path, "rb") as f:
                self._mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
        return self._mm

    @property
    def fd(self) -> _Fd:
        """The file opened for pread (row gathers of mapped weights)."""
        if self._fd is None:
            self._fd = _Fd(self.path)
        return self._fd

    def raw(self, name: str) -> torch.Tensor:
        """Tensor `name`'s bytes as a uint8 [rows, row_bytes] view of the mapping (rows = product of ne[1:])."""
        t = self.tensors[name]
        rows = 1
        for n in t.ne[1:]:
            rows *= n
        data = torch.frombuffer(self.mm, dtype=torch.uint8, count=t.nbytes, offset=t.start) if t.nbytes else \
            torch.empty(0, dtype=torch.uint8)
        return data.view(rows, -1) if t.nbytes else data.view(rows, 0)


class _Cursor:
    """Reads the header's little-endian fields, every short read reported as truncation."""

    def __init__(self, buf, path: Path):
        self.buf, self.pos, self.path = buf, 0, path

    def take(self, n: int) -> int:
        if self.pos + n > len(self.buf):
            raise UserError(f"{self.path}: truncated GGUF file (the header ends at byte {len(self.buf)}); "
                            "download or write it again")
        p = self.pos
        self.pos += n
        return p

    def scalar(self, code: str, n: int):
        return struct.unpack_from(code, self.buf, self.take(n))[0]

    def string(self) -> str:
        n = self.scalar("<Q", 8)
        p = self.take(n)
        try:
            return bytes(self.buf[p:p + n]).decode("utf-8")
        except UnicodeDecodeError:
            raise UserError(f"{self.path}: a metadata string at byte {p} is not UTF-8; the file is corrupt") from None

    def value(self, vtype: int):
        if vtype in _SCALARS:
            return self.scalar(*_SCALARS[vtype])
        if vtype == STRING:
            return self.string()
        if vtype == ARRAY:
            etype, count = self.scalar("<I", 4), self.scalar("<Q", 8)
            if etype in _NUMPY:
                size = _SCALARS[etype][1]
                p = self.take(count * size)
                return np.frombuffer(self.buf, dtype=_NUMPY[etype], count=count, offset=p).copy()
            if etype == STRING:
                return self._strings(count)
            if etype == ARRAY:
                return [self.value(ARRAY) for _ in range(count)]
            raise UserError(f"{self.path}: unknown metadata array type {etype}; the file is corrupt or newer than "
                            "this lcsb")
        raise UserError(f"{self.path}: unknown metadata value type {vtype}; the file is corrupt or newer than lcsb")

    def _strings(self, count: int) -> list[str]:
        # the vocabulary: up to a few hundred thousand short strings, read in one tight loop
        buf, pos, end, out = self.buf, self.pos, len(self.buf), []
        unpack = struct.Struct("<Q").unpack_from
        for _ in range(count):
            if pos + 8 > end:
                self.pos = end
                self.take(8)
            (n,) = unpack(buf, pos)
            pos += 8
            if pos + n > end:
                self.pos = end
                self.take(n)
            out.append(bytes(buf[pos:pos + n]).decode("utf-8", errors="replace"))
            pos += n
        self.pos = pos
        return out


def read_gguf(path: str | Path) -> GGUFFile:
    """The header of a GGUF file: metadata and tensor table (tensor data stays on disk, mapped on use).

    Every problem is a UserError naming the file: not GGUF, an unsupported version, truncation, a
    tensor past the end of the file.
    """
    path = Path(path)
    try:
        size = path.stat().st_size
        f = open(path, "rb")
    except FileNotFoundError:
        raise UserError(f"{path}: model file not found; pass a .gguf file or a Hugging Face checkpoint folder") from None
    except OSError as e:
        raise UserError(f"{path}: cannot read ({e.strerror})") from None
    with f:
        if size < 24 or f.read(4) != MAGIC:
            raise UserError(f"{path}: not a GGUF file (no 'GGUF' magic at the start); pass a .gguf model file "
                            "or a Hugging Face checkpoint folder")
        mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_READ)
    try:
        return _parse(path, mm, size)
    finally:
        try:
            mm.close()
        except BufferError:     # a view is still alive in a traceback: the mapping closes when it goes
            pass


def _parse(path: Path, mm: mmap.mmap, size: int) -> GGUFFile:
    c = _Cursor(memoryview(mm), path)
    c.take(4)
    version = c.scalar("<I", 4)
    if version not in (2, 3):
        raise UserError(f"{path}: GGUF version {version} is not supported (2 and 3 are); convert the model again "
                        "with a recent llama.cpp")
    n_tensors, n_kv = c.scalar("<Q", 8), c.scalar("<Q", 8)
    if n_tensors > 1 << 24 or n_kv > 1 << 24:
        raise UserError(f"{path}: the header claims {n_tensors} tensors and {n_kv} metadata entries; "
                        "the file is corrupt")
    meta = {}
    for _ in range(n_kv):
        key = c.string()
        meta[key] = c.value(c.scalar("<I", 4))
    infos = []
    for _ in range(n_tensors):
        name = c.string()
        n_dims = c.scalar("<I", 4)
        if n_dims > 4:
            raise UserError(f"{path}: tensor {name!r} has {n_dims} dimensions (at most 4); the file is corrupt")
        ne = tuple(c.scalar("<Q", 8) for _ in range(n_dims))
        ggml_type, offset = c.scalar("<I", 4), c.scalar("<Q", 8)
        infos.append((name, ne, ggml_type, offset))
    c.buf.release()
    align = int(meta.get("general.alignment", DEFAULT_ALIGNMENT))
    if align <= 0 or align & (align - 1):
        raise UserError(f"{path}: general.alignment {align} is not a power of two; the file is corrupt")
    data_start = -(-c.pos // align) * align
    g = GGUFFile(path, version, meta, data_start=data_start, size=size)
    for name, ne, ggml_type, offset in infos:
        nbytes = tensor_nbytes(ggml_type, ne, f"{path}: tensor {name!r}")
        start = data_start + offset
        if start + nbytes > size:
            raise UserError(f"{path}: truncated: tensor {name!r} ends at byte {start + nbytes} but the file has "
                            f"{size} bytes; download or write the file again")
        g.tensors[name] = TensorInfo(name, ne, ggml_type, start, nbytes)
    return g


def is_gguf(path: str | Path) -> bool:
    """A path lcsb reads as a GGUF file: a `.gguf` name, or a file starting with the GGUF magic."""
    p = Path(path)
    if p.suffix.lower() == ".gguf":
        return True
    if not p.is_file():
        return False
    try:
        with open(p, "rb") as f:
            return f.read(4) == MAGIC
    except OSError:
        return False


# ---- the model's configuration ------------------------------------------------------------------

def hf_config(g: GGUFFile) -> dict:
    """The config.json a Hugging Face checkpoint of this model would have, from the GGUF metadata
    (the keys transformers' GGUF loader reads, with the same defaults)."""
    where = g.path
    kind = g.meta.get("general.type", "model")
    if kind == "adapter":
        raise UserError(f"{where}: this GGUF file is a LoRA adapter (general.type adapter), not a model; pass the "
                        "base model's .gguf to --model and the adapter to --adapter")
    arch = g.arch
    if arch not in ARCHITECTURES:
        raise UserError(f"{where}: architecture {arch!r} is not supported; supported GGUF architectures: "
                        f"{', '.join(ARCHITECTURES)}")

    def need(key):
        v = g.get(key)
        if v is None:
            raise UserError(f"{where}: missing metadata {arch}.{key}; the GGUF file is incomplete, convert it again")
        return int(v) if not isinstance(v, float) else v

    scaling = g.get("rope.scaling.type")
    if "rope_freqs.weight" in g.tensors:
        raise UserError(f"{where}: rope frequency factors (rope_freqs.weight, Llama 3.1-style rope scaling) are not "
                        "supported yet; use a checkpoint folder, whose config.json lcsb reads with its rope scaling")
    heads = need("attention.head_count")
    kv = g.get("attention.head_count_kv", heads)
    if not isinstance(kv, (int, np.integer)):
        raise UserError(f"{where}: {arch}.attention.head_count_kv varies by layer; such models are not supported")
    embd = g.tensors.get("token_embd.weight")
    if embd is None:
        raise UserError(f"{where}: no token_embd.weight tensor; the GGUF file is incomplete")
    raw = {
        "model_type": ARCHITECTURES[arch],
        "num_hidden_layers": need("block_count"),
        "hidden_size": need("embedding_length"),
        "intermediate_size": need("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": int(kv),
        "max_position_embeddings": int(g.get("context_length", 2048)),
        "rms_norm_eps": float(g.get("attention.layer_norm_rms_epsilon", 1e-6)),
        "rope_theta": float(g.get("rope.freq_base", 10000.0 if arch != "gemma3" else 1_000_000.0)),
        "vocab_size": int(g.get("vocab_size", embd.ne[1])),
        "tie_word_embeddings": "output.weight" not in g.tensors,
    }
    if g.get("attention.key_length") is not None:
        raw["head_dim"] = int(g.get("attention.key_length"))
    elif arch == "llama" and g.get("rope.dimension_count") is not None:
        raw["head_dim"] = int(g.get("rope.dimension_count"))
    if scaling not in (None, "none"):
        if scaling != "linear":
            raise UserError(f"{where}: rope scaling {scaling!r} is not supported (none, linear)")
        raw["rope_scaling"] = {"rope_type": "linear", "factor": float(g.get("rope.scaling.factor", 1.0))}
    raw["attention_bias"] = "blk.0.attn_q.bias" in g.tensors
    if arch == "llama":
        raw["mlp_bias"] = "blk.0.ffn_up.bias" in g.tensors
    if arch == "gemma3":
        raw["sliding_window"] = int(g.get("attention.sliding_window", 4096))
        raw["hidden_activation"] = "gelu_pytorch_tanh"
        # the file has no query_pre_attn_scalar: llama.cpp scales by head_dim ** -0.5, except for Gemma 3 27B
        # (62 layers: hidden / heads); transformers' GGUF loader takes its default 256, the same for 270M-12B
        head_dim = raw.get("head_dim", 256)
        raw["query_pre_attn_scalar"] = raw["hidden_size"] // heads if raw["num_hidden_layers"] == 62 else head_dim
    # what the memory estimate needs of the file: bits per weight of the matrices, as stored
    block = [t for n, t in g.tensors.items() if n.startswith("blk.") and len(t.ne) == 2]
    out = g.tensors.get("output.weight", embd)
    raw["quantization"] = {"format": "gguf", "bits_per_weight": {
        "block": 8 * sum(t.nbytes for t in block) / max(1, sum(t.ne[0] * t.ne[1] for t in block)),
        "embed": 8 * embd.nbytes / (embd.ne[0] * embd.ne[1]), "head": 8 * out.nbytes / (out.ne[0] * out.ne[1])}}
    for key, hf_key in (("tokenizer.ggml.bos_token_id", "bos_token_id"), ("tokenizer.ggml.eos_token_id", "eos_token_id")):
        if key in g.meta:
            raw[hf_key] = int(g.meta[key])
    return raw


def gguf_names(arch: str, num_layers: int) -> dict[str, str]:
    """Hugging Face name -> GGUF name for every tensor a model of `arch` may have."""
    names = {**_BLOCK_NAMES, **_NORM_NAMES.get(arch, _NORM_NAMES["default"])}
    out = {f"{hf}.{s}": f"{g}.{s}" for g, hf in _TOP_NAMES.items() for s in ("weight", "bias")}
    for i in range(num_layers):
        for g, hf in names.items():
            for s in ("weight", "bias"):
                out[f"model.layers.{i}.{hf}.{s}"] = f"blk.{i}.{g}.{s}"
    return out


def llama_qk_rows(rows: int, heads: int) -> torch.Tensor:
    """Row order that undoes llama.cpp's q/k permutation: Hugging Face row r of a head is file row order[r].

    The converter writes, per head of size d, the rows (p, j) -> (j, p) for p in {0, 1}, j < d/2 (the
    two rotary halves interleaved); reading back, row p*d/2 + j of the head is the file's row 2j + p.
    """
    d = rows // heads
    j = torch.arange(d // 2)
    within = torch.cat((2 * j, 2 * j + 1))                       # HF order -> file row within the head
    return (torch.arange(heads)[:, None] * d + within[None, :]).reshape(-1)


def llama_qk_permute(w: torch.Tensor, heads: int) -> torch.Tensor:
    """Hugging Face row order -> the file's (llama.cpp's converter), for rows of q/k or a LoRA B."""
    out = torch.empty_like(w)
    out[llama_qk_rows(w.shape[0], heads)] = w
    return out


# ---- writing ------------------------------------------------------------------------------------

def _pack_value(v) -> tuple[int, bytes]:
    if isinstance(v, bool):
        return 7, struct.pack("<?", v)
    if isinstance(v, int):
        return (4, struct.pack("<I", v)) if 0 <= v < 1 << 32 else (11, struct.pack("<q", v))
    if isinstance(v, float):
        return 6, struct.pack("<f", v)
    if isinstance(v, str):
        b = v.encode("utf-8")
        return STRING, struct.pack("<Q", len(b)) + b
    if isinstance(v, (list, tuple)):
        items = [_pack_value(x) for x in v]
        etype = items[0][0] if items else 4
        return ARRAY, struct.pack("<IQ", etype, len(items)) + b"".join(b for _, b in items)
    raise TypeError(f"cannot store {type(v).__name__} in GGUF metadata")


# torch dtype -> ggml type of the tensors we write
WRITE_TYPES = {torch.float32: 0, torch.float16: 1, torch.bfloat16: 30}


def write_gguf(path: str | Path, meta: dict, tensors: dict[str, torch.Tensor]) -> None:
    """Write a GGUF v3 file of float tensors (F32, F16, BF16) atomically: temporary name, fsync, rename."""
    path = Path(path)
    header = [MAGIC, struct.pack("<IQQ", 3, len(tensors), len(meta))]
    for k, v in meta.items():
        vtype, data = _pack_value(v)
        kb = k.encode("utf-8")
        header += [struct.pack("<Q", len(kb)), kb, struct.pack("<I", vtype), data]
    offset, blobs = 0, []
    for name, t in tensors.items():
        t = t.detach().cpu().contiguous()
        if t.dtype not in WRITE_TYPES:
            raise TypeError(f"{name}: {t.dtype} cannot be written (float32, float16, bfloat16)")
        nb = name.encode("utf-8")
        ne = list(reversed(t.shape))
        header += [struct.pack("<Q", len(nb)), nb, struct.pack("<I", len(ne)), struct.pack(f"<{len(ne)}Q", *ne),
                   struct.pack("<IQ", WRITE_TYPES[t.dtype], offset)]
        data = t.reshape(-1).view(torch.uint8).numpy().tobytes()
        pad = -len(data) % DEFAULT_ALIGNMENT
        blobs.append(data + b"\0" * pad)
        offset += len(data) + pad
    head = b"".join(header)
    head += b"\0" * (-len(head) % DEFAULT_ALIGNMENT)

    def write(tmp: str):
        with open(tmp, "wb") as f:
            f.write(head)
            for b in blobs:
                f.write(b)

    write_atomic(path, write)


# ---- loading ------------------------------------------------------------------------------------

class MappedGGML(_FileBacked, GGMLWeight):
    """A ggml-typed matrix that is a view of the mapped file; with `order`, its rows are read in that
    order (llama's q/k): the compressed bytes of the rows asked for are gathered, then decompressed."""

    order: torch.Tensor | None = None

    def _block(self, lo, hi, dtype, out):
        if self.order is None:
            return super()._block(lo, hi, dtype, out)
        rows = self.tensors()["weight"].index_select(0, self.order[lo:hi])
        return GGMLWeight(rows, self.ggml_type, (hi - lo, self.shape[1]))._block(0, hi - lo, dtype, out)

    def rows(self, ids, dtype=torch.float32):
        return super().rows(ids if self.order is None else self.order[ids], dtype)

    def stored_as(self, dtype):
        # the stored rows are in the file's order: a zero-copy view only when that is the model's order
        return super().stored_as(dtype) if self.order is None else None

    def map(self, fn):
        data = fn(self.data)
        if data.data_ptr() == self.data.data_ptr():         # a no-op move: still the mapped file
            new = MappedGGML(data, self.ggml_type, self.shape, self.where)
            new._ranges, new._rows_at, new.order = self._ranges, self._rows_at, self.order
            return new
        # moved elsewhere (another device): a plain weight, its rows in Hugging Face order
        rows = data if self.order is None else data.index_select(0, self.order.to(data.device))
        return GGMLWeight(rows, self.ggml_type, self.shape, self.where)


def _mapped(g: GGUFFile, name: str, shape: tuple[int, int], order: torch.Tensor | None = None) -> MappedGGML:
    info = g.tensors[name]
    if info.shape != tuple(shape):
        raise UserError(f"{g.path}: tensor {name!r} has shape {list(info.shape)} but the metadata implies "
                        f"{list(shape)}; the GGUF file is inconsistent, convert it again")
    w = MappedGGML(g.raw(name), info.ggml_type, shape, where=f"{g.path}: tensor {name!r}")
    w._ranges = tuple(_page_ranges([(g.mm, info.start, info.start + info.nbytes)]))
    w._rows_at = {"weight": (g.fd, info.start)}
    w.order = order
    return w


def fill_from_gguf(model, g: GGUFFile, quant: str | None = None, group_size: int = 64) -> None:
    """Fill a meta-device `CausalLM` from a GGUF file: matrices stay in the file in their ggml types
    (or, with `quant`, float matrices are compressed on load), norms and biases are copied out."""
    cfg = model.config
    names = gguf_names(g.arch, cfg.num_layers)
    for name, m in model.named_modules():
        if not isinstance(m, (Linear, Embedding)):
            continue
        key = names[f"{name}.weight"]
        if key not in g.tensors:
            raise UserError(f"{g.path}: tensor {key!r} ({name}) is missing; the GGUF file is incomplete or "
                            "not a model lcsb can run")
        shape = (m.out_features, m.in_features) if isinstance(m, Linear) else (m.num_embeddings, m.embedding_dim)
        order = None
        if g.arch == "llama" and name.endswith(("q_proj", "k_proj")):
            heads = cfg.num_heads if name.endswith("q_proj") else cfg.num_kv_heads
            order = llama_qk_rows(shape[0], heads)
        w = _mapped(g, key, shape, order)
        if quant is not None and not w.is_float:
            raise UserError(f"{g.path}: --quant {quant} on a model already quantized as {w.type_name} "
                            f"({key}); drop --quant to train on the file's own weights")
        m.weight = w
    for name, p in list(model.named_parameters()):
        key = names[name]
        if key not in g.tensors:
            raise UserError(f"{g.path}: tensor {key!r} ({name}) is missing; the GGUF file is incomplete")
        info = g.tensors[key]
        if info.shape != tuple(p.shape):
            raise UserError(f"{g.path}: tensor {key!r} has shape {list(info.shape)} but the metadata implies "
                            f"{list(p.shape)}; the GGUF file is inconsistent")
        # read with pread, not through the mapping: each small tensor would leave its 64 KB fault-around
        # window of the neighbouring matrices resident
        raw = g.fd.read(info.start, torch.empty(info.nbytes, dtype=torch.uint8)) if hasattr(os, "preadv") else g.raw(key)
        t = GGMLWeight(raw.reshape(1, -1), info.ggml_type, (1, p.numel()),
                       where=f"{g.path}: tensor {key!r}").dequantize(torch.float32).reshape(p.shape)
        if g.arch == "llama" and key.endswith(("attn_q.bias", "attn_k.bias")):
            heads = cfg.num_heads if "attn_q" in key else cfg.num_kv_heads
            t = t[llama_qk_rows(t.shape[0], heads)]
        if cfg.norm_offset and key.endswith("norm.weight"):
            t = t - cfg.norm_offset                 # the file holds 1 + w (llama.cpp's Gemma converter)
        mod_name, _, attr = name.rpartition(".")
        model.get_submodule(mod_name)._parameters[attr] = torch.nn.Parameter(t.to(model.dtype), requires_grad=False)
    if quant is not None:                       # float matrices compressed, file-backed like a converted folder
        quantize_on_load(model, lambda name, shape: model.get_submodule(name).weight.row_slices(model.dtype),
                         lambda key, p: p.detach(), quant, group_size, g.path)
