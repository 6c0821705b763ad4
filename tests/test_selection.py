"""Selection policies (DESIGN.md section 4): coverage, roles, determinism, validation."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections import Counter

import pytest

from lcsb.engine import selection
from lcsb.engine.selection import Selection, groups_of
from lcsb.errors import UserError

NS = range(1, 14)


def cases():
    for n in NS:
        for k in range(1, n + 1):
            yield n, k


# ---- lcsb coverage ---------------------------------------------------------------------------

@pytest.mark.parametrize("grouping", ["contiguous", "strided"])
@pytest.mark.parametrize("interval", [1, 3])
def test_lcsb_trains_every_block_interval_times_per_window(grouping, interval):
    for method in ("lcsb", "lcsb-exact"):
        for n, k in cases():
            sel = Selection(method, groups=k, grouping=grouping, interval=interval).validate(n)
            trained = [sel.trained(t, n) for t in range(3 * k * interval + interval)]
            for start in range(0, len(trained) - k * interval + 1, interval):
                count = Counter(b for t in range(start, start + k * interval) for b in trained[t])
                assert count == Counter({b: interval for b in range(n)}), (method, n, k, start)
            # the group only changes at multiples of the interval
            for t in range(len(trained)):
                assert trained[t] == trained[t - t % interval]


def test_lcsb_interval_1_any_k_consecutive_steps():
    for grouping in ("contiguous", "strided"):
        for n, k in cases():
            sel = Selection("lcsb", groups=k, grouping=grouping)
            for start in range(2 * k):
                blocks = [b for t in range(start, start + k) for b in sel.trained(t, n)]
                assert sorted(blocks) == list(range(n)), (grouping, n, k, start)


def test_groups_partition_layers():
    for n, k in cases():
        for grouping in ("contiguous", "strided"):
            gs = groups_of(n, k, grouping)
            assert len(gs) == k
            assert sorted(b for g in gs for b in g) == list(range(n))
            sizes = [len(g) for g in gs]
            assert max(sizes) - min(sizes) <= 1 and min(sizes) >= 1, (n, k, grouping, sizes)
        for g in groups_of(n, k, "contiguous"):
            assert g == list(range(g[0], g[-1] + 1)), (n, k, g)
        for gi, g in enumerate(groups_of(n, k, "strided")):
            assert all(b % k == gi for b in g)


# ---- roles ------------------------------------------------------------------------------------

def test_lcsb_roles_train_or_skip():
    for n, k in cases():
        sel = Selection("lcsb", groups=k)
        for t in range(k):
            chosen = set(sel.trained(t, n))
            assert sel.roles(t, n) == ["train" if i in chosen else "skip" for i in range(n)]


@pytest.mark.parametrize("grouping", ["contiguous", "strided"])
def test_lcsb_exact_roles_through_above_lowest(grouping):
    for n, k in cases():
        sel = Selection("lcsb-exact", groups=k, grouping=grouping)
        for t in range(k):
            chosen = set(sel.trained(t, n))
            low = min(chosen)
            expect = ["train" if i in chosen else "through" if i > low else "skip" for i in range(n)]
            assert sel.roles(t, n) == expect


def test_lisa_roles_and_switching():
    n, k, interval = 10, 3, 4
    for seed in range(5):
        sel = Selection("lisa", active=k, interval=interval, seed=seed).validate(n)
        sets = []
        for t in range(40 * interval):
            roles = sel.roles(t, n)
            chosen = [i for i, r in enumerate(roles) if r == "train"]
            assert len(chosen) == k
            low = chosen[0]
            assert all(r == "skip" for r in roles[:low])
            assert all(r in ("train", "through") for r in roles[low:])
            if t % interval:
                assert chosen == sets[-1]         # fixed within an interval
            else:
                sets.append(chosen)
        # changes across intervals: 40 draws of C(10,3)=120 sets are not all the same
        assert sum(a != b for a, b in zip(sets, sets[1:])) >= 30
        # every block gets picked eventually
        assert set().union(*map(set, sets)) == set(range(n))


def test_random_roles():
    n, k = 9, 3
    sel = Selection("random", active=k, seed=3).validate(n)
    seen = set()
    for t in range(60):
        roles = sel.roles(t, n)
        chosen = [i for i, r in enumerate(roles) if r == "train"]
        assert len(chosen) == k and all(r == "skip" for r in roles if r != "train")
        seen.add(tuple(chosen))
    assert len(seen) > 30   # drawn afresh each step


@pytest.mark.parametrize("order", ["ascending", "descending", "random"])
@pytest.mark.parametrize("interval", [1, 2])
def test_badam_visits_every_block_once_per_n_switches(order, interval):
    for n in NS:
        sel = Selection("badam", order=order, interval=interval, seed=7).validate(n)
        switches = [sel.trained(s * interval, n) for s in range(3 * n)]
        for s in range(3 * n * interval):
            assert sel.trained(s, n) == switches[s // interval]
        for c in range(3):
            assert sorted(b for sw in switches[c * n:(c + 1) * n] for (b,) in [sw]) == list(range(n))
        if order == "ascending":
            assert [b for (b,) in switches[:n]] == list(range(n))
        if order == "descending":
            assert [b for (b,) in switches[:n]] == list(range(n - 1, -1, -1))
        for s in range(3 * n):
            (b,) = switches[s]
            assert sel.roles(s * interval, n) == ["skip"] * b + ["train"] + ["through"] * (n - 1 - b)


def test_badam_random_order_changes_between_passes():
    n = 8
    sel = Selection("badam", order="random", seed=1)
    passes = {tuple(sel.trained(s, n)[0] for s in range(c * n, (c + 1) * n)) for c in range(6)}
    assert len(passes) > 1   # a fresh permutation each pass


def test_freeze_trains_top_k_always():
    for n, k in cases():
        sel = Selection("freeze", active=k).validate(n)
        for t in (0, 1, 5, 100):
            assert sel.roles(t, n) == ["skip"] * (n - k) + ["train"] * k


def test_full_trains_all():
    for n in NS:
        for t in (0, 3):
            assert Selection("full").validate(n).roles(t, n) == ["train"] * n


# ---- determinism ---------------------------------------------------------------------------

SEEDED = [
    dict(method="random", active=3),
    dict(method="lisa", active=2, interval=3),
    dict(method="badam", order="random", interval=2),
]


def roles_table(seed: int, n: int = 11, steps: int = 40) -> dict:
    return {kw["method"]: [Selection(seed=seed, **kw).roles(t, n) for t in range(steps)] for kw in SEEDED}


def test_same_seed_same_roles_different_seed_different():
    a, b, c = roles_table(5), roles_table(5), roles_table(6)
    assert a == b
    for m in a:
        assert a[m] != c[m], m


def test_roles_reproducible_in_fresh_process_with_other_hash_seed():
    # Load selection.py without lcsb/__init__ (which pulls in torch): stub packages with a __path__.
    pkg = os.path.dirname(os.path.dirname(selection.__file__))
    code = f"""
import json, sys, types
for name, path in [("lcsb", {pkg!r}), ("lcsb.engine", {os.path.join(pkg, "engine")!r})]:
    mod = types.ModuleType(name)
    mod.__path__ = [path]
    sys.modules[name] = mod
from lcsb.engine.selection import Selection
SEEDED = {SEEDED!r}
def roles_table(seed, n=11, steps=40):
    return {{kw["method"]: [Selection(seed=seed, **kw).roles(t, n) for t in range(steps)] for kw in SEEDED}}
assert "torch" not in sys.modules
print(json.dumps([roles_table(5), roles_table(123)]))
"""
    for hash_seed in ("1", "4242"):
        env = dict(os.environ, PYTHONHASHSEED=hash_seed)
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, check=True)
        assert json.loads(out.stdout) == [roles_table(5), roles_table(123)]


# ---- validation ------------------------------------------------------------------------------

@pytest.mark.parametrize("sel, n", [
    (Selection("lcsb", groups=5), 4),
    (Selection("lcsb-exact", groups=9), 8),
    (Selection("lcsb", groups=0), 4),
    (Selection("lcsb", grouping="diagonal"), 4),
    (Selection("random", active=0), 4),
    (Selection("random", active=5), 4),
    (Selection("lisa", active=9), 8),
    (Selection("freeze", active=0), 4),
    (Selection("freeze", active=5), 4),
    (Selection("badam", order="sideways"), 4),
    (Selection("gradual"), 4),
    (Selection("lcsb", interval=0), 4),
    (Selection("lisa", interval=-1), 4),
])
def test_validate_rejects(sel, n):
    with pytest.raises(UserError):
        sel.validate(n)


def test_validate_accepts_edges():
    assert Selection("lcsb", groups=4).validate(4).groups == 4
    Selection("random", active=4).validate(4)
    Selection("freeze", active=1).validate(1)
    Selection("lcsb", groups=1).validate(1)


# ---- topdown (ours) ---------------------------------------------------------------------------

@pytest.mark.parametrize("every", [1, 2, 5])
def test_topdown_top_k_every_step_all_every_nth(every):
    for n, k in cases():
        sel = Selection("topdown", active=k, full_every=every).validate(n)
        for t in range(3 * every + 1):
            low = 0 if t % every == 0 else n - k
            # exact gradients everywhere it trains: nothing above a trained block is skipped or left out
            assert sel.roles(t, n) == ["skip"] * low + ["train"] * (n - low), (n, k, every, t)


@pytest.mark.parametrize("sel, n", [
    (Selection("topdown", active=0), 4),
    (Selection("topdown", active=5), 4),
    (Selection("topdown", active=2, full_every=0), 4),
])
def test_validate_rejects_topdown(sel, n):
    with pytest.raises(UserError):
        sel.validate(n)


TRAINED_SOMETIMES = [
    dict(method="full"), dict(method="freeze", active=3), dict(method="lcsb", groups=4),
    dict(method="lcsb", groups=3, grouping="strided", interval=2), dict(method="lcsb-exact", groups=5),
    dict(method="topdown", active=3, full_every=4), dict(method="topdown", active=11, full_every=3),
    dict(method="random", active=3), dict(method="lisa", active=2, interval=3), dict(method="badam", interval=2),
]


@pytest.mark.parametrize("kw", TRAINED_SOMETIMES, ids=lambda kw: "-".join(map(str, kw.values())))
def test_train_frequency_is_the_share_of_steps_trained(kw):
    n, steps = 11, 6600          # a multiple of every cycle here; the random methods within sampling error
    sel = Selection(seed=2, **kw).validate(n)
    count = Counter(b for t in range(steps) for b in sel.trained(t, n))
    tol = 0.03 if kw["method"] in ("random", "lisa", "badam") else 1e-12
    for b, f in enumerate(sel.train_frequency(n)):
        assert abs(count[b] / steps - f) <= tol, (b, count[b] / steps, f)


def test_lr_scales_inverse_sqrt_share_with_momentum_inverse_share_otherwise():
    n = 10
    sel = Selection("topdown", active=2, full_every=4).validate(n)
    assert sel.lr_scales(n, "momentum") == [2.0] * 8 + [1.0] * 2
    assert sel.lr_scales(n, "frozen") == [4.0] * 8 + [1.0] * 2
    assert Selection("freeze", active=3).lr_scales(n, "momentum") == [1.0] * n   # never trained: untouched
    assert Selection("full").lr_scales(n, "reset") == [1.0] * n
    assert sel.lr_scales(n, "momentum", "sgd") == [4.0] * 8 + [1.0] * 2          # SGD: each gradient, one push


def test_plan_of_a_step():
    """The plan derives trained / lowest / visited from the roles once: lcsb visits only its group (the rest
    are skipped), lcsb-exact everything from its group up, full every block; no trained block: nothing."""
    from lcsb.engine.selection import Plan

    n = 8
    for step in range(8):
        for method, visited in (("lcsb", lambda g: g), ("lcsb-exact", lambda g: list(range(g[0], n))),
                                ("full", lambda g: list(range(n)))):
            sel = Selection(method, groups=4).validate(n)
            plan = sel.plan(step, n)
            group = sel.trained(step, n)
            assert list(plan.roles) == sel.roles(step, n)
            assert list(plan.trained) == group and plan.lowest == group[0]
            assert list(plan.visited) == visited(group)
    empty = Plan(("skip",) * n)
    assert empty.trained == () and empty.lowest == n and empty.visited == ()
    with pytest.raises(ValueError, match="roles must be values from"):
        Plan(("train", "frozen"))
