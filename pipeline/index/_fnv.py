"""A compiled 64-bit FNV-1a over Arrow string arrays: the key hashes that make `reader._last_of_key` fast.

Imported only when an index is loaded for search (numba costs ~0.5 s to import); `cache=True` keeps
the compiled kernel beside this file, so only the first load on a machine compiles it.
"""

from __future__ import annotations

import numba
import numpy as np

OFFSET = 0xCBF29CE484222325
PRIME = 0x100000001B3
_PRIME = np.uint64(PRIME)


@numba.njit(nogil=True, cache=True)
def fnv1a(offsets, data, seeds, out):
    """out[r] = FNV-1a of data[offsets[r]:offsets[r + 1]], starting from seeds[r] instead of OFFSET."""
    for r in range(out.shape[0]):
        h = seeds[r]
        for j in range(offsets[r], offsets[r + 1]):
            h = (h ^ np.uint64(data[j])) * _PRIME
        out[r] = h


def seed(value: str | None) -> int:
    """FNV-1a of a short string (a row's source) and a separator; None hashes apart from every string."""
    h = OFFSET
    for byte in (b"\xff" if value is None else value.encode()) + b"\x00":
        h = ((h ^ byte) * PRIME) & 0xFFFFFFFFFFFFFFFF
    return h
