"""Gradient fidelity report on a tiny random llama with a random non-zero LoRA."""

from __future__ import annotations

import json
import math

import pytest
import torch

from hf import make
from lcsb import LoraConfig, load_model, lora_gradients
from lcsb.cli import main
from lcsb.engine.fidelity import default_selections, fidelity, format_table
from lcsb.engine.selection import Selection

N = 4


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    make("llama", folder, num_hidden_layers=N)
    return folder


def lora_model(folder, dropout=0.0):
    model = load_model(folder, lora=LoraConfig(rank=4, alpha=8, dropout=dropout))
    gen = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for k, p in model.lora_parameters().items():
            # a fresh B is zero, which zeroes A's gradient; A is drawn again so the model is reproducible
            p.copy_(torch.randn(p.shape, generator=gen) * (0.1 if ".lora_B." in k else 0.2))
    return model


def batches():
    gen = torch.Generator().manual_seed(1)
    out = []
    for _ in range(2):
        ids = torch.randint(0, 96, (2, 10), generator=gen)
        labels = ids.clone()
        labels[0, :4] = -100                         # a masked prompt
        out.append((ids, labels))
    return out


@pytest.fixture(scope="module")
def rows(checkpoint):
    return fidelity(lora_model(checkpoint), batches(), default_selections(N))


def by_method(rows):
    out = {}
    for r in rows:
        out.setdefault(r["method"], []).append(r)
    return out


def exact(r, tol=1e-5):
    return abs(r["cosine"] - 1) < tol and abs(r["rel_norm"] - 1) < tol


def test_full_lcsb_exact_and_topdown_are_exact(rows):
    m = by_method(rows)
    for name in ("full", f"lcsb-exact K={N}", "topdown top 1, all every 4"):
        assert sorted({r["block"] for r in m[name] if r["block"] != "all"}) == list(range(N))
        assert all(exact(r) for r in m[name]), m[name]


def test_every_lcsb_block_covered_once(rows):
    m = by_method(rows)
    for name, sel in default_selections(N).items():
        if sel.method.startswith("lcsb"):
            blocks = [r["block"] for r in m[name] if r["block"] != "all"]
            assert sorted(blocks) == list(range(N)), name


def test_exact_iff_nothing_above_is_skipped(rows):
    """A trained block's gradient is exact when every block above it is visited (train or through);
    under lcsb a skipped block above makes it approximate. The top block is always exact."""
    sels = default_selections(N)
    approx_seen = 0
    for r in rows:
        if r["block"] == "all":
            continue
        roles = sels[r["method"]].roles(r["step"], N)
        above = roles[r["block"] + 1:]
        if "skip" not in above:
            assert exact(r), r
        else:
            assert r["cosine"] < 1 - 1e-4, r
            approx_seen += 1
        if r["block"] == N - 1:
            assert exact(r), r
    assert approx_seen >= 5


def test_lcsb_lower_blocks_approximate_top_group_exact(rows):
    m = by_method(rows)
    k2 = {r["block"]: r for r in m["lcsb K=2 contiguous"] if r["block"] != "all"}
    assert exact(k2[2]) and exact(k2[3])             # the top group: only trained blocks above
    assert k2[0]["cosine"] < 0.9999 and k2[1]["cosine"] < 0.9999
    strided = {r["block"]: r for r in m["lcsb K=2 strided"] if r["block"] != "all"}
    assert exact(strided[3]) and all(strided[b]["cosine"] < 0.9999 for b in range(3))
    for name in m:
        assert all(-1 <= r["cosine"] <= 1 + 1e-9 and r["rel_norm"] > 0 for r in m[name]), name


def test_row_against_direct_computation(checkpoint, rows):
    """Recompute one approximate row and the method's overall row from lora_gradients directly."""
    model = lora_model(checkpoint)
    name, sel = "lcsb K=2 strided", default_selections(N)["lcsb K=2 strided"]

    def mean_grads(roles):
        gs = [lora_gradients(model, ids, labels, roles)[1] for ids, labels in batches()]
        return {k: sum(g[k].double() for g in gs) / len(gs) for k in gs[0]}

    ref = mean_grads(["train"] * N)
    got = {}
    for step in (0, 1):
        got.update(mean_grads(sel.roles(step, N)))
    assert set(got) == set(ref)

    def block_vec(g, b):
        return torch.cat([v.flatten() for k, v in sorted(g.items()) if f".layers.{b}." in k])

    table = {r["block"]: r for r in rows if r["method"] == name}
    for b in range(N):
        x, y = block_vec(got, b), block_vec(ref, b)
        assert table[b]["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(x, y, dim=0)), abs=1e-9)
        assert table[b]["rel_norm"] == pytest.approx(float(x.norm() / y.norm()), rel=1e-9)
    x = torch.cat([block_vec(got, b) for b in range(N)])
    y = torch.cat([block_vec(ref, b) for b in range(N)])
    assert table["all"]["cosine"] == pytest.approx(float(torch.nn.functional.cosine_similarity(x, y, dim=0)), abs=1e-9)
    assert table["all"]["rel_norm"] == pytest.approx(float(x.norm() / y.norm()), rel=1e-9)
    assert table[0]["rel_norm"] != pytest.approx(1, abs=1e-3)


def test_overall_row(rows):
    m = by_method(rows)
    for name, rs in m.items():
        alls = [r for r in rs if r["block"] == "all"]
        assert len(alls) == 1 and rs[-1] is alls[0], name
    assert exact(m["full"][-1]) and m["lcsb K=4 contiguous"][-1]["cosine"] < 0.9999


def test_dropout_masks_match_the_exact_run(checkpoint):
    model = lora_model(checkpoint, dropout=0.3)
    model.train()
    sels = {"lcsb-exact": Selection("lcsb-exact", groups=2), "lisa": Selection("lisa", active=2, seed=3)}
    out = fidelity(model, batches()[:1], sels, step=1)
    assert all(exact(r) for r in out), out


def test_format_table(rows):
    text = format_table(rows)
    lines = text.splitlines()
    names = list(default_selections(N))
    assert len(lines) == 2 + len(names)
    for name, line in zip(names, lines[2:]):
        assert line.startswith(name)
        nums = [float(x) for x in line[len(name):].split()]
        assert len(nums) == 6 and not any(math.isnan(x) for x in nums)
    full = lines[2 + names.index("full")].split()
    assert full[-5:] == ["1.0000"] * 5
    detail = format_table(rows, detail=True)
    assert sum(l.lstrip().startswith("block ") for l in detail.splitlines()) == sum(r["block"] != "all" for r in rows)


def test_cli_writes_the_rows_as_json(tiny4, chat_data, tmp_path, capsys):
    out = tmp_path / "fidelity.json"
    assert main(["bench", "fidelity", "--model", str(tiny4), "--data", str(chat_data), "--batches", "1",
                 "--rank", "4", "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    rows = json.loads(out.read_text())["rows"]
    assert {r["method"] for r in rows} == set(default_selections(4))
    assert all(r["method"] in printed for r in rows)
    top = [r for r in rows if r["method"] == "topdown top 1, all every 4" and r["block"] != "all"]
    assert sorted(r["block"] for r in top) == [0, 1, 2, 3, 3] and all(exact(r, 1e-4) for r in top)
