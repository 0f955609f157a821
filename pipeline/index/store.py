"""A thin layer over `pyarrow.fs`, so the index lives on a local path or on `s3://bucket/prefix`.

Paths handed around are the filesystem's own (`/abs/dir/...` locally, `bucket/prefix/...` on S3), always
joined with `/`. On S3 the configuration comes from the environment at call time, as for boto3:
`AWS_ENDPOINT_URL` (an S3-compatible server), `AWS_REGION`/`AWS_DEFAULT_REGION`, the credential chain.
"""

from __future__ import annotations

import os
import posixpath
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from urllib.parse import urlsplit

import pyarrow as pa
import pyarrow.fs as pafs

from pipeline.errors import BlobError, ModelIndexError

# An object appears only once its PUT (or multipart completion) finishes, so one write is atomic already.
_OBJECT_STORES = frozenset({"s3", "gcs", "abfs"})
S3_CONNECT_TIMEOUT_S = 10.0  # the SDK's default (~1 s) fails on a busy link; pyarrow ignores a read timeout on Linux
S3_MAX_ATTEMPTS = 5
S3_DEFAULT_REGION = "us-east-1"


def resolve(index_uri: str, *, filesystem: pafs.FileSystem | None = None) -> tuple[pafs.FileSystem, str]:
    """Turn an index URI into (filesystem, base path).

    Args:
        index_uri: a plain path, `file://...`, `s3://bucket/prefix` (configured from the environment, see
            `s3_filesystem`), or anything `pyarrow.fs.FileSystem.from_uri` knows
            (`s3://bucket/prefix?endpoint_override=...`, whose options then win).
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
    if index_uri.startswith("s3://") and "?" not in index_uri:
        path = index_uri.removeprefix("s3://").rstrip("/")
        bucket = path.split("/", 1)[0]
        if not bucket:
            raise ModelIndexError(f"cannot open index {index_uri!r}: no bucket")
        return s3_filesystem(bucket), path
    try:
        fs, path = pafs.FileSystem.from_uri(index_uri)
    except (pa.ArrowException, ValueError) as exc:
        raise ModelIndexError(f"cannot open index {index_uri!r}: {exc}") from exc
    return fs, path.rstrip("/") or "/"


def s3_filesystem(bucket: str | None = None) -> pafs.S3FileSystem:
    """pyarrow's S3 filesystem as boto3 would see the environment, read now.

    `AWS_ENDPOINT_URL_S3`/`AWS_ENDPOINT_URL` become `endpoint_override` and `scheme`; the region is
    `AWS_REGION`/`AWS_DEFAULT_REGION`, else the bucket's own (asked of AWS when there is no custom
    endpoint), else us-east-1; credentials come from the SDK's default chain (never passed here).
    Connect timeout and the standard retry strategy are raised for long crawls on shared links.
    """
    from pipeline.blobs import s3

    options: dict = {
        "connect_timeout": S3_CONNECT_TIMEOUT_S,
        "retry_strategy": pafs.AwsStandardS3RetryStrategy(max_attempts=S3_MAX_ATTEMPTS),
    }
    endpoint = s3.endpoint_url()
    if endpoint:
        parts = urlsplit(endpoint if "://" in endpoint else f"https://{endpoint}")
        options.update(endpoint_override=parts.netloc, scheme=parts.scheme)
    region = s3.region()
    if region is None and endpoint is None and bucket:
        try:
            region = pafs.resolve_s3_region(bucket)
        except (OSError, pa.ArrowException):
            region = None  # no network, or no such bucket: the first request will say so
    return pafs.S3FileSystem(region=region or S3_DEFAULT_REGION, **options)


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
    with _remote_errors(fs, directory, "list"):
        infos = fs.get_file_info(selector)
    paths = [
        info.path
        for info in infos
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
        with _remote_errors(fs, path, "write"), fs.open_output_stream(path) as f:
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


def write_new(fs: pafs.FileSystem, path: str, data: bytes | pa.Buffer) -> None:
    """Like `write_atomic`, but create-only: a commit record must never replace another.

    On S3 one conditional PUT (`If-None-Match: *`) creates the object only if none is there, so two
    writers of the same path cannot both succeed. Elsewhere: check, then `write_atomic`.

    Raises:
        FileExistsError: something is already at `path`.
        ModelIndexError: the object store refused the write.
    """
    if fs.type_name == "s3":
        from pipeline.blobs import s3

        try:
            s3.put_if_absent(f"s3://{path}", bytes(memoryview(data)), s3=_boto3_client_like(fs))
        except BlobError as exc:
            raise ModelIndexError(f"cannot write {path}: {exc}") from exc
        return
    if exists(fs, path):
        raise FileExistsError(path)
    write_atomic(fs, path, data)


def _boto3_client_like(fs: pafs.FileSystem):
    """A boto3 client that talks to the same endpoint, region and account as pyarrow's `fs`.

    pyarrow cannot make a conditional PUT. Its filesystem's options are public only through its pickle
    state (the way it travels to Ray workers), which is where they are read from; explicit keys are
    reused, else both clients use the same default credential chain.
    """
    from pipeline.blobs import s3

    try:
        options = dict(fs.__reduce__()[1][0])
    except (AttributeError, IndexError, KeyError, TypeError):
        return s3.client()
    override = options.get("endpoint_override") or ""
    scheme = options.get("scheme") or "https"
    endpoint = (override if "://" in override else f"{scheme}://{override}") if override else None
    return s3.client(
        endpoint=endpoint,
        region_name=options.get("region") or None,
        access_key=options.get("access_key") or None,
        secret_key=options.get("secret_key") or None,
        session_token=options.get("session_token") or None,
    )


@contextmanager
def _remote_errors(fs: pafs.FileSystem, path: str, what: str) -> Iterator[None]:
    """An object store's failure (no bucket, access denied, unreachable) as a ModelIndexError naming `path`."""
    if fs.type_name not in _OBJECT_STORES:
        yield
        return
    try:
        yield
    except (OSError, pa.ArrowException) as exc:
        raise ModelIndexError(f"cannot {what} {fs.type_name}://{path}: {exc}") from exc


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
