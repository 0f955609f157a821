"""The Hamming search of `hamming.py` in torch, for a GPU (and, for tests, the CPU): same answers, bit for bit.

Codes travel as int64 (torch's bitwise ops and shifts are complete there, not for uint64); popcount is
the SWAR sequence of masks, shifts and adds, which every device runs. The (distance << 40 | index) sort
keys are non-negative int64, unique per row, so `torch.topk` over them orders by (distance, index) and a
tie never depends on the device's sort. Work goes in tiles of queries x codes; each tile keeps only its
k best keys per query, merged with the best so far: memory stays O(tile + Q * k), never Q x N.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from pipeline.search import hamming

_TILE_CELLS = 1 << 24  # queries x codes per tile: ~128 MiB per int64 temporary on a GPU
_M1 = 0x5555555555555555
_M2 = 0x3333333333333333
_M4 = 0x0F0F0F0F0F0F0F0F
_EMPTY = torch.iinfo(torch.int64).max


def to_device(codes: np.ndarray, device: Any) -> torch.Tensor:
    """(N, 4) uint64 codes as an int64 tensor on `device` (a view of the numpy array on the CPU)."""
    codes = hamming._check_codes(codes, what="codes")
    return torch.from_numpy(np.ascontiguousarray(codes).view(np.int64)).to(device)


def popcount64(x: torch.Tensor) -> torch.Tensor:
    """Set bits of each int64 element (0..64), as int64."""
    # Arithmetic right shifts smear the sign bit, but every mask clears the bits it smears into.
    x = x - ((x >> 1) & _M1)
    x = (x & _M2) + ((x >> 2) & _M2)
    x = (x + (x >> 4)) & _M4
    x = x + (x >> 8)
    x = x + (x >> 16)
    x = x + (x >> 32)
    return x & 0x7F


def distances(codes: torch.Tensor, queries: torch.Tensor) -> torch.Tensor:
    """(Q, N) int64 distances between int64 codes (N, 4) and queries (Q, 4) on the same device."""
    d = popcount64(queries[:, None, 0] ^ codes[None, :, 0])
    for w in range(1, hamming.WORDS):
        d += popcount64(queries[:, None, w] ^ codes[None, :, w])
    return d


def top_k_many(
    codes: np.ndarray | torch.Tensor,
    queries: np.ndarray,
    k: int,
    max_distance: int | None = None,
    *,
    device: Any = "cuda",
) -> tuple[np.ndarray, np.ndarray]:
    """`hamming.top_k_many` on a torch device; `codes` may already be there (`to_device`).

    Returns numpy arrays, exactly what `hamming.top_k_many(..., device="cpu")` returns.
    """
    queries = hamming._check_codes(queries, what="queries")
    k = hamming._check_k(k)
    hamming._check_max_distance(max_distance)
    on_device = codes if isinstance(codes, torch.Tensor) else to_device(codes, device)
    device = on_device.device
    n, nq = on_device.shape[0], queries.shape[0]
    if n >= hamming.MAX_ROWS:
        raise ValueError(f"at most 2**{hamming.KEY_SHIFT} codes per scan, got {n}")
    kk = min(k, n)
    if kk == 0 or nq == 0:
        return hamming._unpack(np.full((nq, kk), hamming._EMPTY_KEY, dtype=np.uint64))
    q_all = torch.from_numpy(np.ascontiguousarray(queries).view(np.int64)).to(device)
    q_tile = max(1, min(nq, _TILE_CELLS // max(1, min(n, 1 << 20))))
    block = max(kk, _TILE_CELLS // q_tile)
    out = np.empty((nq, kk), dtype=np.uint64)
    for q0 in range(0, nq, q_tile):
        qs = q_all[q0 : q0 + q_tile]
        best = torch.full((qs.shape[0], kk), _EMPTY, dtype=torch.int64, device=device)
        for c0 in range(0, n, block):
            d = distances(on_device[c0 : c0 + block], qs)
            rows = torch.arange(c0, c0 + d.shape[1], dtype=torch.int64, device=device)
            keys = (d << hamming.KEY_SHIFT) | rows
            if max_distance is not None:
                keys = keys.masked_fill(d > max_distance, _EMPTY)
            merged = torch.cat([best, keys], dim=1)
            best = torch.topk(merged, kk, dim=1, largest=False, sorted=True).values
        keys_np = best.cpu().numpy()
        tile = out[q0 : q0 + q_tile]
        tile[:] = keys_np.view(np.uint64)
        tile[keys_np == _EMPTY] = hamming._EMPTY_KEY
    return hamming._unpack(out)
