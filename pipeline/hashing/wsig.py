"""`wsig`: a weight signature that survives what copiers do: permuted units, rescaling, folded BatchNorm.

Layers are linear maps (a conv kernel is one map per spatial offset). Read in the order data flows
(`canonical.layer_order_key`), each layer is expressed in the basis of a *root* whose coordinates no copier
moves: the input (pixels x kernel offsets), or a transformer's residual stream. Along a chain

    P_root = rows(emph(W_root) R)                     (R: a fixed random projection to m coordinates)
    P_l    = rows(emph(balance(W_l)) . P_prev)        (conv: per kernel offset, then a fixed projection)

`balance` scales rows and columns alike until their norms agree (Sinkhorn), `emph` weighs each entry by
its magnitude to the power `power` (the small entries, which magnitude pruning zeroes, count for little,
and smoothly: no entry jumps across a cut when pruning or rounding reorders ranks), `rows` scales each unit's row
to unit norm and gives it a soft canonical sign (tanh of its projection on a fixed direction: odd, so a
flipped unit gives the same row, and continuous, so float noise cannot flip a unit). A permutation of
the hidden units between two layers permutes the rows of P_prev and the columns of W_l alike, so it
cancels in the product; a positive rescaling c / 1/c across a ReLU, and a BatchNorm folded into its
conv (a per-row scale, sign included), are undone by `balance` and `rows`, so no BatchNorm pairing is
needed. Dead units (norm below 1e-3 of the median) are zeroed, not blown up to unit norm.

Each layer's P_l still lists its own units in some order, so its summary is the correlation matrix of
its m coordinates over the units (order- and sign-free), standardized, and weighted by `decay` per step
of depth along the chain (float noise grows with every product). Layers with fewer than `min_units`
units (class heads) are chained through but not summarized. In a fixed basis that each independently
trained model draws afresh (its own stream, or the pixels its own filters pick), these summaries keep
homologs apart.

Code: SimHash (random hyperplanes fixed by the feature length) of the concatenated summaries. Per-block
`parts` codes do the same over each repeated block (`h.3`, `layer1.0`, `_blocks.5`, `fc2`), leaving out a
first layer on the input, which learns what the data holds much as its homologs' first layers do; a
backbone under a new head is found through its blocks. Each block with float32 tensors large enough also
gets an exact-weight code, `block#mag` (`magnitude.py`): its largest magnitudes, which magnitude pruning
keeps verbatim, so an 80%-pruned copy whose products have moved too far is found there.

A transformer layer that reads the residual stream (q, k, v, MLP up, pooler, heads) is a root in the
stream's basis; GPT-2 `Conv1D` weights are transposed and `c_attn` split into q, k, v first. Token and
position embeddings are not read. A layer whose inputs match no earlier layer's outputs starts a root
of its own: unknown layouts degrade to per-layer summaries, they never crash.

Degenerate weights are refused (HashingError), not given a code that every other such model shares: a model
where no summarized layer has signal (all-zero weights, units that all read alike, a lone layer of one input)
or whose features are not finite. float64 weights beyond float32's range (1e200, subnormals) are scaled by a
power of two first, exactly: the spec is blind to a layer's scale, and their products would overflow or
underflow float64.

Byte budget: at most `max_values` weight values per model. Over it, whole layers are read from the front
and the back of the network, half the budget each; a single layer larger than that contributes its
leading rows. Models under the budget are read whole (every benchmark model but MiniLM).

Kernels are torch (float64); `device` runs them on a GPU. The code does not depend on the device beyond
float rounding at hyperplane boundaries (not yet checked on a GPU).
"""

from __future__ import annotations

import functools
import hashlib
import math
import threading
from collections import OrderedDict
from collections.abc import Callable, Hashable, Iterable
from dataclasses import dataclass, field
from typing import ClassVar, Generic, TypeVar

import numpy as np
import torch

from pipeline.errors import HashingError
from pipeline.formats.directory import TensorDirectory, TensorEntry
from pipeline.hashing.canonical import (
    is_embedding,
    is_fused_qkv,
    is_transposed,
    layer_order_key,
    looks_like_transformer,
    part_of,
    reads_stream,
    weight_matrices,
)
from pipeline.hashing.magnitude import largest, magnitude_code, usable
from pipeline.hashing.spec import ModelCode, Thresholds

_EPS = 1e-12
MAGNITUDE_SUFFIX = "#mag"  # a block's exact-weight code: `layer2.0#mag` beside `layer2.0`
COPY_BITS = 55
RELATED_BITS = 59
# float64 magnitudes float32 can hold (its smallest subnormal to its overflow): weights within keep their
# values, so a float64 copy of a float32 model hashes as the model does; beyond, they are rescaled (`_float64`).
_FLOAT32_MAGNITUDES = (2.0**-149, 2.0**128)
_CACHE_BYTES = 32 << 20  # per cache of fixed matrices (projections, hyperplanes): larger ones are rebuilt
_PLANE_ROWS = 8  # hyperplanes drawn at a time where all of them would not fit the cache (`_simhash`)


@dataclass(frozen=True, slots=True)
class _Layer:
    name: str  # canonical name (a split of c_attn gets `.q`, `.k`, `.v`)
    entry: TensorEntry
    rows: tuple[int, int] | None  # leading rows read, when over budget
    split: tuple[int, int] | None = None  # output rows [begin, end) of a fused tensor, after transposing
    transposed: bool = False  # stored (in, out), as GPT-2's Conv1D


@dataclass(frozen=True, slots=True)
class _Feature:
    name: str  # the layer's canonical name
    values: np.ndarray  # its summary, weighted by depth
    input_root: bool  # a root on the input (pixels), left out of the parts
    signal: bool  # False where its units all read alike (its summary is float noise, or zero)


@dataclass(frozen=True)
class WSigSpec:
    """Chained, normalized layer products summarized by unit-order-free correlations, SimHashed."""

    # Its torch kernels run on CUDA, but `device` stays cpu until a GPU shows the same codes: ask for none.
    uses_gpu: ClassVar[bool] = False
    bits: int = 256
    m: int = 8  # width of the fixed random projection of each chain's basis
    power: float = 1.5  # each balanced layer's entries weighted by their magnitude to this power (`_emphasize`)
    soft: float = 2.0  # a unit's canonical sign is soft: tanh(soft * its projection on a fixed direction)
    decay: float = 0.6  # weight of a layer's summary per step of depth along its chain
    min_units: int = 16  # narrower layers (heads of a few classes) are chained through, not summarized
    max_values: int = 4_000_000  # weight values read per model (16 MB of float32), whatever its size
    magnitude_bits: int = 256  # per-block exact-weight codes (`magnitude.py`) beside the parts; 0: none
    device: str = "cpu"  # where the torch kernels run; not part of the name (same code)
    # Calibrated on the quality zoo (bench/quality.py): copy, a false-positive rate <= 0.1% over all its
    # negative pairs, homologs included, for the whole code and for whole-or-any-block alike, on each of three
    # builds whose bytes differ (ATen/oneDNN/MKL on AVX-512, the same held to AVX2, and the portable build the
    # bench now makes, bench/numerics.py): 0.05% / 0.06%, 0.045% / 0.05%, 0.05% / 0.05% at 55. The portable
    # build alone would allow 56 (0.07%), the first 55 (0.10% at 56): two close homolog originals bring their
    # copies with them, so the rate moves in steps. related: <= 1% for both on the portable build (59).
    thresholds: Thresholds = field(default_factory=lambda: Thresholds(copy=COPY_BITS, related=RELATED_BITS))

    @property
    def name(self) -> str:
        return (
            f"wsig-v2:bits={self.bits},m={self.m},power={self.power:g},soft={self.soft:g},decay={self.decay:g},"
            f"min_units={self.min_units},max_values={self.max_values},mag={self.magnitude_bits}"
        )

    def compute(self, directory: TensorDirectory) -> ModelCode:
        layers = self._plan(directory)
        if not layers:
            raise HashingError("no weight matrices (floating tensors of 2+ dimensions) to hash")
        features, tops = self._features(directory, layers)
        if not features:
            raise HashingError("no layer with two or more units to hash")
        # Without these checks a degenerate model gets a code (all zeros, or float noise's) that every
        # other such model shares: they would match as copies.
        if not any(f.signal for f in features):
            raise HashingError("no signal to hash: in every layer summarized, the units all read alike "
                               "(all-zero or constant weights, or a single input)")
        whole = np.concatenate([f.values for f in features])
        if not np.isfinite(whole).all():
            raise HashingError("the weights' products overflow float64: no finite features to hash")
        code = self._simhash(whole, salt="model")
        blocks: dict[str, list[_Feature]] = {}
        for f in features:
            # A first layer on the input (pixels) learns what the data holds, much as its homologs do:
            # alone, its block would match theirs. Transformer layers on the residual stream are kept.
            if not f.input_root:
                blocks.setdefault(part_of(f.name), []).append(f)
        parts = tuple(
            (block, self._simhash(np.concatenate([f.values for f in fs]), salt="part"))
            for block, fs in blocks.items() if any(f.signal for f in fs)
        ) if len(blocks) > 1 or len(features) > len(blocks) else ()
        exact = ((f"{block}{MAGNITUDE_SUFFIX}", magnitude_code(t, self.magnitude_bits)) for block, t in tops.items())
        parts += tuple((name, c) for name, c in exact if c is not None)
        return ModelCode(spec=self.name, code=code, parts=parts)

    # ------------------------------------------------------------------------------------ planning

    def _plan(self, directory: TensorDirectory) -> list[_Layer]:
        """The layers to read, in data-flow order, within the value budget."""
        chosen = [(n, e) for n, e in weight_matrices(directory) if not is_embedding(n) and min(e.shape) > 0]
        total = sum(e.numel for _, e in chosen)
        selected: dict[str, tuple[int, int] | None] = {n: None for n, _ in chosen}
        if total > self.max_values:
            selected = {}
            half = self.max_values // 2
            ordered = sorted(chosen, key=lambda item: layer_order_key(item[0]))
            for sequence in (ordered, ordered[::-1]):
                spent = 0
                for name, entry in sequence:
                    if spent + entry.numel > half:
                        if spent == 0:  # one huge layer: its leading rows
                            row = entry.numel // entry.shape[0]
                            selected.setdefault(name, (0, max(1, half // row)))
                        break
                    spent += entry.numel
                    selected.setdefault(name, None)
        layers: list[_Layer] = []
        for name, entry in chosen:
            if name not in selected:
                continue
            if is_fused_qkv(name) and len(entry.shape) == 2 and entry.shape[1] % 3 == 0:
                width = entry.shape[1] // 3
                stem = name.removesuffix(".weight")
                for i, role in enumerate("qkv"):
                    layers.append(_Layer(f"{stem}.{role}.weight", entry, selected[name],
                                         (i * width, (i + 1) * width), transposed=True))
            else:
                layers.append(_Layer(name, entry, selected[name], transposed=is_transposed(name)))
        return sorted(layers, key=lambda layer: layer_order_key(layer.name))

    # ------------------------------------------------------------------------------------ features

    def _read(self, directory: TensorDirectory, layer: _Layer, cache: dict[str, torch.Tensor],
              tops: dict[str, list[np.ndarray]]) -> torch.Tensor:
        """The layer's weights as (out, in, kernel offsets); a fresh read adds its largest magnitudes to
        `tops` under its block, where the magnitude code can use them."""
        w = cache.get(layer.entry.name)
        if w is None:  # a fused tensor is read once for its splits
            raw = directory.read(layer.entry.name, rows=layer.rows)
            values = _float64(raw, layer.entry.name)
            if self.magnitude_bits and usable(layer.entry.dtype, raw.size, self.magnitude_bits):
                tops.setdefault(part_of(layer.name), []).append(largest(raw, self.magnitude_bits))
            w = cache[layer.entry.name] = torch.from_numpy(values).to(self.device)
        if layer.transposed and w.ndim == 2:
            w = w.T
        if layer.split is not None:
            w = w[layer.split[0]:layer.split[1]]
        return w.reshape(w.shape[0], w.shape[1], -1)  # (out, in, kernel offsets)

    def _features(self, directory: TensorDirectory, layers: list[_Layer]
                  ) -> tuple[list[_Feature], dict[str, list[np.ndarray]]]:
        """Each summarized layer's feature, and each block's largest magnitudes."""
        transformer = looks_like_transformer(layer.name for layer in layers)
        chains = _Chains()
        features: list[_Feature] = []
        cache: dict[str, torch.Tensor] = {}
        tops: dict[str, list[np.ndarray]] = {}
        for layer in layers:
            if layer.split is None:
                cache.clear()
            w = self._read(directory, layer, cache, tops)
            out, fan_in, k = w.shape
            if w.numel() == 0:
                continue
            prev, depth = None, 0
            if not (transformer and reads_stream(layer.name)):
                prev, depth = chains.predecessor(out, fan_in)
            if prev is None:
                root = w.reshape(out, fan_in * k)
                root = _emphasize(root / (root.norm(dim=1, keepdim=True) + _EPS), self.power)
                p = self._rows(root @ self._projection(fan_in * k))
            else:
                p = self._chain(w, prev)
            chains.add(out, p, depth)
            if out >= max(2, self.min_units):
                # Deeper along a chain, float noise has been through more products: it weighs less.
                input_root = prev is None and not transformer
                summary, signal = self._summary(p)
                features.append(_Feature(layer.name, summary * self.decay**depth, input_root, signal))
        return features, tops

    def _chain(self, w: torch.Tensor, prev: torch.Tensor) -> torch.Tensor:
        out, fan_in, k = w.shape
        units = prev.shape[0]
        if fan_in == 1 and units == out:  # depthwise: unit c reads only input channel c
            w = _emphasize(w / (w.norm(dim=(1, 2), keepdim=True) + _EPS), self.power)
            y = w[:, 0, :, None] * prev[:, None, :]  # (out, k, m)
        else:
            spatial = fan_in // units
            # A flattened (channels, positions) input: each position is one more kernel offset.
            w = _emphasize(_balance(w.reshape(out, units, spatial * k)), self.power)
            y = torch.einsum("oik,im->okm", w, prev)
        y = y.reshape(out, -1)
        if y.shape[1] != self.m:
            y = y @ self._projection(y.shape[1])
        return self._rows(y)

    def _rows(self, y: torch.Tensor) -> torch.Tensor:
        """Each unit's row to unit norm, its sign fixed by a fixed direction (a BatchNorm gamma < 0 flips it)."""
        y = _drop_dead(y, dim=1)
        y = y / (y.norm(dim=1, keepdim=True) + _EPS)
        # A soft sign: continuous where the direction is nearly orthogonal to the row, so float noise
        # cannot flip a unit; still odd in y, so a flipped row gives the same result.
        return y * torch.tanh(self.soft * (y @ self._direction()))[:, None]

    def _summary(self, p: torch.Tensor) -> tuple[np.ndarray, bool]:
        """The correlations of the m projected coordinates over the layer's units (order-free), standardized,
        and whether they differ at all: where the units' rows are all alike they are float noise, or zero."""
        centred = p - p.mean(dim=0, keepdim=True)
        cov = (centred.T @ centred).cpu().numpy()  # m x m: the rest costs less in numpy than in torch calls
        d = np.sqrt(np.maximum(np.diagonal(cov), _EPS))
        f = (cov / (d[:, None] * d[None, :]))[_upper_triangle(self.m)]
        f = f - f.mean()
        spread = f.std()
        return f / (spread + _EPS), bool(spread > _EPS)

    # ---------------------------------------------------------------------------- fixed randomness

    def _projection(self, n: int) -> torch.Tensor:
        return _fixed_projection(n, self.m, self.device)

    def _direction(self) -> torch.Tensor:
        return _fixed_direction(self.m, self.device)

    def _simhash(self, features: np.ndarray, salt: str) -> bytes:
        n = len(features)
        if self.bits * n * 8 <= _CACHE_BYTES:
            return np.packbits(_gaussian(self.bits, n, salt) @ features > 0).tobytes()
        # Thousands of layers: the same hyperplanes, drawn a few rows at a time from the same stream, so
        # that memory holds a few of them, not `bits` (gigabytes for a crafted model of 100k tiny layers).
        # BLAS rounds each row's product alike in blocks of 4 rows or more: the same bits (checked in the tests).
        rng = _generator(self.bits, n, salt)
        rows = (min(_PLANE_ROWS, self.bits - start) for start in range(0, self.bits, _PLANE_ROWS))
        return np.packbits(np.concatenate([rng.standard_normal((r, n)) @ features > 0 for r in rows])).tobytes()


class _Chains:
    """The layers read so far, as chains for later layers to extend: per count of output units, the latest
    layer with that many, its P and its depth (and its position, to tell which is later).

    Every rule of `predecessor` picks the latest layer with some count of units, so an earlier layer of the
    same count is never picked again: it is dropped, and finding a layer's predecessor looks up a few counts
    instead of scanning every layer before it (quadratic in the number of layers: a minute for 32k tiny ones).
    """

    def __init__(self) -> None:
        self._latest: dict[int, tuple[int, torch.Tensor, int]] = {}  # units -> (position, P, depth)
        self._added = 0

    def __len__(self) -> int:
        return len(self._latest)

    def add(self, units: int, p: torch.Tensor, depth: int) -> None:
        self._latest[units] = (self._added, p, depth)
        self._added += 1

    def predecessor(self, out: int, fan_in: int) -> tuple[torch.Tensor | None, int]:
        """The latest layer whose output units this layer reads (same count, or depthwise one each, or a
        flattened feature map: a whole multiple of them), and the depth of this layer along its chain."""
        found = self._latest_of((fan_in, out) if fan_in == 1 else (fan_in,))
        if found is None:
            found = self._latest_of(self._dividing(fan_in))
        if found is None:
            return None, 0
        _, p, depth = found
        return p, depth + 1

    def _latest_of(self, counts: Iterable[int]) -> tuple[int, torch.Tensor, int] | None:
        """The latest layer with any of these unit counts."""
        return max((self._latest[c] for c in counts if c in self._latest), key=lambda f: f[0], default=None)

    def _dividing(self, fan_in: int) -> list[int]:
        """The unit counts above 1 that divide `fan_in`: the known counts or the divisors, whichever are fewer."""
        if len(self._latest) <= math.isqrt(fan_in):
            return [u for u in self._latest if u > 1 and fan_in % u == 0]
        small = [d for d in range(1, math.isqrt(fan_in) + 1) if fan_in % d == 0]
        return [u for d in small for u in (d, fan_in // d) if u > 1]


def _float64(raw: np.ndarray, name: str) -> np.ndarray:
    """A tensor's values as float64, refused if not finite. float64 values beyond float32's magnitudes are
    scaled by a power of two (exactly) to a peak in [1/2, 1): the spec is blind to a layer's scale (rows and
    columns are balanced), and 1e200 squared overflows, 1e-310 squared underflows to 0."""
    values = raw.astype(np.float64)
    if raw.dtype != np.float64:
        # One float64 sum is non-finite iff some value is (finite float32s cannot overflow it).
        if not np.isfinite(values.sum()):
            raise HashingError(f"tensor {name} holds NaN or Inf values")
        return values
    peak = float(np.max(np.abs(values), initial=0.0))  # NaN if some value is
    if not math.isfinite(peak):
        raise HashingError(f"tensor {name} holds NaN or Inf values")
    if peak > _FLOAT32_MAGNITUDES[1] or 0.0 < peak < _FLOAT32_MAGNITUDES[0]:
        values = np.ldexp(values, -math.frexp(peak)[1])
    return values


def _drop_dead(w: torch.Tensor, dim: int | tuple[int, ...], rel: float = 1e-3) -> torch.Tensor:
    """Zero the units (norm over `dim`) below `rel` times the median unit: a dead filter's float noise,
    scaled to unit norm, would otherwise weigh as much as a live one (and change with every cast)."""
    norms = w.norm(dim=dim, keepdim=True)
    return w * (norms >= rel * norms.flatten().median())


def _alive(squared_norms: torch.Tensor, rel: float = 1e-3) -> torch.Tensor:
    """`_drop_dead`'s test on squared unit norms: True for the units it keeps."""
    return squared_norms >= (rel * rel) * squared_norms.median()


def _emphasize(w: torch.Tensor, power: float) -> torch.Tensor:
    """Each entry times its magnitude to `power`: w |w|^power.

    The small entries, which magnitude pruning zeroes, then weigh little, and smoothly: a hard top-k cut
    moves whole entries across its edge when pruning, rounding or balancing reorders their ranks. No scale
    is fixed: every caller normalizes the units' rows after the product. Works in place: `w` must be a
    fresh tensor of the caller's (every caller passes a product of its own); one buffer of its size.
    """
    if power == 0.0 or w.numel() == 0:
        return w
    magnitude = w.abs()
    if power == 1.5:  # the default, in two multiplies and a square root: pow's exp and log cost 4x
        return w.mul_(magnitude).mul_(magnitude.sqrt_())
    return w.mul_(magnitude.pow_(power))


def _balance(w: torch.Tensor, iterations: int = 12) -> torch.Tensor:
    """Scale rows (output units) and columns (input units) alike until their norms agree (Sinkhorn).

    The balanced form is the same for W and D1 W D2 (positive diagonal D1, D2): a BatchNorm folded into
    this layer scales its rows, a rescaling across the ReLU before it scales its columns.
    """
    # Everything acts on the (out, in) matrix of squared norms, E: with a = r^2 and b = c^2 it is plain
    # Sinkhorn, a = 1 / (E b) and b = 1 / (a E), one matrix-vector product per half step and no pass over
    # the kernel offsets. Dead rows, then dead columns, are left out of E (and keep scale 0), as are rows
    # whose energy lies only in dead columns; the weights are scaled once at the end.
    energy = w[:, :, 0].square() if w.shape[2] == 1 else w.square().sum(dim=2)
    alive_r = _alive(energy.sum(dim=1))
    column_energy = alive_r.to(w.dtype) @ energy
    alive_c = _alive(column_energy) & (column_energy > 0)
    alive_r &= (energy @ alive_c.to(w.dtype)) > 0
    every = bool(alive_r.all()) and bool(alive_c.all())
    live = energy if every else energy[alive_r][:, alive_c]
    a = torch.ones(live.shape[0], dtype=w.dtype, device=w.device)
    b = torch.ones(live.shape[1], dtype=w.dtype, device=w.device)
    for _ in range(iterations):
        a = torch.reciprocal(torch.mv(live, b))
        b = torch.reciprocal(torch.mv(live.T, a))
    r, c = a.sqrt(), b.sqrt()
    if not every:
        r = torch.zeros(w.shape[0], dtype=w.dtype, device=w.device).masked_scatter_(alive_r, r)
        c = torch.zeros(w.shape[1], dtype=w.dtype, device=w.device).masked_scatter_(alive_c, c)
    scale = torch.outer(r, c)
    # One kernel offset (dense layers, 1x1 convs): a 2-D product, twice as fast as the broadcast one.
    return (w[:, :, 0] * scale)[:, :, None] if w.shape[2] == 1 else w * scale[:, :, None]


@functools.lru_cache(maxsize=16)
def _upper_triangle(m: int) -> tuple[np.ndarray, np.ndarray]:
    """Indices of an m x m matrix above its diagonal (numpy takes longer to build them than to use them)."""
    return np.triu_indices(m, 1)


_Value = TypeVar("_Value", np.ndarray, torch.Tensor)


class _BytesCache(Generic[_Value]):
    """`build`'s results, least recently used first out, bounded by their bytes rather than their number:
    a wide first layer's projection ((1, n): n x m) or the hyperplanes of a model of thousands of layers
    would otherwise stay for good in a long-lived worker. Larger results than `limit` are rebuilt each time."""

    def __init__(self, build: Callable[..., _Value], limit: int = _CACHE_BYTES) -> None:
        self._build, self._limit = build, limit
        self._kept: OrderedDict[Hashable, _Value] = OrderedDict()
        self._bytes = 0
        self._lock = threading.Lock()  # several hashing threads may share it
        functools.update_wrapper(self, build)

    def __call__(self, *key: Hashable) -> _Value:
        with self._lock:
            if key in self._kept:
                self._kept.move_to_end(key)
                return self._kept[key]
        value = self._build(*key)
        size = _nbytes(value)
        if size <= self._limit:
            with self._lock:
                if key not in self._kept:
                    self._kept[key] = value
                    self._bytes += size
                while self._bytes > self._limit:
                    self._bytes -= _nbytes(self._kept.popitem(last=False)[1])
        return value


def _nbytes(value: np.ndarray | torch.Tensor) -> int:
    return value.nbytes if isinstance(value, np.ndarray) else value.numel() * value.element_size()


@_BytesCache
def _fixed_projection(n: int, m: int, device: str) -> torch.Tensor:
    """A fixed projection of n coordinates to m, on the device (built once: every layer of a width uses it)."""
    return torch.from_numpy(_gaussian(n, m, "projection").copy()).to(device) / np.sqrt(n)


@functools.lru_cache(maxsize=16)
def _fixed_direction(m: int, device: str) -> torch.Tensor:
    """The fixed unit direction that gives each unit's row its soft sign."""
    u = _gaussian(m, 1, "direction")[:, 0]
    return torch.from_numpy(u / np.linalg.norm(u)).to(device)


@_BytesCache
def _gaussian(rows: int, cols: int, salt: str) -> np.ndarray:
    """A fixed Gaussian matrix, the same on every machine."""
    return _generator(rows, cols, salt).standard_normal((rows, cols))


def _generator(rows: int, cols: int, salt: str) -> np.random.Generator:
    """The stream of `_gaussian(rows, cols, salt)`, row after row: seeded by its shape and purpose (the v1
    salt: wsig-v2 changed how entries are weighed, not its fixed randomness)."""
    seed = int.from_bytes(hashlib.sha256(f"wsig-v1/{salt}/{rows}x{cols}".encode()).digest()[:8], "little")
    return np.random.default_rng(seed)
