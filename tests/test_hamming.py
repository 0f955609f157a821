"""Hamming search against a plain-Python reference, ties and edge cases included."""

from __future__ import annotations

import tracemalloc

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


@pytest.mark.parametrize("threads", [1, 2, 3])
def test_top_k_many_across_threads_blocks_and_query_groups(rng: np.random.Generator, monkeypatch, threads) -> None:
    # Several thread ranges (their heaps merged), several 2048-row cache blocks, and a query count
    # that is not a multiple of the kernel's group of four.
    monkeypatch.setattr(hamming, "_MIN_PAIRS_PER_THREAD", 1)
    codes = _tied_codes(rng, 5000)
    queries = np.concatenate([codes[[0, 3, 4999]], rng.integers(0, 2**64, size=(6, 4), dtype=np.uint64)])
    idx, dist = hamming.top_k_many(codes, queries, 10, threads=threads)
    ref = hamming.top_k_many(codes, queries, 10, threads=1)
    assert np.array_equal(idx, ref[0]) and np.array_equal(dist, ref[1])
    for qi, q in enumerate(queries[:4]):
        assert (idx[qi].tolist(), dist[qi].tolist()) == _ref_top_k(codes, q, 10)
    with pytest.raises(ValueError):
        hamming.top_k_many(codes, queries, 1, threads=0)


def test_read_only_and_strided_codes(rng: np.random.Generator) -> None:
    codes = rng.integers(0, 2**64, size=(3000, 4), dtype=np.uint64)
    frozen = codes.copy()
    frozen.flags.writeable = False  # what IndexReader.load_codes hands out
    wide = np.zeros((3000, 8), dtype=np.uint64)
    wide[:, 1::2] = codes
    for variant in (frozen, wide[:, 1::2]):
        assert np.array_equal(hamming.top_k_many(variant, codes[:5], 7)[0], hamming.top_k_many(codes, codes[:5], 7)[0])
        assert np.array_equal(hamming.top_k(variant, codes[9], 3)[0], [9, *hamming.top_k(codes, codes[9], 3)[0][1:]])


def test_k_larger_than_n_returns_every_row(rng: np.random.Generator) -> None:
    codes = _tied_codes(rng, 12)
    idx, dist = hamming.top_k(codes, codes[0], 1000)
    assert (idx.tolist(), dist.tolist()) == _ref_top_k(codes, codes[0], 1000)
    many, _ = hamming.top_k_many(codes, codes[:2], 1000)
    assert many.shape == (2, 12)


@pytest.mark.parametrize("max_distance", [None, 0, 100])
def test_torch_path_gives_the_same_answer(rng: np.random.Generator, monkeypatch, max_distance) -> None:
    """The torch kernels, run on the CPU here; on a GPU the same test body holds (see bench/RESULTS.md)."""
    torch = pytest.importorskip("torch")
    from pipeline.search import torch_hamming

    monkeypatch.setattr(torch_hamming, "_TILE_CELLS", 3 * 500)  # several query tiles and code blocks
    codes = _tied_codes(rng, 2000)
    codes[-300:] = rng.integers(0, 2**64, size=(300, 4), dtype=np.uint64)
    queries = np.concatenate([codes[[3, 10, 1999]], rng.integers(0, 2**64, size=(4, 4), dtype=np.uint64)])
    want = hamming.top_k_many(codes, queries, 25, max_distance, device="cpu")
    got = hamming.top_k_many(codes, queries, 25, max_distance, device=torch.device("cpu"))
    assert np.array_equal(got[0], want[0]) and np.array_equal(got[1], want[1])
    on_device = torch_hamming.to_device(codes, "cpu")
    again = torch_hamming.top_k_many(on_device, queries, 25, max_distance, device="cpu")
    assert np.array_equal(again[0], want[0])
    x = torch_hamming.to_device(codes, "cpu")
    assert np.array_equal(torch_hamming.popcount64(x).numpy(), np.bitwise_count(codes))
    empty = torch_hamming.top_k_many(codes[:0], queries, 3, device="cpu")
    assert empty[0].shape == (7, 0)


def test_top_k_many_memory_does_not_grow_with_n(rng: np.random.Generator) -> None:
    """Scratch is O(Q x k x threads): the same for 100k and 1.6M codes (the inputs aside)."""
    queries = rng.integers(0, 2**64, size=(64, 4), dtype=np.uint64)
    peaks = []
    for n in (100_000, 1_600_000):
        codes = rng.integers(0, 2**64, size=(n, 4), dtype=np.uint64)
        hamming.top_k_many(codes, queries, 10)  # compile and warm the pool outside the measurement
        tracemalloc.start()
        hamming.top_k_many(codes, queries, 10)
        peaks.append(tracemalloc.get_traced_memory()[1])
        tracemalloc.stop()
    assert peaks[1] < 2 * peaks[0] + 64 * 1024
    assert peaks[1] < 1_000_000  # far below the 51 MB of codes


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
