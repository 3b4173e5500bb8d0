"""The Llama-style decoder with sparse-friendly FFNs."""

from sparsify_cli.model.ffn import FeedForward
from sparsify_cli.model.kv_cache import KVCache
from sparsify_cli.model.transformer import SparseLlama

__all__ = ["FeedForward", "KVCache", "SparseLlama"]
