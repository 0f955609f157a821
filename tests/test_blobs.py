"""RangeReader implementations: exact ranges, byte accounting, and pickling to Ray workers."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest

from pipeline.blobs import BytesReader, LocalFileReader, RangeReader, open_reader
from pipeline.errors import BlobError, SourceError

DATA = bytes(range(256)) * 4  # 1024 bytes, every offset distinguishable


@pytest.fixture(params=["bytes", "local"])
def reader(request: pytest.FixtureRequest, tmp_path: Path) -> RangeReader:
    if request.param == "bytes":
        return BytesReader(DATA, name="data")
    path = tmp_path / "blob.bin"
    path.write_bytes(DATA)
    return LocalFileReader(path)


def test_reads_exact_ranges_and_counts_bytes(reader: RangeReader) -> None:
    assert isinstance(reader, RangeReader)
    assert reader.size == len(DATA)
    assert reader.read(0, 10) == DATA[:10]
    assert reader.read(300, 5) == DATA[300:305]
    assert reader.read(len(DATA) - 4, 4) == DATA[-4:]  # up to the last byte
    assert reader.read(len(DATA), 0) == b""  # an empty read at the end is fine
    assert reader.bytes_read == 19


@pytest.mark.parametrize(
    ("offset", "length", "why"),
    [(-1, 4, "negative"), (0, -1, "negative"), (1020, 5, "past end"), (len(DATA) + 1, 0, "past end")],
)
def test_rejects_ranges_outside_the_blob(reader: RangeReader, offset: int, length: int, why: str) -> None:
    with pytest.raises(BlobError, match=why):
        reader.read(offset, length)
    assert reader.bytes_read == 0  # a refused read costs nothing


def test_local_reader_missing_file_is_blob_error(tmp_path: Path) -> None:
    with pytest.raises(BlobError, match="cannot open"):
        LocalFileReader(tmp_path / "absent.safetensors")


def test_local_reader_pickles_and_still_reads(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(DATA)
    reader = LocalFileReader(path)
    reader.read(0, 100)
    clone = pickle.loads(pickle.dumps(reader))
    reader.close()  # the clone has its own descriptor
    assert isinstance(clone, LocalFileReader)
    assert clone.path == str(path)
    assert clone.size == len(DATA)
    assert clone.read(512, 8) == DATA[512:520]
    assert clone.bytes_read == 8


def test_open_reader_local_paths_and_unknown_schemes(tmp_path: Path) -> None:
    path = tmp_path / "blob.bin"
    path.write_bytes(DATA)
    assert open_reader(str(path)).read(1, 2) == DATA[1:3]
    assert open_reader(f"file://{path}").read(1, 2) == DATA[1:3]
    with pytest.raises(SourceError, match="not supported"):
        open_reader("gopher://example.org/blob")
