import pytest
import torch

from sparsify_cli.data import eval_batches, prepare_data
from sparsify_cli.eval.quality import (
    Passage, encode_passages, heldout_pass, lastword_accuracy, lastword_passages, split_documents,
)
from sparsify_cli.config.compose import data_config
from sparsify_cli.train.checkpoint import load_model


def test_passages_end_before_a_word_and_spread_over_documents():
    docs = [" ".join(f"w{i}x{j}" for j in range(200)) + " ab, cd." for i in range(3)]  # no 3+-letter word
    letters = ["alpha beta gamma, delta epsilon " * 60, "one two three four five six seven " * 40]
    ps = lastword_passages(letters, n=1000, context_words=10, stride_words=3)
    assert ps and all(p.target.startswith(" ") and p.target[1:].isalpha() and len(p.target) >= 4 for p in ps)
    for p in ps:  # the passage really is context + " " + word in some document
        assert any(p.context + p.target in d for d in letters)
        assert len(p.context.split()) == 10
    assert {p.target for p in ps} >= {" alpha", " gamma", " three"}  # "gamma," gives " gamma": punctuation left out
    few = lastword_passages(letters, n=4, context_words=10, stride_words=3)
    assert len(few) == 4 and few[0] == ps[0] and few[-1] == ps[-1]  # spread: first and last candidates
    assert lastword_passages(docs, n=10, context_words=10) == []  # no alphabetic word: no passage
    assert lastword_passages(letters, n=0) == []


def test_split_documents_on_eos():
    import numpy as np

    toks = np.array([5, 6, 0, 7, 0, 0, 8, 9])
    assert split_documents(toks, 0, lambda ids: ",".join(map(str, ids))) == ["5,6", "7", "8,9"]


def test_encode_cuts_context_from_the_left():
    enc = lambda s: [ord(c) for c in s]  # noqa: E731
    (ctx, tgt), = encode_passages([Passage("abcdefgh", " xy")], enc, max_len=6)
    assert tgt == [32, 120, 121] and ctx == [ord(c) for c in "efgh"]  # 4 + 3 = max_len + 1 tokens


def test_heldout_ce_matches_training_and_lastword_matches_greedy_decoding(tiny_runs):
    run = tiny_runs["sparse"]
    model, config = load_model(run)
    model.eval()
    dcfg = data_config(config["run"]["data"], [])
    data = prepare_data(dcfg, tokenizer_path=str(run / "checkpoint" / "tokenizer.json"))
    # The trainer's final evaluation: 2 batches of 4 windows of 32 tokens from the start of the held-out split.
    windows = list(eval_batches(data.heldout_tokens, 4, 32, 2))
    quality, agreement = heldout_pass(model, windows, torch.device("cpu"))
    assert agreement is None
    assert quality["heldout_ce"] == pytest.approx(tiny_runs["results"]["sparse"].heldout_ce, rel=1e-6)
    assert quality["heldout_tokens"] == 256

    docs = split_documents(data.heldout_tokens, data.eos_id, data.tokenizer.decode)
    encoded = encode_passages(lastword_passages(docs, 40, context_words=8, stride_words=8), lambda s: data.tokenizer.encode(s).ids, 32)
    assert len(encoded) == 40
    batched = lastword_accuracy(model, encoded, torch.device("cpu"), batch_size=7)
    correct, nll = 0, 0.0
    with torch.no_grad():
        for ctx, tgt in encoded:  # one at a time, generating greedily: no padding anywhere
            seq, ok = list(ctx), True
            for t in tgt:
                logp = torch.log_softmax(model(torch.tensor([seq]))[0, -1], -1)
                nll -= float(logp[t])
                ok = ok and int(logp.argmax()) == t
                seq.append(t)
            correct += ok
    assert batched["correct"] == correct and batched["passages"] == 40
    assert batched["mean_nll"] == pytest.approx(nll / 40, rel=1e-4)
