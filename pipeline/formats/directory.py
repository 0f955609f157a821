"""The tensor directory every format produces: names, dtypes, shapes and byte spans, read lazily."""

from __future__ import annotations

import math
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass

import numpy as np

from pipeline.blobs import RangeReader
from pipeline.errors import FormatError
from pipeline.refs import as_text

# safetensors dtype names are our dtype names. Itemsize in bytes.
DTYPE_SIZES: dict[str, int] = {
    "F64": 8, "F32": 4, "F16": 2, "BF16": 2, "F8_E4M3": 1, "F8_E5M2": 1,
    "I64": 8, "I32": 4, "I16": 2, "I8": 1, "U64": 8, "U32": 4, "U16": 2, "U8": 1, "BOOL": 1, "C64": 8,
}
FLOAT_DTYPES = frozenset({"F64", "F32", "F16", "BF16"})
_NUMPY: dict[str, str] = {
    "F64": "<f8", "F32": "<f4", "F16": "<f2", "I64": "<i8", "I32": "<i4", "I16": "<i2", "I8": "i1",
    "U64": "<u8", "U32": "<u4", "U16": "<u2", "U8": "u1", "BOOL": "?",
}
# The largest dimension, and product of nonzero dimensions, a tensor may have: counts beyond it do not fit
# numpy's int64 (times an itemsize), and a zero dimension elsewhere must not hide them.
MAX_NUMEL = 2**62


@dataclass(frozen=True, slots=True)
class TensorEntry:
    """One tensor of a checkpoint: where its bytes lie in which file."""

    name: str
    dtype: str  # "F16", "BF16", ... (safetensors names)
    shape: tuple[int, ...]
    span: tuple[int, int]  # byte offsets [begin, end) in the file
    file: str = ""  # the checkpoint file (shard) that holds it

    @property
    def numel(self) -> int:
        return math.prod(self.shape)  # Python ints: exact whatever the shape, where int64 could overflow

    @property
    def nbytes(self) -> int:
        return self.span[1] - self.span[0]


def checked_numel(shape: Sequence[int], what: str) -> int:
    """The element count of a shape of non-negative ints, refusing any dimension or nonzero product above
    MAX_NUMEL: `[2**64, 0]` holds no element, yet numpy cannot even make an int64 array of that shape.

    Raises:
        FormatError: (with `what`, e.g. "file: tensor 'w'", in the message) a count beyond MAX_NUMEL.
    """
    numel = nonzero = 1
    for d in shape:
        if d > MAX_NUMEL:
            raise FormatError(f"{what} has dimension {d}, above 2**62")
        numel *= d
        nonzero *= d or 1
        if nonzero > MAX_NUMEL:
            raise FormatError(f"{what} has shape {list(shape)}, more than 2**62 elements")
    return numel


def check_text(text: str, what: str) -> None:
    """Refuse a name that is no valid text (a lone surrogate, from a JSON escape or a pickle): a tensor
    of that name hashes, but printing the name or writing it to Parquet fails later, far from the file.

    Raises:
        FormatError: `text` cannot be encoded as UTF-8 (`what` says what it is: "ck.pt: tensor name").
    """
    if as_text(text) != text:
        raise FormatError(f"{what} {text!r} is not valid UTF-8 text")  # repr escapes it


def decode(raw: bytes, dtype: str, shape: tuple[int, ...]) -> np.ndarray:
    """Little-endian bytes of `dtype` to a numpy array (BF16 widened to float32, exactly)."""
    if dtype == "BF16":
        halves = np.frombuffer(raw, dtype="<u2")
        return (halves.astype(np.uint32) << 16).view(np.float32).reshape(shape)
    if dtype not in _NUMPY:
        raise FormatError(f"dtype {dtype} cannot be decoded")
    return np.frombuffer(raw, dtype=_NUMPY[dtype]).reshape(shape)


class TensorDirectory(Mapping[str, TensorEntry]):
    """A model's tensors by name, over one RangeReader per file, read only when asked."""

    def __init__(self, entries: Mapping[str, TensorEntry], readers: Mapping[str, RangeReader], format: str):
        self._entries = dict(entries)
        self._readers = dict(readers)
        self.format = format
        missing = {e.file for e in self._entries.values()} - set(self._readers)
        if missing:
            raise FormatError(f"tensors point at files with no reader: {sorted(missing)}")

    def __getitem__(self, name: str) -> TensorEntry:
        return self._entries[name]

    def __iter__(self) -> Iterator[str]:
        return iter(self._entries)

    def __len__(self) -> int:
        return len(self._entries)

    @property
    def bytes_read(self) -> int:
        """Bytes fetched so far through this directory's readers (headers included)."""
        return sum(r.bytes_read for r in self._readers.values())

    @property
    def n_params(self) -> int:
        return sum(e.numel for e in self._entries.values())

    def read(self, name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        """The tensor (or rows [start, stop) of its first axis), decoded; reads only those bytes."""
        entry = self._entries[name]
        shape = entry.shape
        begin, end = entry.span
        if rows is not None:
            if not shape:
                raise FormatError(f"{name}: a scalar has no rows")
            start, stop = min(max(0, rows[0]), shape[0]), min(shape[0], rows[1])
            row_bytes = (entry.numel // shape[0] if shape[0] else 0) * DTYPE_SIZES[entry.dtype]
            begin, end = begin + start * row_bytes, begin + max(start, stop) * row_bytes
            shape = (max(0, stop - start), *shape[1:])
        raw = self._readers[entry.file].read(begin, end - begin)
        return decode(raw, entry.dtype, shape)
