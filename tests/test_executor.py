"""The training step (lcsb.engine.executor) against autograd oracles, for every family.

The oracle is transformers + PEFT: a tiny random checkpoint (tests/hf.py) with a LoRA adapter whose
A and B are both random and non-zero, saved in PEFT's layout and loaded into lcsb. Then
`lcsb.lora_gradients` must give

- with every block `train`: transformers' loss and PEFT's autograd gradients;
- with `skip` blocks: autograd gradients of the same model whose skipped decoder layers return
  h + (layer(h) - h).detach() (LCSB's surrogate: the gradient passes by the residual identity);
- with `through` blocks: the exact gradients for the trained blocks;
- quantized: autograd gradients of the transformers model holding the dequantized weights;

and it must decompress each visited block exactly once per pass, never touch skipped blocks or
blocks below the lowest trained one in the backward, keep the loss independent of the roles, give
the same numbers with disk checkpoints, replay LoRA dropout masks, and handle the Gemma final
softcap over many vocabulary chunks.
"""

from __future__ import annotations

import copy
import re
import zlib

import peft
import pytest
import torch
import torch.nn.functional as F

import hf
import lcsb
from lcsb.engine import executor
from lcsb.engine.selection import Selection
from lcsb.model import linear as compressed
from lcsb.model.linear import Embedding, Linear
from lcsb.quant import formats

FAMILIES = ["llama", "qwen2", "qwen3", "gemma3"]
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]
N = 4                  # decoder layers of the tiny models: enough for role patterns
B, S = 2, 12           # batch and sequence (S > gemma3's sliding window of 5 in tests/hf.py)
GROUP = 32             # int4 / nf4 group: divides every input width (64, 96) of the tiny models
# fp32: the MLP runs W x^T (core.MLP) where transformers runs x W^T, a different order of summation;
# Gemma 3's scaled embeddings take the relative gradient error to 1.05e-5 at worst, 2.05e-5 since a step
# pads its 12 tokens to 16 (executor.TOKEN_MULTIPLE: other BLAS blocking; 1-2.4x the unpadded error
# over 3 seeds, never near a real error's 1e-3)
TOL = 3e-5
TOL_QUANT = 1e-4

# peft asks transformers a deprecated question; not ours to answer
pytestmark = pytest.mark.filterwarnings("ignore:.*is_gradient_checkpointing.*:FutureWarning")

# role patterns with a skip or through somewhere; each block index < N
PATTERNS = [
    ["train", "skip", "train", "skip"],
    ["skip", "skip", "train", "skip"],
    ["skip", "train", "skip", "train"],
    ["train", "through", "through", "train"],
    ["through", "train", "through", "skip"],      # a through block below the lowest train block
    ["skip", "through", "train", "through"],
    ["train", "skip", "through", "train"],
    ["skip", "skip", "skip", "train"],
]
NO_TRAIN = [["skip"] * N, ["through"] * N, ["through", "skip", "through", "skip"]]


def _ids(roles):
    return "-".join(r[:2] for r in roles)


# ----------------------------------------------------------------------------------------------
# fixtures: checkpoints, adapters and PEFT oracles are built once per module


class Zoo:
    """Tiny checkpoints with a random PEFT adapter, and the PEFT models they came from."""

    def __init__(self, root):
        self.root = root
        self.setups = {}
        self.models = {}

    def setup(self, family: str, **over):
        key = (family, tuple(sorted(over.items())))
        if key not in self.setups:
            tag = family + "".join(f"-{k}{v}" for k, v in sorted(over.items()))
            folder, adapter = self.root / tag, self.root / f"{tag}-adapter"
            seed = zlib.crc32(family.encode()) % 1000     # same weights whatever the overrides
            base = hf.make(family, folder, seed=seed, num_hidden_layers=N, **over)
            torch.manual_seed(seed + 1)
            cfg = peft.LoraConfig(r=4, lora_alpha=8, target_modules=list(TARGETS), init_lora_weights=False)
            model = peft.get_peft_model(base, cfg)   # A and B keep nn.Linear's random init: both non-zero
            model.eval()
            model.save_pretrained(adapter)
            self.setups[key] = (folder, adapter, model)
        return self.setups[key]

    def ours(self, family: str, quant: str | None = None, **over):
        """The lcsb model with the adapter loaded (cached: lora_gradients leaves it unchanged)."""
        key = (family, quant, tuple(sorted(over.items())))
        if key not in self.models:
            folder, adapter, _ = self.setup(family, **over)
            self.models[key] = lcsb.load_model(folder, adapter=adapter, quant=quant, group_size=GROUP)
        return self.models[key]


@pytest.fixture(scope="module")
def zoo(tmp_path_factory):
    return Zoo(tmp_path_factory.mktemp("executor"))


def batch(seed: int, vocab: int = 96):
    """Random ids [B, S] and labels aligned with them: a masked prompt prefix of a different length
    in each row and one masked token in the middle of the first."""
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (B, S), generator=g)
    labels = ids.clone()
    for r in range(B):
        labels[r, : int(torch.randint(1, 6, (1,), generator=g))] = -100
    labels[0, 8] = -100
    return ids, labels


# ----------------------------------------------------------------------------------------------
# oracles


def _surrogate(module, args, kwargs, out):
    """LCSB's skipped block: forward unchanged, backward the identity."""
    h = args[0] if args else kwargs["hidden_states"]
    if isinstance(out, tuple):
        return (h + (out[0] - h).detach(),) + tuple(out[1:])
    return h + (out - h).detach()


def _surrogate_ours(module, args, out):
    h = args[0]
    return h + (out - h).detach()


def layer_of(key: str) -> int:
    return int(re.search(r"\.layers\.(\d+)\.", key).group(1))


def peft_oracle(model, ids, labels, skip=()):
    """transformers + PEFT loss and LoRA gradients (PEFT keys as saved), with the LCSB surrogate on
    the decoder layers in `skip`."""
    layers = model.get_base_model().model.layers
    handles = [layers[i].register_forward_hook(_surrogate, with_kwargs=True) for i in skip]
    params = {n.replace(".default", ""): p for n, p in model.named_parameters() if "lora_" in n}
    try:
        out = model(input_ids=ids, labels=labels)
        grads = torch.autograd.grad(out.loss, list(params.values()), allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return out.loss.item(), {k: g for k, g in zip(params, grads) if g is not None}


def own_oracle(model, ids, labels, skip=()):
    """Plain autograd on lcsb's own forward (model(ids) logits + cross-entropy on shifted labels)."""
    handles = [model.model.layers[i].register_forward_hook(_surrogate_ours) for i in skip]
    params = model.lora_parameters()
    try:
        logits = model(ids)
        loss = F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), labels[:, 1:].reshape(-1),
                               ignore_index=-100)
        grads = torch.autograd.grad(loss, list(params.values()), allow_unused=True)
    finally:
        for h in handles:
            h.remove()
    return loss.item(), {k: g for k, g in zip(params, grads) if g is not None}


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def check_grads(got: dict, ref: dict, roles, tol: float, all_keys):
    """`got` holds exactly the LoRA keys of the train blocks, each within `tol` of `ref`."""
    want = {k for k in all_keys if roles[layer_of(k)] == "train"}
    assert set(got) == want, f"keys beyond/missing: {sorted(set(got) ^ want)[:4]}"
    assert len(want) == 2 * len(TARGETS) * roles.count("train")
    for k in want:
        assert ref[k].norm() > 0, k
        e = rel(got[k], ref[k])
        assert e < tol, f"{k}: relative error {e:.2e}"


def dequantized_oracle(zoo, family, ours):
    """A copy of the PEFT model whose base weights are lcsb's dequantized ones."""
    _, _, model = zoo.setup(family)
    model = copy.deepcopy(model)
    base = model.get_base_model()
    with torch.no_grad():
        for name, m in ours.named_modules():
            if isinstance(m, (Linear, Embedding)):
                target = base.get_submodule(name)
                target = getattr(target, "base_layer", target)
                assert target.weight.shape == m.weight.shape, name
                target.weight.copy_(m.weight.dequantize())
    if ours.lm_head is None:
        assert base.lm_head.weight is base.model.embed_tokens.weight
    return model


# ----------------------------------------------------------------------------------------------
# 1. every block train: transformers + PEFT loss and gradients


@pytest.mark.parametrize("family", FAMILIES)
def test_all_train_matches_peft(zoo, family, seed):
    ours = zoo.ours(family)
    _, _, oracle = zoo.setup(family)
    ids, labels = batch(seed)
    roles = ["train"] * N
    loss, grads = lcsb.lora_gradients(ours, ids, labels, roles)
    ref_loss, ref = peft_oracle(oracle, ids, labels)
    assert abs(loss - ref_loss) / ref_loss < TOL
    check_grads(grads, ref, roles, TOL, ours.lora_parameters())
    assert all(p.grad is None for p in ours.lora_parameters().values())   # .grad left untouched


# ----------------------------------------------------------------------------------------------
# 2, 3. skip blocks follow the LCSB surrogate, through blocks keep the gradient exact


@pytest.mark.parametrize("roles", PATTERNS, ids=_ids)
@pytest.mark.parametrize("family", FAMILIES)
def test_roles_match_surrogate(zoo, family, roles, seed):
    ours = zoo.ours(family)
    _, _, oracle = zoo.setup(family)
    ids, labels = batch(seed)
    loss, grads = lcsb.lora_gradients(ours, ids, labels, roles)
    skip = [i for i, r in enumerate(roles) if r == "skip"]
    ref_loss, ref = peft_oracle(oracle, ids, labels, skip)
    assert abs(loss - ref_loss) / ref_loss < TOL
    check_grads(grads, ref, roles, TOL, ours.lora_parameters())
    if not skip:
        # through only: the trained blocks get the exact (all-train) gradients
        _, exact = peft_oracle(oracle, ids, labels)
        for k in grads:
            assert rel(grads[k], exact[k]) < TOL, k


@pytest.mark.parametrize("family", FAMILIES)
def test_topdown_gradients_are_the_exact_ones(zoo, family, seed):
    """Every block topdown trains, at a step that trains the top ones and at one that trains all, gets
    transformers + PEFT's exact gradient of the whole model (nothing above it is skipped)."""
    ours = zoo.ours(family)
    _, _, oracle = zoo.setup(family)
    ids, labels = batch(seed)
    _, exact = peft_oracle(oracle, ids, labels)
    sel = Selection("topdown", active=2, full_every=2).validate(N)
    for step in (0, 1):
        roles = sel.roles(step, N)
        assert roles.count("train") == (N if step == 0 else 2)
        _, grads = lcsb.lora_gradients(ours, ids, labels, roles)
        check_grads(grads, exact, roles, TOL, ours.lora_parameters())


@pytest.mark.parametrize("family", ["llama", "gemma3"])
def test_skip_changes_gradients(zoo, family, seed):
    """The surrogate is not the exact gradient (else the skip tests would prove little)."""
    ours = zoo.ours(family)
    ids, labels = batch(seed)
    _, exact = lcsb.lora_gradients(ours, ids, labels, ["train"] * N)
    _, skipped = lcsb.lora_gradients(ours, ids, labels, ["train", "skip", "skip", "train"])
    k0 = [k for k in skipped if layer_of(k) == 0]
    assert k0 and all(rel(skipped[k], exact[k]) > 1e-3 for k in k0)
    k3 = [k for k in skipped if layer_of(k) == 3]                         # top block: exact anyway
    assert k3 and all(rel(skipped[k], exact[k]) < TOL for k in k3)


# ----------------------------------------------------------------------------------------------
# 4. quantized: autograd on the dequantized transformers model


@pytest.mark.parametrize("quant", ["int8", "int4", "nf4"])
@pytest.mark.parametrize("family", FAMILIES)
def test_quantized_matches_dequantized_autograd(zoo, family, quant, seed):
    ours = zoo.ours(family, quant)
    assert all(m.weight.fmt == quant for m in ours.modules() if isinstance(m, (Linear, Embedding)))
    oracle = dequantized_oracle(zoo, family, ours)
    ids, labels = batch(seed)
    for roles in (["train"] * N, ["train", "skip", "through", "train"]):
        loss, grads = lcsb.lora_gradients(ours, ids, labels, roles)
        skip = [i for i, r in enumerate(roles) if r == "skip"]
        ref_loss, ref = peft_oracle(oracle, ids, labels, skip)
        assert abs(loss - ref_loss) / ref_loss < TOL_QUANT
        check_grads(grads, ref, roles, TOL_QUANT, ours.lora_parameters())


# ----------------------------------------------------------------------------------------------
# 5. decompression once per visited block per pass; skipped / low blocks never touched


@pytest.mark.parametrize("roles", [["train"] * N] + PATTERNS[:5] + NO_TRAIN, ids=_ids)
@pytest.mark.parametrize("family", FAMILIES)
def test_decompression_counts(zoo, family, roles, seed, monkeypatch):
    ours = zoo.ours(family, "int8")
    layers = ours.model.layers
    index = {id(b): i for i, b in enumerate(layers)}
    per_block = sum(isinstance(m, Linear) for m in layers[0].modules())
    assert per_block == 7
    trained = [i for i, r in enumerate(roles) if r == "train"]
    low = trained[0] if trained else N
    visit = [i for i in range(low, N) if roles[i] != "skip"]

    calls = []
    real = executor.materialized

    def spy(module, *a, **k):
        calls.append(index[id(module)])
        return real(module, *a, **k)

    monkeypatch.setattr(executor, "materialized", spy)
    runs = [0] * N
    hooks = [b.register_forward_pre_hook(lambda m, a, i=i: runs.__setitem__(i, runs[i] + 1))
             for i, b in enumerate(layers)]
    ids, labels = batch(seed)
    try:
        before = formats.STATS["dequantize"]
        lcsb.lora_gradients(ours, ids, labels, roles)
        count = formats.STATS["dequantize"] - before
    finally:
        for h in hooks:
            h.remove()
    assert count == per_block * (N + len(visit))
    assert calls[:N] == list(range(N))                       # forward: every block once, in order
    assert calls[N:] == visit[::-1]                          # backward: visited blocks, top down
    assert runs == [1 + (i in visit) for i in range(N)]      # skipped and low blocks never recomputed
    assert all(m.cached is None for m in ours.modules() if isinstance(m, Linear))


@pytest.mark.parametrize("roles", [["train"] * N, ["skip", "train", "through", "skip"], ["train", "skip", "skip", "skip"]],
                         ids=_ids)
@pytest.mark.parametrize("family", FAMILIES)
def test_decompress_by_linear(zoo, family, roles, seed):
    """decompress="linear": the same loss and gradients as by block, one matrix resident at a time,
    and no Linear decompressed more than twice per visited block (recompute and VJP)."""
    ours = zoo.ours(family, "int4")
    ids, labels = batch(seed)
    loss_b, by_block = lcsb.lora_gradients(ours, ids, labels, roles)
    ours.workspace.clear()
    before = formats.STATS["dequantize"]
    loss_l, by_linear = lcsb.lora_gradients(ours, ids, labels, roles, decompress="linear")
    count = formats.STATS["dequantize"] - before
    assert loss_l == loss_b
    assert set(by_linear) == set(by_block) and by_block
    for k in by_block:
        torch.testing.assert_close(by_linear[k], by_block[k], rtol=1e-6, atol=1e-9)
    trained = [i for i, r in enumerate(roles) if r == "train"]
    visit = [i for i in range(trained[0], N) if roles[i] != "skip"]
    assert 7 * (N + len(visit)) < count <= 7 * (N + 2 * len(visit))
    largest = max(m.weight.shape[0] * m.weight.shape[1] for m in ours.model.layers.modules() if isinstance(m, Linear))
    assert ours.workspace.nbytes == 4 * max(largest, ours.config.vocab_size * ours.config.hidden_size)


@pytest.mark.parametrize("decompress", ["block", "linear"])
@pytest.mark.parametrize("family", FAMILIES)
def test_vjp_skips_the_output_matmul(zoo, family, decompress, seed, monkeypatch):
    """In a visited block's recompute, the last Linear of a Llama-style block (whose output only adds
    into the block's output) computes no matmul, only its input gradient; Gemma 3 (a norm reads that
    output) runs whole. The gradients are checked against PEFT by the tests above; here, against the
    same step with the skip disabled, at every role pattern."""
    ours = zoo.ours(family, "int4")
    spec = getattr(type(ours.model.layers[0]), "OUTPUT_LINEAR", None)
    assert (spec == "mlp.down_proj") == (family != "gemma3")
    skipped = []
    real = compressed._InputGradOnlyFn.forward

    def spy(ctx, x, linear, transposed):
        skipped.append(linear)
        return real(ctx, x, linear, transposed)

    monkeypatch.setattr(compressed._InputGradOnlyFn, "forward", staticmethod(spy))
    ids, labels = batch(seed)
    for roles in (["train"] * N, ["skip", "train", "through", "skip"]):
        skipped.clear()
        loss, grads = lcsb.lora_gradients(ours, ids, labels, roles, decompress=decompress)
        visit = [i for i in range(roles.index("train"), N) if roles[i] != "skip"]
        downs = [ours.model.layers[i].mlp.down_proj for i in visit[::-1]]
        assert skipped == (downs if spec else [])
        assert not any(m.output_unused for m in ours.modules() if isinstance(m, Linear))
        with monkeypatch.context() as m:
            m.setattr(type(ours.model.layers[0]), "OUTPUT_LINEAR", None, raising=False)
            loss_ref, ref = lcsb.lora_gradients(ours, ids, labels, roles, decompress=decompress)
        assert loss == loss_ref and set(grads) == set(ref)
        for k in ref:
            torch.testing.assert_close(grads[k], ref[k], rtol=1e-5, atol=1e-8)


@pytest.mark.parametrize("fmt", ["int4", "nf4", "int8", "dense"])
def test_streamed_linear_by_row_chunks(fmt, seed, monkeypatch):
    """A matrix decompressed 64 rows at a time gives x W^T and x W as the whole matrix does, through a
    workspace of 64 rows."""
    from lcsb.model.linear import Workspace, streamed_linear
    g = torch.Generator().manual_seed(seed)
    W = formats.quantize(torch.randn(300, 128, generator=g), None if fmt == "dense" else fmt, 32)
    monkeypatch.setattr(compressed, "ROW_CHUNK_BYTES", 64 * 128 * 4)
    x, gy = torch.randn(2, 5, 128, generator=g), torch.randn(2, 5, 300, generator=g)
    ws = Workspace()
    before = formats.STATS["dequantize"]
    y, gx = streamed_linear(x, W, ws), streamed_linear(gy, W, ws, transposed=True)
    full = W.dequantize()
    torch.testing.assert_close(y, F.linear(x, full), rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(gx, gy @ full, rtol=1e-5, atol=1e-4)      # summed in another order
    assert y.shape == (2, 5, 300) and gx.shape == (2, 5, 128)
    assert ws.nbytes == (0 if fmt == "dense" else 64 * 128 * 4)       # float weights are used as stored
    assert formats.STATS["dequantize"] - before == (1 if fmt == "dense" else 3)


def test_bad_decompress_refused(zoo, seed):
    ids, labels = batch(seed)
    with pytest.raises(lcsb.UserError, match="decompress must be one of block, linear"):
        lcsb.lora_gradients(zoo.ours("llama"), ids, labels, ["train"] * N, decompress="matrix")


# ----------------------------------------------------------------------------------------------
# 6. disk checkpoints give the same numbers as RAM ones


@pytest.mark.parametrize("roles", [["train"] * N, ["skip", "train", "through", "skip"]], ids=_ids)
@pytest.mark.parametrize("family", FAMILIES)
def test_disk_activations_match_ram(zoo, family, roles, seed):
    ours = zoo.ours(family)
    ids, labels = batch(seed)
    loss_ram, ram = lcsb.lora_gradients(ours, ids, labels, roles, activations="ram")
    loss_disk, disk = lcsb.lora_gradients(ours, ids, labels, roles, activations="disk")
    assert loss_disk == loss_ram
    assert set(disk) == set(ram) and ram
    for k in ram:
        assert torch.allclose(disk[k], ram[k], rtol=0, atol=1e-7), k


def test_bad_activations_refused(zoo, seed):
    ids, labels = batch(seed)
    with pytest.raises(lcsb.UserError, match="activations"):
        lcsb.lora_gradients(zoo.ours("llama"), ids, labels, ["train"] * N, activations="gpu")


# ----------------------------------------------------------------------------------------------
# 7. the loss does not depend on the roles


@pytest.mark.parametrize("family", FAMILIES)
def test_loss_independent_of_roles(zoo, family, seed):
    ours = zoo.ours(family)
    ids, labels = batch(seed)
    losses = set()
    for roles in [["train"] * N] + PATTERNS + NO_TRAIN:
        loss, grads = lcsb.lora_gradients(ours, ids, labels, roles)
        losses.add(loss)
        if "train" not in roles:
            assert grads == {}
    assert len(losses) == 1


def test_bad_roles_and_empty_batch(zoo, seed):
    ours = zoo.ours("llama")
    ids, labels = batch(seed)
    with pytest.raises(ValueError):
        lcsb.lora_gradients(ours, ids, labels, ["train"] * (N - 1))
    with pytest.raises(ValueError):
        lcsb.lora_gradients(ours, ids, labels, ["train", "freeze", "train", "train"])
    with pytest.raises(lcsb.UserError, match="-100"):
        lcsb.lora_gradients(ours, ids, torch.full_like(labels, -100), ["train"] * N)


# ----------------------------------------------------------------------------------------------
# 8. LoRA dropout: the recompute replays the forward's masks


@pytest.mark.parametrize("roles", [["train"] * N, ["train", "skip", "through", "train"]], ids=_ids)
@pytest.mark.parametrize("family", FAMILIES)
def test_dropout_masks_replayed(zoo, family, roles, seed):
    folder, _, _ = zoo.setup(family)
    ours = lcsb.load_model(folder, lora=lcsb.LoraConfig(rank=4, alpha=8, dropout=0.3))
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for k, p in ours.lora_parameters().items():
            if ".lora_B." in k:
                p.copy_(torch.randn(p.shape, generator=g) * 0.2)
    ours.train()
    ids, labels = batch(seed)
    skip = [i for i, r in enumerate(roles) if r == "skip"]

    torch.manual_seed(seed)
    loss, grads = lcsb.lora_gradients(ours, ids, labels, roles)
    torch.manual_seed(seed)
    ref_loss, ref = own_oracle(ours, ids, labels, skip)
    assert abs(loss - ref_loss) / ref_loss < TOL
    check_grads(grads, ref, roles, TOL, ours.lora_parameters())

    # dropout is really active: another seed draws other masks, eval mode none
    torch.manual_seed(seed + 1)
    _, other = own_oracle(ours, ids, labels, skip)
    assert max(rel(other[k], ref[k]) for k in grads) > 1e-2
    ours.eval()
    torch.manual_seed(seed)
    assert abs(lcsb.lora_gradients(ours, ids, labels, roles)[0] - loss) > 1e-6


# ----------------------------------------------------------------------------------------------
# 9. the head: Gemma's final softcap, and a vocabulary spread over many chunks


@pytest.mark.parametrize("family,softcap", [("llama", None), ("gemma3", 5.0)])
def test_generation_and_scoring_share_the_head_loop(zoo, family, softcap, seed, monkeypatch):
    """Logits (generation) and token log-probabilities (scoring) walk the head in VOCAB_CHUNK rows through
    the model's workspace, as training does, and equal transformers + PEFT's."""
    over = {} if softcap is None else {"final_logit_softcapping": softcap}
    ours = zoo.ours(family, **over)
    _, _, oracle = zoo.setup(family, **over)
    monkeypatch.setattr(compressed, "VOCAB_CHUNK", 7)
    W = ours.head_weight()
    seen, real_block = [], type(W).row_block

    def row_block(self, lo, hi, dtype=torch.float32, out=None):
        if self is W:
            seen.append((lo, hi, out is not None))
        return real_block(self, lo, hi, dtype, out)

    monkeypatch.setattr(type(W), "row_block", row_block)
    ids, labels = batch(seed)
    with torch.no_grad():
        ref = oracle(input_ids=ids).logits.float()
        got = ours(ids)
        assert seen == [(lo, min(lo + 7, 96), True) for lo in range(0, 96, 7)]   # chunks of 7, in the workspace
        assert rel(got, ref) < TOL
        seen.clear()
        h = ours.embed(ids)                                  # the last block's output, as scoring has it
        ctx = ours.context(0, ids.shape[1])
        for block in ours.model.layers:
            h = block(h, ctx)
        targets = ids[0]
        logp = ours.token_logprobs(h[0], targets)
        want = torch.log_softmax(ref[0].double(), dim=-1).gather(1, targets[:, None])[:, 0]
        assert len(seen) == 14 and (logp.double() - want).abs().max() < 1e-4


@pytest.mark.parametrize("family,softcap", [("llama", None), ("qwen2", None), ("qwen3", None),
                                            ("gemma3", None), ("gemma3", 5.0), ("gemma3", 0.5)])
def test_head_chunks_and_softcap(zoo, family, softcap, seed, monkeypatch):
    over = {} if softcap is None else {"final_logit_softcapping": softcap}
    ours = zoo.ours(family, **over)
    _, _, oracle = zoo.setup(family, **over)
    assert ours.config.final_softcap == softcap
    monkeypatch.setattr(compressed, "VOCAB_CHUNK", 7)
    W = ours.head_weight()
    seen = []
    real_block = type(W).row_block

    def row_block(self, lo, hi, dtype=torch.float32, out=None):
        if self is W:
            seen.append((lo, hi))
        return real_block(self, lo, hi, dtype, out)

    monkeypatch.setattr(type(W), "row_block", row_block)
    ids, labels = batch(seed)
    for roles in (["train"] * N, ["skip", "train", "skip", "through"]):
        seen.clear()
        loss, grads = lcsb.lora_gradients(ours, ids, labels, roles)
        assert seen == [(lo, min(lo + 7, 96)) for lo in range(0, 96, 7)]     # the head walked 14 chunks
        skip = [i for i, r in enumerate(roles) if r == "skip"]
        ref_loss, ref = peft_oracle(oracle, ids, labels, skip)
        assert abs(loss - ref_loss) / ref_loss < TOL
        check_grads(grads, ref, roles, TOL, ours.lora_parameters())
    if softcap is not None:
        # the cap matters (same weights without it): its gradients differ by far more than TOL
        _, plain = peft_oracle(zoo.setup(family)[2], ids, labels, skip)
        assert max(rel(plain[k], ref[k]) for k in grads) > 1e-3


@pytest.mark.parametrize("family", ["llama", "gemma3"])
@pytest.mark.parametrize("quant", [None, "int4"])
def test_recompute_off_keeps_graphs_with_the_same_result(tmp_path, family, quant):
    """recompute=False keeps visited blocks' forward graphs: same loss and gradients as recomputing,
    and no more decompressions than the recompute pass."""
    from lcsb.engine.executor import run_step
    from lcsb.quant.formats import STATS

    torch.manual_seed(11)
    hf.make(family, tmp_path, num_hidden_layers=4)
    model = lcsb.load_model(tmp_path, quant=quant, group_size=16, lora=lcsb.LoraConfig(rank=4))
    with torch.no_grad():
        for k, p in model.lora_parameters().items():
            p.normal_(0, 0.1)
    ids = torch.randint(0, 96, (2, 12))
    labels = ids.clone()
    labels[0, :4] = -100
    for roles in (["train"] * 4, ["skip", "train", "through", "train"], ["skip", "skip", "train", "skip"]):
        got = []
        for recompute in (True, False):
            for p in model.lora_parameters().values():
                p.grad = None
            before = STATS["dequantize"]
            res = run_step(model, ids, labels, roles, recompute=recompute)
            grads = {k: p.grad.clone() for k, p in model.lora_parameters().items() if p.grad is not None}
            got.append((res.loss, grads, STATS["dequantize"] - before))
        (loss_on, g_on, n_on), (loss_off, g_off, n_off) = got
        assert loss_on == loss_off
        assert set(g_on) == set(g_off) and g_on
        for k in g_on:
            torch.testing.assert_close(g_off[k], g_on[k], rtol=1e-6, atol=1e-8)
        assert n_off <= n_on


# ----------------------------------------------------------------------------------------------
# 10. few tokens: the sequence padded to a BLAS-friendly length, and block weights streamed


@pytest.mark.parametrize("family", FAMILIES)
def test_padded_sequence_matches_peft(zoo, family, seed, monkeypatch):
    """run_step appends tokens up to executor.TOKEN_MULTIPLE (S = 12 -> 16 here); the loss and
    gradients stay those of transformers + PEFT on the 12 tokens as given."""
    ours = zoo.ours(family)
    _, _, oracle = zoo.setup(family)
    lengths = []
    real = ours.context
    monkeypatch.setattr(ours, "context", lambda start, length, dev=None: lengths.append(length) or real(start, length, dev))
    ids, labels = batch(seed)
    for roles in (["train"] * N, ["skip", "train", "skip", "through"]):
        lengths.clear()
        loss, grads = lcsb.lora_gradients(ours, ids, labels, roles)
        assert lengths == [16]                                            # the step ran 16 tokens
        skip = [i for i, r in enumerate(roles) if r == "skip"]
        ref_loss, ref = peft_oracle(oracle, ids, labels, skip)
        assert abs(loss - ref_loss) / ref_loss < TOL
        check_grads(grads, ref, roles, TOL, ours.lora_parameters())


@pytest.mark.parametrize("roles", [["train"] * N, ["skip", "train", "through", "skip"]], ids=_ids)
@pytest.mark.parametrize("family", FAMILIES)
def test_few_tokens_stream_the_block(zoo, family, roles, seed, monkeypatch):
    """Below STREAM_TOKENS, decompress="block" decompresses one matrix at a time (no block is
    materialized) when a matrix is larger than a row chunk (ROW_CHUNK_BYTES made small here): the
    gradients of autograd on the dequantized model, and none of that at STREAM_TOKENS tokens or more."""
    ours = zoo.ours(family, "int4")
    ids, labels = batch(seed)
    calls = []
    real = executor.materialized
    monkeypatch.setattr(executor, "materialized", lambda *a, **k: calls.append(1) or real(*a, **k))
    monkeypatch.setattr(executor, "ROW_CHUNK_BYTES", 1024)
    assert executor.streams(ours, B * 16)
    loss, grads = lcsb.lora_gradients(ours, ids, labels, roles)
    assert calls == []
    skip = [i for i, r in enumerate(roles) if r == "skip"]
    ref_loss, ref = peft_oracle(dequantized_oracle(zoo, family, ours), ids, labels, skip)
    assert abs(loss - ref_loss) / ref_loss < TOL_QUANT
    check_grads(grads, ref, roles, TOL_QUANT, ours.lora_parameters())
    monkeypatch.setattr(executor, "STREAM_TOKENS", B * 16)                # as many tokens as the batch: by block
    lcsb.lora_gradients(ours, ids, labels, roles)
    assert len(calls) == N + len([i for i in range(roles.index("train"), N) if roles[i] != "skip"])
