"""Corpora, tokenizer, token caches and batching: everything between text on disk and (x, y) tensors.

prepare_data(cfg) -> PreparedData (tokenizer + memory-mapped train/held-out token arrays);
BatchSampler for resumable random training windows; eval_batches for fixed held-out windows.
"""

from sparsify_cli.data.batches import BatchSampler, eval_batches
from sparsify_cli.data.prepare import PreparedData, prepare_data
from sparsify_cli.data.tokenizer import EOS_CANDIDATES, EOS_TOKEN

__all__ = ["BatchSampler", "EOS_CANDIDATES", "EOS_TOKEN", "PreparedData", "eval_batches", "prepare_data"]
