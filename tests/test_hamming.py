"""Hamming search against a plain-Python reference, ties and edge cases included."""

from __future__ import annotations

import numpy as np
import pytest

from pipeline.errors import SpecMismatchError
from pipeline.search import hamming


def _ref_distances(codes: np.ndarray, query: np.ndarray) -> list[int]:
    q = hamming.as_bytes(query)
    return [hamming.distance(row.tobytes(), q) for row in codes]


def _ref_top_k(codes: np.ndarray, query: np.ndarray, k: int, max_distance: int | None = None):
    ranked = sorted((d, i) for i, d in enumerate(_ref_distances(codes, query)))
    if max_distance is not None:
        ranked = [(d, i) for d, i in ranked if d <= max_distance]
    ranked = ranked[:k]
    return [i for _, i in ranked], [d for d, _ in ranked]


def _tied_codes(rng: np.random.Generator, n: int) -> np.ndarray:
    """Codes that share many exact distances: few distinct rows, and low-entropy bits."""
    base = rng.integers(0, 2**64, size=(n, 4), dtype=np.uint64)
    sparse = base & rng.integers(0, 2**64, size=(n, 4), dtype=np.uint64) & np.uint64(0x0101010101010101)
    sparse[::7] = sparse[3]  # exact duplicates: ties at every distance they sit at
    return sparse


@pytest.fixture
def rng() -> np.random.Generator:
    return np.random.default_rng(1234)


def test_words_round_trip(rng: np.random.Generator) -> None:
    code = rng.bytes(32)
    words = hamming.as_words(code)
    assert words.shape == (4,) and words.dtype == np.uint64
    assert hamming.as_bytes(words) == code


def test_distance_python_ints() -> None:
    a = bytes(32)
    b = bytes([0xFF]) + bytes(30) + bytes([0x01])
    assert hamming.distance(a, b) == 9
    assert hamming.distance(b, b) == 0


def test_distances_match_reference_across_chunks(rng: np.random.Generator) -> None:
    codes = rng.integers(0, 2**64, size=(70_000, 4), dtype=np.uint64)  # > 2 chunks of 32 Ki rows
    query = codes[123]
    d = hamming.distances(codes, query)
    assert d.dtype == np.uint16 and d.shape == (70_000,)
    sample = np.r_[0:50, 32_760:32_780, 69_950:70_000]
    assert d[sample].tolist() == _ref_distances(codes[sample], query)
    assert d[123] == 0
    assert np.array_equal(d, np.bitwise_count(codes ^ query).sum(axis=1))
    # bytes queries and non-contiguous code arrays give the same answer
    assert np.array_equal(hamming.distances(codes, hamming.as_bytes(query)), d)
    wide = np.zeros((70_000, 8), dtype=np.uint64)
    wide[:, ::2] = codes
    assert np.array_equal(hamming.distances(wide[:, ::2], query), d)


@pytest.mark.parametrize("k", [1, 5, 17, 299, 300, 1000])
@pytest.mark.parametrize("tied", [False, True])
def test_top_k_matches_reference(rng: np.random.Generator, k: int, tied: bool) -> None:
    codes = _tied_codes(rng, 300) if tied else rng.integers(0, 2**64, size=(300, 4), dtype=np.uint64)
    query = codes[10] if tied else rng.integers(0, 2**64, size=4, dtype=np.uint64)
    idx, dist = hamming.top_k(codes, query, k)
    ref_idx, ref_dist = _ref_top_k(codes, query, k)
    assert idx.dtype == np.int64 and dist.dtype == np.uint16
    assert idx.tolist() == ref_idx
    assert dist.tolist() == ref_dist
    assert len(idx) == min(k, 300)


def test_top_k_ties_go_to_lower_index() -> None:
    codes = np.zeros((10, 4), dtype=np.uint64)  # every row at distance 0
    idx, dist = hamming.top_k(codes, codes[0], 3)
    assert idx.tolist() == [0, 1, 2] and dist.tolist() == [0, 0, 0]


@pytest.mark.parametrize("max_distance", [0, 2, 5, 256])
def test_max_distance_filter_and_within(rng: np.random.Generator, max_distance: int) -> None:
    codes = _tied_codes(rng, 400)
    query = codes[3]
    idx, dist = hamming.top_k(codes, query, 20, max_distance=max_distance)
    assert (idx.tolist(), dist.tolist()) == _ref_top_k(codes, query, 20, max_distance)
    w_idx, w_dist = hamming.within(codes, query, max_distance)
    assert (w_idx.tolist(), w_dist.tolist()) == _ref_top_k(codes, query, 400, max_distance)


@pytest.mark.parametrize("tied", [False, True])
@pytest.mark.parametrize("k", [1, 7, 250])
def test_top_k_many_matches_reference(rng: np.random.Generator, tied: bool, k: int) -> None:
    n = 200
    codes = _tied_codes(rng, n) if tied else rng.integers(0, 2**64, size=(n, 4), dtype=np.uint64)
    queries = np.concatenate([codes[[3, 7, 50]], rng.integers(0, 2**64, size=(4, 4), dtype=np.uint64)])
    idx, dist = hamming.top_k_many(codes, queries, k)
    assert idx.shape == dist.shape == (7, min(k, n))
    for qi, q in enumerate(queries):
        ref_idx, ref_dist = _ref_top_k(codes, q, k)
        assert idx[qi].tolist() == ref_idx
        assert dist[qi].tolist() == ref_dist


def test_top_k_many_across_blocks_and_tiles(rng: np.random.Generator, monkeypatch) -> None:
    # Small blocks and tiles so that the merge across blocks and query tiles is exercised.
    monkeypatch.setattr(hamming, "_CHUNK_ROWS", 64)
    monkeypatch.setattr(hamming, "_TILE_CELLS", 64 * 3)
    codes = _tied_codes(rng, 1000)
    queries = np.concatenate([codes[[0, 3, 999]], rng.integers(0, 2**64, size=(5, 4), dtype=np.uint64)])
    idx, dist = hamming.top_k_many(codes, queries, 10)
    for qi, q in enumerate(queries):
        single = hamming.top_k(codes, q, 10)
        assert idx[qi].tolist() == single[0].tolist() == _ref_top_k(codes, q, 10)[0]
        assert dist[qi].tolist() == single[1].tolist()


def test_top_k_many_max_distance_pads(rng: np.random.Generator) -> None:
    codes = _tied_codes(rng, 150)
    queries = np.stack([codes[3], ~codes[3]])  # the second query is far from everything
    idx, dist = hamming.top_k_many(codes, queries, 30, max_distance=4)
    for qi, q in enumerate(queries):
        ref_idx, ref_dist = _ref_top_k(codes, q, 30, max_distance=4)
        found = idx[qi] != hamming.NO_MATCH
        assert idx[qi][found].tolist() == ref_idx and dist[qi][found].tolist() == ref_dist
        assert (dist[qi][~found] == hamming.NO_DISTANCE).all()
        assert found.tolist() == sorted(found.tolist(), reverse=True)  # padding only at the end
    assert not (idx[1] != hamming.NO_MATCH).any()


def test_empty_index() -> None:
    codes = np.empty((0, 4), dtype=np.uint64)
    q = np.zeros(4, dtype=np.uint64)
    assert hamming.distances(codes, q).shape == (0,)
    idx, dist = hamming.top_k(codes, q, 5)
    assert idx.shape == dist.shape == (0,)
    assert hamming.within(codes, q, 10)[0].shape == (0,)
    idx, dist = hamming.top_k_many(codes, np.zeros((3, 4), dtype=np.uint64), 5)
    assert idx.shape == dist.shape == (3, 0)
    idx, dist = hamming.top_k_many(np.zeros((5, 4), dtype=np.uint64), np.empty((0, 4), np.uint64), 2)
    assert idx.shape == (0, 2)


def test_bad_inputs() -> None:
    codes = np.zeros((5, 4), dtype=np.uint64)
    q = np.zeros(4, dtype=np.uint64)
    with pytest.raises(ValueError):
        hamming.top_k(codes, q, 0)
    with pytest.raises(ValueError):
        hamming.top_k_many(codes, codes, -1)
    with pytest.raises(ValueError):
        hamming.top_k(codes, q, 3, max_distance=-1)
    with pytest.raises(SpecMismatchError):
        hamming.distances(codes, bytes(16))
    with pytest.raises(SpecMismatchError):
        hamming.distances(np.zeros((5, 2), dtype=np.uint64), q)
    with pytest.raises(SpecMismatchError):
        hamming.top_k(codes, np.zeros(8, dtype=np.uint64), 1)
    with pytest.raises(SpecMismatchError):
        hamming.distance(bytes(32), bytes(31))
    with pytest.raises(SpecMismatchError):
        hamming.as_words(bytes(33))
    with pytest.raises(TypeError):
        hamming.distances(codes.astype(np.int64), q)
    with pytest.raises(TypeError):
        hamming.distances(codes, q.astype(np.uint32))
    with pytest.raises(ValueError):
        hamming.distances(codes, codes)  # a batch where one query is expected
    with pytest.raises(ValueError):
        hamming.top_k_many(codes, q, 1)  # one query where a batch is expected
