"""`nts`: the perceptual hash of Chen et al. (ACM TOMM 2023), the baseline later specs must beat.

The paper's pipeline (../shared/seeds/000_*): select the important weights by model-compression theory,
compute normal test statistics (NTS) over segments of them, binarize into a fixed-length code. The paper's
exact layer rule and segment sizes are not public; this reconstruction follows research/algorithms.md §1:

1. weights: every floating tensor of two or more dimensions (conv kernels and linear weights), under
   canonical names, in natural order (so renamed keys and another file format give the same code);
2. importance: per tensor, the `keep` fraction of entries largest in magnitude (magnitude pruning keeps
   exactly these, so pruning up to 1 - keep leaves the selection unchanged), in their original order;
3. segments: the kept weights concatenated and cut into `bits` equal segments;
4. NTS: D'Agostino-Pearson K^2 per segment (invariant to scale and shift within a segment);
5. code: bit i = K^2_i above the median of the K^2 values (balanced bits).

It is position-based: permuted hidden units or other layouts move weights between segments. Per-block
codes (`parts`) come from the same procedure on each top-level block with enough weights.

Byte budget (our addition, so that a 70B checkpoint costs what a small one does): when the weight
matrices hold more than `max_params` values, each matrix contributes only its leading rows, its share of
the budget in proportion to its size: one ranged read per tensor. The budget counts values, not bytes,
so an fp16 copy reads the same rows as its fp32 original. Models under the budget are read whole.
Each matrix reads at least one row, so a model of very many matrices reads more than its share: a 70B
Llama about 1.6x the budget (a row of each of its 560 matrices), a 405B one about 4.8x (882 rows of 16k-53k
values), a crafted file of N views of one storage (no bytes each in the file) N rows. Reading therefore
stops, and the remaining matrices are left out, once READ_CAP times the budget is read (256 MB of float32):
far above every dense model's reads, so their codes are what they were; a mixture of thousands of experts
may be cut short.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import ClassVar

import numpy as np

from pipeline.errors import HashingError
from pipeline.formats.directory import TensorDirectory
from pipeline.hashing.canonical import block_of, weight_matrices
from pipeline.hashing.spec import ModelCode, Thresholds

MIN_SEGMENT = 20  # the kurtosis test needs at least 20 samples per segment
READ_CAP = 16  # values read per model, at most, in budgets (`max_params`): one row per matrix can exceed one


@dataclass(frozen=True)
class NTSSpec:
    """The paper's hash; `bits` segments of the top-`keep` weights by magnitude."""

    uses_gpu: ClassVar[bool] = False  # numpy only
    bits: int = 256
    keep: float = 0.5
    max_params: int = 4_000_000  # 16 MB of float32 per model, whatever the model's size
    # Calibrated on the demo zoo (README, "Verdicts"): copies there lie at <= 46 bits, the homolog at 66,
    # other architectures at >= 92; random codes at 128 +- 8.
    thresholds: Thresholds = field(default_factory=lambda: Thresholds(copy=48, related=80))

    @property
    def name(self) -> str:
        return f"nts-v1:bits={self.bits},keep={self.keep:g},max_params={self.max_params}"

    def compute(self, directory: TensorDirectory) -> ModelCode:
        matrices = weight_matrices(directory)
        if not matrices:
            raise HashingError("no weight matrices (floating tensors of 2+ dimensions) to hash")
        total = sum(entry.numel for _, entry in matrices)
        kept: list[tuple[str, np.ndarray]] = []
        read = 0
        for name, entry in matrices:
            if read >= READ_CAP * self.max_params:
                break
            rows = None
            if total > self.max_params:
                row_numel = entry.numel // entry.shape[0]
                rows = (0, max(1, (self.max_params * entry.numel // total) // max(1, row_numel)))
            values = directory.read(entry.name, rows=rows).astype(np.float32, copy=False).ravel()
            read += values.size
            if not np.isfinite(values).all():
                raise HashingError(f"tensor {entry.name} holds NaN or Inf values")
            kept.append((name, _important(values, self.keep)))
        code = self._code(np.concatenate([v for _, v in kept]))
        return ModelCode(spec=self.name, code=code, parts=self._parts(kept))

    def _parts(self, kept: list[tuple[str, np.ndarray]]) -> tuple[tuple[str, bytes], ...]:
        blocks: dict[str, list[np.ndarray]] = {}
        for name, values in kept:
            blocks.setdefault(block_of(name), []).append(values)
        parts = []
        for block, arrays in blocks.items():
            weights = np.concatenate(arrays)
            if len(weights) >= self.bits * MIN_SEGMENT and len(blocks) > 1:
                parts.append((block, self._code(weights)))
        return tuple(parts)

    def _code(self, weights: np.ndarray) -> bytes:
        segment = len(weights) // self.bits
        if segment < MIN_SEGMENT:
            raise HashingError(
                f"too few weights to hash: {len(weights)} kept, need {self.bits * MIN_SEGMENT}"
            )
        segments = weights[: segment * self.bits].reshape(self.bits, segment).astype(np.float64)
        k2 = _normal_test_statistic(segments)
        bits = k2 > np.median(k2)
        return np.packbits(bits).tobytes()


def _important(values: np.ndarray, keep: float) -> np.ndarray:
    """The `keep` fraction of entries largest in magnitude, in their original order."""
    n_keep = max(1, int(round(len(values) * keep)))
    if n_keep >= len(values):
        return values
    # Stable order by magnitude: ties (e.g. pruned zeros) resolve by position, deterministically.
    order = np.argsort(-np.abs(values), kind="stable")[:n_keep]
    return values[np.sort(order)]


def _normal_test_statistic(segments: np.ndarray) -> np.ndarray:
    """D'Agostino-Pearson K^2 of each row (= scipy.stats.normaltest, checked in the tests).

    Written out in numpy: importing scipy.stats costs over a second on every CLI call. A constant row
    (all zeros) scores 0, not NaN.
    """
    n = float(segments.shape[1])
    centred = segments - segments.mean(axis=1, keepdims=True)
    m2 = (centred**2).mean(axis=1)
    with np.errstate(all="ignore"):
        skew = (centred**3).mean(axis=1) / m2**1.5
        kurt = (centred**4).mean(axis=1) / m2**2
        k2 = _skew_z(skew, n) ** 2 + _kurtosis_z(kurt, n) ** 2
    return np.nan_to_num(k2, nan=0.0, posinf=0.0, neginf=0.0)


def _skew_z(skew: np.ndarray, n: float) -> np.ndarray:
    """D'Agostino's skewness test statistic (1970)."""
    y = skew * np.sqrt((n + 1) * (n + 3) / (6.0 * (n - 2)))
    beta2 = 3.0 * (n * n + 27 * n - 70) * (n + 1) * (n + 3) / ((n - 2.0) * (n + 5) * (n + 7) * (n + 9))
    w2 = -1 + np.sqrt(2 * (beta2 - 1))
    delta = 1 / np.sqrt(0.5 * np.log(w2))
    alpha = np.sqrt(2.0 / (w2 - 1))
    y = np.where(y == 0, 1, y)
    return delta * np.log(y / alpha + np.sqrt((y / alpha) ** 2 + 1))


def _kurtosis_z(kurt: np.ndarray, n: float) -> np.ndarray:
    """Anscombe and Glynn's kurtosis test statistic (1983)."""
    mean = 3.0 * (n - 1) / (n + 1)
    var = 24.0 * n * (n - 2) * (n - 3) / ((n + 1) * (n + 1.0) * (n + 3) * (n + 5))
    x = (kurt - mean) / np.sqrt(var)
    sqrt_beta1 = (
        6.0 * (n * n - 5 * n + 2) / ((n + 7) * (n + 9)) * np.sqrt(6.0 * (n + 3) * (n + 5) / (n * (n - 2) * (n - 3)))
    )
    a = 6.0 + 8.0 / sqrt_beta1 * (2.0 / sqrt_beta1 + np.sqrt(1 + 4.0 / sqrt_beta1**2))
    term1 = 1 - 2 / (9.0 * a)
    denom = 1 + x * np.sqrt(2 / (a - 4.0))
    term2 = np.sign(denom) * np.where(denom == 0.0, np.nan, ((1 - 2.0 / a) / np.abs(denom)) ** (1 / 3.0))
    return (term1 - term2) / np.sqrt(2 / (9.0 * a))
