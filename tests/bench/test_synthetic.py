"""PERFORMANCE.md's inputs with a chosen sparsity (bench/synthetic.py, shared by every suite and by tests/formats)."""

import pytest
import torch

from sparsify_cli.bench.synthetic import make_ffn_inputs


@pytest.mark.parametrize("nnz", [5.0, 20.0, 60.0])
def test_synthetic_inputs_hit_the_requested_density(nnz):
    inp = make_ffn_inputs(2048, 64, 1000, nnz, seed=9, dtype=torch.float32)
    per_token = (torch.relu(inp.x @ inp.gate.T) != 0).sum(dim=1).float()
    assert 0.7 * nnz < float(per_token.mean()) < 1.3 * nnz
    assert abs((inp.rates == 0).float().mean() - 0.3) < 0.01  # 30% dead neurons
    never = ((inp.x @ inp.gate.T) > 0).sum(0) == 0
    assert bool(never[inp.rates == 0].all())  # the dead ones never fire


def test_unreachable_density_is_refused():
    with pytest.raises(ValueError, match="not reachable"):
        make_ffn_inputs(4, 16, 100, 40.0)  # 70 live neurons capped at rate 0.5: at most 35
