"""The task metrics against transformers on the bundled model: exact match of greedy answers, label accuracy."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
import transformers

from lcsb.evaluate import _label_sequences, exact_match, label_accuracy, label_logprobs
from lcsb.model import load_model
from lcsb.model.tokenizer import load_tokenizer

ASSETS = Path(__file__).resolve().parents[1] / "assets"
MODEL = ASSETS / "model"


@pytest.fixture(scope="module")
def bundled():
    return load_model(MODEL), load_tokenizer(MODEL), transformers.AutoModelForCausalLM.from_pretrained(
        MODEL, dtype=torch.float32).eval()


def test_exact_match_is_greedy_decoding_of_each_prompt(bundled):
    """Each record's verdict is whether transformers' greedy answer to that prompt alone (stopped at
    the end-of-turn ids) equals the reference, though exact_match decodes prompts of equal length
    together; half the references are set to transformers' own answer, so both verdicts occur."""
    model, tok, ref = bundled
    lines = (ASSETS / "data" / "chat" / "test.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[:12]]
    eos = [*tok.eos_token_ids, *model.config.eos_token_id]
    answers = []
    for rec in records:
        ids = tok.apply_chat_template(rec["messages"][:-1], add_generation_prompt=True)
        with torch.no_grad():
            out = ref.generate(torch.tensor([ids]), max_new_tokens=8, do_sample=False, eos_token_id=eos,
                               pad_token_id=eos[0])[0, len(ids):].tolist()
        out = out[:next((i for i, t in enumerate(out) if t in eos), len(out))]
        answers.append(tok.decode(out, skip_special_tokens=True).strip())
    for i, rec in enumerate(records):
        if i % 2 == 0:
            rec["messages"][-1]["content"] = answers[i]
    want = [answers[i] == rec["messages"][-1]["content"].strip() for i, rec in enumerate(records)]
    assert 6 <= sum(want) < len(records)
    lengths = [len(tok.apply_chat_template(r["messages"][:-1], add_generation_prompt=True)) for r in records]
    assert len(set(lengths)) < len(lengths)                   # some prompts are decoded as a batch
    r = exact_match(model, tok, records, max_new_tokens=8, batch_size=2)
    assert r["correct"] == want
    assert r["n"] == len(records) and r["exact_match"] == sum(want) / len(records)
    assert [e["generated"].strip() for e in r["examples"]] == answers[:5]
    assert exact_match(model, tok, records, max_new_tokens=8, limit=3)["correct"] == want[:3]


def test_label_accuracy_is_transformers_argmax(bundled):
    """Each label's log-likelihood equals transformers' on that sequence alone, and the accuracy
    over right-padded batches is that of transformers' argmax: half the records are given the label
    transformers prefers, half another one, so the accuracy must be exactly one half."""
    model, tok, ref = bundled
    labels = json.loads((ASSETS / "data" / "classify" / "labels.json").read_text())
    lines = (ASSETS / "data" / "classify" / "test.jsonl").read_text().splitlines()
    records = [json.loads(line) for line in lines[:10]]
    for i, rec in enumerate(records):
        n, seqs = _label_sequences(tok, rec["prompt"], labels)
        want = []
        for s in seqs:
            with torch.no_grad():
                logp = torch.log_softmax(ref(torch.tensor([s])).logits[0].float(), dim=-1)
            want.append(sum(float(logp[t - 1, s[t]]) for t in range(n, len(s))))
        got = label_logprobs(model, tok, rec["prompt"], labels)
        assert got == pytest.approx(want, rel=1e-4, abs=1e-4)
        best = max(range(len(labels)), key=want.__getitem__)
        rec["completion"] = labels[best] if i % 2 == 0 else labels[(best + 1) % len(labels)]
    assert label_accuracy(model, tok, records, labels, batch_size=3) == {"accuracy": 0.5, "n": 10}
    assert label_accuracy(model, tok, records, labels, limit=4)["n"] == 4


@pytest.mark.parametrize("family, over", [("llama", {}), ("gemma3", dict(final_logit_softcapping=3.0))])
def test_token_logprobs_equal_the_full_softmax(family, over, tmp_path, seed):
    """The chunked LM-head scoring (label accuracy's) against log_softmax over the whole [T, vocab] logits,
    with a vocabulary of several chunks and Gemma's final soft-capping."""
    import hf

    hf.make(family, tmp_path, vocab_size=40000, **over)
    model = load_model(tmp_path)
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(7, model.config.hidden_size, generator=g)
    targets = torch.randint(0, 40000, (7,), generator=g)
    targets[0], targets[1] = 0, 39999                       # the first and the last chunk
    with torch.no_grad():
        want = torch.log_softmax(model.logits(h[None])[0], dim=-1)[torch.arange(7), targets]
        got = model.token_logprobs(h, targets)
    assert torch.allclose(got, want, atol=1e-5, rtol=1e-5)
