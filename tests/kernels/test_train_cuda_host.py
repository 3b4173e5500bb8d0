"""The CUDA training op's host-side pieces that need no GPU: argument checks, the hot mask and its padding."""

import pytest
import torch

from sparsify_cli.kernels import train_cuda


def test_padded_hot_columns_are_aligned_and_keep_the_real_ones_first():
    idx = torch.tensor([3, 9, 17])
    padded = train_cuda._padded(idx)
    assert padded.numel() == train_cuda.HOT_ALIGN
    assert torch.equal(padded[:3], idx) and bool((padded[3:] == 3).all())  # repeats of a real column, zeroed later
    full = torch.arange(2 * train_cuda.HOT_ALIGN)
    assert train_cuda._padded(full) is full
    assert train_cuda._padded(torch.empty(0, dtype=torch.int64)).numel() == 0


def test_hot_mask_is_the_neurons_above_the_rate():
    counts = torch.tensor([0, 5, 6, 100])
    assert train_cuda.hot_mask(counts, 1000, rate=0.005).tolist() == [False, False, True, True]


def test_cuda_argument_checks_name_the_problem():
    x = torch.zeros(4, 16, dtype=torch.bfloat16)
    w = torch.zeros(8, 16, dtype=torch.bfloat16)
    with pytest.raises(ValueError, match="must be a CUDA tensor"):
        train_cuda.check_cuda_args(x, w, w, w.t(), 64)
    from sparsify_cli.train.ffn_kernels import ELL_WIDTH_MAX

    assert ELL_WIDTH_MAX <= train_cuda.MAX_WIDTH  # the policy never asks for a width the kernels refuse


def test_constants_match_the_kernel_source():
    src = (train_cuda.loader.kernel_dir() / train_cuda.SOURCE).read_text()
    for name, value in (("TRAIN_WARPS", train_cuda.TRAIN_WARPS), ("TRAIN_MAX_WIDTH", train_cuda.MAX_WIDTH),
                        ("NEURON_THREADS", train_cuda.NEURON_THREADS), ("PLAN_THREADS", train_cuda.PLAN_THREADS)):
        assert f"#define {name} {value}" in src, name
