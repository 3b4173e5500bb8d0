"""The L1 penalty, its schedule, activation statistics and dead-neuron handling."""

from sparsify_cli.sparsity.penalty import l1_coefficient, layer_l1
from sparsify_cli.sparsity.stats import LayerStats, SparsityTracker, summarize

__all__ = ["LayerStats", "SparsityTracker", "l1_coefficient", "layer_l1", "summarize"]
