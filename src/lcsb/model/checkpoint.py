"""Safetensors checkpoints, read and written: Hugging Face folders, and the folders `lcsb convert` writes.

Reading a Hugging Face folder: config.json and the safetensors shards. The model is built on the meta
device (its Parameters are only norms and biases; base weights are `quant.Weight` objects set afterwards),
then filled tensor by tensor from the shards. A tensor is read, converted or compressed, and the float
original dropped before the next one, so the float model never exists in full when loading with `quant`.

The converted-model store (written by convert.convert_model, read back lazily by `fill_from_store`).

Design note. A converted folder is a Hugging Face folder whose base weights are already
compressed: config.json with a `quantization` entry, the tokenizer files, and safetensors
shards holding, for every Linear of the blocks, the embedding and an untied LM head, the
format's storage tensors under MLX's names (`<module>.weight`, `.scales`, `.biases` or
`.absmax`); norms and biases stay float.

Writing streams. One source tensor is read (in row slices with plain file reads: quantization is
row-wise, so slicing changes nothing, and unlike safetensors' mapped tensors the pages read do
not stay in our resident set), and each slice is compressed and written at its place in the current
shard's data file (`write_weights`); a shard gets its header when it is full. Nothing but one row
slice is ever in memory, so the peak depends on neither the model nor its largest matrix. `lcsb
convert` builds the folder under a temporary name beside the destination and renames it into place,
so a failed conversion leaves nothing behind; quantize-on-load writes the same folder into a scratch
folder, maps it and deletes it (`quantize_on_load`).

Reading maps. Each shard is memory-mapped (copy-on-write, so tensors are writable views and
nothing can reach the file) and its header parsed here; every compressed tensor is a
`torch.frombuffer` view of the mapping: no copy and no unpickling. Pages come in from the page
cache when a block is dequantized and `release()`, which `linear.materialized` calls when the
block is done, hands them back with madvise(MADV_DONTNEED): resident memory holds about one
block's weights as the engine walks the blocks. Norms and biases are copied into RAM.
"""

from __future__ import annotations

import json
import math
import mmap
import os
import shutil
import struct
import tempfile
import warnings
from pathlib import Path

import torch
from safetensors import SafetensorError, safe_open

from .. import native
from ..errors import UserError
from ..runtime import trim_heap
from ..quant.formats import (CHUNK_ELEMENTS, FORMATS, NF4, Dense, Int4, Int8, Weight, check_group_size, quantize,
                             weight_from_tensors)
from .core import CausalLM
from .linear import Embedding, Linear

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "chat_template.jinja",
                   "chat_template.json", "generation_config.json", "tokenizer.model", "vocab.json", "merges.txt",
                   "added_tokens.json")
INDEX = "model.safetensors.index.json"
SHARD_BYTES = 256 << 20      # shard size of converted folders; memory does not depend on it
STATS = {"release": 0}       # release() calls on file-backed weights, for tests

DTYPES = {
    "F64": torch.float64, "F32": torch.float32, "F16": torch.float16, "BF16": torch.bfloat16,
    "I64": torch.int64, "I32": torch.int32, "I16": torch.int16, "I8": torch.int8, "U8": torch.uint8,
    "U16": torch.uint16, "U32": torch.uint32, "U64": torch.uint64, "BOOL": torch.bool,
    "F8_E4M3": torch.float8_e4m3fn, "F8_E5M2": torch.float8_e5m2,
}
DTYPE_NAMES = {v: k for k, v in DTYPES.items()}


# ---- Hugging Face folders: reading ------------------------------------------------------------

def read_json(path: Path) -> dict:
    try:
        with open(path, encoding="utf-8") as f:
            d = json.load(f)
    except FileNotFoundError:
        raise UserError(f"{path} not found") from None
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: not valid JSON ({e}); restore the file from the original checkpoint") from None
    if not isinstance(d, dict):
        raise UserError(f"{path}: expected a JSON object")
    return d


def shard_files(folder: Path, fix_index: str, fix_missing: str) -> list[str]:
    """The safetensors files of a folder: those its index names, else every *.safetensors (sorted); a
    broken index or no file at all is one line naming the folder and `fix_...`."""
    index = folder / INDEX
    if index.exists():
        weight_map = read_json(index).get("weight_map")
        if not isinstance(weight_map, dict):
            raise UserError(f"{index}: no 'weight_map' object; {fix_index}")
        return sorted(set(weight_map.values()))
    files = sorted(p.name for p in folder.glob("*.safetensors"))
    if not files:
        raise UserError(f"{folder}: no *.safetensors files; {fix_missing}")
    return files


class Shards:
    """Every tensor of a checkpoint by name, across one or several safetensors files."""

    def __init__(self, folder: Path):
        self.folder = folder
        files = shard_files(folder, "restore the index from the original checkpoint",
                            "a model folder needs the checkpoint's weights (convert .bin checkpoints to safetensors first)")
        self.where: dict[str, Path] = {}
        self.handles = {}
        for name in files:
            path = folder / name
            if not path.exists():
                raise UserError(f"{path} not found, but the index lists it; the checkpoint is incomplete")
            try:
                h = safe_open(str(path), framework="pt")
                keys = list(h.keys())
            except (SafetensorError, OSError, ValueError) as e:
                raise UserError(f"{path}: not a readable safetensors file ({e}); the file is truncated or corrupt, "
                                "download or convert it again") from None
            self.handles[path] = h
            for k in keys:
                self.where[k] = path

    def __contains__(self, key):
        return key in self.where

    def get(self, key: str) -> torch.Tensor:
        path = self.where.get(key)
        if path is None:
            raise UserError(f"{self.folder}: weight {key!r} is missing from the checkpoint; "
                            "the safetensors files do not match config.json")
        try:
            return self.handles[path].get_tensor(key)
        except (SafetensorError, OSError, ValueError) as e:
            raise UserError(f"{path}: cannot read {key!r} ({e}); the file is truncated or corrupt") from None

    def dtype(self, key: str) -> torch.dtype:
        return self.get_slice(key).get_dtype()

    def get_slice(self, key):
        return self.handles[self.where[key]].get_slice(key)


class CheckpointReader:
    """A checkpoint's tensors read with plain file reads, a slice of rows at a time.

    safetensors' own tensors are views of a mapping of the whole file: every page read stays in
    the process's resident set until the file is closed, so reading a 1 GB checkpoint through it
    shows 1 GB of RSS. A read into a fresh buffer leaves the file in the page cache only. `Shards`
    still says which file holds which tensor and words the errors.

    `weight()` is quantize-on-load for one matrix: rows are read, cast and compressed in slices,
    so the float matrix never exists whole; the result equals `quantize(whole.to(dtype), ...)`
    because every format is row-wise.
    """

    def __init__(self, shards):
        self.shards = shards
        self.files: dict[Path, tuple[object, dict]] = {}

    def entry(self, key: str) -> tuple[Path, object, tuple]:
        if key not in self.shards:
            self.shards.get(key)                            # raises the checkpoint's "missing" UserError
        path = self.shards.where[key]
        if path not in self.files:
            f = open(path, "rb")
            self.files[path] = (f, _parse_header(path, f)[1])
        f, entries = self.files[path]
        return path, f, entries[key]

    def shape(self, key: str) -> list[int]:
        return self.entry(key)[2][1]

    def rows(self, key: str, a: int, b: int) -> torch.Tensor:
        """Rows a..b-1 of tensor `key` (rows are contiguous in the file), in a fresh buffer."""
        path, f, (dtype, shape, start, end) = self.entry(key)
        if not shape:
            return self.shards.get(key).clone()
        row = (end - start) // max(1, shape[0])
        b = min(b, shape[0])
        buf = torch.empty(max(0, b - a) * row, dtype=torch.uint8)
        f.seek(start + a * row)
        if f.readinto(buf.numpy()) != buf.numel():
            raise UserError(f"{path}: cannot read {key!r}: the file is truncated; download or convert it again")
        return buf.view(dtype).view(-1, *shape[1:])

    def tensor(self, key: str, shape) -> torch.Tensor:
        """The whole tensor `key`, checked against the `shape` config.json implies."""
        got = self.shape(key)
        if list(got) != list(shape):
            raise UserError(f"{self.shards.where[key]}: {key!r} has shape {got} but config.json implies "
                            f"{list(shape)}; the weights do not match config.json")
        return self.rows(key, 0, got[0] if got else 0)

    def matrix_rows(self, key: str, shape: tuple[int, int], dtype: torch.dtype | None = None):
        """Matrix `key`, checked against `shape`, as float row slices of about CHUNK_ELEMENTS (cast to `dtype`)."""
        path, _, (src_dtype, got, _, _) = self.entry(key)
        _check_tensor(path, key, got, src_dtype, shape)
        step = max(1, CHUNK_ELEMENTS // max(1, shape[1]))
        for a in range(0, shape[0], step):
            x = self.rows(key, a, a + step)
            yield x if dtype is None else x.to(dtype)

    def weight(self, key: str, shape: tuple[int, int], fmt: str | None, group_size: int = 64,
               dtype: torch.dtype | None = None) -> Weight:
        """Matrix `key` as a Weight of format `fmt` (None: dense) in RAM, each row slice cast to `dtype` first."""
        if fmt is None or fmt == "dense":
            t = self.tensor(key, shape)
            return Dense(t.to(dtype) if dtype is not None else t)
        return _assemble(self.matrix_rows(key, shape, dtype), shape, fmt, group_size)

    def close(self):
        for f, _ in self.files.values():
            f.close()
        self.files.clear()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


def _assemble(slices, shape: tuple[int, int], fmt: str, group_size: int) -> Weight:
    """A Weight in RAM from consecutive float row slices, each compressed as it comes (formats are row-wise,
    so this equals compressing the whole matrix)."""
    full: dict[str, torch.Tensor] = {}
    a = 0
    for x in slices:
        for suffix, t in quantize(x, fmt, group_size).tensors().items():
            if suffix not in full:                     # every storage tensor is row-major in the output rows
                full[suffix] = torch.empty((shape[0], *t.shape[1:]), dtype=t.dtype)
            full[suffix][a:a + x.shape[0]] = t
        a += x.shape[0]
    return weight_from_tensors(fmt, full, shape, group_size)


def fill_from_checkpoint(model: CausalLM, shards: Shards, dtype, quant, group_size):
    if model.lm_head is None and "lm_head.weight" in shards and "model.embed_tokens.weight" not in shards:
        raise UserError(f"{shards.folder}: tie_word_embeddings is set but the checkpoint has only lm_head.weight")
    # plain reads, a slice of rows at a time: neither the float matrix nor safetensors' whole-file
    # mapping stays resident
    with CheckpointReader(shards) as reader:
        for name, module in model.named_modules():           # shapes and types checked before anything is written
            if isinstance(module, (Linear, Embedding)):
                key = f"{name}.weight"
                path, _, (src_dtype, got, _, _) = reader.entry(key)
                _check_tensor(path, key, got, src_dtype, _shape(module))
        if quant is not None:
            quantize_on_load(model, lambda name, shape: reader.matrix_rows(f"{name}.weight", shape, dtype),
                             lambda key, p: _read(shards, key, tuple(p.shape)).to(dtype), quant, group_size,
                             shards.folder)
            return
        for name, module in model.named_modules():
            if isinstance(module, (Linear, Embedding)):
                module.weight = reader.weight(f"{name}.weight", _shape(module), None, dtype=dtype)
    for name, p in list(model.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        t = _read(shards, name, tuple(p.shape)).to(dtype)
        model.get_submodule(mod_name)._parameters[attr] = torch.nn.Parameter(t, requires_grad=False)


def _check_tensor(where, key: str, shape, dtype: torch.dtype, expected) -> None:
    if tuple(shape) != tuple(expected):
        raise UserError(f"{where}: weight {key!r} has shape {list(shape)} but config.json implies {list(expected)}; "
                        "the safetensors files do not match config.json")
    if not dtype.is_floating_point:
        raise UserError(f"{where}: weight {key!r} is {dtype}, not a float tensor; pre-quantized checkpoints "
                        "(GPTQ, AWQ, bitsandbytes) are not supported: use the original float checkpoint")


def _read(shards: Shards, key: str, shape: tuple) -> torch.Tensor:
    """One (small) checkpoint tensor, checked against the shape config.json implies."""
    t = shards.get(key)
    _check_tensor(shards.where[key], key, t.shape, t.dtype, shape)
    return t


# ---- writing ------------------------------------------------------------------------------------

class _ShardWriter:
    """Safetensors files of about `limit` bytes, written as tensors arrive.

    A file's header lists every tensor in it, so a shard's data goes to a side file first and is
    copied behind its header when the shard is full: one tensor in memory at a time, whatever
    the shard size.
    """

    def __init__(self, folder: Path, limit: int):
        self.folder, self.limit = folder, limit
        self.done: list[tuple[Path, list[str]]] = []      # finished shards and their tensors
        self.data = None
        self.entries: dict[str, dict] = {}
        self.size = 0
        self.total = 0

    def add(self, tensors: dict[str, torch.Tensor], layout: dict[str, tuple[tuple, torch.dtype]] | None = None,
            parts=()):
        """Append a group of tensors (one module's), kept in one shard: `tensors` whole, and before them
        the tensors of `layout` ({name: (shape, dtype)}) streamed from `parts`, dicts of consecutive row
        slices of them, each written to its place as it comes (a row slice in memory, not the tensor)."""
        layout = layout or {}
        sizes = {name: math.prod(shape) * dtype.itemsize for name, (shape, dtype) in layout.items()}
        nbytes = sum(sizes.values()) + sum(t.numel() * t.element_size() for t in tensors.values())
        if self.entries and self.size + nbytes > self.limit:
            self._finish()
        if self.data is None:
            self.data = open(self.folder / f"part-{len(self.done) + 1:05d}.data", "wb")
        at = {}
        for name, (shape, dtype) in layout.items():
            self.entries[name] = {"dtype": DTYPE_NAMES[dtype], "shape": list(shape),
                                  "data_offsets": [self.size, self.size + sizes[name]]}
            at[name] = [self.size, self.size + sizes[name]]
            self.size += sizes[name]
        for part in parts:
            for name, t in part.items():
                b = t.detach().cpu().contiguous().reshape(-1).view(torch.uint8)
                pos, end = at[name]
                if t.dtype != layout[name][1] or pos + b.numel() > end:
                    raise ValueError(f"{name}: a {t.dtype} slice of {b.numel()} bytes does not fit the layout "
                                     f"{layout[name]} at {pos - self.entries[name]['data_offsets'][0]}")
                self.data.seek(pos)
                self.data.write(b.numpy().data)
                at[name][0] += b.numel()
        short = [name for name, (pos, end) in at.items() if pos != end]
        if short:
            raise ValueError(f"{short}: the row slices ended before the tensors were full")
        self.data.seek(self.size)
        for name, t in tensors.items():
            t = t.detach().cpu().contiguous()
            n = t.numel() * t.element_size()
            if n:
                self.data.write(t.reshape(-1).view(torch.uint8).numpy().data)
            self.entries[name] = {"dtype": DTYPE_NAMES[t.dtype], "shape": list(t.shape),
                                  "data_offsets": [self.size, self.size + n]}
            self.size += n
        self.total += nbytes

    def _finish(self):
        data_path = Path(self.data.name)
        self.data.close()
        header = json.dumps({"__metadata__": {"format": "pt"}, **self.entries}, separators=(",", ":")).encode()
        header += b" " * (-len(header) % 8)           # tensor data starts 8-byte aligned, as safetensors does
        path = data_path.with_suffix(".safetensors")
        with open(path, "wb") as f, open(data_path, "rb") as d:
            f.write(struct.pack("<Q", len(header)))
            f.write(header)
            shutil.copyfileobj(d, f, 1 << 20)
            f.flush()
            os.fsync(f.fileno())
        data_path.unlink()
        self.done.append((path, list(self.entries)))
        self.data, self.entries, self.size = None, {}, 0

    def close(self) -> list[str]:
        """Finish the last shard, give the shards their final names, write the index if several."""
        if self.entries or self.data is not None:
            self._finish()
        n = len(self.done)
        names = ["model.safetensors"] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
        weight_map = {}
        for (path, keys), name in zip(self.done, names):
            path.rename(self.folder / name)
            weight_map.update({k: name for k in keys})
        if n > 1:
            _write_json(self.folder / INDEX, {"metadata": {"total_size": self.total}, "weight_map": weight_map})
        return names


def _write_json(path: Path, obj: dict):
    with open(path, "w", encoding="utf-8") as f:
        json.dump(obj, f, indent=2, ensure_ascii=False)
        f.write("\n")
        f.flush()
        os.fsync(f.fileno())


def _shape(m) -> tuple[int, int]:
    """[out, in] of a base Linear, [rows, dim] of the embedding."""
    return (m.out_features, m.in_features) if hasattr(m, "out_features") else (m.num_embeddings, m.embedding_dim)


def stored_modules(model) -> list[tuple[str, torch.nn.Module]]:
    """The modules whose tensors a converted folder holds, in model order (a block's tensors lie together)."""
    return [(n, m) for n, m in model.named_modules()
            if isinstance(m, (Linear, Embedding)) or any(True for _ in m.parameters(recurse=False))]


def check_groups(model, quant: str, group_size: int) -> None:
    """Refuse a group size that some matrix's input dimension is not a multiple of, before anything is written."""
    if quant not in ("int4", "nf4"):
        return
    check_group_size(group_size, quant)
    for name, m in model.named_modules():
        if isinstance(m, (Linear, Embedding)) and _shape(m)[1] % group_size:
            raise UserError(f"{quant}: {name} has input dimension {_shape(m)[1]}, not a multiple of the group size "
                            f"{group_size}; choose a --group-size that divides it")


def _storage(model, quant: str, group_size: int) -> int:
    """Bytes a converted folder of `model` in `quant` takes (its tensors; headers are small)."""
    n = 0
    for _, m in stored_modules(model):
        if isinstance(m, (Linear, Embedding)):
            n += sum(math.prod(shape) * dtype.itemsize for shape, dtype in _expected(quant, group_size, _shape(m)).values())
        n += sum(p.numel() * 4 for p in m.parameters(recurse=False))
    return n


def write_weights(folder: Path, model, matrix_rows, param, quant: str, group_size: int,
                  shard_bytes: int = SHARD_BYTES, progress=None) -> None:
    """The tensors of a converted folder, written into `folder` module by module, a row slice at a time.

    Args:
        model: the model (on the meta device or loaded) that names the modules and their shapes.
        matrix_rows: matrix_rows(module name, [out, in]) -> iterable of consecutive float row slices of
            the module's weight; each slice is compressed and written before the next is read.
        param: param(key, parameter) -> the float tensor to store for that norm or bias.
        quant, group_size: the format ("int8", "int4", "nf4").
        progress: called as progress(done, total) after each module.
    """
    check_groups(model, quant, group_size)
    writer = _ShardWriter(folder, shard_bytes)
    modules = stored_modules(model)
    for i, (name, m) in enumerate(modules):
        layout, parts = {}, ()
        if isinstance(m, (Linear, Embedding)):
            layout = {f"{name}.{k}": v for k, v in _expected(quant, group_size, _shape(m)).items()}
            parts = ({f"{name}.{k}": t for k, t in quantize(x, quant, group_size).tensors().items()}
                     for x in matrix_rows(name, _shape(m)))
        writer.add({f"{name}.{pn}": param(f"{name}.{pn}", p) for pn, p in m.named_parameters(recurse=False)},
                   layout, parts)
        if progress is not None:
            progress(i + 1, len(modules))
    writer.close()


def quantize_on_load(model, matrix_rows, param, quant: str, group_size: int, source) -> None:
    """Fill `model` with its weights compressed to `quant` as they are read, file-backed like a converted folder's.

    The compressed tensors are written (`write_weights`) into a temporary folder under the cache
    ($LCSB_CACHE, default ~/.cache/lcsb), mapped as `fill_from_store` maps an `lcsb convert` folder,
    and the folder is deleted at once: the mappings keep the files' data until the process ends.
    The model then costs what a converted folder costs (about one block resident as the engine walks
    the blocks) instead of the whole compressed model in anonymous memory, and loading peaks at one
    row slice. Where the cache has no room for the copy or cannot be written, the weights are
    compressed into RAM instead, with a warning naming the folder. `source` names the model in messages.
    """
    check_groups(model, quant, group_size)
    tmp = _scratch_folder(_storage(model, quant, group_size), source)
    try:
        if tmp is None:
            for name, m in stored_modules(model):
                if isinstance(m, (Linear, Embedding)):
                    m.weight = _assemble(matrix_rows(name, _shape(m)), _shape(m), quant, group_size)
                for pn, p in list(m.named_parameters(recurse=False)):
                    m._parameters[pn] = torch.nn.Parameter(param(f"{name}.{pn}", p).to(model.dtype),
                                                           requires_grad=False)
        else:
            write_weights(tmp, model, matrix_rows, param, quant, group_size)
            fill_from_store(model, tmp, {"format": quant, "group_size": group_size})
    finally:
        if tmp is not None:
            shutil.rmtree(tmp, ignore_errors=True)        # mapped files live on until unmapped (POSIX)
        trim_heap()                                       # the row slices' temporaries, freed


SCRATCH_SPARE = 256 << 20        # free space left beside a quantized copy in the cache


def _scratch_folder(need: int, source) -> Path | None:
    """A fresh folder under the cache for a quantized copy of `need` bytes, or None (with a warning) where
    there is no room or the cache cannot be written. Copies left by killed processes are removed first."""
    root = native.cache_dir()
    fallback = "quantizing in memory (the whole compressed model resident); set LCSB_CACHE to a folder with room, " \
               "or `lcsb convert` the model once and train on the converted folder"
    try:
        root.mkdir(parents=True, exist_ok=True)
        for old in root.glob("quantized-*"):
            pid = old.name.split("-")[1]
            if pid.isdigit() and not _alive(int(pid)):
                shutil.rmtree(old, ignore_errors=True)
        free = shutil.disk_usage(root).free
        if free < need + SCRATCH_SPARE:
            warnings.warn(f"{source}: {root} has {free >> 20} MB free, the quantized copy needs {need >> 20} MB "
                          f"(+{SCRATCH_SPARE >> 20} spare); {fallback}", RuntimeWarning, stacklevel=4)
            return None
        return Path(tempfile.mkdtemp(prefix=f"quantized-{os.getpid()}-", dir=root))
    except OSError as e:
        warnings.warn(f"{source}: cannot write the quantized copy under {root} ({e}); {fallback}",
                      RuntimeWarning, stacklevel=4)
        return None


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except OSError:                                        # someone else's process: alive
        return True
    return True



# ---- converted folders: memory-mapped, read lazily --------------------------------------------

def _parse_header(path: Path, f) -> tuple[int, dict[str, tuple[torch.dtype, list[int], int, int]]]:
    """A safetensors header, checked against the file size -> (data start, {name: (dtype, shape, start, end)})
    with absolute byte offsets. Every problem is a UserError naming the file."""
    size = os.fstat(f.fileno()).st_size
    head = f.read(8)
    if len(head) < 8:
        raise UserError(f"{path}: truncated ({size} bytes, not even a safetensors header); convert the model again")
    (n,) = struct.unpack("<Q", head)
    if n > size - 8 or n > 100 << 20:
        raise UserError(f"{path}: the header says {n} bytes but the file has {size}; the file is truncated or not "
                        "safetensors; convert the model again")
    try:
        header = json.loads(f.read(n))
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise UserError(f"{path}: the safetensors header is not valid JSON ({e}); convert the model again") from None
    if not isinstance(header, dict):
        raise UserError(f"{path}: the safetensors header is not a JSON object; convert the model again")
    header.pop("__metadata__", None)
    start = 8 + n
    entries = {}
    for name, e in header.items():
        try:
            dtype = DTYPES[e["dtype"]]
            shape = [int(s) for s in e["shape"]]
            a, b = (int(x) for x in e["data_offsets"])
        except (KeyError, TypeError, ValueError):
            raise UserError(f"{path}: tensor {name!r} has a malformed header entry; convert the model again") from None
        numel = 1
        for s in shape:
            numel *= s
        if min(shape, default=0) < 0 or a < 0 or b - a != numel * dtype.itemsize:
            raise UserError(f"{path}: tensor {name!r} has a malformed header entry; convert the model again")
        if start + b > size:
            raise UserError(f"{path}: truncated: tensor {name!r} ends at byte {start + b} but the file has {size} "
                            "bytes; convert the model again")
        entries[name] = (dtype, shape, start + a, start + b)
    return start, entries


class _Fd:
    """A file descriptor for reading rows with pread; closed with its last user. Like a mapping, it keeps a
    deleted file's data (quantize-on-load's scratch folder)."""

    def __init__(self, path: Path):
        self.path = path
        self.fd = os.open(path, os.O_RDONLY)

    def __del__(self):
        try:
            os.close(self.fd)
        except (OSError, AttributeError):
            pass

    def read(self, offset: int, out: torch.Tensor) -> torch.Tensor:
        """Fill `out` (contiguous) from the file's bytes at `offset`: a copy that leaves any mapping of the
        file untouched (a page touched there also maps its neighbours, 64 KB of fault-around)."""
        n = out.numel() * out.element_size()
        if n and os.preadv(self.fd, [out.view(-1).view(torch.uint8).numpy()], offset) != n:
            raise UserError(f"{self.path}: shorter than when it was opened; it changed while in use, "
                            "load the model again")
        return out


class _File:
    """One safetensors file, memory-mapped; tensors are zero-copy views into the mapping."""

    def __init__(self, path: Path):
        self.path = path
        try:
            with open(path, "rb") as f:
                self.start, self.entries = _parse_header(path, f)
                self.mm = mmap.mmap(f.fileno(), 0, access=mmap.ACCESS_COPY)
            self.fd = _Fd(path)
        except OSError as e:
            raise UserError(f"{path}: cannot read ({e})") from None

    def tensor(self, name: str) -> tuple[torch.Tensor, tuple[int, int]]:
        """Tensor `name` and its byte range in the file."""
        dtype, shape, a, b = self.entries[name]
        numel = (b - a) // dtype.itemsize
        if numel == 0:
            t = torch.empty(shape, dtype=dtype)
        elif a % dtype.itemsize == 0:
            t = torch.frombuffer(self.mm, dtype=dtype, count=numel, offset=a).view(shape)
        else:                                               # misaligned for its type: copy (never by our writer's choice)
            t = torch.frombuffer(self.mm, dtype=torch.uint8, count=b - a, offset=a).clone().view(dtype).view(shape)
        return t, (a, b)


class _FileBacked:
    """Mixin: a weight whose storage tensors are views of memory-mapped files.

    `release()` gives the pages back (they are re-read from the page cache when next touched);
    `map()` keeps that ability when the new tensors are the same memory (a no-op `.to()`).
    """

    _ranges: tuple = ()          # (mmap, start, length), page-aligned
    _rows_at: dict = {}          # storage suffix -> (_Fd, byte offset of that tensor in the file)

    def release(self) -> None:
        STATS["release"] += 1
        if not hasattr(mmap, "MADV_DONTNEED"):
            return
        for mm, start, length in self._ranges:
            mm.madvise(mmap.MADV_DONTNEED, start, length)

    def rows(self, ids, dtype=torch.float32):
        """Rows `ids` read from the file with pread, not through the mapping. A page touched in the mapping
        brings its whole page-cache folio into our resident set (large folios, readahead-sized): the 255
        target rows of Qwen2.5-0.5B's LM head mapped 59 MB, 146 MB at 3B, the embedding lookup tens of MB;
        pread copies the rows' bytes alone. The rows are then decompressed as the format does."""
        tensors = self.tensors()
        flat = ids.reshape(-1)
        if not self._rows_at or not hasattr(os, "preadv") or flat.numel() == 0:
            return super().rows(ids, dtype)
        want, inverse = torch.unique(flat.cpu(), return_inverse=True)
        picked = {}
        for k, t in tensors.items():
            fd, offset = self._rows_at[k]
            size = t[0].numel() * t.element_size()
            out = torch.empty((len(want), *t.shape[1:]), dtype=t.dtype)
            view = out.view(-1).view(torch.uint8).reshape(len(want), size)
            for i, r in enumerate(want.tolist()):
                fd.read(offset + r * size, view[i])
            picked[k] = out
        return self.with_rows(picked).rows(inverse, dtype).view(*ids.shape, self.shape[1])

    def map(self, fn):
        new = super().map(fn)
        old, now = self.tensors(), new.tensors()
        if all(now[k].data_ptr() == old[k].data_ptr() for k in old):
            return _file_backed(new, self._ranges, self._rows_at)
        return new


class MappedDense(_FileBacked, Dense):
    pass


class MappedInt8(_FileBacked, Int8):
    pass


class MappedInt4(_FileBacked, Int4):
    pass


class MappedNF4(_FileBacked, NF4):
    pass


MAPPED = {Dense: MappedDense, Int8: MappedInt8, Int4: MappedInt4, NF4: MappedNF4}


def _file_backed(w: Weight, ranges, rows_at: dict) -> Weight:
    w.__class__ = MAPPED[type(w)]
    w._ranges, w._rows_at = tuple(ranges), rows_at
    return w


# A page fault on a file mapping maps more than its page: the cached pages of an aligned window around it
# (Linux's fault_around_bytes, 64 KB by default), and on kernels whose page cache holds large folios (ext4 on
# 6.18 here, folios up to 2 MB) the folio's pages. A weight's reads so leave pages of its neighbours resident
# that their own release may never cover (4 MB of Qwen2.5-0.5B's shards after a step with page-exact
# releases). Releases are rounded out to 2 MB windows, the largest folio (a PMD on x86-64 and arm64 with 4 KB
# pages): dropping a neighbour's pages costs it a fault, not a read (no measurable time at 0.5B: 8.3-8.7
# CPU s per step either way, /tmp/fa.py).
RELEASE_WINDOW = 2 << 20


def _page_ranges(spans: list[tuple[mmap.mmap, int, int]]):
    """Byte spans -> merged (mmap, start, length) to release, rounded outwards to RELEASE_WINDOW windows (within
    the mapping)."""
    page = mmap.PAGESIZE
    win = max(RELEASE_WINDOW, page)
    out = []
    for mm, a, b in sorted(spans, key=lambda s: (id(s[0]), s[1])):
        a, b = a // win * win, min(-(-b // win) * win, -(-len(mm) // page) * page)
        if out and out[-1][0] is mm and a <= out[-1][2]:
            out[-1][2] = max(out[-1][2], b)
        else:
            out.append([mm, a, b])
    return [(mm, a, b - a) for mm, a, b in out]


class _Store:
    """Every tensor of a converted folder by name, across its mapped shards."""

    def __init__(self, folder: Path):
        self.folder = folder
        names = shard_files(folder, "convert the model again", "convert the model again")
        self.where: dict[str, _File] = {}
        for name in names:
            path = folder / name
            if not path.exists():
                raise UserError(f"{path} not found, but the index lists it; the converted folder is incomplete")
            f = _File(path)
            for k in f.entries:
                self.where[k] = f

    def get(self, key: str) -> tuple[torch.Tensor, tuple[mmap.mmap, int, int]]:
        f = self.where.get(key)
        if f is None:
            raise UserError(f"{self.folder}: tensor {key!r} is missing from the converted model; "
                            "convert the model again")
        t, (a, b) = f.tensor(key)
        return t, (f.mm, a, b)


def _expected(fmt: str, group_size: int, shape: tuple[int, int]) -> dict[str, tuple[tuple, torch.dtype]]:
    """Storage tensor shapes and types of a [out, in] weight: those of one quantized row, `out` times."""
    one = quantize(torch.zeros(1, shape[1]), fmt, group_size).tensors()
    return {k: ((shape[0], *t.shape[1:]), t.dtype) for k, t in one.items()}


def fill_from_store(model, folder: str | Path, stored: dict):
    """Fill a meta-device model from a converted folder: base weights stay in the files.

    Args:
        model: a `CausalLM` built on the meta device; `model.dtype` is the compute type.
        folder: the converted folder.
        stored: its config.json `quantization` entry ({"format", "group_size", ...}).
    """
    folder = Path(folder)
    where = folder / "config.json"
    if not isinstance(stored, dict) or stored.get("format") not in FORMATS:
        what = stored.get("format") if isinstance(stored, dict) else stored
        raise UserError(f"{where}: quantization format {what!r} is not one lcsb writes ({', '.join(FORMATS)}); "
                        "convert the original checkpoint with `lcsb convert`")
    fmt = stored["format"]
    group_size = stored.get("group_size", 64) if fmt in ("int4", "nf4") else 0
    if fmt in ("int4", "nf4"):
        check_group_size(group_size, f"{where}: quantization")
    store = _Store(folder)
    for name, m in model.named_modules():
        if not isinstance(m, (Linear, Embedding)):
            continue
        shape = _shape(m)
        tensors, spans, rows_at = {}, [], {}
        for suffix, (want_shape, want_dtype) in _expected(fmt, group_size, shape).items():
            key = f"{name}.{suffix}"
            t, span = store.get(key)
            rows_at[suffix] = (store.where[key].fd, span[1])
            ok = tuple(t.shape) == want_shape and (
                t.dtype == want_dtype or (t.dtype.is_floating_point and want_dtype.is_floating_point))
            if not ok:
                raise UserError(f"{store.where[key].path}: {key!r} is {t.dtype} {list(t.shape)} but {fmt} "
                                f"(group {group_size}) and config.json imply {want_dtype} {list(want_shape)}; "
                                "convert the model again")
            tensors[suffix] = t
            spans.append(span)
        m.weight = _file_backed(weight_from_tensors(fmt, tensors, shape, group_size), _page_ranges(spans), rows_at)
    for name, p in list(model.named_parameters()):
        mod_name, _, attr = name.rpartition(".")
        t, _ = store.get(name)
        if tuple(t.shape) != tuple(p.shape):
            raise UserError(f"{store.where[name].path}: {name!r} has shape {list(t.shape)} but config.json implies "
                            f"{list(p.shape)}; convert the model again")
        # norms and biases are small: read into RAM with pread, not through the mapping, where each would
        # leave its 64 KB fault-around window of the neighbouring weights resident (7.2 MB of Qwen2.5-0.5B)
        f = store.where[name]
        own = f.fd.read(f.entries[name][2], torch.empty(t.shape, dtype=t.dtype)) if hasattr(os, "preadv") else t
        model.get_submodule(mod_name)._parameters[attr] = torch.nn.Parameter(
            own.to(model.dtype, copy=own is t), requires_grad=False)
