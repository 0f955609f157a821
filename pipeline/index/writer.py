"""Writing the index: shards as rows arrive, then one commit record per run (DESIGN.md, Index on disk).

A run is visible to readers only once `runs/<run_id>.json` exists, and that record is written last and
atomically; a crashed run leaves orphan shards that no reader ever opens.
"""

from __future__ import annotations

import json
import numbers
import os
import re
import uuid
from collections.abc import Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import TracebackType
from typing import Any, Self

import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import ModelIndexError
from pipeline.index import store
from pipeline.index.schema import CODE_BYTES, SCHEMA, STATUS_DUPLICATE, STATUS_ERROR, STATUS_OK
from pipeline.refs import as_text

RECORD_FORMAT = 1
RUNS_DIR = "runs"
SHARDS_DIR = "shards"
DEFAULT_ROWS_PER_SHARD = 50_000

_STATUSES = frozenset({STATUS_OK, STATUS_DUPLICATE, STATUS_ERROR})
_REQUIRED = ("source", "model_id", "spec", "status")  # the dedup key, and what load_codes filters on
_RUN_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]*")


@dataclass(frozen=True, slots=True)
class ShardEntry:
    """One shard of a run: its path relative to the index root and its row count."""

    path: str
    rows: int


@dataclass(frozen=True, slots=True)
class RunRecord:
    """The commit record of one run, as stored in `runs/<run_id>.json`."""

    run_id: str
    started_at: datetime
    committed_at: datetime
    shards: tuple[ShardEntry, ...]
    summary: dict[str, Any] = field(default_factory=dict)

    @property
    def rows(self) -> int:
        return sum(s.rows for s in self.shards)

    def to_json(self) -> bytes:
        doc = {
            "format": RECORD_FORMAT,
            "run_id": self.run_id,
            "started_at": self.started_at.isoformat(),
            "committed_at": self.committed_at.isoformat(),
            "rows": self.rows,
            "shards": [{"path": s.path, "rows": s.rows} for s in self.shards],
            "summary": self.summary,
        }
        # default=str: a summary holding a datetime or a Path should not lose a whole crawl at commit.
        return json.dumps(doc, indent=1, default=str).encode()

    @classmethod
    def from_json(cls, data: bytes) -> RunRecord:
        """Parse a record; raises ValueError/KeyError/TypeError on malformed input (the reader wraps them)."""
        doc = json.loads(data)
        if doc.get("format") != RECORD_FORMAT:
            raise ValueError(f"unknown record format {doc.get('format')!r}")
        shards = tuple(ShardEntry(path=str(s["path"]), rows=int(s["rows"])) for s in doc["shards"])
        return cls(
            run_id=str(doc["run_id"]),
            started_at=_parse_time(doc["started_at"]),
            committed_at=_parse_time(doc["committed_at"]),
            shards=shards,
            summary=dict(doc.get("summary") or {}),
        )


def new_run_id(now: datetime | None = None) -> str:
    """A run id that sorts by start time: `20250101T120000.123456Z-1a2b3c4d`."""
    now = now or datetime.now(UTC)
    return f"{now.astimezone(UTC):%Y%m%dT%H%M%S.%fZ}-{uuid.uuid4().hex[:8]}"


def run_record_path(base: str, run_id: str) -> str:
    return store.join(base, RUNS_DIR, f"{run_id}.json")


def check_index_folder(index_uri: str) -> None:
    """Refuse, before any work, a local index path that is a file, or a folder holding other files than an
    index's (RUNS_DIR, SHARDS_DIR): a crawl would fail there after hashing, or mix its shards into a model
    folder.

    Raises:
        ModelIndexError: the path is not a folder an index can live in.
    """
    fs, base = store.resolve(index_uri)
    if not isinstance(fs, pafs.LocalFileSystem) or not os.path.exists(base):
        return
    if not os.path.isdir(base):
        raise ModelIndexError(f"index {index_uri} is a file: an index is a folder (or s3://bucket/prefix)")
    others = sorted(n for n in os.listdir(base) if n not in (RUNS_DIR, SHARDS_DIR) and not n.startswith("."))
    if others:
        shown = ", ".join(others[:5]) + (", ..." if len(others) > 5 else "")
        raise ModelIndexError(f"index {index_uri} is a folder of other files ({shown}), not an index: "
                              "give the index a folder of its own")


class ShardWriter:
    """Buffers index rows, writes a Parquet shard each `rows_per_shard` rows, and commits the run.

    Use as a context manager: a clean exit commits, an exception commits nothing.

        with ShardWriter("index/") as w:
            for row in rows:
                w.add(row)

    Args:
        index_uri: local path or `s3://bucket/prefix` (see `store.resolve`).
        run_id: defaults to `new_run_id()`; must not be committed already.
        rows_per_shard: at most this many rows are held in memory and written per shard.
        filesystem: a preconfigured `pyarrow.fs.FileSystem` (e.g. S3 with a custom endpoint).

    Raises:
        ModelIndexError: the run id is already committed in this index.
    """

    def __init__(
        self,
        index_uri: str,
        run_id: str | None = None,
        *,
        rows_per_shard: int = DEFAULT_ROWS_PER_SHARD,
        filesystem: pafs.FileSystem | None = None,
    ) -> None:
        if rows_per_shard <= 0:
            raise ValueError(f"rows_per_shard must be positive, got {rows_per_shard}")
        run_id = run_id or new_run_id()
        if not _RUN_ID.fullmatch(run_id):
            raise ValueError(f"run id {run_id!r} must match {_RUN_ID.pattern}")
        self._fs, self._base = store.resolve(index_uri, filesystem=filesystem)
        self.index_uri = index_uri
        self.run_id = run_id
        self.rows_per_shard = rows_per_shard
        self.started_at = datetime.now(UTC)
        if store.exists(self._fs, run_record_path(self._base, run_id)):
            raise ModelIndexError(f"run {run_id} is already committed in {index_uri}")
        self._buffer: list[dict[str, Any]] = []
        self._shards: list[ShardEntry] = []
        self._closed = False
        self.record: RunRecord | None = None

    @property
    def rows_written(self) -> int:
        """Rows already flushed to shards (not counting the buffer)."""
        return sum(s.rows for s in self._shards)

    def add(self, row: Mapping[str, Any]) -> None:
        """Buffer one row (keys are SCHEMA names); a full buffer is flushed to a new shard.

        Missing optional fields become null (lists: []); `indexed_at` defaults to now.

        Raises:
            ValueError: unknown key, wrong type, missing identity field, unknown status, or a code
                that is not `CODE_BYTES` bytes.
        """
        self._check_open()
        self._buffer.append(_normalize(row))
        if len(self._buffer) >= self.rows_per_shard:
            self.flush()

    def flush(self) -> None:
        """Write the buffered rows as the next shard (nothing if the buffer is empty)."""
        self._check_open()
        if not self._buffer:
            return
        table = pa.Table.from_pylist(self._buffer, schema=SCHEMA)
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd")
        rel = f"{SHARDS_DIR}/run={self.run_id}/part-{len(self._shards):05d}.parquet"
        store.write_atomic(self._fs, store.join(self._base, rel), sink.getvalue())
        self._shards.append(ShardEntry(path=rel, rows=table.num_rows))
        self._buffer = []

    def commit(self, summary: Mapping[str, Any] | None = None) -> RunRecord:
        """Flush the remaining rows, then write the run record, last and atomically.

        Raises:
            ModelIndexError: a record for this run id appeared meanwhile.
        """
        self.flush()
        path = run_record_path(self._base, self.run_id)
        record = RunRecord(
            run_id=self.run_id,
            started_at=self.started_at,
            committed_at=datetime.now(UTC),
            shards=tuple(self._shards),
            summary=dict(summary or {}),
        )
        # Create-only: a second commit of this run id must not replace the first run's shard list
        # (on S3 a conditional PUT, so two crawls racing on one run id cannot both win).
        try:
            store.write_new(self._fs, path, record.to_json())
        except FileExistsError as exc:
            raise ModelIndexError(f"run {self.run_id} is already committed in {self.index_uri}") from exc
        self._closed = True
        self.record = record
        return record

    def abort(self) -> None:
        """Drop the buffer and commit nothing; shards already written stay orphaned and unread."""
        self._buffer = []
        self._closed = True

    def __enter__(self) -> Self:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if exc_type is not None:
            self.abort()
        elif not self._closed:
            self.commit()

    def _check_open(self) -> None:
        if self._closed:
            raise RuntimeError(f"run {self.run_id} is already committed or aborted")


def _kind(t: pa.DataType) -> str:
    for kind, test in (
        ("code", pa.types.is_fixed_size_binary),
        ("str", pa.types.is_string),
        ("int", pa.types.is_integer),
        ("float", pa.types.is_floating),
        ("time", pa.types.is_timestamp),
        ("list", pa.types.is_list),
    ):
        if test(t):
            return kind
    raise TypeError(f"no row check for index type {t}")


# Resolved once: walking the pyarrow schema per row cost more than the Parquet write itself.
_COLUMNS = tuple((f.name, _kind(f.type), f.type) for f in SCHEMA)
_NAMES = frozenset(SCHEMA.names)


def _normalize(row: Mapping[str, Any]) -> dict[str, Any]:
    if not _NAMES.issuperset(row):
        raise ValueError(f"unknown index columns: {sorted(set(row) - _NAMES)}")
    out: dict[str, Any] = {}
    for name, kind, t in _COLUMNS:
        value = row.get(name)
        if value is None:
            if name in _REQUIRED:
                raise ValueError(f"index row lacks {name!r}: {dict(row)!r}"[:500])
            if kind == "list":
                value = []
            elif name == "indexed_at":
                value = datetime.now(UTC)
        else:
            value = _check_value(name, kind, t, value)
        out[name] = value
    if out["status"] not in _STATUSES:
        raise ValueError(f"status must be one of {sorted(_STATUSES)}, got {out['status']!r}")
    return out


def _check_value(name: str, kind: str, t: pa.DataType, value: Any) -> Any:
    """Catch a bad value at `add`, naming the column, rather than a whole shard failing at flush."""
    if kind == "code":
        if not isinstance(value, bytes | bytearray | memoryview):
            raise ValueError(f"{name} must be bytes, got {type(value).__name__}")
        value = bytes(value)
        if len(value) != CODE_BYTES:
            raise ValueError(f"{name} must be {CODE_BYTES} bytes, got {len(value)}")
    elif kind == "str":
        if not isinstance(value, str):
            raise ValueError(f"{name} must be str, got {type(value).__name__}")
        if as_text(value) != value:
            raise ValueError(f"{name} must be valid UTF-8 text, got {as_text(value)!r}")
    elif kind == "int":
        if isinstance(value, bool) or not isinstance(value, numbers.Integral):
            raise ValueError(f"{name} must be int, got {type(value).__name__}")
        value = int(value)
    elif kind == "float":
        if isinstance(value, bool) or not isinstance(value, numbers.Real):
            raise ValueError(f"{name} must be a number, got {type(value).__name__}")
        value = float(value)
    elif kind == "time":
        if not isinstance(value, datetime):
            raise ValueError(f"{name} must be a datetime, got {type(value).__name__}")
    elif kind == "list":
        if isinstance(value, str | bytes) or not hasattr(value, "__iter__"):
            raise ValueError(f"{name} must be a list, got {type(value).__name__}")
        value = list(value)
        if value:
            try:
                pa.array([value], type=t)
            except (pa.ArrowInvalid, pa.ArrowTypeError, TypeError) as exc:
                raise ValueError(f"{name}: {exc}") from exc
    return value


def _parse_time(text: str) -> datetime:
    t = datetime.fromisoformat(text)
    return t if t.tzinfo else t.replace(tzinfo=UTC)
