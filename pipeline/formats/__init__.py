"""Checkpoint formats: a model's files to one lazy TensorDirectory, whatever format and sharding."""

from __future__ import annotations

import json
import os
import posixpath
from collections.abc import Sequence
from dataclasses import dataclass

from pipeline.blobs import RangeReader, open_reader
from pipeline.errors import FormatError, NoCheckpointError
from pipeline.formats import safetensors, torch_zip
from pipeline.formats.directory import TensorDirectory, TensorEntry, check_text
from pipeline.refs import (
    CHECKPOINT_SUFFIXES,
    INDEX_SUFFIX,
    NOT_WEIGHTS,
    SAFETENSORS_SUFFIXES,
    TORCH_SUFFIXES,
    FileRef,
    stays_inside,
)

__all__ = [
    "CHECKPOINT_SUFFIXES",
    "TensorDirectory",
    "TensorEntry",
    "open_model",
    "safetensors",
    "torch_zip",
]

_MAX_INDEX_BYTES = 64 * 2**20


@dataclass(frozen=True, slots=True)
class _Unit:
    """Files that together make one checkpoint: a single file, or an index's shards."""

    format: str
    shards: tuple[FileRef, ...]
    weight_map: dict[str, str] | None = None  # tensor -> shard name, for an index
    index: tuple[str, RangeReader] | None = None  # the index file, whose bytes count as read too


def open_model(files: Sequence[FileRef]) -> TensorDirectory:
    """One TensorDirectory over a model's checkpoint files (single, sharded with an index, or several).

    Other files (config.json, tokenizer, training_args.bin) are ignored. When a model ships both
    safetensors and torch weights, only the safetensors are read; when an index is present, only the
    shards it names are read (a consolidated copy beside them is skipped).

    Raises:
        NoCheckpointError: no checkpoint file among `files`.
        FormatError: a file is malformed, a tensor is not in the shard the index says, or two files
            hold a tensor of the same name.
        UnsafePickleError: a torch checkpoint's pickle references code outside the allow-list.
    """
    units = _choose_units(files)
    if not units:
        raise NoCheckpointError(f"no checkpoint among {sorted(f.name for f in files)}")
    entries: dict[str, TensorEntry] = {}
    readers: dict[str, RangeReader] = {}
    for unit in units:
        if unit.index:
            readers[unit.index[0]] = unit.index[1]
        for shard in unit.shards:
            if shard.name in readers:
                continue
            reader = open_reader(shard.uri, size=shard.size, etag=shard.etag)
            readers[shard.name] = reader
            module = safetensors if unit.format == safetensors.FORMAT else torch_zip
            for name, entry in module.read_entries(reader, shard.name).items():
                if name in entries:
                    raise FormatError(f"tensor {name!r} is in both {entries[name].file} and {entry.file}")
                entries[name] = entry
        for name, shard_name in (unit.weight_map or {}).items():
            found = entries.get(name)
            if found is None or found.file != shard_name:
                where = f"in {found.file}" if found else "in no shard"
                raise FormatError(f"index says tensor {name!r} is in {shard_name}, but it is {where}")
    return TensorDirectory(entries, readers, units[0].format)


def _format_of(name: str) -> str | None:
    if name.endswith(SAFETENSORS_SUFFIXES):
        return safetensors.FORMAT
    if name.endswith(TORCH_SUFFIXES) and not NOT_WEIGHTS.fullmatch(posixpath.basename(name)):
        return torch_zip.FORMAT
    return None


def _choose_units(files: Sequence[FileRef]) -> list[_Unit]:
    """The checkpoint(s) to read: safetensors over torch; an index's shards over loose files."""
    loose = [_Unit(fmt, (f,)) for f in files if (fmt := _format_of(f.name))]
    for fmt in (safetensors.FORMAT, torch_zip.FORMAT):
        # An index's name says its shards' format (model.safetensors.index.json); read only those we use.
        indexes = [
            f for f in files
            if f.name.endswith(INDEX_SUFFIX) and _format_of(f.name.removesuffix(INDEX_SUFFIX)) == fmt
        ]
        chosen = [_read_index(f, files, fmt) for f in indexes] or [u for u in loose if u.format == fmt]
        if chosen:
            return chosen
    return []


def _read_index(index: FileRef, files: Sequence[FileRef], fmt: str) -> _Unit:
    """The shards an `*.index.json` names, as FileRefs: those passed in, else beside the index."""
    reader = open_reader(index.uri, size=index.size, etag=index.etag)
    if reader.size > _MAX_INDEX_BYTES:
        raise FormatError(f"{index.name}: index is {reader.size} bytes, above {_MAX_INDEX_BYTES}")
    try:
        weight_map = json.loads(reader.read(0, reader.size).decode("utf-8"))["weight_map"]
    except (ValueError, KeyError, TypeError) as exc:
        raise FormatError(f"{index.name}: not a sharded-checkpoint index: {exc!r}") from exc
    except RecursionError:  # `[[[[...]]]]`: the parser recurses once per level
        raise FormatError(f"{index.name}: not a sharded-checkpoint index: JSON nests too deeply") from None
    if not isinstance(weight_map, dict) or not all(
        isinstance(k, str) and isinstance(v, str) for k, v in weight_map.items()
    ):
        raise FormatError(f"{index.name}: weight_map must map tensor names to shard file names")

    by_name = {f.name: f for f in files}
    index_dir = posixpath.dirname(index.name)
    shards: dict[str, FileRef] = {}
    names: dict[str, str] = {}
    for shard in sorted(set(weight_map.values())):
        check_text(shard, f"{index.name}: shard name")  # it labels every message about the shard
        if not stays_inside(shard):
            raise FormatError(f"{index.name}: shard name {shard!r} escapes the model's folder")
        name = posixpath.join(index_dir, shard)
        names[shard] = name
        if _format_of(name) != fmt:
            raise FormatError(f"{index.name}: shard {shard!r} is not a {fmt} checkpoint")
        # A shard not passed in lies beside the index; its size is unknown until opened (-1).
        shards[name] = by_name.get(name) or FileRef(name=name, size=-1, uri=_sibling_uri(index.uri, shard))
    placed = {tensor: names[shard] for tensor, shard in weight_map.items()}
    return _Unit(fmt, tuple(shards.values()), placed, (index.name, reader))


def _sibling_uri(uri: str, name: str) -> str:
    if "://" in uri:
        return posixpath.join(posixpath.dirname(uri), name)
    return os.path.join(os.path.dirname(uri), *name.split("/"))
