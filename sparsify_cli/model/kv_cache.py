"""Keys and values of the tokens a decoder has already seen, so that each new token attends to them without
recomputing them (incremental decoding).

    cache = KVCache.allocate(model.cfg, batch=4, capacity=1024, device=..., dtype=torch.bfloat16)
    logits = model(prompt, cache)      # (4, T, V); cache.length == T
    logits = model(next_tokens, cache) # (4, 1, V): attends to the T cached positions and itself

Buffers are allocated once at full capacity (static shapes: a decode step can be captured in a CUDA graph), and
`length` says how many positions are filled. Setting `length` back (e.g. to a prompt's length) forgets what came
after it; the buffers beyond `length` are never read.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from sparsify_cli.config.schema import ModelConfig


@dataclass(eq=False)
class KVCache:
    keys: list[torch.Tensor]  # per layer (B, n_kv_heads, capacity, head_dim), rotary already applied
    values: list[torch.Tensor]  # per layer (B, n_kv_heads, capacity, head_dim)
    length: int = 0  # positions filled

    @classmethod
    def allocate(cls, cfg: ModelConfig, batch: int, capacity: int, device: torch.device | str,
                 dtype: torch.dtype = torch.float32) -> "KVCache":
        if batch < 1 or capacity < 1:
            raise ValueError(f"KVCache needs batch >= 1 and capacity >= 1; got {batch}, {capacity}")
        if capacity > cfg.max_seq_len:
            raise ValueError(f"KVCache capacity {capacity} exceeds model.max_seq_len={cfg.max_seq_len}")
        shape = (batch, cfg.n_kv_heads, capacity, cfg.head_dim)
        return cls([torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)],
                   [torch.zeros(shape, device=device, dtype=dtype) for _ in range(cfg.n_layers)])

    @property
    def capacity(self) -> int:
        return self.keys[0].shape[2]

    @property
    def batch(self) -> int:
        return self.keys[0].shape[0]

    def check_append(self, batch: int, t: int) -> None:
        """Refuse, with the reason, an append of t positions for `batch` sequences that does not fit."""
        if batch != self.batch:
            raise ValueError(f"KVCache holds {self.batch} sequences; got a batch of {batch}")
        if self.length + t > self.capacity:
            raise ValueError(f"KVCache is full: {self.length} + {t} positions exceed its capacity {self.capacity}")
