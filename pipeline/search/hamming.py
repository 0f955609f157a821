"""Hamming search over 256-bit codes held as (N, 4) uint64 arrays (stage 1 of a query or sweep).

Results are always ordered by (distance, index): equal distances go to the lower index, so a query
gives the same answer on every run, machine, thread count and device.

The scans are compiled kernels (`_kernels.py`, numba) that release the GIL: the rows are cut into one
contiguous range per thread, each thread keeps its own per-query top-k heaps, and the heaps are merged
by (distance, index). Selection is fused into the scan (a row is kept only when it beats the query's
current k-th distance or `max_distance`), so a query never materializes its N distances. Many queries
pass over each cache-resident block of codes (`top_k_many`); a single query runs at memory speed.

`top_k_many(..., device="cuda")` runs the same search with torch (`torch_hamming.py`); by default it does
so when torch sees a GPU.
"""

from __future__ import annotations

import functools
import operator
import os
import sys
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np

from pipeline.errors import SpecMismatchError
from pipeline.index.schema import CODE_BYTES

WORDS = CODE_BYTES // 8
BITS = CODE_BYTES * 8
NO_MATCH = -1  # index padding in top_k_many rows that hold fewer than k results
NO_DISTANCE = np.iinfo(np.uint16).max  # distance padding next to NO_MATCH
KEY_SHIFT = 40  # sort keys are distance << 40 | index: at most 2**40 codes per scan
MAX_ROWS = 1 << KEY_SHIFT
CPU = "cpu"  # the compiled CPU kernels; any other device name runs torch on that device

_INDEX_MASK = np.uint64((1 << KEY_SHIFT) - 1)
_EMPTY_KEY = np.uint64(np.iinfo(np.uint64).max)
_MIN_PAIRS_PER_THREAD = 1 << 16  # below this many (query, code) pairs a thread costs more than it saves


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


@functools.cache
def default_threads() -> int:
    """Threads a scan uses by default: the CPUs this process may run on (read once)."""
    return max(1, len(os.sched_getaffinity(0)))


def distances(codes: np.ndarray, query: np.ndarray | bytes, *, threads: int | None = None) -> np.ndarray:
    """Distance from `query` to every row of `codes`, as uint16 of shape (N,)."""
    codes = _check_codes(codes)
    q = _check_query(query)
    out = np.empty(codes.shape[0], dtype=np.uint16)
    kernels = _kernels()
    _run(lambda lo, hi: kernels.distances(codes, q, lo, hi, out), codes.shape[0], 1, threads)
    return out


def top_k(
    codes: np.ndarray,
    query: np.ndarray | bytes,
    k: int,
    max_distance: int | None = None,
    *,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """The k nearest rows: (indices int64, distances uint16), ordered by (distance, index).

    Fewer than k come back when the index is smaller or `max_distance` leaves fewer.

    Raises:
        ValueError: k <= 0 or max_distance < 0. SpecMismatchError: wrong code width.
    """
    q = _check_query(query)
    idx, dist = top_k_many(codes, q[None, :], k, max_distance, device=CPU, threads=threads)
    found = idx[0] != NO_MATCH
    return idx[0][found], dist[0][found]


def within(
    codes: np.ndarray, query: np.ndarray | bytes, max_distance: int, *, threads: int | None = None
) -> tuple[np.ndarray, np.ndarray]:
    """Every row within `max_distance`: (indices int64, distances uint16), ordered by (distance, index)."""
    _check_max_distance(max_distance)
    d = distances(codes, query, threads=threads)
    idx = np.flatnonzero(d <= max_distance)
    idx = idx[np.argsort(d[idx], kind="stable")]  # stable: ties keep ascending index order
    return idx.astype(np.int64, copy=False), d[idx]


def top_k_many(
    codes: np.ndarray,
    queries: np.ndarray,
    k: int,
    max_distance: int | None = None,
    *,
    device: Any = None,
    threads: int | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """`top_k` for each row of `queries` (Q, 4) in one pass over `codes`, never a Q x N matrix.

    Args:
        codes: (N, 4) uint64, any strides (a non-contiguous array is copied once).
        queries: (Q, 4) uint64.
        k: results per query.
        max_distance: keep only rows within this many bits.
        device: `"cpu"` for the compiled CPU kernels; any other device name (`"cuda"`, `"cuda:1"`) or a
            `torch.device` (even `torch.device("cpu")`) runs torch there; None: `"cuda"` when torch
            sees a GPU, else `"cpu"`.
        threads: CPU threads (default: `default_threads()`).

    Returns (indices (Q, min(k, N)) int64, distances same shape uint16), each row ordered by
    (distance, index). Slots left empty by `max_distance` hold NO_MATCH and NO_DISTANCE, at the end.
    Memory: O(Q * k * threads) besides the inputs.

    Raises:
        ValueError: k <= 0, max_distance < 0, queries not 2-D, more than 2**40 codes.
        TypeError: not uint64. SpecMismatchError: wrong code width.
    """
    codes = _check_codes(codes)
    queries = _check_codes(queries, what="queries")
    k = _check_k(k)
    _check_max_distance(max_distance)
    n, nq = codes.shape[0], queries.shape[0]
    if n >= MAX_ROWS:
        raise ValueError(f"at most 2**{KEY_SHIFT} codes per scan, got {n}")
    kk = min(k, n)
    if kk == 0 or nq == 0:
        return _unpack(np.full((nq, kk), _EMPTY_KEY, dtype=np.uint64))
    device = _choose_device(device)
    if device != CPU:
        from pipeline.search import torch_hamming

        return torch_hamming.top_k_many(codes, queries, k, max_distance, device=device)
    codes = np.ascontiguousarray(codes)
    queries = np.ascontiguousarray(queries)
    kernels = _kernels()
    cut0 = np.uint64(BITS + 1 if max_distance is None else min(max_distance, BITS) + 1)

    def scan(lo: int, hi: int) -> np.ndarray:
        keys = np.full(nq * kk, _EMPTY_KEY, dtype=np.uint64)
        cut = np.full(nq, cut0, dtype=np.uint64)
        kernels.top_k(codes, queries, lo, hi, kk, cut, keys)
        return keys.reshape(nq, kk)

    parts = _run(scan, n, nq, threads)
    keys = parts[0] if len(parts) == 1 else np.concatenate(parts, axis=1)
    keys.sort(axis=1)
    return _unpack(keys[:, :kk])


def _run(scan: Callable[[int, int], Any], n: int, nq: int, threads: int | None) -> list[Any]:
    """`scan(lo, hi)` over one contiguous row range per thread, results in row order."""
    threads = default_threads() if threads is None else operator.index(threads)
    if threads <= 0:
        raise ValueError(f"threads must be positive, got {threads}")
    threads = max(1, min(threads, (n * nq) // _MIN_PAIRS_PER_THREAD, n))
    if threads == 1:
        return [scan(0, n)]
    bounds = np.linspace(0, n, threads + 1).astype(np.int64).tolist()
    pool = _pool(threads)
    return list(pool.map(scan, bounds[:-1], bounds[1:]))


@functools.cache
def _pool(threads: int) -> ThreadPoolExecutor:
    return ThreadPoolExecutor(max_workers=threads, thread_name_prefix="hamming")


@functools.cache
def _kernels() -> ModuleType:
    # numba costs ~0.5 s to import: only the first scan pays it, not `modelhash --help`.
    from pipeline.search import _kernels

    return _kernels


def _choose_device(device: Any) -> Any:
    if device is None:
        return "cuda" if _cuda_available() else CPU
    return CPU if isinstance(device, str) and device == CPU else device


@functools.cache
def _cuda_available() -> bool:
    # Importing torch costs ~2 s: ask it only where a GPU driver is present (NVIDIA, or ROCm's /dev/kfd).
    nvidia = Path("/proc/driver/nvidia/gpus")
    driver = (nvidia.is_dir() and any(nvidia.iterdir())) or Path("/dev/kfd").exists()
    if not driver and "torch" not in sys.modules:
        return False
    try:
        import torch
    except ImportError:
        return False
    return bool(torch.cuda.is_available())


def _unpack(keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    empty = keys == _EMPTY_KEY
    indices = (keys & _INDEX_MASK).astype(np.int64)
    dists = (keys >> np.uint64(KEY_SHIFT)).astype(np.uint16)
    indices[empty] = NO_MATCH
    dists[empty] = NO_DISTANCE
    return indices, dists


def _check_codes(codes: np.ndarray, what: str = "codes", ndim: int = 2) -> np.ndarray:
    """`codes` as the kernels take them: a uint64 array of `ndim` dimensions (a query: 1), WORDS per code."""
    if not isinstance(codes, np.ndarray):
        raise TypeError(f"{what} must be a numpy array, got {type(codes).__name__}")
    if codes.dtype != np.uint64:
        raise TypeError(f"{what} must be uint64, got {codes.dtype}")
    if codes.ndim != ndim:
        shape = f"(N, {WORDS})" if ndim == 2 else f"({WORDS},)"
        raise ValueError(f"{what} must be {ndim}-D {shape}, got shape {codes.shape}")
    if codes.shape[-1] != WORDS:
        raise SpecMismatchError(f"{what}: codes of {codes.shape[-1] * 8} bytes, expected {CODE_BYTES}")
    return codes


def _check_query(query: np.ndarray | bytes) -> np.ndarray:
    if isinstance(query, bytes | bytearray | memoryview):
        return as_words(query)
    if not isinstance(query, np.ndarray):
        raise TypeError(f"query must be bytes or a numpy array, got {type(query).__name__}")
    return _check_codes(query, "query", ndim=1)


def _check_k(k: int) -> int:
    k = operator.index(k)
    if k <= 0:
        raise ValueError(f"k must be positive, got {k}")
    return k


def _check_max_distance(max_distance: int | None) -> None:
    if max_distance is not None and operator.index(max_distance) < 0:
        raise ValueError(f"max_distance must be >= 0, got {max_distance}")
