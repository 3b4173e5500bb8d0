"""A Llama-style decoder: token embedding, pre-norm blocks of (RMSNorm, grouped-KV attention with rotary
embeddings, RMSNorm, FFN), a final RMSNorm and the LM head (tied to the embedding or not)."""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F
from torch import nn
from torch.utils.checkpoint import checkpoint

from sparsify_cli.config.schema import ModelConfig, RopeScalingConfig
from sparsify_cli.model.ffn import ActivationObserver, FeedForward
from sparsify_cli.model.kv_cache import KVCache


class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(dim))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # Normalize in fp32 (bf16 sums of squares lose too much), return in the input's dtype. F.rms_norm is one
        # fused kernel on the GPU (forward and backward) where the spelled-out formula was ~8 elementwise ones.
        return F.rms_norm(x.float(), (x.shape[-1],), self.weight.float(), self.eps).to(x.dtype)


def rotary_tables(
    head_dim: int, max_len: int, theta: float, scaling: RopeScalingConfig | None = None
) -> tuple[torch.Tensor, torch.Tensor]:
    """cos, sin of shape (max_len, head_dim/2), for the "rotate halves" convention Llama checkpoints use."""
    inv_freq = 1.0 / (theta ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))  # (hd/2,)
    if scaling is not None and scaling.type == "linear":
        inv_freq = inv_freq / scaling.factor
    elif scaling is not None and scaling.type == "llama3":
        # Long wavelengths (> original / low_freq_factor) slow down by `factor`, short ones (< original /
        # high_freq_factor) stay, and the band between blends the two linearly in original / wavelength.
        wavelen = 2 * math.pi / inv_freq
        smooth = (scaling.original_max_seq_len / wavelen - scaling.low_freq_factor) / (
            scaling.high_freq_factor - scaling.low_freq_factor
        )
        blended = (1 - smooth) * inv_freq / scaling.factor + smooth * inv_freq
        inv_freq = torch.where(
            wavelen > scaling.original_max_seq_len / scaling.low_freq_factor,
            inv_freq / scaling.factor,
            torch.where(wavelen < scaling.original_max_seq_len / scaling.high_freq_factor, inv_freq, blended),
        )
    angles = torch.outer(torch.arange(max_len, dtype=torch.float64), inv_freq)  # (L, hd/2)
    return angles.cos().float(), angles.sin().float()


def _rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotate the pairs (x_i, x_{i+hd/2}) by the angles of cos/sin (broadcast), in fp32, back to x's dtype."""
    x1, x2 = x.float().chunk(2, dim=-1)
    return torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin), dim=-1).to(x.dtype)


class _Rotary(torch.autograd.Function):
    """Rotary embedding with its backward spelled out: the gradient is the inverse rotation (sin -> -sin) of the
    incoming gradient made contiguous. Autograd's own backward ran ~8 strided elementwise kernels on the gradient
    (it arrives as a transposed view from attention); this is one copy and the same vectorized ops as forward."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
        ctx.save_for_backward(cos, sin)
        return _rotate(x, cos, sin)

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        cos, sin = ctx.saved_tensors
        return _rotate(grad.contiguous(), cos, -sin), None, None


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """x: (B, T, nh, hd), as the projection lays it out (contiguous, so the elementwise kernels are vectorized:
    on the (B, nh, T, hd) view they ran strided, a large share of a training step's time); cos/sin: (T, hd/2)."""
    cos, sin = cos[:, None, :], sin[:, None, :]  # (T, 1, hd/2): the same angle for every head
    if torch.is_grad_enabled() and x.requires_grad:
        return _Rotary.apply(x, cos, sin)
    return _rotate(x, cos, sin)


class Attention(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        self.n_heads, self.n_kv_heads, self.head_dim = cfg.n_heads, cfg.n_kv_heads, cfg.head_dim
        d = cfg.d_model
        self.q = nn.Linear(d, cfg.n_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.k = nn.Linear(d, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.v = nn.Linear(d, cfg.n_kv_heads * cfg.head_dim, bias=cfg.attn_bias)
        self.o = nn.Linear(cfg.n_heads * cfg.head_dim, d, bias=False)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        """x (B, T, D) at positions pos … pos+T-1, cos/sin for those positions. cache = (keys, values, pos): this
        layer's KVCache buffers; the new keys/values are written at [pos, pos+T) and attention covers [0, pos+T)."""
        b, t, _ = x.shape
        q = apply_rotary(self.q(x).view(b, t, self.n_heads, self.head_dim), cos, sin).transpose(1, 2)  # (B, nh, T, hd)
        k = apply_rotary(self.k(x).view(b, t, self.n_kv_heads, self.head_dim), cos, sin).transpose(1, 2)
        v = self.v(x).view(b, t, self.n_kv_heads, self.head_dim).transpose(1, 2)  # (B, nkv, T, hd)
        pos = 0
        if cache is not None:
            keys, values, pos = cache
            keys[:, :, pos:pos + t] = k
            values[:, :, pos:pos + t] = v
            k, v = keys[:, :, :pos + t].to(q.dtype), values[:, :, :pos + t].to(q.dtype)  # (B, nkv, pos+T, hd)
        if self.n_kv_heads != self.n_heads:  # grouped KV: each KV head serves n_heads / n_kv_heads queries
            rep = self.n_heads // self.n_kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
        if pos == 0:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)  # (B, nh, T, hd)
        elif t == 1:  # one new token: it sees every cached position and itself
            y = F.scaled_dot_product_attention(q, k, v)
        else:  # new token i (position pos+i) sees positions <= pos+i
            allowed = torch.ones(t, pos + t, dtype=torch.bool, device=x.device).tril(diagonal=pos)
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=allowed)
        return self.o(y.transpose(1, 2).reshape(b, t, self.n_heads * self.head_dim))


class Block(nn.Module):
    def __init__(self, cfg: ModelConfig, layer_index: int):
        super().__init__()
        self.attn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.attn = Attention(cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.ffn = FeedForward(cfg, layer_index)

    def forward(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                cache: tuple[torch.Tensor, torch.Tensor, int] | None = None) -> torch.Tensor:
        x = x + self.attn(self.attn_norm(x), cos, sin, cache)
        return x + self.ffn(self.ffn_norm(x))


class SparseLlama(nn.Module):
    """The decoder. forward(tokens (B, T), cache=None) -> logits (B, T, V).

    With a KVCache (model/kv_cache.py) the tokens continue the cached ones: they sit at positions cache.length …,
    attend to everything cached, and are appended (cache.length grows by T)."""

    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.vocab_size <= 0:
            raise ValueError("ModelConfig.vocab_size must be set (it is taken from the tokenizer)")
        self.cfg = cfg
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.blocks = nn.ModuleList(Block(cfg, i) for i in range(cfg.n_layers))
        self.norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        if cfg.tie_embeddings:
            self.lm_head.weight = self.embed.weight
        cos, sin = rotary_tables(cfg.head_dim, cfg.max_seq_len, cfg.rope_theta, cfg.rope_scaling)
        # Not saved in checkpoints: they are a function of the config.
        self.register_buffer("rope_cos", cos, persistent=False)
        self.register_buffer("rope_sin", sin, persistent=False)
        self.activation_checkpointing = False
        self.reset_parameters()

    def reset_parameters(self) -> None:
        std = self.cfg.init_std
        # Residual-output projections get the GPT-2 depth scaling so the residual stream does not grow with depth.
        out_std = std / math.sqrt(2 * self.cfg.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("norm.weight"):
                nn.init.ones_(p)
            elif name.endswith(".bias"):
                nn.init.zeros_(p)
            elif name.endswith(("o.weight", "down.weight")):
                nn.init.normal_(p, std=out_std)
            else:
                nn.init.normal_(p, std=std)

    @property
    def ffns(self) -> list[FeedForward]:
        return [b.ffn for b in self.blocks]

    def set_observer(self, observer: ActivationObserver | None) -> None:
        for ffn in self.ffns:
            ffn.observer = observer

    def forward(self, tokens: torch.Tensor, cache: KVCache | None = None) -> torch.Tensor:
        b, t = tokens.shape
        pos = 0 if cache is None else cache.length
        if pos + t > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {pos + t} tokens exceeds model.max_seq_len={self.cfg.max_seq_len}")
        if cache is not None:
            cache.check_append(b, t)
        x = self.embed(tokens)  # (B, T, D)
        cos, sin = self.rope_cos[pos:pos + t], self.rope_sin[pos:pos + t]
        for i, block in enumerate(self.blocks):
            if cache is not None:
                x = block(x, cos, sin, (cache.keys[i], cache.values[i], pos))
            elif self.activation_checkpointing and self.training:
                x = checkpoint(block, x, cos, sin, use_reentrant=False)
            else:
                x = block(x, cos, sin)
        if cache is not None:
            cache.length = pos + t
        return self.lm_head(self.norm(x))  # (B, T, V)

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())
