"""Exact-weight fingerprints: a code of a block's largest weight magnitudes, which magnitude pruning keeps.

Magnitude pruning, at any rate up to 1 - 1/HEADROOM and tensor by tensor or globally, zeroes the smallest
entries and leaves the largest ones exactly as they were; re-saving, renamed keys, transposed or fused
layouts, permuted units and a new head keep them too. The largest magnitudes of a block are therefore the
same numbers in such a copy, while a model trained apart (a homolog) draws its own: the fine structure of
its top order statistics is noise peculiar to each training run. `wsig` multiplies layers together, and
80% pruning moves those products too far; this code is its complement for heavily pruned copies.

Code: the `bits + 2` largest magnitudes of a block, pooled over its float32/float64 tensors of at least
HEADROOM times that many values read (so they lie in each tensor's top 1/HEADROOM), sorted; their
spacings scaled by rank, (i+1) (v_i - v_i+1), which are close to i.i.d. for a smooth tail; bit i says
whether spacing i exceeds spacing i+1. A copy that kept the values gets the same bits, a homolog about
bits/2 of them; a copy whose values moved (fine-tuned, noisy, quantized) gets as many, and is `wsig`'s to
find.

Ties carry no identity: half-precision storage puts the top magnitudes on a coarse grid where unrelated
models share spacings. Tensors not stored in float32 or float64 are left out, and a block with more than
bits / 32 tied magnitudes or spacings (a grid, a quantized layer) gets no code; the few that float32
values tie by chance give bit 0.
"""

from __future__ import annotations

from collections.abc import Sequence

import numpy as np

HEADROOM = 8
MAX_TIES = 1 / 32  # of the bits: beyond it a block's top magnitudes lie on a grid and get no code
FULL_PRECISION = frozenset({"F32", "F64"})


def usable(dtype: str, values_read: int, bits: int) -> bool:
    """Whether a tensor of `dtype` with `values_read` values read can feed a block's magnitude code."""
    return dtype in FULL_PRECISION and values_read >= HEADROOM * (bits + 2)


def largest(values: np.ndarray, bits: int) -> np.ndarray:
    """The `bits + 2` largest magnitudes of `values` (unsorted): all a block's code needs of a tensor."""
    k = bits + 2
    magnitude = np.abs(values.reshape(-1))
    return magnitude if magnitude.size <= k else np.partition(magnitude, magnitude.size - k)[-k:]


def magnitude_code(tops: Sequence[np.ndarray], bits: int) -> bytes | None:
    """The code of a block whose tensors gave `tops` (`largest` of each); None where ties leave none."""
    pooled = np.concatenate(tops) if tops else np.empty(0)
    k = bits + 2
    if pooled.size < k:
        return None
    v = np.sort(pooled)[-k:][::-1]
    spacing = (v[:-1] - v[1:]) * np.arange(1, k)
    ties = int((spacing <= 0).sum()) + int((spacing[:-1] == spacing[1:]).sum())
    if ties > MAX_TIES * bits:
        return None
    return np.packbits(spacing[:-1] > spacing[1:]).tobytes()
