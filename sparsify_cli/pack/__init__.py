"""`sparsify pack` and packed models: calibration, dead-neuron removal, neuron order, format choice, loading."""

from sparsify_cli.pack.pack import PackOptions, pack_checkpoint
from sparsify_cli.pack.packed import PackedFFN, is_packed_dir, load_packed, read_manifest

__all__ = ["PackOptions", "PackedFFN", "is_packed_dir", "load_packed", "pack_checkpoint", "read_manifest"]
