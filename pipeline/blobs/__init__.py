"""RangeReader: a file's size and reads of byte ranges, whatever holds the bytes.

Formats read checkpoints only through this interface, so that a 70B-parameter checkpoint costs the
header plus the spans a spec asks for, wherever it lives. Every reader counts the bytes it returned.
"""

from __future__ import annotations

import os
import stat
from typing import Protocol, runtime_checkable

from pipeline.errors import BlobError, SourceError


@runtime_checkable
class RangeReader(Protocol):
    """Random access to the bytes of one blob."""

    @property
    def size(self) -> int: ...

    @property
    def bytes_read(self) -> int: ...

    def read(self, offset: int, length: int) -> bytes:
        """Exactly `length` bytes from `offset`; raises BlobError if the blob is shorter."""
        ...


def _check_range(offset: int, length: int, size: int, name: str) -> None:
    if offset < 0 or length < 0:
        raise BlobError(f"{name}: negative range offset={offset} length={length}")
    if offset + length > size:
        raise BlobError(f"{name}: range {offset}+{length} past end of blob ({size} bytes)")


class LocalFileReader:
    """A local regular file, read with pread (thread-safe, no shared file position)."""

    def __init__(self, path: str | os.PathLike[str]):
        self.path = os.fspath(path)
        self._fd = -1
        try:
            # Non-blocking, so that opening a FIFO returns (to be refused below) instead of waiting for a writer.
            self._fd = os.open(self.path, os.O_RDONLY | os.O_NONBLOCK)
            info = os.fstat(self._fd)
        except OSError as exc:
            raise BlobError(f"{self.path}: cannot open: {exc.strerror}") from exc
        except ValueError as exc:  # a NUL byte, or a lone surrogate the file system cannot encode
            raise BlobError(f"{self.path!r}: cannot open: {exc}") from exc
        if not stat.S_ISREG(info.st_mode):  # a directory, FIFO or device has no fixed bytes to hash
            self.close()
            raise BlobError(f"{self.path}: not a regular file")
        os.set_blocking(self._fd, True)
        self._size = info.st_size
        self._bytes_read = 0

    @property
    def size(self) -> int:
        return self._size

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    def read(self, offset: int, length: int) -> bytes:
        _check_range(offset, length, self._size, self.path)
        chunks, got = [], 0
        while got < length:
            chunk = os.pread(self._fd, length - got, offset + got)
            if not chunk:
                raise BlobError(f"{self.path}: file shrank while reading at {offset + got}")
            chunks.append(chunk)
            got += len(chunk)
        self._bytes_read += length
        return b"".join(chunks)

    def close(self) -> None:
        if self._fd >= 0:
            os.close(self._fd)
            self._fd = -1

    def __del__(self) -> None:
        self.close()

    def __reduce__(self):
        # Re-open on the other side: a file descriptor does not travel to a Ray worker.
        return (LocalFileReader, (self.path,))


class BytesReader:
    """Bytes already in memory (tests, small blobs fetched whole)."""

    def __init__(self, data: bytes, name: str = "<bytes>"):
        self._data = memoryview(data)
        self.name = name
        self._bytes_read = 0

    @property
    def size(self) -> int:
        return len(self._data)

    @property
    def bytes_read(self) -> int:
        return self._bytes_read

    def read(self, offset: int, length: int) -> bytes:
        _check_range(offset, length, len(self._data), self.name)
        self._bytes_read += length
        return bytes(self._data[offset : offset + length])


def open_reader(uri: str, *, size: int | None = None, etag: str | None = None) -> RangeReader:
    """A RangeReader for a FileRef's uri: a local path, `http(s)://` (pipeline.blobs.http), `s3://`
    (pipeline.blobs.s3). Remote readers are imported on first use, so local work never loads their clients.

    `size` and `etag`, when known from the listing, pin the version: another one raises BlobError.
    """
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    size = None if size is None or size < 0 else size
    if scheme in ("", "file"):
        reader = LocalFileReader(uri.removeprefix("file://"))
        if size is not None and reader.size != size:
            raise BlobError(f"{reader.path}: changed since listing ({size} bytes then, {reader.size} now)")
        return reader
    if scheme in ("http", "https"):
        from pipeline.blobs.http import HttpReader

        return HttpReader(uri, expected_size=size, expected_etag=etag)
    if scheme == "s3":
        from pipeline.blobs.s3 import S3Reader

        return S3Reader(uri, expected_size=size, expected_etag=etag)
    raise SourceError(f"{uri}: {scheme}:// blobs are not supported")
