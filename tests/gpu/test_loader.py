"""The loader launches on torch's current stream, through CuPy's non-deprecated stream wrapper."""

import warnings

import torch

from sparsify_cli.kernels import loader


def test_current_stream_wraps_torchs_stream_without_deprecation():
    loader._streams.clear()
    side = torch.cuda.Stream()
    with warnings.catch_warnings():
        warnings.simplefilter("error", DeprecationWarning)
        with torch.cuda.stream(side):
            ext = loader.current_stream()
    assert ext.ptr == side.cuda_stream
