"""Sweeps: many query codes against an index's whole-model codes and per-block codes, k best each.

A sweep's unit of work is a `Target`: some rows of an index (all of them on one machine, a few shards in
a Ray task) with their per-block codes. `search` scans one target for every query and returns `Hits`:
per query, the k best (distance, key) pairs, where the key says which code matched and orders ties:
the row for a whole-model code, `row << PART_BITS | position` for the position-th block of a row. Hits of
disjoint targets `merge` into exactly the hits of their union, so a Ray sweep (one target per task) and
a local one give the same answer. Memory is O(Q x k) on top of the codes: never Q x N.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import pyarrow as pa

from pipeline.search import hamming

PART_BITS = 20  # blocks per model < 2**20; row << 20 | position stays below 2**60
NO_KEY = hamming.NO_MATCH
WHOLE = "whole"
PARTS = "parts"


@dataclass(frozen=True, slots=True)
class Target:
    """Index rows to search: whole-model codes with their row numbers, and per-block codes.

    `rows` must ascend (row numbers in the whole index); `part_rows` too, with `part_position` numbering
    a row's blocks 0, 1, ... in index order, and `part_name` their block names.
    """

    codes: np.ndarray  # (N, 4) uint64
    rows: np.ndarray  # (N,) int64
    part_codes: np.ndarray  # (P, 4) uint64
    part_rows: np.ndarray  # (P,) int64
    part_position: np.ndarray  # (P,) int64
    part_name: pa.Array | pa.ChunkedArray  # (P,) string

    @classmethod
    def of(
        cls,
        codes: np.ndarray,
        rows: np.ndarray | None = None,
        *,
        part_codes: np.ndarray | None = None,
        part_rows: np.ndarray | None = None,
        part_name: pa.Array | Sequence[str] | None = None,
    ) -> Target:
        """A target from codes (rows 0..N-1 unless given) and optional per-block codes of those rows."""
        rows = np.arange(codes.shape[0], dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        if part_codes is None:
            part_codes = np.empty((0, hamming.WORDS), dtype=np.uint64)
            part_rows = np.empty(0, dtype=np.int64)
            part_name = []
        if part_rows is None or part_name is None:
            raise ValueError("per-block codes need their rows and names")
        part_rows = np.asarray(part_rows, dtype=np.int64)
        if not isinstance(part_name, pa.Array | pa.ChunkedArray):
            part_name = pa.array(list(part_name), pa.string())
        return cls(codes, rows, part_codes, part_rows, _positions(part_rows), part_name)


@dataclass(frozen=True, slots=True)
class Hits:
    """Per query, the k best matches of one kind (WHOLE or PARTS), ordered by (distance, key).

    `distance` (Q, k) uint16 and `key` (Q, k) int64; `name` (Q, k) object holds block names for PARTS.
    Empty slots (fewer than k within `max_distance`) hold NO_DISTANCE and NO_KEY, at the end.
    """

    kind: str
    distance: np.ndarray
    key: np.ndarray
    name: np.ndarray

    @property
    def rows(self) -> np.ndarray:
        """The index row of each hit (NO_KEY where empty)."""
        if self.kind == WHOLE:
            return self.key
        return np.where(self.key == NO_KEY, NO_KEY, self.key >> PART_BITS)


def search(
    target: Target,
    queries: np.ndarray,
    k: int,
    max_distance: int | None = None,
    *,
    parts: bool = True,
    device: Any = None,
    threads: int | None = None,
) -> dict[str, Hits]:
    """The k best whole-model codes (and, with `parts`, per-block codes) of `target` for each query."""
    out = {WHOLE: _search_kind(WHOLE, target.codes, target.rows, None, queries, k, max_distance, device, threads)}
    if parts:
        keys = (target.part_rows << PART_BITS) | target.part_position
        names = target.part_name
        out[PARTS] = _search_kind(PARTS, target.part_codes, keys, names, queries, k, max_distance, device, threads)
    return out


def merge(hits: Sequence[Hits], k: int) -> Hits:
    """The k best of several targets' hits for the same queries, by (distance, key): as one search would."""
    if not hits:
        raise ValueError("nothing to merge")
    if len(hits) == 1 and hits[0].key.shape[1] <= k:
        return hits[0]
    distance = np.concatenate([h.distance for h in hits], axis=1)
    key = np.concatenate([h.key for h in hits], axis=1)
    name = np.concatenate([h.name for h in hits], axis=1)
    # Empty slots (NO_DISTANCE) sort last whatever their key; keys are unique among real hits.
    order = np.lexsort((key, distance), axis=-1)[:, :k]
    return Hits(
        kind=hits[0].kind,
        distance=np.take_along_axis(distance, order, axis=1),
        key=np.take_along_axis(key, order, axis=1),
        name=np.take_along_axis(name, order, axis=1),
    )


def empty_hits(kind: str, n_queries: int) -> Hits:
    """Hits with no slot: what a target without codes gives."""
    shape = (n_queries, 0)
    return Hits(kind, np.empty(shape, np.uint16), np.empty(shape, np.int64), np.empty(shape, object))


def _search_kind(
    kind: str,
    codes: np.ndarray,
    keys: np.ndarray,
    names: pa.Array | pa.ChunkedArray | None,
    queries: np.ndarray,
    k: int,
    max_distance: int | None,
    device: Any,
    threads: int | None,
) -> Hits:
    idx, dist = hamming.top_k_many(codes, queries, k, max_distance, device=device, threads=threads)
    found = idx != hamming.NO_MATCH
    key = np.full(idx.shape, NO_KEY, dtype=np.int64)
    key[found] = keys[idx[found]]
    name = np.full(idx.shape, None, dtype=object)
    if names is not None and found.any():
        name[found] = names.take(pa.array(idx[found])).to_numpy(zero_copy_only=False)
    return Hits(kind=kind, distance=dist, key=key, name=name)


def _positions(rows: np.ndarray) -> np.ndarray:
    """0, 1, ... within each run of equal (ascending) rows."""
    if rows.size and np.any(rows[1:] < rows[:-1]):
        raise ValueError("part rows must ascend")
    return np.arange(rows.size, dtype=np.int64) - np.searchsorted(rows, rows, side="left")
