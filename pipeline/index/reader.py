"""Reading the index: only committed runs, latest row per (source, model_id, spec), codes into numpy.

Shards not named by a run record (a crashed or running crawl) are never opened.
"""

from __future__ import annotations

from collections.abc import Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import ModelIndexError
from pipeline.index import store
from pipeline.index.schema import CODE_BYTES, SCHEMA, STATUS_DUPLICATE, STATUS_OK
from pipeline.index.writer import RUNS_DIR, RunRecord, ShardEntry

KEY = ("source", "model_id", "spec")  # one row per model and spec; the latest wins
WORDS = CODE_BYTES // 8
_READ_THREADS = 8  # shards are read concurrently: object-store latency, not CPU, dominates there


@dataclass(frozen=True, slots=True)
class Codes:
    """The searchable codes of one spec: row i of `codes` belongs to `source[i]`, `model_id[i]`, ...

    `codes` is (N, 4) uint64 and read-only: it may be a zero-copy view of Arrow memory. The identity
    columns stay Arrow arrays (compact at hub scale); `identity(i)` gives one row as Python values.
    """

    spec: str
    codes: np.ndarray
    source: pa.Array
    model_id: pa.Array
    revision: pa.Array

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    def identity(self, i: int) -> tuple[str, str, str | None]:
        """(source, model_id, revision) of row `i`."""
        i = int(i)
        return (self.source[i].as_py(), self.model_id[i].as_py(), self.revision[i].as_py())


class IndexReader:
    """A consistent view of an index: the runs committed when it was opened.

    Args:
        index_uri: local path or `s3://bucket/prefix` (see `store.resolve`).
        filesystem: a preconfigured `pyarrow.fs.FileSystem` (e.g. S3 with a custom endpoint).

    Raises:
        ModelIndexError: the index path is missing, it holds no committed run, or a run record is
            unreadable.
    """

    def __init__(self, index_uri: str, *, filesystem: pafs.FileSystem | None = None) -> None:
        self.index_uri = index_uri
        self._fs, self._base = store.resolve(index_uri, filesystem=filesystem)
        if not store.exists(self._fs, self._base):
            raise ModelIndexError(f"index {index_uri} does not exist")
        records = [
            self._load_record(p)
            for p in store.list_files(self._fs, store.join(self._base, RUNS_DIR), suffix=".json")
        ]
        if not records:
            raise ModelIndexError(f"index {index_uri} has no committed run")
        self.runs: tuple[RunRecord, ...] = tuple(sorted(records, key=lambda r: (r.committed_at, r.run_id)))

    @staticmethod
    def exists(index_uri: str, *, filesystem: pafs.FileSystem | None = None) -> bool:
        """Whether `index_uri` holds at least one committed run (a first crawl starts from nothing)."""
        fs, base = store.resolve(index_uri, filesystem=filesystem)
        return bool(store.list_files(fs, store.join(base, RUNS_DIR), suffix=".json"))

    def read_table(self, columns: Sequence[str] | None = None) -> pa.Table:
        """The latest row per (source, model_id, spec), with only `columns` (default: all), in commit order.

        Only the requested columns and the key columns are read from the shards.

        Raises:
            ValueError: an unknown column name.
            ModelIndexError: a shard named by a run is missing, unreadable, or not what its run recorded.
        """
        columns = list(SCHEMA.names if columns is None else columns)
        unknown = [c for c in columns if c not in SCHEMA.names]
        if unknown:
            raise ValueError(f"unknown index columns: {unknown}")
        return self._read(columns)

    def known_revisions(self, source: str, spec: str) -> dict[str, tuple[str | None, str]]:
        """model_id -> (revision, status) of the latest rows for `source` and `spec`.

        What an incremental crawl needs to skip models whose revision is already indexed.
        """
        table = self._read(["model_id", "revision", "status"], source=source, spec=spec)
        return {
            m: (r, s)
            for m, r, s in zip(
                table["model_id"].to_pylist(),
                table["revision"].to_pylist(),
                table["status"].to_pylist(),
                strict=True,
            )
        }

    def load_codes(self, spec: str) -> Codes:
        """The codes of one spec, for Hamming search: latest rows with status ok/duplicate and a code.

        The (N, 4) uint64 array is a view of each decoded Arrow chunk (one copy joins several chunks).
        """
        table = self._read(["source", "model_id", "revision", "status", "code"], spec=spec)
        keep = pc.and_(
            pc.is_in(table["status"], value_set=pa.array([STATUS_OK, STATUS_DUPLICATE])),
            pc.is_valid(table["code"]),
        )
        keep = pc.fill_null(keep, False)
        if not pc.all(keep).as_py():
            table = table.filter(keep)
        words = _code_words(table["code"])
        words.flags.writeable = False  # a view may share memory with Arrow buffers
        return Codes(
            spec=spec,
            codes=words,
            source=table["source"].combine_chunks(),
            model_id=table["model_id"].combine_chunks(),
            revision=table["revision"].combine_chunks(),
        )

    def specs(self) -> list[str]:
        """The specs present in committed rows, sorted."""
        table = self._read(["spec"], dedup=False)
        return sorted(s for s in pc.unique(table["spec"]).to_pylist() if s is not None)

    # -- internals -------------------------------------------------------------------------------

    def _load_record(self, path: str) -> RunRecord:
        try:
            return RunRecord.from_json(store.read_bytes(self._fs, path))
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ModelIndexError(f"run record {path} is unreadable: {exc}") from exc

    def _read(
        self,
        columns: list[str],
        *,
        source: str | None = None,
        spec: str | None = None,
        dedup: bool = True,
    ) -> pa.Table:
        wanted = list(dict.fromkeys([*(KEY if dedup else ()), *columns]))
        if source is not None and "source" not in wanted:
            wanted.append("source")
        if spec is not None and "spec" not in wanted:
            wanted.append("spec")
        schema = pa.schema([SCHEMA.field(c) for c in wanted])
        jobs = [(run, shard) for run in self.runs for shard in run.shards]

        def read_one(job: tuple[RunRecord, ShardEntry]) -> pa.Table:
            table = self._read_shard(job[0], job[1], schema)
            # Filter per shard, before concatenating: keeps memory at what is returned.
            mask = None
            if source is not None:
                mask = pc.equal(table["source"], source)
            if spec is not None:
                by_spec = pc.equal(table["spec"], spec)
                mask = by_spec if mask is None else pc.and_(mask, by_spec)
            if mask is None or pc.all(pc.fill_null(mask, False)).as_py():
                return table  # nothing to drop: keep Parquet's buffers rather than copy them
            return table.filter(mask)

        if len(jobs) > 1:
            with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(jobs))) as pool:
                tables = list(pool.map(read_one, jobs))  # keeps commit order
        else:
            tables = [read_one(j) for j in jobs]
        table = pa.concat_tables(tables) if tables else schema.empty_table()
        if dedup:
            # A column pinned to one value by the filter cannot tell rows apart: hash fewer keys.
            pinned = {"source"} if source is not None else set()
            pinned |= {"spec"} if spec is not None else set()
            table = _latest(table, [k for k in KEY if k not in pinned])
        return table.select(columns)

    def _read_shard(self, run: RunRecord, shard: ShardEntry, schema: pa.Schema) -> pa.Table:
        path = store.join(self._base, shard.path)
        where = f"shard {shard.path} of run {run.run_id} in {self.index_uri}"
        if not store.exists(self._fs, path):
            raise ModelIndexError(f"{where} is missing")
        try:
            with self._fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f)
                if pf.metadata.num_rows != shard.rows:
                    raise ModelIndexError(
                        f"{where} holds {pf.metadata.num_rows} rows, its run recorded {shard.rows}"
                    )
                missing = [n for n in schema.names if n not in pf.schema_arrow.names]
                if missing:
                    raise ModelIndexError(f"{where} lacks columns {missing}")
                table = pf.read(columns=schema.names)
            return table.cast(schema)
        except ModelIndexError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ModelIndexError(f"{where} is unreadable: {exc}") from exc


def _latest(table: pa.Table, keys: list[str]) -> pa.Table:
    """Keep, per key, the row that comes last (tables are concatenated in commit order)."""
    if table.num_rows == 0:
        return table
    order = pa.array(np.arange(table.num_rows, dtype=np.int64))
    keyed = table.select(keys).append_column("_order", order)
    latest = keyed.group_by(keys, use_threads=False).aggregate([("_order", "max")])
    if latest.num_rows == table.num_rows:
        return table  # no key repeats: skip the copy a filter makes
    keep = np.zeros(table.num_rows, dtype=bool)
    keep[latest["_order_max"].to_numpy()] = True
    return table.filter(pa.array(keep))


def _code_words(column: pa.ChunkedArray) -> np.ndarray:
    """fixed_size_binary(32) chunks -> one (N, 4) uint64 array, a view when there is a single chunk."""
    parts = [_chunk_words(chunk) for chunk in column.chunks if len(chunk)]
    if not parts:
        return np.empty((0, WORDS), dtype=np.uint64)
    return parts[0] if len(parts) == 1 else np.concatenate(parts)


def _chunk_words(chunk: pa.FixedSizeBinaryArray) -> np.ndarray:
    # A chunk may be a slice: its data buffer starts `offset` rows earlier (ecosystem.md 4.2).
    data = chunk.buffers()[1]
    rows = chunk.offset + len(chunk)
    words = np.frombuffer(data, dtype=np.uint64, count=rows * WORDS).reshape(rows, WORDS)[chunk.offset :]
    if chunk.null_count:
        words = words[chunk.is_valid().to_numpy(zero_copy_only=False)]
    return words
