"""The LM head's chunk loop (engine.executor.head_loss_and_grad) against autograd on the dense head.

Fresh random hidden states, targets and head weights (float, and int4 against its own dequantized
matrix): the summed cross-entropy of the full softmax and its gradient with respect to the hidden
states, for token counts on and off the padding multiple, chunk sizes that do and do not divide the
vocabulary, and Gemma's final softcap. And a step's own padding of the sequence (run_step appends
tokens up to executor.TOKEN_MULTIPLE) gives the loss and gradients of autograd on the batch as given.
"""

from __future__ import annotations

import types

import pytest
import torch
import torch.nn.functional as F

from lcsb.engine import executor
from lcsb.model.linear import Workspace
from lcsb.quant.formats import quantize


def head_model(W, cap):
    """What head_loss_and_grad reads of a model: its head weight, softcap and workspace."""
    return types.SimpleNamespace(head_weight=lambda: W, config=types.SimpleNamespace(final_softcap=cap),
                                 workspace=Workspace())


def reference(Wd: torch.Tensor, hn: torch.Tensor, targets: torch.Tensor, cap):
    """Summed cross-entropy over the dense logits [T, V] and its gradient, by autograd in float64."""
    h = hn.double().requires_grad_(True)
    z = h @ Wd.double().t()
    if cap is not None:
        z = torch.tanh(z / cap) * cap
    loss = F.cross_entropy(z, targets, reduction="sum")
    (g,) = torch.autograd.grad(loss, h)
    return loss.item(), g


@pytest.mark.parametrize("tokens", [1, 15, 16, 17, 63, 100])
@pytest.mark.parametrize("chunk", [None, 7, 64, 300, 1000])
@pytest.mark.parametrize("fmt,cap", [("dense", None), ("dense", 3.0), ("int4", None)])
def test_head_matches_autograd(tokens, chunk, fmt, cap):
    g = torch.Generator().manual_seed(tokens * 1000 + (chunk or 0))
    V, H = 300, 64
    w = torch.randn(V, H, generator=g) * 0.5
    W = quantize(w, None if fmt == "dense" else fmt, 32)
    Wd = W.dequantize()
    hn = torch.randn(tokens, H, generator=g)
    targets = torch.randint(0, V, (tokens,), generator=g)
    loss, grad = executor.head_loss_and_grad(head_model(W, cap), hn, targets, chunk)
    ref_loss, ref_grad = reference(Wd, hn, targets, cap)
    assert grad.shape == hn.shape and grad.dtype == hn.dtype
    assert abs(loss.item() - ref_loss) <= 1e-5 * abs(ref_loss)
    # float32 against float64: summation order only (a bug in the chunk loop or the padding is O(1))
    assert ((grad.double() - ref_grad).norm() / ref_grad.norm()).item() < 1e-6
    torch.testing.assert_close(grad.double(), ref_grad, rtol=1e-4, atol=1e-5)


def test_head_padding_columns_change_nothing():
    """The padded columns must not leak: 17 tokens give the same rows as each token alone."""
    g = torch.Generator().manual_seed(3)
    W = quantize(torch.randn(200, 32, generator=g), None, 32)
    hn, targets = torch.randn(17, 32, generator=g), torch.randint(0, 200, (17,), generator=g)
    model = head_model(W, None)
    loss, grad = executor.head_loss_and_grad(model, hn, targets, 50)
    alone = [executor.head_loss_and_grad(model, hn[i:i + 1], targets[i:i + 1], 50) for i in range(17)]
    assert abs(loss.item() - sum(l.item() for l, _ in alone)) < 1e-4
    torch.testing.assert_close(grad, torch.cat([g_ for _, g_ in alone]), rtol=1e-5, atol=1e-6)
