"""train.compile on a GPU (inductor, Triton kernels): compiled decoder blocks and loss train like eager ones, with
dense FFNs and with the CUDA sparse training op between the compiled graphs."""

from __future__ import annotations

import copy

import pytest
import torch

from sparsify_cli.config.schema import ModelConfig
from sparsify_cli.model import SparseLlama
from sparsify_cli.sparsity import SparsityTracker
from sparsify_cli.train import compile as compiling

DEV = "cuda"


def _steps(model: SparseLlama, tokens: torch.Tensor, ce, steps: int = 3):
    tracker = SparsityTracker(model.cfg.n_layers, model.cfg.d_ffn, dead_window_tokens=1 << 20,
                              device=torch.device(DEV))
    model.set_observer(tracker)
    for _ in range(steps):  # later steps: the cached graphs, and the op's hot set from the previous step
        model.zero_grad()
        tracker.begin_forward(want_l1=True)
        with torch.autocast("cuda", dtype=torch.bfloat16):
            logits = model(tokens[:, :-1])
            loss = ce(logits, tokens[:, 1:]) + 0.1 * tracker.end_forward()
        loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads, tracker


@pytest.mark.parametrize("sparse", [False, True])
def test_compiled_training_matches_eager(sparse):
    torch._dynamo.reset()
    torch.manual_seed(0)
    cfg = ModelConfig(d_model=256, n_layers=2, n_heads=4, d_ffn=1024, vocab_size=512, max_seq_len=128,
                      mlp_bias=True)
    model = SparseLlama(cfg).to(DEV)
    with torch.no_grad():  # negative gate biases: ~1% of the neurons fire per token
        for ffn in model.ffns:
            scale = ffn.gate.weight.norm(dim=1)
            ffn.gate.bias.copy_(-(2.3 + 0.6 * torch.randn_like(scale)) * scale)
            ffn.sparse_train, ffn.sparse_backend, ffn.sparse_width = sparse, "cuda", 256
    compiled = copy.deepcopy(model)
    ce = compiling.compile_blocks(compiled)
    tokens = torch.randint(0, cfg.vocab_size, (4, 129), device=DEV)
    loss_e, grads_e, tr_e = _steps(model, tokens, compiling.cross_entropy)
    loss_c, grads_c, tr_c = _steps(compiled, tokens, ce)
    torch._dynamo.reset()
    # fused kernels round differently from eager ones (bf16 casts inside a fusion): agreement within bf16 noise
    assert abs(loss_c.item() - loss_e.item()) <= 1e-2 * abs(loss_e.item())
    num = sum(float((grads_c[n] - grads_e[n]).double().pow(2).sum()) for n in grads_e)
    den = sum(float(grads_e[n].double().pow(2).sum()) for n in grads_e)
    assert (num / den) ** 0.5 < 3e-2
    for a, b in zip(tr_c.layer_stats(), tr_e.layer_stats()):
        assert abs(a.mean_active - b.mean_active) <= 0.05 * max(b.mean_active, 1.0)
    if sparse:
        assert all(ffn.sparse_hot is not None for ffn in compiled.ffns), "the sparse op did not run between graphs"
