"""TwELL v1: tile-wise ELLPACK packing of FFN activations for inference (reference semantics).

The CUDA kernels must produce and consume exactly these words, bit for bit; docs/FORMAT.md is the spec.

    a: (M, H) activations  ──pack_twell──►  TwELL.words: int32 (M, n_tiles, S),  S = tile // compression
    words[m, t, 0]      true count of non-zeros of a[m, t*tile:(t+1)*tile] (may exceed capacity K = S - 1)
    words[m, t, 1 + i]  entry i < min(count, K), ascending column: (col << 16) | bf16_bits(value)
    other slots         0

A (token, tile) whose count exceeds K is "overflowed"; only its first K entries are stored and every consumer
must compute the whole row exactly by another path (see sparse_ffn.twell_ffn_forward). Nothing in this module
drops an entry without the count saying so.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
from torch import Tensor

FORMAT_VERSION = "twell-v1"
MAX_COLS = 65536  # column indices are 16-bit
MAX_TILE = 1024
COMPRESSIONS = (2, 4, 8, 16)
DEFAULT_TILE = 256
DEFAULT_COMPRESSION = 8

# pack_twell handles this many activations per step (bounds the memory of nonzero(); rows are never looped).
_PACK_CHUNK_ELEMS = 1 << 26


class TwELLOverflowError(ValueError):
    """A TwELL holds overflowed tiles and the caller asked for something only complete tiles can give."""


def check_twell_params(n_cols: int, tile: int, compression: int) -> None:
    """Raise ValueError unless (n_cols, tile, compression) describe a valid TwELL v1 layout."""
    if not 1 <= n_cols <= MAX_COLS:
        raise ValueError(f"TwELL needs 1 <= H <= {MAX_COLS} columns (16-bit indices); got H={n_cols}")
    if tile % 32 != 0 or not 32 <= tile <= MAX_TILE:
        raise ValueError(f"TwELL tile must be a multiple of 32 in [32, {MAX_TILE}]; got tile={tile}")
    if compression not in COMPRESSIONS:
        raise ValueError(f"TwELL compression must be one of {COMPRESSIONS}; got compression={compression}")
    if tile % compression != 0 or tile // compression < 2:
        raise ValueError(
            f"TwELL needs tile % compression == 0 and tile // compression >= 2 slots (count + 1 entry); "
            f"got tile={tile}, compression={compression}"
        )


def encode_entries(cols: Tensor, values: Tensor) -> Tensor:
    """Entry words (col << 16) | bf16_bits(value) as int32 (two's complement). cols: int (N,), values: float (N,).

    Values are rounded to bf16 with torch's .to(torch.bfloat16) (round to nearest even; NaN stays NaN).
    """
    bits = values.to(torch.bfloat16).view(torch.int16).to(torch.int64) & 0xFFFF  # (N,) in [0, 65535]
    word = (cols.to(torch.int64) << 16) | bits  # (N,) in [0, 2**32)
    return torch.where(word >= 2**31, word - 2**32, word).to(torch.int32)


def decode_entries(words: Tensor) -> tuple[Tensor, Tensor]:
    """Inverse of encode_entries: int32 words (any shape) -> (cols int64, values bf16), same shape."""
    w = words.to(torch.int64) & 0xFFFFFFFF
    cols = w >> 16
    bits = w & 0xFFFF
    bits = torch.where(bits >= 2**15, bits - 2**16, bits).to(torch.int16)
    return cols, bits.view(torch.bfloat16)


@dataclass(frozen=True, eq=False)  # holds tensors: compare .words etc. explicitly
class TwELL:
    """Packed activations of M tokens over n_cols neurons. words: int32 (M, n_tiles, S)."""

    words: Tensor  # (M, n_tiles, S) int32
    n_cols: int  # H, before padding to n_tiles * tile
    tile: int  # T
    compression: int  # C; S = T // C

    def __post_init__(self) -> None:
        check_twell_params(self.n_cols, self.tile, self.compression)
        if self.words.dtype != torch.int32 or self.words.dim() != 3:
            raise ValueError(f"TwELL.words must be a 3-D int32 tensor; got {self.words.dtype} {tuple(self.words.shape)}")
        want = (math.ceil(self.n_cols / self.tile), self.slots)
        if tuple(self.words.shape[1:]) != want:
            raise ValueError(f"TwELL.words must have shape (M, {want[0]}, {want[1]}); got {tuple(self.words.shape)}")

    @property
    def version(self) -> str:
        return FORMAT_VERSION

    @property
    def n_rows(self) -> int:
        return self.words.shape[0]

    @property
    def n_tiles(self) -> int:
        return self.words.shape[1]

    @property
    def slots(self) -> int:
        """S: 32-bit words per (token, tile): one count + S - 1 entries."""
        return self.tile // self.compression

    @property
    def capacity(self) -> int:
        """K = S - 1: entries a (token, tile) can hold."""
        return self.slots - 1

    @property
    def counts(self) -> Tensor:
        """True non-zero count per (token, tile), int32 (M, n_tiles); may exceed capacity."""
        return self.words[:, :, 0]

    @property
    def tile_overflow(self) -> Tensor:
        """bool (M, n_tiles): tiles whose count exceeds capacity (entries beyond K were not stored)."""
        return self.counts > self.capacity

    @property
    def row_overflow(self) -> Tensor:
        """bool (M,): rows with at least one overflowed tile; consumers must compute these exactly elsewhere."""
        return self.tile_overflow.any(dim=1)

    @property
    def n_overflow_tiles(self) -> int:
        return int(self.tile_overflow.sum())

    @property
    def nnz(self) -> int:
        """True number of non-zeros (stored or not)."""
        return int(self.counts.sum())

    def entries(self, include_overflow_rows: bool = False) -> tuple[Tensor, Tensor, Tensor]:
        """Stored entries as (rows int64 (N,), cols int64 (N,), values bf16 (N,)), row-major, ascending columns.

        Rows with an overflowed tile are left out unless include_overflow_rows=True (then their stored,
        incomplete entries come back too).
        """
        stored = self.counts.clamp(max=self.capacity)  # (M, n_tiles)
        valid = torch.arange(self.capacity, device=self.words.device) < stored.unsqueeze(-1)  # (M, n_tiles, K)
        if not include_overflow_rows:
            valid &= ~self.row_overflow[:, None, None]
        rows = valid.nonzero()[:, 0]  # (N,)
        cols, values = decode_entries(self.words[:, :, 1:][valid])  # (N,), (N,)
        if cols.numel() and int(cols.max()) >= self.n_cols:
            raise ValueError(f"corrupt TwELL: an entry has column {int(cols.max())} >= H={self.n_cols}")
        return rows, cols, values


def validate_twell(tw: TwELL) -> None:
    """Check every structural rule of TwELL v1 on tw.words; ValueError naming the first (row, tile) that breaks one.

    Rules: 0 <= count <= tile; stored entries have columns inside their own tile and below H, strictly ascending;
    slots past min(count, K) are 0. (pack_twell output always passes; use it on words a kernel wrote.)
    """
    counts = tw.counts  # (M, n_tiles)
    cols, _ = decode_entries(tw.words[:, :, 1:])  # (M, n_tiles, K)
    slot = torch.arange(tw.capacity, device=tw.words.device)  # (K,)
    used = slot < counts.clamp(min=0, max=tw.capacity).unsqueeze(-1)  # (M, n_tiles, K)
    first = (torch.arange(tw.n_tiles, device=tw.words.device) * tw.tile).view(1, -1, 1)  # (1, n_tiles, 1)
    in_tile = (cols >= first) & (cols < (first + tw.tile).clamp(max=tw.n_cols))
    ascending = torch.ones_like(used)
    ascending[:, :, 1:] = cols[:, :, 1:] > cols[:, :, :-1]
    problems = {
        "count outside [0, tile]": (counts < 0) | (counts > tw.tile),
        "entry column outside its tile or >= H": (used & ~in_tile).any(-1),
        "entry columns not strictly ascending": (used & ~ascending).any(-1),
        "unused slot not 0": (~used & (tw.words[:, :, 1:] != 0)).any(-1),
    }
    for what, bad in problems.items():
        if bad.any():
            m, t = bad.nonzero()[0].tolist()
            raise ValueError(f"invalid TwELL words: {what} at row {m}, tile {t} ({int(bad.sum())} tile(s) in all)")


def pack_twell(a: Tensor, tile: int = DEFAULT_TILE, compression: int = DEFAULT_COMPRESSION) -> TwELL:
    """Pack activations a (M, H) (any float dtype) into TwELL v1.

    "Non-zero" is a != 0 on the input value (so NaN counts and is stored; -0.0 does not). The stored value is
    a rounded to bf16; a value so small that it rounds to 0 is still an entry (with bits 0x0000).
    """
    if a.dim() != 2:
        raise ValueError(f"pack_twell expects a 2-D activation tensor (M, H); got shape {tuple(a.shape)}")
    if not a.is_floating_point():
        raise ValueError(f"pack_twell expects a floating-point tensor; got {a.dtype}")
    n_rows, n_cols = a.shape
    check_twell_params(n_cols, tile, compression)
    n_tiles = math.ceil(n_cols / tile)
    slots = tile // compression
    capacity = slots - 1
    words = torch.zeros(n_rows, n_tiles, slots, dtype=torch.int32, device=a.device)  # (M, n_tiles, S)
    flat = words.view(-1)
    rows_per_step = max(1, _PACK_CHUNK_ELEMS // n_cols)
    for r0 in range(0, n_rows, rows_per_step):  # row blocks only bound memory; everything inside is vectorized
        block = a[r0 : r0 + rows_per_step]  # (m, H)
        # nonzero() of a float tensor selects x != 0 (NaN in, -0.0 out) in row-major order: ascending columns.
        m, j = block.nonzero(as_tuple=True)  # (N,), (N,)
        group = m * n_tiles + torch.div(j, tile, rounding_mode="floor")  # (N,) (token, tile) within the block
        counts = torch.bincount(group, minlength=block.shape[0] * n_tiles)  # (m * n_tiles,)
        words[r0 : r0 + block.shape[0], :, 0] = counts.view(-1, n_tiles).to(torch.int32)
        starts = torch.cumsum(counts, 0) - counts  # (m * n_tiles,) first entry of each group
        rank = torch.arange(m.numel(), device=a.device) - starts[group]  # (N,) position within its tile
        keep = rank < capacity
        group, rank, m, j = group[keep], rank[keep], m[keep], j[keep]
        slot = (r0 * n_tiles + group) * slots + 1 + rank  # (N,) flat index into words
        flat[slot] = encode_entries(j, block[m, j])
    return TwELL(words=words, n_cols=n_cols, tile=tile, compression=compression)


def unpack_twell(tw: TwELL, allow_overflow: bool = False) -> Tensor:
    """TwELL -> bf16 (M, H) activations.

    Raises TwELLOverflowError if any tile overflowed, unless allow_overflow=True: then overflowed tiles come back
    with only their first K (lowest-column) entries and the rest read as zero, i.e. NOT the packed tensor.
    """
    if tw.n_overflow_tiles and not allow_overflow:
        bad = tw.row_overflow.nonzero().squeeze(1)
        raise TwELLOverflowError(
            f"TwELL has {tw.n_overflow_tiles} overflowed tile(s) (count > capacity {tw.capacity}) in "
            f"{bad.numel()} row(s), first rows {bad[:5].tolist()}; their entries are incomplete. "
            f"Pass allow_overflow=True to get only the stored entries, or use a smaller compression."
        )
    out = torch.zeros(tw.n_rows, tw.n_cols, dtype=torch.bfloat16, device=tw.words.device)  # (M, H)
    rows, cols, values = tw.entries(include_overflow_rows=True)
    out[rows, cols] = values
    return out
