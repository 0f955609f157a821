"""safetensors checkpoints, parsed from the header alone through any RangeReader.

Layout: a little-endian u64 `N`, then `N` bytes of JSON (`name -> {dtype, shape, data_offsets}` plus an
optional `"__metadata__"`), then the data; offsets are relative to byte `8 + N`. We parse the header
ourselves because the safetensors library reads only local files and buffers, not byte ranges.
"""

from __future__ import annotations

import json
import struct
from itertools import pairwise
from typing import Any

from pipeline.blobs import RangeReader
from pipeline.errors import FormatError
from pipeline.formats.directory import DTYPE_SIZES, TensorDirectory, TensorEntry, check_text, checked_numel

__all__ = ["FORMAT", "MAX_HEADER_BYTES", "open", "read_entries"]

FORMAT = "safetensors"
# The reference implementation's own cap: a larger header is an attack or a broken file.
MAX_HEADER_BYTES = 100_000_000
# Every dtype safetensors 0.8 may write; those without a DTYPE_SIZES entry are valid but unsupported.
_KNOWN_DTYPES = frozenset(DTYPE_SIZES) | {
    "C64", "F8_E4M3FNUZ", "F8_E5M2FNUZ", "F8_E8M0", "F4", "F6_E2M3", "F6_E3M2",
}


def read_entries(reader: RangeReader, file: str = "") -> dict[str, TensorEntry]:
    """The tensors of one safetensors file, reading only its header.

    Args:
        reader: the file's bytes.
        file: the name recorded in each entry's `file` (the shard name in a sharded checkpoint).

    Returns:
        Entries by tensor name, with absolute byte spans inside the file.

    Raises:
        FormatError: the file is truncated, or its header is malformed or lies about sizes.
    """
    label = file or "safetensors"
    if reader.size < 8:
        raise FormatError(f"{label}: file too short ({reader.size} bytes) for a safetensors header")
    (n,) = struct.unpack("<Q", reader.read(0, 8))
    if n > MAX_HEADER_BYTES:
        raise FormatError(f"{label}: header length {n} above the {MAX_HEADER_BYTES}-byte cap")
    if 8 + n > reader.size:
        raise FormatError(f"{label}: header length {n} past end of file ({reader.size} bytes): truncated?")
    header = _parse_json(reader.read(8, n), label)
    data_start, data_size = 8 + n, reader.size - 8 - n

    entries: dict[str, TensorEntry] = {}
    for name, info in header.items():
        if name == "__metadata__":
            if not isinstance(info, dict) or not all(isinstance(v, str) for v in info.values()):
                raise FormatError(f"{label}: __metadata__ must map strings to strings")
            continue
        check_text(name, f"{label}: tensor name")
        begin, end, dtype, shape = _parse_info(name, info, label)
        if end > data_size:
            raise FormatError(
                f"{label}: tensor {name!r} data_offsets [{begin}, {end}) past end of data "
                f"({data_size} bytes): truncated file or lying header"
            )
        entries[name] = TensorEntry(name, dtype, shape, (data_start + begin, data_start + end), file)
    _check_no_overlap(entries, label)
    return entries


def open(reader: RangeReader, file: str = "model.safetensors") -> TensorDirectory:
    """A TensorDirectory over one safetensors file; reads only the header now, tensors on demand."""
    return TensorDirectory(read_entries(reader, file), {file: reader}, FORMAT)


def _parse_json(raw: bytes, label: str) -> dict[str, Any]:
    def no_duplicates(pairs: list[tuple[str, Any]]) -> dict[str, Any]:
        out = dict(pairs)
        if len(out) != len(pairs):
            raise FormatError(f"{label}: header repeats a key")
        return out

    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=no_duplicates)
    except (UnicodeDecodeError, ValueError) as exc:
        if isinstance(exc, FormatError):
            raise
        raise FormatError(f"{label}: header is not valid JSON: {exc}") from exc
    except RecursionError:  # `[[[[...]]]]`: the parser recurses once per level
        raise FormatError(f"{label}: header JSON nests too deeply") from None
    if not isinstance(header, dict):
        raise FormatError(f"{label}: header is JSON {type(header).__name__}, not an object")
    return header


def _parse_info(name: str, info: Any, label: str) -> tuple[int, int, str, tuple[int, ...]]:
    """(begin, end, dtype, shape) of one header entry, with sizes checked against each other."""
    if not isinstance(info, dict):
        raise FormatError(f"{label}: tensor {name!r} is not an object")
    dtype, shape, offsets = info.get("dtype"), info.get("shape"), info.get("data_offsets")
    if not isinstance(dtype, str) or dtype not in _KNOWN_DTYPES:
        raise FormatError(f"{label}: tensor {name!r} has unknown dtype {dtype!r}")
    if dtype not in DTYPE_SIZES:
        raise FormatError(f"{label}: tensor {name!r} has unsupported dtype {dtype}")
    if not isinstance(shape, list) or not all(_is_count(d) for d in shape):
        raise FormatError(f"{label}: tensor {name!r} has bad shape {shape!r}")
    if (
        not isinstance(offsets, list)
        or len(offsets) != 2
        or not all(_is_count(o) for o in offsets)
        or offsets[0] > offsets[1]
    ):
        raise FormatError(f"{label}: tensor {name!r} has bad data_offsets {offsets!r}")
    numel = checked_numel(shape, f"{label}: tensor {name!r}")
    begin, end = offsets
    if end - begin != numel * DTYPE_SIZES[dtype]:
        raise FormatError(
            f"{label}: tensor {name!r} data_offsets [{begin}, {end}) hold {end - begin} bytes, "
            f"but {dtype}{shape} needs {numel * DTYPE_SIZES[dtype]}"
        )
    return begin, end, dtype, tuple(shape)


def _is_count(x: Any) -> bool:
    return isinstance(x, int) and not isinstance(x, bool) and x >= 0


def _check_no_overlap(entries: dict[str, TensorEntry], label: str) -> None:
    # The spec forbids overlaps (two names over the same bytes); holes are harmless to us, so allowed.
    spans = sorted((e.span, e.name) for e in entries.values() if e.nbytes)
    for (prev, prev_name), (cur, cur_name) in pairwise(spans):
        if cur[0] < prev[1]:
            raise FormatError(f"{label}: tensors {prev_name!r} and {cur_name!r} overlap")
