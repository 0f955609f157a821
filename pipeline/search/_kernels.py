"""Compiled Hamming kernels (numba), imported on the first scan so that `import pipeline` stays light.

Every kernel works on rows [lo, hi) of an (N, 4) uint64 array and releases the GIL (`nogil`), so
`hamming.py` runs one per thread over disjoint row ranges. A 256-bit distance is four XOR + POPCNT of
64-bit words: popcount comes from LLVM's `ctpop`, a single instruction on any x86-64 with POPCNT.

Top-k keeps, per query, a max-heap of k keys `distance << KEY_SHIFT | row` (uint64): keys are unique, so
ordering them orders by (distance, row) and no tie is left to chance. Rows are scanned in increasing
order, so a new row enters a full heap only when its distance is strictly smaller than the heap's worst.

Row loops count in uint64: with a signed index numba adds negative-index wraparound to every load,
which cost ~15% of the many-query scan.
"""

from __future__ import annotations

import numba
import numpy as np
from numba import types
from numba.extending import intrinsic

KEY_SHIFT = 40  # rows < 2**40 per scan; distances (<= 256) sit above them
EMPTY_KEY = np.uint64(np.iinfo(np.uint64).max)  # an empty heap slot: larger than every real key
_SHIFT = np.uint64(KEY_SHIFT)
_BLOCK_ROWS = 2048  # 64 KiB of codes, held in L2 while every query of the batch passes over it
_GROUP = 4  # queries scored together per loaded code row: four loads serve four distances


@intrinsic
def _popcount(typingctx, x):
    sig = types.uint64(types.uint64)

    def codegen(context, builder, signature, args):
        return builder.ctpop(args[0])

    return sig, codegen


@numba.njit(nogil=True, cache=True, inline="always")
def _distance(c, i, q0, q1, q2, q3):
    return _popcount(c[i, 0] ^ q0) + _popcount(c[i, 1] ^ q1) + _popcount(c[i, 2] ^ q2) + _popcount(c[i, 3] ^ q3)


@numba.njit(nogil=True, cache=True)
def distances(codes, query, lo, hi, out):
    """out[i] = distance(codes[i], query) for i in [lo, hi)."""
    q0, q1, q2, q3 = query[0], query[1], query[2], query[3]
    for i in range(np.uint64(lo), np.uint64(hi)):
        out[i] = _distance(codes, i, q0, q1, q2, q3)


@numba.njit(nogil=True, cache=True, inline="always")
def _sift_down(keys, base, k):
    j = 0
    while True:
        left = 2 * j + 1
        if left >= k:
            return
        m = left
        if left + 1 < k and keys[base + left + 1] > keys[base + left]:
            m = left + 1
        if keys[base + m] <= keys[base + j]:
            return
        t = keys[base + m]
        keys[base + m] = keys[base + j]
        keys[base + j] = t
        j = m


@numba.njit(nogil=True, cache=True, inline="always")
def _offer(keys, base, k, d, i, cut):
    """Put (d, i) into the heap at keys[base:base+k] if d < cut; return the new cut."""
    if d < cut:
        keys[base] = (d << _SHIFT) | np.uint64(i)
        _sift_down(keys, base, k)
        worst = keys[base] >> _SHIFT
        if worst < cut:
            cut = worst
    return cut


@numba.njit(nogil=True, cache=True)
def top_k(codes, queries, lo, hi, k, cut, keys):
    """Fold rows [lo, hi) into the per-query heaps `keys` (Q * k, uint64; EMPTY_KEY when unused).

    `cut[j]` (uint64) admits rows of query j with distance < cut[j]: max_distance + 1 at first, then the
    heap's worst distance once it is full. Codes are visited in blocks that stay in cache while every
    query passes over them, four queries per loaded row.
    """
    nq = queries.shape[0]
    for b0 in range(lo, hi, _BLOCK_ROWS):
        b1 = min(b0 + _BLOCK_ROWS, hi)
        j = 0
        while j + _GROUP <= nq:
            a0, a1, a2, a3 = queries[j, 0], queries[j, 1], queries[j, 2], queries[j, 3]
            b_0, b_1, b_2, b_3 = queries[j + 1, 0], queries[j + 1, 1], queries[j + 1, 2], queries[j + 1, 3]
            c0, c1, c2, c3 = queries[j + 2, 0], queries[j + 2, 1], queries[j + 2, 2], queries[j + 2, 3]
            e0, e1, e2, e3 = queries[j + 3, 0], queries[j + 3, 1], queries[j + 3, 2], queries[j + 3, 3]
            ta, tb, tc, te = cut[j], cut[j + 1], cut[j + 2], cut[j + 3]
            for i in range(np.uint64(b0), np.uint64(b1)):
                x0, x1, x2, x3 = codes[i, 0], codes[i, 1], codes[i, 2], codes[i, 3]
                da = _popcount(x0 ^ a0) + _popcount(x1 ^ a1) + _popcount(x2 ^ a2) + _popcount(x3 ^ a3)
                db = _popcount(x0 ^ b_0) + _popcount(x1 ^ b_1) + _popcount(x2 ^ b_2) + _popcount(x3 ^ b_3)
                dc = _popcount(x0 ^ c0) + _popcount(x1 ^ c1) + _popcount(x2 ^ c2) + _popcount(x3 ^ c3)
                de = _popcount(x0 ^ e0) + _popcount(x1 ^ e1) + _popcount(x2 ^ e2) + _popcount(x3 ^ e3)
                # One well-predicted branch for the common case: no query of the four improves.
                if (da < ta) | (db < tb) | (dc < tc) | (de < te):
                    ta = _offer(keys, j * k, k, da, i, ta)
                    tb = _offer(keys, (j + 1) * k, k, db, i, tb)
                    tc = _offer(keys, (j + 2) * k, k, dc, i, tc)
                    te = _offer(keys, (j + 3) * k, k, de, i, te)
            cut[j], cut[j + 1], cut[j + 2], cut[j + 3] = ta, tb, tc, te
            j += _GROUP
        while j < nq:
            q0, q1, q2, q3 = queries[j, 0], queries[j, 1], queries[j, 2], queries[j, 3]
            t = cut[j]
            for i in range(np.uint64(b0), np.uint64(b1)):
                d = _distance(codes, i, q0, q1, q2, q3)
                if d < t:  # test first: entering _offer costs a refcount round trip on `keys`
                    t = _offer(keys, j * k, k, d, i, t)
            cut[j] = t
            j += 1
