"""An S3 prefix as a source: every "folder" under `s3://bucket/prefix` that holds a checkpoint is one model.

The same rules as a local folder (pipeline.sources.local), with S3's identity (DESIGN.md): `model_id` is
the model folder's `bucket/prefix/...` path (the `bucket/key` of a single checkpoint object); `revision` is
a digest of the files' names, sizes and ETags, so an unchanged model is skipped without reading a byte of
weights. A file's `sha256` is the object's SHA-256 checksum when S3 stores a full-object one.

The listing is one flat, paginated `ListObjectsV2`: keys come in UTF-8 order, so all keys under a folder
are contiguous, and each model is yielded as soon as the listing has passed its folder.
"""

from __future__ import annotations

import base64
import binascii
import json
import posixpath
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

import botocore.exceptions as bexc

from pipeline.blobs.s3 import S3Reader, client, parse_uri, translate
from pipeline.errors import BlobError, NoCheckpointError, SourceError
from pipeline.refs import CHECKPOINT_SUFFIXES, FileRef, ModelRef, files_revision, is_checkpoint_name

SOURCE = "s3"
CONFIG_MAX_BYTES = 1 << 20
PAGE_SIZE = 1000  # keys per ListObjectsV2 page (S3's maximum)


@dataclass(slots=True)
class _Object:
    """One listed object: what identity needs."""

    key: str
    size: int
    etag: str
    checksums: tuple[str, ...] = ()  # algorithms the listing reports (ChecksumAlgorithm)
    checksum_type: str | None = None  # FULL_OBJECT or COMPOSITE, where the listing says

    @property
    def name(self) -> str:
        return posixpath.basename(self.key)


@dataclass(slots=True)
class _Folder:
    parts: tuple[str, ...]  # path below the root, () for the root itself
    objects: list[_Object] = field(default_factory=list)
    has_subfolders: bool = False


def list_models(
    uri: str,
    *,
    unchanged: Callable[[str, str], bool] | None = None,
    page_size: int = PAGE_SIZE,
    **filters: object,
) -> Iterator[ModelRef]:
    """Every model under `s3://bucket/prefix`, each yielded once the listing has passed its folder.

    A folder with checkpoint files is a model; so is a leaf folder with files but no checkpoint we can
    read (a ModelRef with no files, which becomes an `error` row). A URI naming one checkpoint object
    yields that model. Names starting with `.` are skipped, as in a local folder.

    Args:
        uri: `s3://bucket`, `s3://bucket/prefix` or `s3://bucket/key.safetensors`.
        unchanged: `unchanged(model_id, revision)` is true for a model the caller holds already: it is
            yielded from the listing alone, without the requests that fetch its files' SHA-256 and its
            config.json (`sha256` and `arch` are then None), so a nightly crawl costs LIST requests only.
        page_size: keys per listing request.

    Raises:
        SourceError: hub filters were given, the bucket does not exist or cannot be listed, or nothing
            is stored under the prefix.
    """
    if any(v is not None for v in filters.values()):
        raise SourceError(f"filters ({', '.join(sorted(filters))}) apply to hub listings, not to an S3 prefix")
    bucket, prefix = _split(uri)
    if prefix and is_checkpoint_name(prefix):
        head = _head(bucket, prefix)
        if head is not None:
            yield _object_model(bucket, prefix, head)
            return
    seen = 0

    def counted() -> Iterator[_Object | None]:
        nonlocal seen
        for obj in _list(bucket, f"{prefix}/" if prefix else "", page_size, uri):
            seen += 1
            yield obj

    yield from _walk(bucket, prefix, counted(), unchanged)
    if prefix and not seen:
        raise SourceError(f"{uri}: no objects under this prefix")


def model_at(uri: str) -> ModelRef:
    """One model: a checkpoint object, or a folder prefix that holds one (its `bucket/prefix` is the id).

    Raises:
        NoCheckpointError: the object is not a checkpoint, or the folder holds none.
        SourceError: nothing is stored at `uri`, or the bucket does not exist or cannot be read.
    """
    bucket, key = _split(uri)
    tried_head = False
    if key and is_checkpoint_name(key):
        head, tried_head = _head(bucket, key), True
        if head is not None:
            return _object_model(bucket, key, head)
    objects: list[_Object] = []
    found_any = False  # a subfolder, a hidden file or a folder marker ("key/") still make it a folder
    for obj in _list(bucket, f"{key}/" if key else "", PAGE_SIZE, uri, delimiter="/"):
        found_any = True
        if obj is not None and obj.name and not _hidden(obj.name):
            objects.append(obj)
    if found_any:
        ref = _folder_model(bucket, _model_id(bucket, key, ()), objects)
        if not ref.files:
            found = ", ".join(o.name for o in objects) or "no files"
            raise NoCheckpointError(f"{uri}: no checkpoint in folder (found: {found})")
        return ref
    if key and not tried_head and _head(bucket, key) is not None:
        raise NoCheckpointError(f"{uri}: not a checkpoint (expected {', '.join(CHECKPOINT_SUFFIXES)})")
    raise SourceError(f"{uri}: no such object or prefix")


# -- listing --------------------------------------------------------------------------------------


def _split(uri: str) -> tuple[str, str]:
    try:
        bucket, key = parse_uri(uri)
    except BlobError as exc:
        raise SourceError(str(exc)) from exc
    return bucket, key.rstrip("/")


def _list(
    bucket: str, prefix: str, page_size: int, uri: str, *, delimiter: str | None = None
) -> Iterator[_Object | None]:
    """The objects under `prefix`, page by page; with a delimiter, None stands for each common prefix."""
    kwargs: dict[str, Any] = {"Bucket": bucket, "Prefix": prefix, "PaginationConfig": {"PageSize": page_size}}
    if delimiter:
        kwargs["Delimiter"] = delimiter
    try:
        for page in client().get_paginator("list_objects_v2").paginate(**kwargs):
            for _ in page.get("CommonPrefixes", ()):
                yield None
            for item in page.get("Contents", ()):
                yield _Object(
                    key=item["Key"],
                    size=int(item["Size"]),
                    etag=item.get("ETag", ""),
                    checksums=tuple(item.get("ChecksumAlgorithm", ())),
                    checksum_type=item.get("ChecksumType"),
                )
    except (bexc.ClientError, bexc.BotoCoreError) as exc:
        raise translate(exc, uri, error=SourceError) from exc


def _walk(
    bucket: str, prefix: str, objects: Iterable[_Object | None], unchanged: Callable[[str, str], bool] | None
) -> Iterator[ModelRef]:
    """Models from a flat listing in key order, like os.walk over a folder: each folder is complete
    once a key outside it arrives (keys under a prefix are contiguous), so memory holds one path."""
    root = len(prefix) + 1 if prefix else 0
    stack = [_Folder(())]
    for obj in objects:
        if obj is None:
            continue
        *parts, name = obj.key[root:].split("/")
        if any(_hidden(p) for p in parts):
            continue
        folder = tuple(parts)
        while stack[-1].parts != folder[: len(stack[-1].parts)]:
            yield from _finished(bucket, prefix, stack.pop(), unchanged)
        for depth in range(len(stack[-1].parts) + 1, len(folder) + 1):
            stack[-1].has_subfolders = True
            stack.append(_Folder(folder[:depth]))
        if name and not _hidden(name):  # "" is a folder marker ("dir/"), not a file
            stack[-1].objects.append(obj)
    while stack:
        yield from _finished(bucket, prefix, stack.pop(), unchanged)


def _finished(
    bucket: str, prefix: str, folder: _Folder, unchanged: Callable[[str, str], bool] | None
) -> Iterator[ModelRef]:
    """A completed folder as a model, if it is one (the same rule as a local folder)."""
    has_checkpoint = any(is_checkpoint_name(o.name) for o in folder.objects)
    if has_checkpoint or (folder.objects and not folder.has_subfolders and folder.parts):
        yield _folder_model(bucket, _model_id(bucket, prefix, folder.parts), folder.objects, unchanged)


def _hidden(name: str) -> bool:
    return name.startswith(".")


def _model_id(bucket: str, prefix: str, parts: tuple[str, ...]) -> str:
    return "/".join(p for p in (bucket, prefix, *parts) if p)


# -- models ---------------------------------------------------------------------------------------


def _folder_model(
    bucket: str, model_id: str, objects: list[_Object], unchanged: Callable[[str, str], bool] | None = None
) -> ModelRef:
    checkpoints = [o for o in objects if is_checkpoint_name(o.name)]
    configs = [o for o in objects if o.name == "config.json"]
    revision = _revision(checkpoints + configs)
    if unchanged is not None and unchanged(model_id, revision):
        # Held already: the listing describes it fully enough, spare the HEADs and the config GET.
        files = tuple(_file_ref(bucket, o, with_sha256=False) for o in checkpoints)
        return ModelRef(SOURCE, model_id, revision, files)
    files = tuple(_file_ref(bucket, o) for o in checkpoints)
    arch = _arch(bucket, configs[0]) if configs else None
    return ModelRef(SOURCE, model_id, revision, files, arch=arch)


def _object_model(bucket: str, key: str, head: dict[str, Any]) -> ModelRef:
    obj = _Object(key=key, size=int(head["ContentLength"]), etag=head.get("ETag", ""))
    uri = f"s3://{bucket}/{key}"
    ref = FileRef(name=obj.name, size=obj.size, uri=uri, sha256=_sha256_of(head), etag=obj.etag or None)
    return ModelRef(SOURCE, f"{bucket}/{key}", _revision([obj]), (ref,))


def _file_ref(bucket: str, obj: _Object, *, with_sha256: bool = True) -> FileRef:
    sha256 = _sha256(bucket, obj) if with_sha256 else None
    uri = f"s3://{bucket}/{obj.key}"
    return FileRef(name=obj.name, size=obj.size, uri=uri, sha256=sha256, etag=obj.etag or None)


def _revision(objects: list[_Object]) -> str:
    return files_revision((o.name, o.size, o.etag.strip('"')) for o in objects)


def _sha256(bucket: str, obj: _Object) -> str | None:
    """The object's full-object SHA-256, when the listing says S3 stores one (one HEAD to fetch it)."""
    if "SHA256" not in obj.checksums or obj.checksum_type == "COMPOSITE":
        return None
    head = _head(bucket, obj.key)
    return _sha256_of(head) if head is not None else None


def _sha256_of(head: dict[str, Any]) -> str | None:
    # A multipart upload's SHA-256 is a checksum of part checksums ("...=-3"): not the file's digest.
    value = head.get("ChecksumSHA256")
    if not value or head.get("ChecksumType", "FULL_OBJECT") != "FULL_OBJECT":
        return None
    try:
        digest = base64.b64decode(value, validate=True)
    except (binascii.Error, ValueError):
        return None
    return digest.hex() if len(digest) == 32 else None


def _head(bucket: str, key: str) -> dict[str, Any] | None:
    """HEAD with checksums, or None when there is no such object."""
    try:
        return client().head_object(Bucket=bucket, Key=key, ChecksumMode="ENABLED")
    except bexc.ClientError as exc:
        # A HEAD has no body: 404 is all S3 says, for a missing key and a missing bucket alike.
        if exc.response.get("ResponseMetadata", {}).get("HTTPStatusCode") == 404:
            return None
        raise translate(exc, f"s3://{bucket}/{key}", error=SourceError) from exc
    except bexc.BotoCoreError as exc:
        raise translate(exc, f"s3://{bucket}/{key}", error=SourceError) from exc


def _arch(bucket: str, config: _Object) -> str | None:
    """`model_type` from a small config.json (one GET, pinned to the listed version)."""
    if config.size > CONFIG_MAX_BYTES:
        return None
    try:
        reader = S3Reader(f"s3://{bucket}/{config.key}", expected_size=config.size, expected_etag=config.etag)
        value = json.loads(reader.read(0, config.size)).get("model_type")
    except (BlobError, ValueError, AttributeError):
        return None
    return value if isinstance(value, str) else None
