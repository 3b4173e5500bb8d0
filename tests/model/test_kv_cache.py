"""Incremental decoding with a KVCache gives the logits of the full forward, position by position."""

import pytest
import torch

from sparsify_cli.config.schema import ModelConfig
from sparsify_cli.model import KVCache, SparseLlama


def make(**kw) -> SparseLlama:
    base = dict(d_model=64, n_layers=3, n_heads=4, d_ffn=128, vocab_size=97, max_seq_len=32)
    torch.manual_seed(0)
    return SparseLlama(ModelConfig(**{**base, **kw})).double().eval()


@pytest.mark.parametrize("kw", [dict(), dict(n_kv_heads=2), dict(ffn="plain", activation="relu")])
def test_token_by_token_and_chunked_decoding_match_the_full_forward(kw):
    model = make(**kw)
    tokens = torch.randint(0, 97, (3, 20))
    with torch.no_grad():
        full = model(tokens)  # (3, 20, V)
        cache = KVCache.allocate(model.cfg, batch=3, capacity=20, device="cpu", dtype=torch.float64)
        parts = [model(tokens[:, :7], cache)]  # prefill
        parts += [model(tokens[:, i:i + 1], cache) for i in range(7, 12)]  # one token at a time
        parts.append(model(tokens[:, 12:20], cache))  # a chunk after a cached prefix (masked attention)
    assert cache.length == 20
    assert torch.allclose(torch.cat(parts, dim=1), full, atol=1e-10, rtol=0)


def test_rewinding_the_length_repeats_a_step_exactly():
    model = make()
    tokens = torch.randint(0, 97, (2, 9))
    with torch.no_grad():
        cache = KVCache.allocate(model.cfg, 2, 16, "cpu", torch.float64)
        model(tokens[:, :8], cache)
        first = model(tokens[:, 8:9], cache)
        cache.length = 8
        again = model(tokens[:, 8:9], cache)
    assert torch.equal(first, again) and cache.length == 9


def test_refuses_what_does_not_fit():
    model = make()
    cache = KVCache.allocate(model.cfg, 2, 8, "cpu", torch.float64)
    with torch.no_grad():
        model(torch.zeros(2, 6, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="KVCache is full: 6 \\+ 3 positions exceed its capacity 8"):
            model(torch.zeros(2, 3, dtype=torch.long), cache)
        with pytest.raises(ValueError, match="holds 2 sequences; got a batch of 1"):
            model(torch.zeros(1, 1, dtype=torch.long), cache)
    with pytest.raises(ValueError, match="exceeds model.max_seq_len=32"):
        KVCache.allocate(model.cfg, 1, 64, "cpu")
