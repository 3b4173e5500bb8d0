"""TwELL v1 reference: bit layout, round trips, overflow, validation (docs/FORMAT.md)."""

import math

import pytest
import torch

from sparsify_cli.formats.twell import (
    FORMAT_VERSION,
    TwELL,
    TwELLOverflowError,
    decode_entries,
    encode_entries,
    pack_twell,
    unpack_twell,
)


def naive_words(a: torch.Tensor, tile: int, compression: int) -> torch.Tensor:
    """Independent, loop-based statement of the layout (small inputs only)."""
    m_rows, h = a.shape
    n_tiles, s = math.ceil(h / tile), tile // compression
    words = [[[0] * s for _ in range(n_tiles)] for _ in range(m_rows)]
    bits = a.to(torch.bfloat16).view(torch.int16).tolist()
    for m in range(m_rows):
        for t in range(n_tiles):
            cols = [j for j in range(t * tile, min((t + 1) * tile, h)) if a[m, j] != 0]
            words[m][t][0] = len(cols)
            for i, j in enumerate(cols[: s - 1]):
                u = (j << 16) | (bits[m][j] & 0xFFFF)
                words[m][t][1 + i] = u - (1 << 32) if u >= 1 << 31 else u
    return torch.tensor(words, dtype=torch.int32).view(m_rows, n_tiles, s)


def random_activations(m, h, density, seed, dtype=torch.float32):
    g = torch.Generator().manual_seed(seed)
    a = torch.rand(m, h, generator=g) + 0.01
    a = torch.where(torch.rand(m, h, generator=g) < density, a, torch.zeros(()))
    return a.to(dtype)


def test_hand_built_1x64_words():
    a = torch.zeros(1, 64)
    a[0, 3], a[0, 10], a[0, 33], a[0, 40] = 1.0, 2.5, 3.0, 0.5  # bf16: 3F80, 4020, 4040, 3F00
    tw = pack_twell(a, tile=32, compression=8)  # S = 4 slots: count + 3 entries per tile
    expected = torch.tensor(
        [[[2, 0x0003_3F80, 0x000A_4020, 0], [2, 0x0021_4040, 0x0028_3F00, 0]]], dtype=torch.int32
    )
    assert torch.equal(tw.words, expected)
    assert tw.version == FORMAT_VERSION == "twell-v1"
    assert (tw.slots, tw.capacity, tw.n_tiles, tw.nnz) == (4, 3, 2, 4)


def test_high_columns_use_the_sign_bit():
    a = torch.zeros(1, 65536)
    a[0, 32768], a[0, 65535] = -1.0, 1.0  # bf16 BF80, 3F80
    tw = pack_twell(a, tile=256, compression=8)
    assert tw.words[0, 128, :3].tolist() == [1, 0x8000_BF80 - 2**32, 0]
    assert tw.words[0, 255, :3].tolist() == [1, 0xFFFF_3F80 - 2**32, 0]  # == -49280
    assert torch.equal(unpack_twell(tw), a.to(torch.bfloat16))


def test_encode_decode_round_trip():
    cols = torch.tensor([0, 1, 255, 32767, 32768, 65535])
    vals = torch.tensor([1.0, -0.0078125, 3.0e38, float("inf"), -2.0, 1e-3]).to(torch.bfloat16)
    words = encode_entries(cols, vals)
    assert words.dtype == torch.int32
    c, v = decode_entries(words)
    assert torch.equal(c, cols) and torch.equal(v.view(torch.int16), vals.view(torch.int16))


@pytest.mark.parametrize(
    "m,h,tile,comp,density",
    [(1, 64, 32, 4, 0.1), (1, 5632, 256, 8, 0.01), (7, 300, 64, 4, 0.1), (33, 1000, 128, 2, 0.2),
     (20, 100, 32, 16, 0.004), (16, 2049, 1024, 16, 0.02), (3, 257, 256, 8, 0.01)],
)
def test_round_trip_matches_naive_layout(m, h, tile, comp, density):
    a = random_activations(m, h, density, seed=m * 1000 + h)
    tw = pack_twell(a, tile=tile, compression=comp)
    assert tw.words.shape == (m, math.ceil(h / tile), tile // comp)
    assert torch.equal(tw.words, naive_words(a, tile, comp))
    assert tw.nnz > 0 and tw.n_overflow_tiles == 0  # densities chosen so that the exact round trip is what is tested
    assert torch.equal(unpack_twell(tw), a.to(torch.bfloat16))
    assert torch.equal(tw.counts.sum(dim=1), (a != 0).sum(dim=1).to(torch.int32))


def test_bf16_input_round_trips_exactly_and_fp32_rounds_like_torch():
    a32 = random_activations(9, 700, 0.03, seed=1) * 1.2345
    tw32 = pack_twell(a32)
    assert torch.equal(unpack_twell(tw32), a32.to(torch.bfloat16))
    assert not torch.equal(unpack_twell(tw32).float(), a32)  # rounding really happened
    a16 = a32.to(torch.bfloat16)
    assert torch.equal(unpack_twell(pack_twell(a16)), a16)
    assert torch.equal(pack_twell(a16).words, tw32.words)


def test_row_blocks_do_not_change_the_result(monkeypatch):
    import sparsify_cli.formats.twell as twell_mod

    a = random_activations(37, 300, 0.1, seed=3)
    whole = pack_twell(a, tile=64, compression=4)
    monkeypatch.setattr(twell_mod, "_PACK_CHUNK_ELEMS", 700)  # 2 rows per step, ragged last step
    assert torch.equal(pack_twell(a, tile=64, compression=4).words, whole.words)


def test_empty_rows_and_all_zero_input():
    a = random_activations(6, 200, 0.1, seed=5)
    a[2] = 0.0
    tw = pack_twell(a, tile=64, compression=4)
    assert tw.n_overflow_tiles == 0
    assert torch.equal(tw.words[2], torch.zeros_like(tw.words[2]))
    assert torch.equal(unpack_twell(tw), a.to(torch.bfloat16))
    z = pack_twell(torch.zeros(4, 130), tile=32, compression=4)
    assert not z.words.any() and z.nnz == 0


def test_zero_rows():
    tw = pack_twell(torch.zeros(0, 300), tile=64, compression=8)
    assert tw.words.shape == (0, 5, 8)
    assert tw.row_overflow.shape == (0,) and tw.n_overflow_tiles == 0
    assert unpack_twell(tw).shape == (0, 300)


def test_full_tile_is_not_overflow_but_one_more_is():
    a = torch.zeros(2, 64)
    a[0, 32:39] = torch.arange(1, 8, dtype=torch.float32)  # 7 = capacity of tile 32 / C 4 (S = 8)
    a[1, 0:8] = torch.arange(1, 9, dtype=torch.float32)  # 8 > 7
    tw = pack_twell(a, tile=32, compression=4)
    assert tw.capacity == 7
    assert tw.counts.tolist() == [[0, 7], [8, 0]]
    assert tw.row_overflow.tolist() == [False, True]
    assert tw.n_overflow_tiles == 1
    # the full tile: all 7 slots used, in ascending column order
    c, v = decode_entries(tw.words[0, 1, 1:])
    assert c.tolist() == list(range(32, 39)) and v.float().tolist() == list(range(1, 8))
    # the overflowed tile: true count, the first 7 entries, column 7 not stored anywhere
    c, v = decode_entries(tw.words[1, 0, 1:])
    assert c.tolist() == list(range(0, 7))
    with pytest.raises(TwELLOverflowError, match="overflowed"):
        unpack_twell(tw)
    partial = unpack_twell(tw, allow_overflow=True)
    expected = a.to(torch.bfloat16)
    expected[1, 7] = 0  # documented: only stored entries come back
    assert torch.equal(partial, expected)


def test_overflow_in_random_data_is_counted_exactly():
    a = random_activations(20, 500, 0.3, seed=7)
    tw = pack_twell(a, tile=64, compression=8)  # capacity 7, ~19 expected per tile
    true_counts = (torch.nn.functional.pad(a, (0, 12)).view(20, 8, 64) != 0).sum(-1)
    assert torch.equal(tw.counts, true_counts.to(torch.int32))
    assert tw.row_overflow.all()
    assert torch.equal(tw.words, naive_words(a, 64, 8))
    rows, cols, vals = tw.entries()
    assert rows.numel() == 0  # overflow rows are left out by default


def test_nan_is_an_entry_and_negative_zero_is_not():
    a = torch.zeros(2, 64)
    a[0, 5] = float("nan")
    a[0, 6] = -0.0
    a[1, 7] = 1e-45  # non-zero in fp32, rounds to 0 in bf16: counted, stored with bits 0
    tw = pack_twell(a, tile=64, compression=8)
    assert tw.counts.tolist() == [[1], [1]]
    out = unpack_twell(tw)
    assert torch.isnan(out[0, 5]) and out[0].isnan().sum() == 1
    assert tw.words[1, 0, 1].item() == 7 << 16


@pytest.mark.parametrize(
    "shape,tile,comp,match",
    [((64,), 32, 8, "2-D"), ((2, 3, 4), 32, 8, "2-D"), ((1, 65537), 256, 8, "65536"), ((1, 64), 48, 8, "multiple of 32"),
     ((1, 64), 2048, 8, "multiple of 32"), ((1, 64), 0, 8, "multiple of 32"), ((1, 64), 256, 3, "compression"),
     ((1, 64), 256, 32, "compression"), ((2, 0), 256, 8, "H=0")],
)
def test_invalid_arguments_raise_value_error(shape, tile, comp, match):
    with pytest.raises(ValueError, match=match):
        pack_twell(torch.zeros(shape), tile=tile, compression=comp)


def test_integer_input_and_bad_words_are_rejected():
    with pytest.raises(ValueError, match="floating"):
        pack_twell(torch.zeros(2, 64, dtype=torch.int32))
    with pytest.raises(ValueError, match="shape"):
        TwELL(words=torch.zeros(2, 3, 32, dtype=torch.int32), n_cols=300, tile=256, compression=8)
    with pytest.raises(ValueError, match="int32"):
        TwELL(words=torch.zeros(2, 2, 32, dtype=torch.int64), n_cols=300, tile=256, compression=8)


def test_corrupt_column_is_reported():
    words = torch.zeros(1, 1, 4, dtype=torch.int32)
    words[0, 0, 0], words[0, 0, 1] = 1, encode_entries(torch.tensor([40]), torch.tensor([1.0]))[0]
    tw = TwELL(words=words, n_cols=20, tile=32, compression=8)
    with pytest.raises(ValueError, match="corrupt"):
        unpack_twell(tw)


def test_validate_accepts_packed_words_and_names_each_broken_rule():
    from sparsify_cli.formats.twell import validate_twell

    a = random_activations(6, 300, 0.1, seed=8)
    good = pack_twell(a, tile=64, compression=4)
    validate_twell(good)
    validate_twell(pack_twell(random_activations(6, 300, 0.5, seed=8), tile=64, compression=8))  # with overflow
    m, t = 3, 1
    assert good.counts[m, t] >= 2

    def broken(edit):
        w = good.words.clone()
        edit(w)
        return TwELL(words=w, n_cols=300, tile=64, compression=4)

    def set_entry(w, i, col):
        w[m, t, 1 + i] = encode_entries(torch.tensor([col]), torch.tensor([1.0]))[0]

    cases = {
        "count outside": lambda w: w[m, t].__setitem__(0, 65),
        "outside its tile": lambda w: set_entry(w, 0, 3),
        "ascending": lambda w: set_entry(w, 1, int(decode_entries(w[m, t, 1])[0])),
        "unused slot": lambda w: w[m, t].__setitem__(-1, 7),
    }
    for what, edit in cases.items():
        with pytest.raises(ValueError, match=what):
            validate_twell(broken(edit))
    # a column in the padded part of the last tile (>= H) is invalid too
    w = good.words.clone()
    w[0, 4, 0], w[0, 4, 1] = 1, encode_entries(torch.tensor([310]), torch.tensor([1.0]))[0]
    w[0, 4, 2:] = 0
    with pytest.raises(ValueError, match=">= H"):
        validate_twell(TwELL(words=w, n_cols=300, tile=64, compression=4))
