"""A whole model's decode step captured in a CUDA graph (bench/model.py's DecodeGraph), on the GPU.

The model suite's tiny synthetic model and its packed twin (as the suite packs it), bf16. Under the graph the packed
FFNs run the sparse decode kernels (eagerly they take the dense path at decode sizes), so the sparse graph's
logits are checked against an eager step of the dense twin: within 2× plain bf16's own error against the fp32 model
(+1e-3 slack), and within the suite's bf16-vs-bf16 tolerance (3e-2). Replays after rewinding are bit-identical.
"""

from __future__ import annotations

import copy

import pytest
import torch

from sparsify_cli.bench import model as bm
from sparsify_cli.bench import model_pair as mp
from sparsify_cli.bench.settings import resolve
from sparsify_cli.kernels import ffn as kffn
from sparsify_cli.model import KVCache

DEV = torch.device("cuda")


def _rel(a: torch.Tensor, ref: torch.Tensor) -> float:
    return float((a.float() - ref.float()).norm() / ref.float().norm().clamp_min(1e-30))


@pytest.fixture(scope="module")
def models():
    # tiny preset: D 128, H 512, 2 layers, 4 heads; 99.5% sparse, so that every packed layer's calibrated density
    # is under the policy's decode limit (the sparse kernels run in every layer under the graph)
    s = resolve("model", "cuda", ["shapes=tiny", "sparsity=0.995"])
    return s, mp.load_models(s, None, DEV)


@pytest.mark.parametrize("batch,ctx", [(1, 16), (8, 16), (4, 0)])
def test_graph_replay_matches_an_eager_step_of_the_dense_twin(models, monkeypatch, batch, ctx):
    s, m = models
    assert m.backend == "cuda"
    assert all(bm.sparse_under_graph(f, batch) for f in m.sparse.ffns)
    gen = torch.Generator().manual_seed(batch + ctx)
    tokens = torch.randint(0, s.vocab, (batch, 1), generator=gen).to(DEV)
    context = torch.randint(0, s.vocab, (batch, ctx), generator=gen).to(DEV) if ctx else None
    # fp32 reference: the dense twin in fp32, eager, with a cache of its own
    ref_model = copy.deepcopy(m.dense).float()
    calls = []  # the dense FFN path, and whether it ran under capture
    real_dense = kffn.dense_ffn
    monkeypatch.setattr(kffn, "dense_ffn",
                        lambda *a, **k: calls.append(torch.cuda.is_current_stream_capturing()) or real_dense(*a, **k))
    with torch.inference_mode():
        cache32 = KVCache.allocate(ref_model.cfg, batch, ctx + 1, DEV, torch.float32)
        if ctx:
            ref_model(context, cache32)
        ref = ref_model(tokens, cache32)

        dense = bm.DecodeGraph(m.dense, tokens, context)
        calls.clear()
        sparse = bm.DecodeGraph(m.sparse, tokens, context)
        assert True not in calls  # nothing took the dense FFN path under capture: the sparse kernels are in the graph
        assert False in calls  # while the eager warm-up steps (decode-sized) took it
        eager = dense.step().clone()  # the dense twin, eager
        eager_packed = sparse.step().clone()  # the packed model, eager: its dense path
        got = sparse.replay().clone()
        assert torch.isfinite(got).all() and got.shape == (batch, 1, s.vocab)
        bf16_err = _rel(eager, ref)
        assert _rel(got, ref) <= 2 * bf16_err + 1e-3, (_rel(got, ref), bf16_err)
        assert _rel(got, eager) < 3e-2 and _rel(eager_packed, eager) < 3e-2
        assert _rel(dense.replay(), eager) < 1e-3  # the dense graph is the eager step, replayed

        # rewound replays are identical, also after an eager step wrote the cache slot at ctx in between
        again = sparse.replay().clone()
        sparse.step()
        third = sparse.replay().clone()
        assert torch.equal(got, again) and torch.equal(got, third)
        assert sparse.cache.length == ctx and dense.cache.length == ctx
