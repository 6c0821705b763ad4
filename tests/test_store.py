"""Converted folders (lcsb.convert.convert_model, lcsb.model.checkpoint) against quantize-on-load, safetensors, RSS."""

from __future__ import annotations

import json
import mmap
import os
import shutil
import struct
import subprocess
import sys
import textwrap
import weakref
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import save_file

import hf
from lcsb import UserError, load_model
from lcsb.config import LoraConfig
from lcsb.model import materialized
from lcsb.model.linear import Embedding, Linear
from lcsb.convert import convert_model
from lcsb.model import checkpoint as store
from lcsb.quant import formats

FAMILIES = ("llama", "qwen2", "qwen3", "gemma3")
FMTS = ("int8", "int4", "nf4")
GROUP = 32                     # divides every in-dimension of the tiny models (64, 96)
TOKENIZER = {"tokenizer.json": '{"version": "1.0", "model": {"type": "BPE"}}',
             "tokenizer_config.json": '{"eos_token": "</s>"}',
             "chat_template.jinja": "{% for m in messages %}{{ m['content'] }}{% endfor %}"}


@pytest.fixture(scope="module")
def sources(tmp_path_factory):
    """One tiny transformers checkpoint per family, with tokenizer files beside it."""
    root = tmp_path_factory.mktemp("src")
    out = {}
    for fam in FAMILIES:
        hf.make(fam, root / fam)
        for name, text in TOKENIZER.items():
            (root / fam / name).write_text(text)
        out[fam] = root / fam
    return out


def logits(model, seed=0):
    ids = torch.randint(0, model.config.vocab_size, (2, 11), generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        return model(ids)


def header(path: Path) -> tuple[int, dict]:
    """A safetensors header read by hand: (data start, entries)."""
    with open(path, "rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        return 8 + n, json.loads(f.read(n))


# ---- conversion = quantize on load ---------------------------------------------------------------

@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_converted_model_equals_quantize_on_load(sources, tmp_path, family, fmt):
    src = sources[family]
    dst = convert_model(src, tmp_path / "conv", quant=fmt, group_size=GROUP)
    conv = load_model(dst)
    ref = load_model(src, quant=fmt, group_size=GROUP)
    assert conv.quant == fmt
    assert torch.equal(logits(conv), logits(ref))
    # every base weight is stored compressed and comes back file-backed
    for name, m in conv.named_modules():
        if isinstance(m, (Linear, Embedding)):
            assert m.weight.fmt == fmt and isinstance(m.weight, store._FileBacked), name
            r = ref.get_submodule(name).weight
            assert all(torch.equal(m.weight.tensors()[k], r.tensors()[k]) for k in r.tensors()), name
    cfg = json.loads((dst / "config.json").read_text())
    src_cfg = json.loads((src / "config.json").read_text())
    entry = cfg.pop("quantization")
    assert entry["format"] == fmt and entry["lcsb_version"]
    assert entry.get("group_size") == (GROUP if fmt != "int8" else None)
    assert cfg.pop("source") == str(src.resolve())            # the checkpoint it came from: adapters name it
    assert cfg == src_cfg
    for name, text in TOKENIZER.items():
        assert (dst / name).read_text() == text
    assert (dst / "generation_config.json").exists() == (src / "generation_config.json").exists()
    assert not list(tmp_path.glob(".conv*")), "temporary folder left behind"


def test_files_are_standard_safetensors_with_mlx_names(sources, tmp_path):
    dst = convert_model(sources["qwen2"], tmp_path / "conv", quant="int4", group_size=GROUP)
    model = load_model(dst)
    with safe_open(str(dst / "model.safetensors"), "pt") as f:
        keys = set(f.keys())
        assert {"model.layers.0.self_attn.q_proj.weight", "model.layers.0.self_attn.q_proj.scales",
                "model.layers.0.self_attn.q_proj.biases", "model.layers.0.self_attn.q_proj.bias",
                "model.layers.0.input_layernorm.weight", "model.embed_tokens.scales", "model.norm.weight"} <= keys
        assert "lm_head.weight" not in keys                 # tied
        q = model.layers[1].mlp.down_proj.weight
        for suffix, t in q.tensors().items():
            assert torch.equal(f.get_tensor(f"model.layers.1.mlp.down_proj.{suffix}"), t)
        assert f.get_tensor("model.layers.1.post_attention_layernorm.weight").dtype == torch.float32
    # zero copy: two tensors of one file lie as far apart in memory as in the file
    start, entries = header(dst / "model.safetensors")
    w = model.layers[1].self_attn.o_proj.weight
    off = {k: entries[f"model.layers.1.self_attn.o_proj.{k}"]["data_offsets"][0] for k in ("weight", "scales")}
    assert w.scales.data_ptr() - w.packed.data_ptr() == off["scales"] - off["weight"]


def test_bf16_source_and_dtype_option(sources, tmp_path):
    src = tmp_path / "src"
    hf.make("llama", src, dtype=torch.bfloat16)
    same = convert_model(src, tmp_path / "keep", quant="nf4", group_size=GROUP)
    assert torch.equal(logits(load_model(same)), logits(load_model(src, quant="nf4", group_size=GROUP)))
    _, entries = header(same / "model.safetensors")
    assert entries["model.norm.weight"]["dtype"] == "BF16"  # float tensors keep the checkpoint's type

    src32 = sources["qwen3"]
    half = convert_model(src32, tmp_path / "bf16", quant="int4", group_size=GROUP, dtype=torch.bfloat16)
    a = load_model(half, dtype=torch.bfloat16)
    b = load_model(src32, dtype=torch.bfloat16, quant="int4", group_size=GROUP)
    assert torch.equal(logits(a), logits(b))


def test_sharded_source_and_sharded_output(tmp_path):
    src = tmp_path / "src"
    hf.make("llama", src, max_shard_size="100KB")
    assert (src / "model.safetensors.index.json").exists()
    seen = []
    dst = convert_model(src, tmp_path / "conv", quant="int8", shard_bytes=20_000,
                        progress=lambda done, total: seen.append((done, total)))
    files = sorted(p.name for p in dst.glob("*.safetensors"))
    assert len(files) > 2 and files[0] == f"model-00001-of-{len(files):05d}.safetensors"
    index = json.loads((dst / "model.safetensors.index.json").read_text())
    by_file = {}
    for k, f in index["weight_map"].items():
        by_file.setdefault(f, set()).add(k)
    total = 0
    for f, keys in by_file.items():
        start, entries = header(dst / f)
        entries.pop("__metadata__")
        assert set(entries) == keys
        total += max(e["data_offsets"][1] for e in entries.values())
        # a module's tensors stay in one file
        assert all(k.rpartition(".")[0] + ".scales" in keys for k in keys if k.endswith("proj.weight"))
    assert index["metadata"]["total_size"] == total
    assert seen[-1][0] == seen[-1][1] and len(seen) == seen[-1][1]
    assert torch.equal(logits(load_model(dst)), logits(load_model(src, quant="int8")))


@pytest.mark.parametrize("fmt", (None, *FMTS))
def test_checkpoint_reader_slices_equal_whole_tensor_quantize(sources, monkeypatch, fmt):
    from lcsb.model.checkpoint import Shards
    monkeypatch.setattr(store, "CHUNK_ELEMENTS", 500)       # many row slices per matrix
    shards = Shards(sources["qwen2"])
    with store.CheckpointReader(shards) as reader:
        for key, shape in (("model.embed_tokens.weight", (96, 64)), ("model.layers.0.mlp.down_proj.weight", (64, 96))):
            for dtype in (None, torch.bfloat16):
                got = reader.weight(key, shape, fmt, GROUP, dtype)
                whole = shards.get(key) if dtype is None else shards.get(key).to(dtype)
                ref = formats.quantize(whole, fmt, GROUP)
                assert type(got) is type(ref) and got.shape == ref.shape
                assert all(torch.equal(got.tensors()[k], ref.tensors()[k]) for k in ref.tensors()), (key, dtype)
        assert torch.equal(reader.tensor("model.norm.weight", [64]), shards.get("model.norm.weight"))
        with pytest.raises(UserError, match=r"'model\.norm\.weight' has shape \[64\] but config.json implies \[65\]"):
            reader.tensor("model.norm.weight", [65])


# ---- refusals and broken folders -----------------------------------------------------------------

def test_converting_a_converted_folder_is_refused(sources, tmp_path):
    dst = convert_model(sources["llama"], tmp_path / "conv", quant="int4", group_size=GROUP)
    with pytest.raises(UserError, match=r"already quantized \(int4\)"):
        convert_model(dst, tmp_path / "again", quant="int8")
    assert not (tmp_path / "again").exists()


def test_existing_destination_is_refused_unless_overwrite(sources, tmp_path):
    dst = tmp_path / "conv"
    dst.mkdir()
    (dst / "keep.txt").write_text("x")
    with pytest.raises(UserError, match="already exists"):
        convert_model(sources["llama"], dst, quant="int8")
    assert (dst / "keep.txt").exists()
    convert_model(sources["llama"], dst, quant="int8", overwrite=True)
    assert not (dst / "keep.txt").exists() and (dst / "model.safetensors").exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["conv"]
    with pytest.raises(UserError, match="source folder"):
        convert_model(sources["llama"], sources["llama"], quant="int8", overwrite=True)


def test_group_size_is_checked_before_writing(sources, tmp_path):
    with pytest.raises(UserError, match=r"down_proj has input dimension 96, not a multiple of the group size 64"):
        convert_model(sources["llama"], tmp_path / "conv", quant="int4", group_size=64)
    with pytest.raises(UserError, match="unknown quantization"):
        convert_model(sources["llama"], tmp_path / "conv", quant="int2")
    assert list(tmp_path.iterdir()) == []


def test_failed_conversion_leaves_nothing(sources, tmp_path):
    # config.json promises a fourth layer the weights lack: the failure comes mid-way through writing
    src = tmp_path / "src"
    shutil.copytree(sources["qwen2"], src)
    cfg = json.loads((src / "config.json").read_text())
    cfg["num_hidden_layers"] += 1
    (src / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"model\.layers\.3\.input_layernorm\.weight. is missing"):
        convert_model(src, tmp_path / "conv", quant="int4", group_size=GROUP, shard_bytes=10_000)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["src"]


def test_truncated_shard_names_the_file(sources, tmp_path):
    dst = convert_model(sources["llama"], tmp_path / "conv", quant="int4", group_size=GROUP, shard_bytes=40_000)
    shard = sorted(dst.glob("*.safetensors"))[1]
    with open(shard, "r+b") as f:
        f.truncate(shard.stat().st_size - 100)
    with pytest.raises(UserError, match=rf"{shard.name}: truncated: tensor .* convert the model again"):
        load_model(dst)
    with open(shard, "r+b") as f:
        f.truncate(5)
    with pytest.raises(UserError, match=rf"{shard.name}: truncated"):
        load_model(dst)
    shard.write_bytes(struct.pack("<Q", 10) + b"not json!!")
    with pytest.raises(UserError, match=rf"{shard.name}: the safetensors header is not valid JSON"):
        load_model(dst)
    shard.unlink()
    with pytest.raises(UserError, match=rf"{shard.name} not found"):
        load_model(dst)


def test_bad_quantization_entry_and_missing_tensor(sources, tmp_path):
    dst = convert_model(sources["qwen3"], tmp_path / "conv", quant="nf4", group_size=GROUP)
    cfg_path = dst / "config.json"
    cfg = json.loads(cfg_path.read_text())
    cfg["quantization"] = {"format": "gptq", "bits": 4}
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match="quantization format 'gptq' is not one lcsb writes"):
        load_model(dst)
    cfg["quantization"] = {"format": "nf4", "group_size": 64}    # does not match the tensors
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"absmax' is .* but nf4 \(group 64\)"):
        load_model(dst)
    cfg["quantization"] = {"format": "nf4", "group_size": GROUP}
    cfg["num_hidden_layers"] += 1
    cfg_path.write_text(json.dumps(cfg))
    with pytest.raises(UserError, match=r"'model\.layers\.3\.self_attn\.q_proj\.weight' is missing"):
        load_model(dst)


# ---- lazy reading and page release ---------------------------------------------------------------

def test_release_after_materialized_and_values_survive_it(sources, tmp_path):
    dst = convert_model(sources["gemma3"], tmp_path / "conv", quant="int4", group_size=GROUP)
    model = load_model(dst)
    before = logits(model)
    block = model.layers[1]
    linears = [m for m in block.modules() if isinstance(m, Linear)]
    ref = [m.weight.dequantize() for m in linears]
    n = store.STATS["release"]
    with materialized(block):
        pass
    assert store.STATS["release"] == n + len(linears)
    # the pages come back from the file when touched again
    assert all(torch.equal(m.weight.dequantize(), r) for m, r in zip(linears, ref))
    for b in model.layers:                                  # the engine's walk
        with materialized(b):
            pass
    model.model.embed_tokens.weight.release()
    assert torch.equal(logits(model), before)
    w = linears[0].weight
    assert w._ranges and all(start % mmap.PAGESIZE == 0 and length % mmap.PAGESIZE == 0
                             for _, start, length in w._ranges)


def test_device_moves_keep_or_drop_file_backing(sources, tmp_path):
    dst = convert_model(sources["llama"], tmp_path / "conv", quant="int4", group_size=GROUP)
    model = load_model(dst)
    model.to(torch.float32)                                 # no-op move: still the mapped memory
    assert isinstance(model.layers[0].mlp.up_proj.weight, store._FileBacked)
    model.to(torch.bfloat16)                                # scales converted: plain RAM weights now
    w = model.layers[0].mlp.up_proj.weight
    assert type(w) is formats.Int4 and w.scales.dtype == torch.bfloat16


@pytest.mark.parametrize("fmt", FMTS)
def test_row_gathers_read_the_file_and_equal_the_mapped_rows(sources, tmp_path, monkeypatch, fmt):
    """Embedding lookups and the LM head's target rows are read with pread; they equal the rows of the same
    storage held in RAM, for any ids shape, repeats included, and in the compute types."""
    dst = convert_model(sources["llama"], tmp_path / "conv", quant=fmt, group_size=GROUP)  # llama: untied head
    model = load_model(dst)
    calls = []
    preadv = os.preadv
    monkeypatch.setattr(os, "preadv", lambda *a: calls.append(1) or preadv(*a))
    g = torch.Generator().manual_seed(int.from_bytes(os.urandom(2), "little"))
    for w in (model.model.embed_tokens.weight, model.head_weight()):
        assert isinstance(w, store._FileBacked)
        in_ram = formats.weight_from_tensors(w.fmt, {k: v.clone() for k, v in w.tensors().items()}, w.shape,
                                             w.group_size)
        ids = torch.randint(0, w.shape[0], (3, 7), generator=g)
        ids[2, 3] = ids[0, 1]                                   # a repeat
        for dtype in (torch.float32, torch.bfloat16):
            n = len(calls)
            got = w.rows(ids, dtype)
            assert len(calls) > n                               # read from the file, not through the mapping
            assert got.shape == (3, 7, w.shape[1]) and got.dtype == dtype
            assert torch.equal(got, in_ram.rows(ids, dtype))
        assert torch.equal(w.rows(ids), in_ram.dequantize(torch.float32)[ids])


def mapped_rss(folder) -> int:
    """Resident bytes of this process's mappings of files under `folder` (/proc/self/smaps)."""
    total, inside = 0, False
    for line in open("/proc/self/smaps"):
        parts = line.split()
        if parts and "-" in parts[0] and not parts[0].endswith(":"):
            inside = len(parts) > 5 and parts[5].startswith(str(folder))
        elif inside and parts[0] == "Rss:":
            total += int(parts[1]) * 1024
    return total


def test_loading_and_steps_leave_no_page_of_the_files_resident(sources, tmp_path):
    """Norms and biases are read with pread: read through the mapping, each left its 64 KB fault-around window
    of the neighbouring weights resident (7.2 MB of Qwen2.5-0.5B's shards after loading)."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux /proc/self/smaps")
    dst = convert_model(sources["qwen2"], tmp_path / "conv", quant="int8")      # qwen2: q/k/v biases too
    model = load_model(dst, lora=LoraConfig(4))
    assert mapped_rss(dst) == 0
    # nor does a step: each weight's release covers the fault-around windows its reads mapped (4 MB of
    # Qwen2.5-0.5B's neighbouring weights stayed after a step when releases covered the weight's own pages)
    from lcsb.engine.executor import run_step
    ids = torch.randint(0, model.config.vocab_size, (1, 12), generator=torch.Generator().manual_seed(0))
    for decompress in ("linear", "block"):
        run_step(model, ids, ids, ["train"] * model.config.num_layers, decompress=decompress)
        assert mapped_rss(dst) == 0, decompress
    name = "model.layers.0.input_layernorm.weight"
    t, _ = store._Store(dst).get(name)
    assert torch.equal(t, dict(model.named_parameters())[name].detach())      # the control touches the mapping
    assert mapped_rss(dst) > 0


RSS_PRELUDE = textwrap.dedent("""
    import json, sys
    import torch
    from lcsb import load_model

    def rss(field="RssFile"):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise SystemExit(f"no {field}")

    rss_file = rss
    torch.set_num_threads(1)
""")


def int8_store(folder: Path, hidden: int, inter: int, layers: int, vocab: int, shard_per_block=False) -> dict:
    """An int8 converted store written directly (no float model), random weights, llama names; one shard, or
    the embedding and each block in its own. Returns the block's matrix shapes {name: (out, in)}."""
    folder.mkdir()
    (folder / "config.json").write_text(json.dumps(dict(
        architectures=["LlamaForCausalLM"], model_type="llama", hidden_size=hidden, intermediate_size=inter,
        num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8, vocab_size=vocab,
        tie_word_embeddings=True, rms_norm_eps=1e-5, max_position_embeddings=128, hidden_act="silu",
        quantization={"format": "int8"})))
    g = torch.Generator().manual_seed(0)
    shapes = {"self_attn.q_proj": (hidden, hidden), "self_attn.k_proj": (hidden, hidden),
              "self_attn.v_proj": (hidden, hidden), "self_attn.o_proj": (hidden, hidden),
              "mlp.gate_proj": (inter, hidden), "mlp.up_proj": (inter, hidden), "mlp.down_proj": (hidden, inter)}

    def int8(prefix, out, inp):
        return {f"{prefix}.weight": torch.randint(-127, 128, (out, inp), dtype=torch.int8, generator=g),
                f"{prefix}.scales": torch.full((out,), 1e-3)}

    shards = {"embed.safetensors": {**int8("model.embed_tokens", vocab, hidden), "model.norm.weight": torch.ones(hidden)}}
    for i in range(layers):
        t = {f"model.layers.{i}.{n}.weight": torch.ones(hidden) for n in ("input_layernorm", "post_attention_layernorm")}
        for name, (o, k) in shapes.items():
            t.update(int8(f"model.layers.{i}.{name}", o, k))
        shards[f"layer{i}.safetensors"] = t
    if not shard_per_block:
        shards = {"model.safetensors": {k: v for t in shards.values() for k, v in t.items()}}
    for name, t in shards.items():
        save_file(t, str(folder / name))
        with open(folder / name, "rb") as f:      # read once, as a first load would, into the page cache
            while f.read(1 << 24):
                pass
    if shard_per_block:
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"weight_map": {k: name for name, t in shards.items() for k in t}}))
    return shapes


def rss_child(script: str, folder: Path, **env) -> dict:
    """Run `script` (after RSS_PRELUDE) on `folder` in a fresh process with `env` added; its last line of output,
    as JSON."""
    r = subprocess.run([sys.executable, "-c", RSS_PRELUDE + script, str(folder)], capture_output=True, text=True,
                       env=dict(os.environ, PYTHONPATH=os.pathsep.join(sys.path), **env), timeout=300)
    if r.returncode:
        if "no Rss" in r.stderr + r.stdout:
            pytest.skip("this kernel does not report RssFile / RssAnon")
        raise AssertionError(r.stderr[-2000:])
    return json.loads(r.stdout.strip().splitlines()[-1])


RSS_ROWS_CHILD = textwrap.dedent("""
    w = load_model(sys.argv[1]).model.embed_tokens.weight
    g = torch.Generator().manual_seed(1)
    w.rows(torch.randint(0, w.shape[0], (255,), generator=g))     # warm-up: code pages
    w.release()
    growth = {}
    for how in ("pread", "mapping"):
        if how == "mapping":
            w._rows_at = {}                                       # the control: gather through the mapping
        base = rss_file()
        w.rows(torch.randint(0, w.shape[0], (255,), generator=g))
        growth[how] = rss_file() - base
        w.release()
    print(json.dumps(growth))
""")


def test_row_gather_does_not_map_the_table(tmp_path):
    """255 random rows of a 64 MB int8 table: pread adds about their bytes to the resident set. Through the
    mapping, each row may bring in its whole page-cache folio (tens of MB where the page cache holds large
    folios, as on kernels with readahead-sized folios); the control shows what this machine does."""
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux /proc/self/status")
    vocab, hidden = 65536, 1024
    int8_store(tmp_path / "store", hidden, 64, 1, vocab)
    growth = rss_child(RSS_ROWS_CHILD, tmp_path / "store")
    print({k: round(v / 2**20, 2) for k, v in growth.items()}, "MB; rows", round(255 * (hidden + 4) / 2**20, 2), "MB")
    assert growth["pread"] < 2 << 20, growth            # the rows and the odd code page, never the table


def test_quantize_on_load_holds_one_float_tensor_at_a_time(sources, monkeypatch):
    """Quantize-on-load reads row slices with plain reads; at most the previous slice is still
    referenced when the next is read, so the float matrix never exists whole."""
    live: list[weakref.ref] = []
    worst = [0]
    rows = store.CheckpointReader.rows

    def tracking_rows(self, key, a, b):
        t = rows(self, key, a, b)
        if t.dim() == 2:
            worst[0] = max(worst[0], sum(r() is not None for r in live))
            live.append(weakref.ref(t))
        return t

    monkeypatch.setattr(store.CheckpointReader, "rows", tracking_rows)
    monkeypatch.setattr(store, "CHUNK_ELEMENTS", 512)     # several slices per matrix
    load_model(sources["llama"], quant="int4", group_size=GROUP)
    assert len(live) > 10 and worst[0] <= 1


RSS_CHILD = textwrap.dedent("""
    from lcsb.model import materialized
    from lcsb.model import checkpoint as store

    model = load_model(sys.argv[1])

    def walk():
        # file-backed resident bytes after each block, above those before the walk
        base = rss_file()
        growth = []
        for block in model.layers:
            with materialized(block):
                pass
            growth.append(rss_file() - base)
        return growth

    walk()                                     # warm-up: fault in the code pages the kernels need
    released = walk()
    store._FileBacked.release = lambda self: None       # the control: pages are never handed back
    kept = walk()
    print(json.dumps({"released": released, "kept": kept}))
""")


def test_rss_stays_near_one_block(tmp_path):
    if not sys.platform.startswith("linux") or not hasattr(mmap, "MADV_DONTNEED"):
        pytest.skip("needs Linux /proc/self/status and madvise(MADV_DONTNEED)")
    # 6 blocks of ~12.6 MB, each in its own shard
    layers = 6
    shapes = int8_store(tmp_path / "store", 1024, 2816, layers, 256, shard_per_block=True)
    block = sum(o * k for o, k in shapes.values())
    model_bytes = layers * block
    out = rss_child(RSS_CHILD, tmp_path / "store")
    print({k: [v >> 20 for v in vs] for k, vs in out.items()}, "MB; block", block >> 20, "MB")
    released, kept = out["released"], out["kept"]
    # the control must see the whole model resident, or this platform does not count mapped pages
    if kept[-1] < 0.8 * model_bytes:
        pytest.skip(f"mapped pages are not counted as resident here (control grew {kept[-1] >> 20} MB)")
    # after each block the file-backed resident set is back to about nothing; never near the model
    assert max(released) < 1.5 * block, (released, block)
    assert released[-1] < 0.5 * block, (released, block)


# ---- quantize on load: through a scratch converted folder ----------------------------------------

@pytest.fixture
def cache(tmp_path, monkeypatch):
    root = tmp_path / "cache"
    monkeypatch.setenv("LCSB_CACHE", str(root))
    return root


@pytest.mark.parametrize("fmt", FMTS)
@pytest.mark.parametrize("family", FAMILIES)
def test_quantize_on_load_is_file_backed_and_equals_quantizing_the_tensors(sources, cache, family, fmt):
    src = sources[family]
    for dtype in (torch.float32, torch.bfloat16):
        model = load_model(src, dtype=dtype, quant=fmt, group_size=GROUP)
        with safe_open(str(src / "model.safetensors"), "pt") as f:       # the reference: safetensors' own reader
            for name, m in model.named_modules():
                if isinstance(m, (Linear, Embedding)):
                    ref = formats.quantize(f.get_tensor(f"{name}.weight").to(dtype), fmt, GROUP)
                    assert isinstance(m.weight, store._FileBacked) and m.weight.fmt == fmt, name
                    got = m.weight.tensors()
                    assert all(torch.equal(got[k], v) for k, v in ref.tensors().items()), (name, dtype)
            for name, p in model.named_parameters():
                assert p.dtype == dtype and torch.equal(p, f.get_tensor(name).to(dtype)), name
        assert model.quant == fmt
        assert not list(cache.glob("quantized-*")), "the scratch folder is deleted once mapped"
        # the mapped copy outlives its deleted files: the model still computes
        assert torch.isfinite(logits(model)).all()


def test_quantize_on_load_without_room_compresses_in_memory(sources, cache, monkeypatch):
    src = sources["qwen2"]
    mapped = load_model(src, quant="int4", group_size=GROUP)
    free = type("Usage", (), {"free": 1 << 20})
    monkeypatch.setattr(store.shutil, "disk_usage", lambda path: free)
    with pytest.warns(RuntimeWarning, match=rf"{cache}.* 1 MB free, the quantized copy needs .*LCSB_CACHE"):
        in_ram = load_model(src, quant="int4", group_size=GROUP)
    assert not any(isinstance(m.weight, store._FileBacked) for m in in_ram.modules() if isinstance(m, Linear))
    assert torch.equal(logits(in_ram), logits(mapped))


def test_quantize_on_load_with_an_unwritable_cache_warns_and_loads(sources, tmp_path, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    monkeypatch.setenv("LCSB_CACHE", str(blocker / "cache"))             # cannot be created under a file
    with pytest.warns(RuntimeWarning, match="cannot write the quantized copy"):
        model = load_model(sources["llama"], quant="int8")
    assert torch.isfinite(logits(model)).all()


def test_scratch_copies_of_dead_processes_are_removed(sources, cache):
    dead = subprocess.run([sys.executable, "-c", "import os; print(os.getpid())"], capture_output=True, text=True)
    stale = cache / f"quantized-{int(dead.stdout)}-abc"
    live = cache / f"quantized-{os.getpid()}-xyz"                   # this process: alive, kept
    for d in (stale, live):
        d.mkdir(parents=True)
        (d / "model.safetensors").write_bytes(b"x")
    load_model(sources["llama"], quant="int8")
    assert not stale.exists() and live.exists()


def test_streamed_shard_writer_refuses_slices_that_do_not_fill_the_layout(tmp_path):
    w = store._ShardWriter(tmp_path, 1 << 20)
    layout = {"a": ((4, 2), torch.float32)}
    with pytest.raises(ValueError, match="ended before"):
        w.add({}, layout, [{"a": torch.zeros(3, 2)}])
    w = store._ShardWriter(tmp_path, 1 << 20)
    with pytest.raises(ValueError, match="does not fit"):
        w.add({}, layout, [{"a": torch.zeros(5, 2)}])
    w = store._ShardWriter(tmp_path, 1 << 20)                         # slices land in their tensors' places
    w.add({"n": torch.arange(3.0)}, {"a": ((4, 2), torch.float32), "b": ((4,), torch.int8)},
          [{"a": torch.ones(1, 2), "b": torch.tensor([1], dtype=torch.int8)},
           {"a": torch.full((3, 2), 2.0), "b": torch.tensor([2, 3, 4], dtype=torch.int8)}])
    w.close()
    with safe_open(str(tmp_path / "model.safetensors"), "pt") as f:
        assert torch.equal(f.get_tensor("a"), torch.tensor([[1.0, 1], [2, 2], [2, 2], [2, 2]]))
        assert torch.equal(f.get_tensor("b"), torch.tensor([1, 2, 3, 4], dtype=torch.int8))
        assert torch.equal(f.get_tensor("n"), torch.arange(3.0))


ANON_CHILD = textwrap.dedent("""
    base = rss("RssAnon")
    model = load_model(sys.argv[1], quant="int8")
    print(json.dumps({"anon": rss("RssAnon") - base}))
""")


def test_quantize_on_load_does_not_hold_the_compressed_model_in_anonymous_memory(tmp_path):
    if not sys.platform.startswith("linux"):
        pytest.skip("needs Linux /proc/self/status")
    src = tmp_path / "src"
    hf.make("llama", src, dtype=torch.bfloat16, hidden_size=1024, intermediate_size=2816, num_hidden_layers=4,
            num_attention_heads=8, num_key_value_heads=8, vocab_size=256)
    compressed = 4 * (4 * 1024 * 1024 + 3 * 1024 * 2816)                # int8: a byte per weight of the blocks

    def child(**env):
        return rss_child(ANON_CHILD, src, **env)["anon"]

    mapped = child(LCSB_CACHE=str(tmp_path / "cache"))
    in_ram = child(LCSB_CACHE=str(src / "config.json" / "cache"))     # the control: no scratch folder possible
    print({"mapped": mapped >> 20, "in_ram": in_ram >> 20, "compressed": compressed >> 20}, "MB")
    assert in_ram > 0.8 * compressed                  # the control holds the model: the measure sees it
    assert mapped < 0.3 * compressed
