"""sparsify: sparse transformer language models (ReLU FFNs + L1), TwELL packing and sparse kernels."""

__version__ = "0.1.0"
