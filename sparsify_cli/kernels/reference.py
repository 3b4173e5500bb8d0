"""Pure-torch references for every kernel in kernels_cu/ (the semantics the CUDA code must match).

Independent of sparsify_cli.formats on purpose (dependencies run formats -> kernels); tests check that both
agree bit for bit. Layout: docs/FORMAT.md (TwELL v1).
"""

from __future__ import annotations

import torch


def _n_tiles(hidden: int, tile: int) -> int:
    return (hidden + tile - 1) // tile


def relu_active(act: torch.Tensor) -> torch.Tensor:
    """The pack's notion of non-zero after relu: a > 0, NaN included, -0.0 excluded."""
    return ~(act <= 0)


def twell_pack_ref(act: torch.Tensor, tile: int = 256, slots: int = 32) -> torch.Tensor:
    """relu + TwELL pack of act (M, H) bf16 -> words (M, n_tiles, slots) int32."""
    if act.dtype != torch.bfloat16 or act.dim() != 2:
        raise ValueError(f"act must be a 2-D bf16 tensor, got {tuple(act.shape)} {act.dtype}")
    m, h = act.shape
    nt = _n_tiles(h, tile)
    k = slots - 1
    pad = nt * tile - h
    a = torch.nn.functional.pad(act, (0, pad)) if pad else act
    a = a.reshape(m, nt, tile)
    mask = relu_active(a)  # (M, NT, T)
    counts = mask.sum(-1, dtype=torch.int64)  # (M, NT)
    rank = torch.cumsum(mask.to(torch.int64), dim=-1) - 1  # (M, NT, T)
    keep = mask & (rank < k)
    bits = a.contiguous().view(torch.int16).to(torch.int64) & 0xFFFF
    cols = torch.arange(nt * tile, device=act.device, dtype=torch.int64).reshape(1, nt, tile)
    word = (cols << 16) | bits
    word = torch.where(word >= 2**31, word - 2**32, word)  # reinterpret as int32
    words = torch.zeros(m, nt, slots, dtype=torch.int64, device=act.device)
    mi, ti, ci = keep.nonzero(as_tuple=True)
    words[mi, ti, 1 + rank[mi, ti, ci]] = word.expand(m, nt, tile)[mi, ti, ci]
    words[:, :, 0] = counts
    return words.to(torch.int32)


def twell_ffn_ref(x: torch.Tensor, words: torch.Tensor, up: torch.Tensor | None, down_t: torch.Tensor,
                  act: torch.Tensor, tile: int = 256) -> torch.Tensor:
    """What the twell_ffn kernels compute, in fp32, rounded to x.dtype once.

    gated (up given): out = (a ⊙ (x·Uᵀ))·DownT ; plain: out = a·DownT, with a = the words' activation
    (overflowed tiles read from relu(act)). Shapes: x (M, D), words (M, NT, S), up/down_t (H, D), act (M, H).
    """
    a = twell_unpack_ref(words, act, tile)  # (M, H) fp32
    h = a * (x.float() @ up.float().T) if up is not None else a
    return (h @ down_t.float()).to(x.dtype)


def twell_unpack_ref(words: torch.Tensor, act: torch.Tensor, tile: int) -> torch.Tensor:
    """The dense activation (M, H) fp32 the words stand for; overflowed tiles are taken from relu(act), exactly."""
    m, nt, s = words.shape
    hidden = act.shape[1]
    k = s - 1
    w = words.to(torch.int64) & 0xFFFFFFFF
    counts = words[:, :, 0].to(torch.int64)
    n = counts.clamp(max=k)
    slot = torch.arange(1, s, device=words.device).reshape(1, 1, k)
    valid = slot <= n.unsqueeze(-1)
    cols = w[:, :, 1:] >> 16
    vals = (w[:, :, 1:] & 0xFFFF).to(torch.int16).view(torch.bfloat16).float()
    out = torch.zeros(m, nt * tile, dtype=torch.float32, device=words.device)
    mi = torch.arange(m, device=words.device).reshape(m, 1, 1).expand(m, nt, k)
    out[mi[valid], cols[valid]] = vals[valid]
    out = out[:, :hidden]
    over = counts > k
    if bool(over.any()):
        a = act.float()
        a = torch.where(relu_active(act), a, torch.zeros_like(a))
        col_tile = torch.arange(hidden, device=words.device) // tile
        out = torch.where(over[:, col_tile], a, out)
    return out


def dense_ffn_ref(x: torch.Tensor, w_act: torch.Tensor, up: torch.Tensor | None, down_t: torch.Tensor,
                  dtype: torch.dtype = torch.float32) -> torch.Tensor:
    """The whole FFN densely in ``dtype``: gated out = (relu(x·Gᵀ) ⊙ (x·Uᵀ))·DownT, plain relu(x·Uᵀ)·DownT."""
    xf = x.to(dtype)
    a = torch.relu(xf @ w_act.to(dtype).T)
    h = a * (xf @ up.to(dtype).T) if up is not None else a
    return h @ down_t.to(dtype)


def relu_ffn_ref(x: torch.Tensor, act: torch.Tensor, up: torch.Tensor | None, down_t: torch.Tensor,
                 c_start: int = 0, init: torch.Tensor | None = None) -> torch.Tensor:
    """What sparsify::relu_ffn computes (the fused prefill/decode kernels), in fp32, rounded once.

    a = relu(act) on columns >= c_start (NaN kept, as the pack does); out = init + (a ⊙ (x·Uᵀ))·DownT
    (gated) or init + a·DownT (plain). Shapes: x (M, D), act (M, H), up/down_t (H, D), init (M, D) or None.
    """
    a = torch.where(relu_active(act), act.float(), torch.zeros((), device=act.device))
    a[:, :c_start] = 0
    h = a * (x.float() @ up.float().T) if up is not None else a
    out = h @ down_t.float()
    if init is not None:
        out = out + init.float()
    return out.to(x.dtype)


def gemv_ref(x: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """What sparsify::gemv computes: x·wᵀ with fp32 sums, rounded to x.dtype once."""
    return (x.float() @ w.float().T).to(x.dtype)


def relu_mul_ref(act: torch.Tensor, n: int, u: torch.Tensor) -> torch.Tensor:
    """relu(act[:, :n]) ⊙ u in bf16 (kernels_cu/relu_mul.cu: the hybrid path's hot neurons)."""
    return torch.relu(act[:, :n]) * u


def relu_list_ref(act: torch.Tensor, c_start: int, u: torch.Tensor | None,
                  slots: int) -> tuple[torch.Tensor, torch.Tensor]:
    """What kernels_cu/relu_list.cu writes: h = relu(act[:, :c_start]) ⊙ u (u None: relu alone), and the cold
    list (M, slots) int32: per row the true count of relu-active columns >= c_start, then the first slots - 1 of
    them as TwELL words (column << 16 | bf16 bits) in ascending order. Slots past the count are zero here; the
    kernel leaves them unwritten."""
    hot = torch.relu(act[:, :c_start])
    h = hot * u if u is not None else hot
    cold = act.clone()
    cold[:, :c_start] = 0
    return h, twell_pack_ref(cold, tile=max(act.shape[1], 1), slots=slots)[:, 0]
