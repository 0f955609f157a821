"""A thin layer over `pyarrow.fs`, so the index lives on a local path now and on `s3://bucket/prefix` later.

Paths handed around are the filesystem's own (`/abs/dir/...` locally, `bucket/prefix/...` on S3), always
joined with `/`.
"""

from __future__ import annotations

import os
import posixpath
import uuid

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import ModelIndexError

# An object appears only once its PUT (or multipart completion) finishes, so one write is atomic already.
_OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})


def resolve(index_uri: str, *, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """Turn an index URI into (filesystem, base path).

    Args:
        index_uri: a plain path, `file://...`, or anything `pyarrow.fs.FileSystem.from_uri` knows
            (`s3://bucket/prefix?endpoint_override=...`).
        filesystem: an already configured filesystem (an S3 with custom endpoint and keys); the URI's
            scheme is then stripped and the rest taken as the path on it.

    Raises:
        ModelIndexError: the URI is empty or its scheme is not supported.
    """
    if not index_uri:
        raise ModelIndexError("empty index URI")
    if filesystem is not None:
        _, sep, rest = index_uri.partition("://")
        path = rest if sep else index_uri
        return filesystem, path.split("?", 1)[0].rstrip("/") or "/"
    if "://" not in index_uri:
        return pafs.LocalFileSystem(), os.path.abspath(os.path.expanduser(index_uri))
    try:
        fs, path = pafs.FileSystem.from_uri(index_uri)
    except (pa.ArrowException, ValueError) as exc:
        raise ModelIndexError(f"cannot open index {index_uri!r}: {exc}") from exc
    return fs, path.rstrip("/") or "/"


def join(base: str, *parts: str) -> str:
    """Join path parts with `/` (object-store keys and POSIX paths alike)."""
    return posixpath.join(base, *parts)


def exists(fs: pafs.FileSystem, path: str) -> bool:
    """Whether a file or directory (or S3 prefix holding objects) exists at `path`."""
    return fs.get_file_info(path).type != pafs.FileType.NotFound


def read_bytes(fs: pafs.FileSystem, path: str) -> bytes:
    """The whole content of a (small) file, e.g. a run record."""
    with fs.open_input_stream(path) as f:
        return f.read()


def list_files(fs: pafs.FileSystem, directory: str, *, suffix: str = "") -> list[str]:
    """Files directly under `directory` whose names end with `suffix`, sorted; [] if it does not exist.

    Names starting with `.` are skipped: they are temporary files of an unfinished `write_atomic`.
    """
    selector = pafs.FileSelector(directory, allow_not_found=True, recursive=False)
    paths = [
        info.path
        for info in fs.get_file_info(selector)
        if info.type == pafs.FileType.File
        and info.base_name.endswith(suffix)
        and not info.base_name.startswith(".")
    ]
    return sorted(paths)


def write_atomic(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer) -> None:
    """Write `data` to `path` so that readers see either nothing or all of it, never a torn file.

    Locally: a hidden temporary name in the same directory, flush + fsync, rename, fsync the directory
    (a crash leaves at most a stray `.name.tmp-*`). On object stores a single PUT is atomic already.
    Elsewhere: a temporary file then `fs.move`, atomic wherever that filesystem's rename is.
    """
    parent, name = posixpath.split(path)
    if isinstance(fs, pafs.LocalFileSystem):
        _write_local(parent, name, data)
        return
    if fs.type_name in _OBJECT_STORES:
        with fs.open_output_stream(path) as f:
            f.write(data)
        return
    fs.create_dir(parent, recursive=True)
    tmp = join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with fs.open_output_stream(tmp) as f:
            f.write(data)
        fs.move(tmp, path)
    except BaseException:
        if exists(fs, tmp):
            fs.delete_file(tmp)
        raise


def _write_local(parent: str, name: str, data: bytes | pa.Buffer) -> None:
    os.makedirs(parent, exist_ok=True)
    final = os.path.join(parent, name)
    tmp = os.path.join(parent, f".{name}.tmp-{uuid.uuid4().hex}")
    try:
        with open(tmp, "wb") as f:
            f.write(memoryview(data))
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    # The rename itself must survive a power cut, or the file may vanish after reboot.
    dir_fd = os.open(parent, os.O_RDONLY)
    try:
        os.fsync(dir_fd)
    finally:
        os.close(dir_fd)
