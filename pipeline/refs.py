"""What a source yields: a model and its checkpoint files, as frozen values that travel to Ray workers."""

from __future__ import annotations

import hashlib
import posixpath
import re
from collections.abc import Iterable
from dataclasses import dataclass, field

SAFETENSORS_SUFFIXES = (".safetensors",)
TORCH_SUFFIXES = (".bin", ".pt", ".pth")
INDEX_SUFFIX = ".index.json"  # model.safetensors.index.json, pytorch_model.bin.index.json
# File names that make a folder a model; `name.endswith(CHECKPOINT_SUFFIXES)`.
CHECKPOINT_SUFFIXES: tuple[str, ...] = SAFETENSORS_SUFFIXES + TORCH_SUFFIXES + (INDEX_SUFFIX,)
# Torch files a trainer writes beside the weights: not weights, and often pickles of arbitrary classes.
NOT_WEIGHTS = re.compile(
    r"training_args\.bin|optimizer\.pt|scheduler\.pt|scaler\.pt|trainer_state\.pt|rng_state(_\d+)?\.pth"
)


def files_revision(files: Iterable[tuple[str, int, str]]) -> str:
    """A revision for sources without commits (local, S3): a digest of the files' (name, size, version
    stamp), the stamp being an mtime or an ETag, so that any change to the files makes a new revision."""
    digest = hashlib.sha1()
    for name, size, stamp in sorted(files):
        digest.update(f"{name}\0{size}\0{stamp}\n".encode())
    return digest.hexdigest()


def is_checkpoint_name(name: str) -> bool:
    """Whether a file name is (part of) a checkpoint we can read, by name alone."""
    return name.endswith(CHECKPOINT_SUFFIXES) and not NOT_WEIGHTS.fullmatch(posixpath.basename(name))


@dataclass(frozen=True, slots=True)
class FileRef:
    """One checkpoint file of a model.

    `uri` is what `blobs.open_reader` opens: a local path today, `https://` or `s3://` later.
    `sha256` is the digest the hub or S3 reports, when it does (never computed by reading the bytes).
    `size` (-1 when unknown) and `etag` pin the version listed: a file that changed since is an error.
    """

    name: str
    size: int
    uri: str
    sha256: str | None = None
    etag: str | None = None  # the version the listing saw; reads of another version fail, never mix


def as_text(text: str) -> str:
    """`text` with what UTF-8 cannot hold (the lone surrogates Python gives an undecodable file name) shown as
    backslash escapes: index rows are Parquet, whose strings must be UTF-8, or the whole shard fails."""
    return text.encode("utf-8", "backslashreplace").decode("utf-8")


def stays_inside(name: str) -> bool:
    """Whether a relative file name that a hub or an index names stays inside its model's folder: no `..`
    or `.` segment (clients normalize them away, leaving the folder), no empty segment, no absolute path,
    backslash or control character."""
    parts = name.split("/")
    return not (name.startswith("/") or "\\" in name or any(p in ("", ".", "..") for p in parts)
                or any(ord(c) < 32 or ord(c) == 127 for c in name))


@dataclass(frozen=True, slots=True)
class ModelRef:
    """One model of a source, pinned to a revision (DESIGN.md, Identity)."""

    source: str  # "local", "hf", "s3"
    model_id: str
    revision: str
    files: tuple[FileRef, ...]
    arch: str | None = None
    license: str | None = None
    declared_base: tuple[str, ...] = field(default_factory=tuple)
    error: str | None = None  # why the source could not describe it (gated, missing): becomes an error row

    @property
    def key(self) -> tuple[str, str]:
        return (self.source, self.model_id)
