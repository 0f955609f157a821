"""Hamming search over 256-bit codes held as (N, 4) uint64 arrays (stage 1 of a query or sweep).

Results are always ordered by (distance, index): equal distances go to the lower index, so a query
gives the same answer on every run and machine.

The scan walks rows in chunks and XORs one 64-bit word column at a time: on this project's machines
that is about 4x faster than XOR-ing whole (chunk, 4) blocks (the per-word temporaries stay in cache).
"""

from __future__ import annotations

import operator

import numpy as np

from pipeline.errors import SpecMismatchError
from pipeline.index.schema import CODE_BYTES

WORDS = CODE_BYTES // 8
BITS = CODE_BYTES * 8
NO_MATCH = -1  # index padding in top_k_many rows that hold fewer than k results
NO_DISTANCE = np.iinfo(np.uint16).max  # distance padding next to NO_MATCH

_CHUNK_ROWS = 32_768
_TILE_CELLS = 1 << 21  # queries x codes per top_k_many tile: ~16 MiB of uint64 scratch
_INDEX_BITS = 48  # top_k_many packs (distance << 48 | index) into one uint64 sort key
_INDEX_MASK = np.uint64((1 << _INDEX_BITS) - 1)
_EMPTY_KEY = np.iinfo(np.uint64).max


def as_words(code: bytes) -> np.ndarray:
    """A 32-byte code as 4 native uint64 words, the layout `IndexReader.load_codes` produces.

    Raises:
        SpecMismatchError: the code is not CODE_BYTES long.
    """
    if not isinstance(code, bytes | bytearray | memoryview):
        raise TypeError(f"code must be bytes, got {type(code).__name__}")
    if len(code) != CODE_BYTES:
        raise SpecMismatchError(f"code is {len(code)} bytes, the index holds {CODE_BYTES}-byte codes")
    return np.frombuffer(bytes(code), dtype=np.uint64).copy()


def as_bytes(words: np.ndarray) -> bytes:
    """The inverse of `as_words`."""
    return _check_query(words).tobytes()


def distance(a: bytes, b: bytes) -> int:
    """The Hamming distance between two codes.

    Raises:
        SpecMismatchError: either code is not CODE_BYTES long.
    """
    for code in (a, b):
        if len(code) != CODE_BYTES:
            raise SpecMismatchError(f"code is {len(code)} bytes, expected {CODE_BYTES}")
    return (int.from_bytes(a, "little") ^ int.from_bytes(b, "little")).bit_count()


def distances(codes: np.ndarray, query: np.ndarray | bytes) -> np.ndarray:
    """Distance from `query` to every row of `codes`, as uint16 of shape (N,)."""
    codes = _check_codes(codes)
    q = _check_query(query)
    n = codes.shape[0]
    out = np.empty(n, dtype=np.uint16)
    chunk = min(_CHUNK_ROWS, max(n, 1))
    xor = np.empty(chunk, dtype=np.uint64)
    bits = np.empty(chunk, dtype=np.uint8)
    for start in range(0, n, chunk):
        stop = min(start + chunk, n)
        m = stop - start
        acc = out[start:stop]
        acc[:] = 0
        for w in range(WORDS):
            np.bitwise_xor(codes[start:stop, w], q[w], out=xor[:m])
            np.bitwise_count(xor[:m], out=bits[:m])
            np.add(acc, bits[:m], out=acc)
    return out


def top_k(
    codes: np.ndarray, query: np.ndarray | bytes, k: int, max_distance: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows: (indices int64, distances uint16), ordered by (distance, index).

    Fewer than k come back when the index is smaller or `max_distance` leaves fewer.

    Raises:
        ValueError: k <= 0 or max_distance < 0. SpecMismatchError: wrong code width.
    """
    k = _check_k(k)
    _check_max_distance(max_distance)
    d = distances(codes, query)
    candidates = None
    if max_distance is not None:
        candidates = np.flatnonzero(d <= max_distance)
        d = d[candidates]
    if k < d.shape[0]:
        part = np.argpartition(d, k - 1)[:k]
        # argpartition picks arbitrary members of the tie at the k-th distance: every row below it
        # is in `part`, so take the tie's lowest indices explicitly.
        kth = d[part].max()
        below = part[d[part] < kth]
        tied = np.flatnonzero(d == kth)[: k - below.shape[0]]
        sel = np.concatenate([below, tied])
    else:
        sel = np.arange(d.shape[0])
    sel = sel[np.lexsort((sel, d[sel]))]
    indices = sel if candidates is None else candidates[sel]
    return indices.astype(np.int64, copy=False), d[sel]


def within(codes: np.ndarray, query: np.ndarray | bytes, max_distance: int) -> tuple[np.ndarray, np.ndarray]:
    """Every row within `max_distance`: (indices int64, distances uint16), ordered by (distance, index)."""
    _check_max_distance(max_distance)
    d = distances(codes, query)
    idx = np.flatnonzero(d <= max_distance)
    idx = idx[np.argsort(d[idx], kind="stable")]  # stable: ties keep ascending index order
    return idx.astype(np.int64, copy=False), d[idx]


def top_k_many(
    codes: np.ndarray, queries: np.ndarray, k: int, max_distance: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` for each row of `queries` (Q, 4), scanning codes tile by tile, never a Q x N matrix.

    Returns (indices (Q, min(k, N)) int64, distances same shape uint16), each row ordered by
    (distance, index). Slots left empty by `max_distance` hold NO_MATCH and NO_DISTANCE, at the end.

    Raises:
        ValueError: k <= 0, max_distance < 0, queries not 2-D. TypeError: not uint64.
        SpecMismatchError: wrong code width.
    """
    codes = _check_codes(codes)
    queries = _check_codes(queries, what="queries")
    k = _check_k(k)
    _check_max_distance(max_distance)
    n, nq = codes.shape[0], queries.shape[0]
    if n >= 1 << _INDEX_BITS:
        raise ValueError(f"at most 2**{_INDEX_BITS} codes per scan, got {n}")
    kk = min(k, n)
    # Each query keeps its best kk (distance << 48 | index) keys: unique per row, so sorting keys
    # orders by (distance, index) with no tie left to chance.
    best = np.full((nq, kk), _EMPTY_KEY, dtype=np.uint64)
    if kk == 0 or nq == 0:
        return _unpack(best)
    block = min(n, max(_CHUNK_ROWS, kk))
    q_tile = max(1, _TILE_CELLS // block)
    for q0 in range(0, nq, q_tile):
        qs = queries[q0 : q0 + q_tile]
        kept = best[q0 : q0 + q_tile]
        xor = np.empty((qs.shape[0], block), dtype=np.uint64)
        bits = np.empty((qs.shape[0], block), dtype=np.uint8)
        dist = np.empty((qs.shape[0], block), dtype=np.uint16)
        for c0 in range(0, n, block):
            m = min(block, n - c0)
            x, b, d = xor[:, :m], bits[:, :m], dist[:, :m]
            d[:] = 0
            for w in range(WORDS):
                np.bitwise_xor(codes[c0 : c0 + m, w][None, :], qs[:, w][:, None], out=x)
                np.bitwise_count(x, out=b)
                np.add(d, b, out=d)
            keys = x  # reuse the scratch: the XOR is consumed
            np.left_shift(d, np.uint64(_INDEX_BITS), out=keys, dtype=np.uint64)
            np.bitwise_or(keys, np.arange(c0, c0 + m, dtype=np.uint64)[None, :], out=keys)
            if max_distance is not None:
                keys[d > max_distance] = _EMPTY_KEY
            merged = np.concatenate([kept, keys], axis=1)
            if merged.shape[1] > kk:
                merged = np.partition(merged, kk - 1, axis=1)[:, :kk]
            kept[:] = merged
        kept.sort(axis=1)
    return _unpack(best)


def _unpack(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    empty = keys == _EMPTY_KEY
    indices = (keys & _INDEX_MASK).astype(np.int64)
    dists = (keys >> np.uint64(_INDEX_BITS)).astype(np.uint16)
    indices[empty] = NO_MATCH
    dists[empty] = NO_DISTANCE
    return indices, dists


def _check_codes(codes: np.ndarray, what: str = "codes") -> np.ndarray:
    if not isinstance(codes, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(codes).__name__}")
    if codes.dtype != np.uint64:
        raise TypeError(f"{what} must be uint64, got {codes.dtype}")
    if codes.ndim != 2:
        raise ValueError(f"{what} must be 2-D (N, {WORDS}), got shape {codes.shape}")
    if codes.shape[1] != WORDS:
        raise SpecMismatchError(f"{what} hold {codes.shape[1] * 8}-byte codes, expected {CODE_BYTES}")
    return codes


def _check_query(query: np.ndarray | bytes) -> np.ndarray:
    if isinstance(query, bytes | bytearray | memoryview):
        return as_words(query)
    if not isinstance(query, np.ndarray):
        raise TypeError(f"query must be bytes or a numpy array, got {type(query).__name__}")
    if query.dtype != np.uint64:
        raise TypeError(f"query must be uint64, got {query.dtype}")
    if query.ndim != 1:
        raise ValueError(f"query must be 1-D ({WORDS},), got shape {query.shape}")
    if query.shape[0] != WORDS:
        raise SpecMismatchError(f"query is a {query.shape[0] * 8}-byte code, expected {CODE_BYTES}")
    return query


def _check_k(k: int) -> int:
    k = operator.index(k)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return k


def _check_max_distance(max_distance: int | None) -> None:
    if max_distance is not None and operator.index(max_distance) < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
