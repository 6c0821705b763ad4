"""lcsb.evaluate generation against transformers' generate, plain argmax decoding and the sampling rules."""

from __future__ import annotations

import pytest
import torch
from transformers.generation.logits_process import TopPLogitsWarper

import hf
import lcsb
from lcsb.errors import UserError
from lcsb.evaluate import TextStreamer, generate, sample, top_p_filter

PROMPT = [5, 17, 33, 8, 41, 9, 60, 3]

# (hf.make overrides, new tokens). Larger weights than transformers' default init keep greedy decoding
# from repeating one token, so a wrong position or cache entry changes the output. Gemma3's window is
# 5 positions (tests/hf.py): 8 + 12 positions cross it several times.
FAMILIES = {
    "llama": (dict(seed=1, initializer_range=0.2), 20),
    "qwen2": (dict(seed=1, initializer_range=0.2), 5),
    "qwen3": (dict(seed=1, initializer_range=0.2), 5),
    "gemma3": (dict(seed=1), 12),
}


@pytest.fixture(scope="module", params=list(FAMILIES))
def pair(request, tmp_path_factory):
    """(transformers model, lcsb model, new tokens) on the same random weights."""
    family = request.param
    over, n = FAMILIES[family]
    folder = tmp_path_factory.mktemp(family)
    ref = hf.make(family, folder, **over)
    return ref, lcsb.load_model(folder), n


def hf_greedy(ref, prompt, n):
    ids = torch.tensor([prompt])
    out = ref.generate(ids, attention_mask=torch.ones_like(ids), do_sample=False, max_new_tokens=n,
                       pad_token_id=0)
    return out[0, len(prompt):].tolist()


def test_greedy_matches_transformers(pair):
    ref, model, n = pair
    eos = model.config.eos_token_id          # transformers stops at the same ids (config.json)
    ours = list(generate(model, PROMPT, max_new_tokens=n, eos_ids=eos))
    assert ours == hf_greedy(ref, PROMPT, n)
    assert len(ours) == n and len(set(ours)) > 2, "degenerate output: the comparison would prove little"


def test_cached_matches_uncached_argmax(pair):
    _, model, n = pair
    seq = list(PROMPT)
    with torch.no_grad():
        for _ in range(n):
            seq.append(int(model(torch.tensor([seq]))[0, -1].argmax()))   # the whole sequence every step
    assert list(generate(model, PROMPT, max_new_tokens=n)) == seq[len(PROMPT):]


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    folder = tmp_path_factory.mktemp("llama")
    hf.make("llama", folder, seed=1, initializer_range=0.2)
    return lcsb.load_model(folder)


def test_sampling_reproducible_with_seed(llama):
    run = lambda seed, **kw: list(generate(llama, PROMPT, 20, temperature=1.0, seed=seed, **kw))
    a = run(1)
    assert run(1) == a
    torch.manual_seed(123)                   # the global RNG plays no part when a seed is given
    assert run(1) == a
    assert run(2) != a
    assert run(1, top_p=0.9) == run(1, top_p=0.9)
    # a tiny nucleus holds only the most likely token: sampling becomes greedy
    assert run(3, top_p=1e-6) == list(generate(llama, PROMPT, 20))


def test_sampling_unseeded_uses_global_rng(llama):
    torch.manual_seed(7)
    a = list(generate(llama, PROMPT, 10, temperature=1.0))
    torch.manual_seed(7)
    assert list(generate(llama, PROMPT, 10, temperature=1.0)) == a


def test_top_p_filter_matches_transformers():
    torch.manual_seed(0)
    for top_p in (0.05, 0.3, 0.7, 0.9, 0.999):
        logits = torch.randn(4, 50) * 3
        ref = TopPLogitsWarper(top_p)(None, logits.clone())
        for row, ref_row in zip(logits, ref):
            kept = top_p_filter(torch.softmax(row, -1), top_p) > 0
            assert torch.equal(kept, torch.isfinite(ref_row)), top_p


def test_sample_draws_only_from_nucleus():
    logits = torch.log(torch.tensor([0.05, 0.5, 0.15, 0.3]))
    g = torch.Generator().manual_seed(0)
    drawn = {sample(logits, 1.0, 0.8, g) for _ in range(200)}
    assert drawn == {1, 3}                   # 0.5 + 0.3 reaches 0.8
    assert sample(logits, 0.0) == 1
    # temperature -> 0 sharpens towards the argmax
    assert {sample(logits, 0.01, 1.0, g) for _ in range(50)} == {1}


def test_stops_at_eos(llama):
    greedy = list(generate(llama, PROMPT, 20))
    stop = greedy[5]
    first = greedy.index(stop)
    out = list(generate(llama, PROMPT, 20, eos_ids=[stop, 10_000]))
    assert out == greedy[: first + 1]        # the eos token is yielded, then generation ends


def test_stops_at_max_position_embeddings(llama, monkeypatch):
    monkeypatch.setattr(llama.config, "max_position_embeddings", len(PROMPT) + 3)
    assert len(list(generate(llama, PROMPT, 50))) == 3
    with pytest.raises(UserError, match="max_position_embeddings"):
        list(generate(llama, PROMPT + [1, 2, 3], 5))


def test_streams_lazily(llama):
    it = generate(llama, PROMPT, 5)
    first = next(it)
    assert torch.is_grad_enabled()           # no_grad holds only inside the generator's steps
    assert [first, *it] == list(generate(llama, PROMPT, 5))


@pytest.mark.parametrize("kw, match", [
    (dict(max_new_tokens=0), "max_new_tokens"),
    (dict(temperature=-0.5), "temperature"),
    (dict(temperature=float("nan")), "temperature"),
    (dict(top_p=0.0), "top_p"),
    (dict(top_p=1.5), "top_p"),
])
def test_bad_settings_refused(llama, kw, match):
    with pytest.raises(UserError, match=match):
        generate(llama, PROMPT, **kw)            # refused at the call, before any token is asked for


def test_bad_prompts_refused(llama):
    with pytest.raises(UserError, match="empty"):
        generate(llama, [], 3)
    with pytest.raises(UserError, match="vocab_size 96"):
        generate(llama, [5, 96], 3)


class ByteTokenizer:
    """Byte-level decoding at its plainest: token id = one byte, invalid UTF-8 becomes U+FFFD."""

    def decode(self, ids, skip_special_tokens=False):
        return bytes(ids).decode("utf-8", errors="replace")


def test_text_streamer_holds_back_partial_characters():
    text = "héllo wörld, 日本語 🙂!"
    ids = list(text.encode("utf-8"))
    streamer = TextStreamer(ByteTokenizer())
    pieces = [streamer.put(i) for i in ids]
    pieces.append(streamer.end())
    assert "".join(pieces) == text
    assert all("\ufffd" not in p for p in pieces)
    assert pieces.count("") >= 2 + 2 * 3 + 3   # continuation bytes give nothing until the character ends
    assert pieces[ids.index(0xF0) + 3] == "🙂"


def test_text_streamer_flushes_invalid_bytes_at_end():
    streamer = TextStreamer(ByteTokenizer())
    assert streamer.put(ord("a")) == "a"
    assert streamer.put(0xE6) == ""          # first byte of a 3-byte character, never completed
    assert streamer.end() == "\ufffd"
    streamer = TextStreamer(ByteTokenizer())
    assert [streamer.put(i) for i in (0xE6, ord("b"))] == ["", "\ufffdb"]   # invalid in the middle: kept
