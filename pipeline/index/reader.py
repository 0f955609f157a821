"""Reading the index: only committed runs, latest row per (source, model_id, spec), codes into numpy.

Shards not named by a run record (a crashed or running crawl) are never opened.

Loading codes for search holds the codes and nothing per row beside them: N x 32 bytes, plus, per shard,
which of its rows were kept (nothing when it is every row, else 4 bytes a row). It reads in two passes
over the shards: first source, model_id, spec and status (dictionary-encoded where they repeat), to
decide which rows are the latest searchable ones; then the code column, each shard's kept rows copied
straight into one preallocated (N, 4) uint64 array. The identities of the first pass are dropped once
the rows are chosen, so peak memory is N x 32 bytes plus those two columns plus one shard. A model's
identity (or any other column) is read back on demand, for the rows a query or sweep reports only: one
read per shard touched, of the row groups that hold those rows (`CodePlan.identities`).
The plan of the first pass (`CodePlan`) also lets Ray workers read their own shards' codes.
"""

from __future__ import annotations

import dataclasses
import functools
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from types import ModuleType
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.fs as pafs
import pyarrow.parquet as pq

from pipeline.errors import ModelIndexError
from pipeline.index import store
from pipeline.index.schema import CODE_BYTES, SCHEMA, STATUS_DUPLICATE, STATUS_OK
from pipeline.index.uris import crawled_root, model_uri
from pipeline.index.writer import RUNS_DIR, RunRecord, ShardEntry

KEY = ("source", "model_id", "spec")  # one row per model and spec; the latest wins
WORDS = CODE_BYTES // 8
SEARCHABLE = (STATUS_OK, STATUS_DUPLICATE)  # statuses whose rows carry a code to search
_READ_THREADS = 8  # shards are read concurrently: object-store latency, not CPU, dominates there
IDENTITY = ("source", "model_id", "revision")  # what `identities` reads unless asked for other columns
_ID_COLUMNS = ("source", "model_id", "spec", "status")  # what choosing the searchable rows needs
_DICTIONARY_COLUMNS = ("source", "spec", "status")  # few distinct values: kept as dictionaries on read


@dataclass(frozen=True, slots=True)
class PartCodes:
    """Per-block codes (the index's `parts`): part j is block `name[j]` of row `row[j]` of its `Codes`."""

    codes: np.ndarray  # (P, 4) uint64
    row: np.ndarray  # (P,) int64
    name: pa.Array  # (P,) string

    def __len__(self) -> int:
        return int(self.codes.shape[0])


@dataclass(frozen=True, slots=True)
class ShardRows:
    """The rows of one shard that hold searchable codes: local row numbers `keep` (ascending) become
    rows `offset, offset + 1, ...` of the spec's codes. `keep` is None when every row of the shard is kept
    (the common case: nothing is held per row), else int32; build with `ShardRows.of`."""

    run_id: str
    path: str  # relative to the index root, as in the run record
    rows: int  # rows the run recorded for this shard
    keep: np.ndarray | None
    offset: int

    @classmethod
    def of(cls, run_id: str, path: str, rows: int, keep: np.ndarray, offset: int) -> ShardRows:
        """The compact form of ascending, distinct local rows `keep`."""
        if len(keep) == rows:
            return cls(run_id, path, rows, None, offset)
        return cls(run_id, path, rows, np.asarray(keep, dtype=np.int32 if rows < 2**31 else np.int64), offset)

    def __len__(self) -> int:
        return self.rows if self.keep is None else int(self.keep.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held per kept row (the `keep` array)."""
        return 0 if self.keep is None else int(self.keep.nbytes)

    def local_rows(self, positions: np.ndarray | None = None) -> np.ndarray:
        """The shard's own row numbers (int64) of kept rows `positions` (0-based; default: all of them)."""
        if self.keep is None:
            return np.arange(self.rows, dtype=np.int64) if positions is None else np.asarray(positions, np.int64)
        return (self.keep if positions is None else self.keep[positions]).astype(np.int64)


@dataclass(frozen=True, slots=True)
class CodePlan:
    """Where the searchable codes of one spec are, before reading any code, and whose they are.

    Row i of the spec's codes is kept row `i - shard.offset` of the shard whose range holds i; `shards`
    are in commit order. No identity is held: `identities(rows)` reads the rows' columns back from their
    shards through the same filesystem. Picklable, so that each Ray task reads only its shards.
    """

    spec: str
    shards: tuple[ShardRows, ...]
    reader: IndexReader = dataclasses.field(repr=False, compare=False)

    def __len__(self) -> int:
        return self.shards[-1].offset + len(self.shards[-1]) if self.shards else 0

    @property
    def nbytes(self) -> int:
        """Bytes held per row to locate it (0 when every row of every shard is kept)."""
        return sum(s.nbytes for s in self.shards)

    def identities(self, rows: Sequence[int] | np.ndarray | None = None, columns: Sequence[str] = IDENTITY) -> pa.Table:
        """`columns` of `rows` (default: all rows, in order), one table row per requested row, in that order.

        One read per shard touched, of only the row groups holding those rows; shards in parallel.

        Raises:
            IndexError: a row outside 0..len - 1.
            ValueError: an unknown column.
            ModelIndexError: a shard went missing or unreadable since the plan was made, or no longer
                holds the planned rows.
        """
        return self.reader.read_rows(self, rows, columns)

    def identity(self, i: int) -> tuple[str, str, str | None]:
        """(source, model_id, revision) of row `i`. Reads a shard: for many rows, use `identities`."""
        row = self.identities([i]).to_pylist()[0]
        return row["source"], row["model_id"], row["revision"]

    def run_ids(self, rows: Sequence[int] | np.ndarray) -> list[str]:
        """The run that wrote each of `rows` (no read: the plan knows each row's shard).

        Raises:
            IndexError: a row outside 0..len - 1.
        """
        wanted = np.asarray(rows, dtype=np.int64).reshape(-1)
        if wanted.size and (wanted.min() < 0 or wanted.max() >= len(self)):
            raise IndexError(f"rows out of range: the plan of {self.spec} has {len(self)} rows")
        offsets = np.array([s.offset for s in self.shards], dtype=np.int64)
        # An empty shard shares its offset with the next one; the last shard starting at or before a row holds it.
        shard_of = np.searchsorted(offsets, wanted, side="right") - 1
        return [self.shards[i].run_id for i in shard_of.tolist()]

    def uris(self, rows: Sequence[int] | np.ndarray | None = None) -> list[str | None]:
        """The URI that loads each of `rows` (default: all rows), for stage 2 (`pipeline.index.uris`).

        `hf://org/name@revision` and `s3://bucket/prefix` from the identity; a local row's path is its
        run's crawled root joined with its model_id. None where no URI can be told (a local row whose run
        recorded no root). Reads the rows' identities (see `identities`).
        """
        wanted = np.arange(len(self), dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64)
        ids = self.identities(wanted)
        roots = {run.run_id: crawled_root(run.summary) for run in self.reader.runs}
        return [
            model_uri(source, model_id, revision, root=roots.get(run))
            for source, model_id, revision, run in zip(
                ids["source"].to_pylist(), ids["model_id"].to_pylist(), ids["revision"].to_pylist(),
                self.run_ids(wanted), strict=True,
            )
        ]


@dataclass(frozen=True, slots=True)
class Codes:
    """The searchable codes of one spec: row i of `codes` is row i of `plan`.

    `codes` is (N, 4) uint64, C-contiguous and read-only; beside it only `plan` (which shard rows they
    are: a few bytes per shard, 4 per row at most), so loading holds N x 32 bytes plus a small overhead.
    Identities are read on demand, for the rows asked: `identities(rows)` (batched per shard) or
    `identity(i)`. `parts` holds the per-block codes when they were asked for.
    """

    spec: str
    codes: np.ndarray
    plan: CodePlan
    parts: PartCodes | None = None

    def __len__(self) -> int:
        return int(self.codes.shape[0])

    @property
    def nbytes(self) -> int:
        """Bytes held: the codes, the row locators, and the per-block codes if loaded."""
        parts = 0
        if self.parts is not None:
            parts = self.parts.codes.nbytes + self.parts.row.nbytes + self.parts.name.nbytes
        return int(self.codes.nbytes) + self.plan.nbytes + parts

    def identities(self, rows: Sequence[int] | np.ndarray | None = None, columns: Sequence[str] = IDENTITY) -> pa.Table:
        """`columns` (default source, model_id, revision) of `rows`, read from the index now; see `CodePlan`."""
        return self.plan.identities(rows, columns)

    def identity(self, i: int) -> tuple[str, str, str | None]:
        """(source, model_id, revision) of row `i`. Reads a shard: for many rows, use `identities`."""
        return self.plan.identity(i)

    def uris(self, rows: Sequence[int] | np.ndarray | None = None) -> list[str | None]:
        """The URI that loads each of `rows` (default: all rows); see `CodePlan.uris`."""
        return self.plan.uris(rows)


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
            raise ModelIndexError(
                f"index {index_uri} does not exist (`modelhash crawl SOURCE --index {index_uri}` makes it)")
        records = [
            self._load_record(p)
            for p in store.list_files(self._fs, store.join(self._base, RUNS_DIR), suffix=".json")
        ]
        if not records:
            raise ModelIndexError(f"{index_uri} is not an index: it holds no committed run "
                                  f"(`modelhash crawl SOURCE --index {index_uri}` makes one)")
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

    def load_codes(self, spec: str, *, parts: bool = False) -> Codes:
        """The codes of one spec, for Hamming search: latest rows with status ok/duplicate and a code.

        Reads only the source, model_id, spec, status and code columns (and `parts` when asked), shards in
        parallel; the codes land in one (N, 4) uint64 array without an intermediate copy of all of them.
        No identity is held (see `Codes`).

        Raises:
            ModelIndexError: a shard is missing, unreadable, not what its run recorded, or holds a
                part code that is not CODE_BYTES long.
        """
        plan = self.plan_codes(spec)
        codes = np.empty((len(plan), WORDS), dtype=np.uint64)
        results = self._map(lambda shard: self._fill_codes(shard, codes, parts=parts), plan.shards)
        invalid = [bad for bad, _ in results if bad is not None]
        part_codes = _join_parts([p for _, p in results]) if parts else None
        if invalid:
            # Rows whose latest status is ok but that hold no code: nothing to search, like error rows.
            valid = np.ones(len(plan), dtype=bool)
            valid[np.concatenate(invalid)] = False
            codes = codes[valid]
            plan = _keep_rows(plan, valid)
            if part_codes is not None:
                new_row = np.cumsum(valid) - 1
                held = valid[part_codes.row]
                part_codes = PartCodes(
                    codes=part_codes.codes[held], row=new_row[part_codes.row[held]], name=part_codes.name.filter(held)
                )
        codes.flags.writeable = False
        # The first pass's columns are freed by now; hand their pages back rather than let Arrow's allocator
        # keep them (~130 MiB of a 10M-row load would otherwise stay in the process's RSS).
        pa.default_memory_pool().release_unused()
        return Codes(spec=spec, codes=codes, plan=plan, parts=part_codes)

    def plan_codes(self, spec: str) -> CodePlan:
        """Which shard rows hold the searchable codes of `spec`; reads no code and keeps no identity.

        The latest row per (source, model_id) decides: an error row hides an older ok row.

        Raises:
            ModelIndexError: a shard is missing, unreadable, or not what its run recorded.
        """
        jobs = [(run, shard) for run in self.runs for shard in run.shards]
        scanned = self._map(lambda job: self._scan_ids(job[0], job[1], spec), jobs)
        if not scanned:
            return CodePlan(spec=spec, shards=(), reader=self)
        ids = pa.concat_tables([table for _, table, _, _ in scanned])
        latest = _last_of_key(ids["source"], ids["model_id"], np.concatenate([h for _, _, h, _ in scanned]))
        del ids  # the identities were needed only to choose the rows
        chosen = latest & np.concatenate([ok for _, _, _, ok in scanned])
        shards, offset, start = [], 0, 0
        for (run, entry), (rows, _, _, _) in zip(jobs, scanned, strict=True):
            keep = rows[chosen[start : start + len(rows)]]
            shards.append(ShardRows.of(run.run_id, entry.path, entry.rows, keep, offset))
            offset += len(keep)
            start += len(rows)
        return CodePlan(spec=spec, shards=tuple(shards), reader=self)

    def read_codes(self, shard: ShardRows) -> tuple[np.ndarray, np.ndarray]:
        """The codes of one planned shard: ((n, 4) uint64, their row numbers in the spec's codes).

        Planned rows without a code are left out (their numbers too).
        """
        codes = np.empty((len(shard), WORDS), dtype=np.uint64)
        invalid, _ = self._fill_codes(dataclasses.replace(shard, offset=0), codes)
        rows = np.arange(shard.offset, shard.offset + len(shard), dtype=np.int64)
        if invalid is not None:
            valid = np.ones(len(shard), dtype=bool)
            valid[invalid] = False
            codes, rows = codes[valid], rows[valid]
        return codes, rows

    def read_parts(self, shard: ShardRows) -> PartCodes:
        """The per-block codes of one planned shard; `row` counts in the spec's codes, like `read_codes`."""
        table = self._read_shard_columns(shard.run_id, shard.path, shard.rows, ["parts"])
        return _parts_of(table["parts"], shard)

    def read_rows(
        self, plan: CodePlan, rows: Sequence[int] | np.ndarray | None = None, columns: Sequence[str] = IDENTITY
    ) -> pa.Table:
        """`columns` of rows of a plan (default: all rows), in the order asked; what `CodePlan.identities` does.

        The rows are grouped by shard; each shard touched is opened once and only its row groups holding
        those rows are read, shards in parallel.

        Raises:
            IndexError: a row outside 0..len(plan) - 1.
            ValueError: an unknown column.
            ModelIndexError: a shard is missing or unreadable now, or its rows are no longer of the plan's spec.
        """
        columns = list(columns)
        unknown = [c for c in columns if c not in SCHEMA.names]
        if unknown:
            raise ValueError(f"unknown index columns: {unknown}")
        n = len(plan)
        wanted = np.arange(n, dtype=np.int64) if rows is None else np.asarray(rows, dtype=np.int64).reshape(-1)
        schema = pa.schema([SCHEMA.field(c) for c in columns])
        if wanted.size == 0:
            return schema.empty_table()
        if wanted.min() < 0 or wanted.max() >= n:
            raise IndexError(f"rows out of range: the plan of {plan.spec} has {n} rows")
        offsets = np.array([s.offset for s in plan.shards], dtype=np.int64)
        # An empty shard shares its offset with the next one; the last shard starting at or before a row holds it.
        shard_of = np.searchsorted(offsets, wanted, side="right") - 1
        order = np.argsort(shard_of, kind="stable")
        groups = np.split(order, np.flatnonzero(np.diff(shard_of[order])) + 1)
        read = list(dict.fromkeys([*columns, "spec"]))

        def read_group(group: np.ndarray) -> pa.Table:
            shard = plan.shards[int(shard_of[group[0]])]
            local, back = np.unique(shard.local_rows(wanted[group] - shard.offset), return_inverse=True)
            table = self._read_shard_columns(shard.run_id, shard.path, shard.rows, read, take=local)
            if not _is_in(table["spec"], [plan.spec]).all():
                raise ModelIndexError(
                    f"shard {shard.path} of run {shard.run_id} in {self.index_uri} no longer holds the rows "
                    f"of spec {plan.spec} it held when the codes were loaded"
                )
            return table.select(columns).take(pa.array(back))

        table = pa.concat_tables(self._map(read_group, groups))
        if np.all(np.diff(order) > 0):
            return table  # asked in shard order already
        back = np.empty_like(order)
        back[order] = np.arange(len(order))
        return table.take(pa.array(back))

    def _fill_codes(
        self, shard: ShardRows, out: np.ndarray, *, parts: bool = False
    ) -> tuple[np.ndarray | None, PartCodes | None]:
        """Copy the shard's kept codes into out[offset:]; return the offsets of rows with no code."""
        columns = ["code", "parts"] if parts else ["code"]
        table = self._read_shard_columns(shard.run_id, shard.path, shard.rows, columns)
        dest = out[shard.offset : shard.offset + len(shard)]
        keep = shard.keep
        invalid: list[np.ndarray] = []
        start, pos = 0, 0
        for chunk in table["code"].chunks:
            stop = start + len(chunk)
            if keep is None:  # every row: a straight copy
                sel = None
                count = len(chunk)
            else:
                lo, hi = np.searchsorted(keep, [start, stop])
                sel = keep[lo:hi] - start
                count = len(sel)
            if count:
                words = _chunk_words(chunk, keep_nulls=True)
                if sel is None:
                    dest[pos : pos + count] = words
                else:
                    np.take(words, sel, axis=0, out=dest[pos : pos + count])
                if chunk.null_count:
                    valid = chunk.is_valid().to_numpy(zero_copy_only=False)
                    bad = np.flatnonzero(~(valid if sel is None else valid[sel]))
                    if len(bad):
                        invalid.append(shard.offset + pos + bad)
            pos += count
            start = stop
        part_codes = _parts_of(table["parts"], shard) if parts else None
        return (np.concatenate(invalid) if invalid else None), part_codes

    def _scan_ids(
        self, run: RunRecord, entry: ShardEntry, spec: str
    ) -> tuple[np.ndarray, pa.Table, np.ndarray, np.ndarray]:
        """(local rows of `spec`, their source and model_id, their key hashes, whether each is searchable).

        The key hashes are computed here, in the reading thread, shards in parallel.
        """
        table = self._read_shard_columns(run.run_id, entry.path, entry.rows, _ID_COLUMNS, dictionary=True)
        rows = np.flatnonzero(_is_in(table["spec"], [spec]))
        table = table.select(["source", "model_id", "status"])
        if len(rows) < table.num_rows:  # a shard of one spec keeps Parquet's buffers, uncopied
            table = table.take(pa.array(rows))
        ok = _is_in(table["status"], SEARCHABLE)
        return rows, table.select(["source", "model_id"]), _key_hashes(table["source"], table["model_id"]), ok

    def _read_shard_columns(
        self,
        run_id: str,
        path: str,
        rows: int,
        columns: Sequence[str],
        *,
        dictionary: bool = False,
        take: np.ndarray | None = None,
    ) -> pa.Table:
        run = next((r for r in self.runs if r.run_id == run_id), None)
        if run is None:
            raise ModelIndexError(f"run {run_id} is not committed in {self.index_uri}")
        fields = [
            pa.field(c, pa.dictionary(pa.int32(), SCHEMA.field(c).type))
            if dictionary and c in _DICTIONARY_COLUMNS
            else SCHEMA.field(c)
            for c in columns
        ]
        read_dictionary = [c for c in columns if c in _DICTIONARY_COLUMNS] if dictionary else ()
        return self._read_shard(
            run, ShardEntry(path, rows), pa.schema(fields), read_dictionary=read_dictionary, take=take
        )

    @staticmethod
    def _map(fn: Callable[[Any], Any], items: Sequence[Any]) -> list[Any]:
        if len(items) <= 1:
            return [fn(i) for i in items]
        with ThreadPoolExecutor(max_workers=min(_READ_THREADS, len(items))) as pool:
            return list(pool.map(fn, items))  # keeps commit order

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

    def _read_shard(
        self,
        run: RunRecord,
        shard: ShardEntry,
        schema: pa.Schema,
        *,
        read_dictionary: Sequence[str] = (),
        take: np.ndarray | None = None,
    ) -> pa.Table:
        """The shard's `schema` columns (only rows `take`, ascending and distinct, when given)."""
        path = store.join(self._base, shard.path)
        where = f"shard {shard.path} of run {run.run_id} in {self.index_uri}"
        if not store.exists(self._fs, path):
            raise ModelIndexError(f"{where} is missing")
        try:
            # Local shards are memory-mapped: decoding reads the page cache, no buffered copy of the file.
            local = isinstance(self._fs, pafs.LocalFileSystem)
            with pa.memory_map(path) if local else self._fs.open_input_file(path) as f:
                pf = pq.ParquetFile(f, read_dictionary=list(read_dictionary) or None)
                if pf.metadata.num_rows != shard.rows:
                    raise ModelIndexError(
                        f"{where} holds {pf.metadata.num_rows} rows, its run recorded {shard.rows}"
                    )
                missing = [n for n in schema.names if n not in pf.schema_arrow.names]
                if missing:
                    raise ModelIndexError(f"{where} lacks columns {missing}")
                table = pf.read(columns=schema.names) if take is None else _read_rows(pf, take, schema.names)
            return table.cast(schema)
        except ModelIndexError:
            raise
        except (pa.ArrowException, OSError, ValueError) as exc:
            raise ModelIndexError(f"{where} is unreadable: {exc}") from exc


def _read_rows(pf: pq.ParquetFile, rows: np.ndarray, columns: Sequence[str]) -> pa.Table:
    """Rows `rows` (ascending, distinct) of a Parquet file; only the row groups holding them are read."""
    meta = pf.metadata
    sizes = np.array([meta.row_group(g).num_rows for g in range(meta.num_row_groups)], dtype=np.int64)
    ends = np.cumsum(sizes)
    group = np.searchsorted(ends, rows, side="right")
    needed = np.unique(group)
    table = pf.read_row_groups(needed.tolist(), columns=list(columns))
    # Where each needed group starts in `table`, then each row's place in it.
    starts = np.concatenate([[0], np.cumsum(sizes[needed])[:-1]])
    position = rows - (ends[group] - sizes[group]) + starts[np.searchsorted(needed, group)]
    return table.take(pa.array(position))


def _keep_rows(plan: CodePlan, valid: np.ndarray) -> CodePlan:
    """The plan without the rows where `valid` (one flag per planned row) is False; offsets recounted."""
    shards, offset = [], 0
    for shard in plan.shards:
        keep = shard.local_rows()[valid[shard.offset : shard.offset + len(shard)]]
        shards.append(ShardRows.of(shard.run_id, shard.path, shard.rows, keep, offset))
        offset += len(keep)
    return dataclasses.replace(plan, shards=tuple(shards))


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


def _chunk_words(chunk: pa.FixedSizeBinaryArray, *, keep_nulls: bool = False) -> np.ndarray:
    """A view of a fixed_size_binary(32) chunk as (n, 4) uint64; null rows dropped (a copy) unless kept."""
    # A chunk may be a slice: its data buffer starts `offset` rows earlier (ecosystem.md 4.2).
    data = chunk.buffers()[1]
    rows = chunk.offset + len(chunk)
    if data is None:  # all null
        words = np.zeros((len(chunk), WORDS), dtype=np.uint64)
    else:
        words = np.frombuffer(data, dtype=np.uint64, count=rows * WORDS).reshape(rows, WORDS)[chunk.offset :]
    if chunk.null_count and not keep_nulls:
        words = words[chunk.is_valid().to_numpy(zero_copy_only=False)]
    return words


def _is_in(column: pa.ChunkedArray, values: Sequence[str]) -> np.ndarray:
    """Boolean mask of rows equal to one of `values`, comparing dictionary indices where it can."""
    masks = []
    for chunk in column.chunks:
        if pa.types.is_dictionary(chunk.type):
            hits = [i for i, v in enumerate(chunk.dictionary.to_pylist()) if v in values]
            indices = chunk.indices.to_numpy(zero_copy_only=False)
            mask = np.isin(indices, hits) if hits else np.zeros(len(chunk), dtype=bool)
            if chunk.null_count:
                mask &= chunk.is_valid().to_numpy(zero_copy_only=False)
        else:
            mask = pc.fill_null(pc.is_in(chunk, value_set=pa.array(values, chunk.type)), False).to_numpy(
                zero_copy_only=False
            )
        masks.append(mask)
    return np.concatenate(masks) if masks else np.zeros(0, dtype=bool)


def _last_of_key(source: pa.ChunkedArray, model_id: pa.ChunkedArray, hashes: np.ndarray) -> np.ndarray:
    """Whether each row is the last of its (source, model_id) key: what `_latest` keeps, at 10M rows.

    A 64-bit hash per row finds the rows whose hash repeats; only those (re-crawled models, and any
    true hash collision) go through Arrow's exact group-by, so a collision can never merge two models.
    """
    n = len(model_id)
    last = np.ones(n, dtype=bool)
    if n < 2:
        return last
    ordered = np.sort(hashes)
    repeats = np.unique(ordered[1:][ordered[1:] == ordered[:-1]])
    if not len(repeats):
        return last  # every key once: the common case, decided without comparing a string
    rows = np.flatnonzero(np.isin(hashes, repeats))
    subset = pa.table(
        {
            "source": source.take(pa.array(rows)),
            "model_id": model_id.take(pa.array(rows)),
            "_row": pa.array(rows),
        }
    )
    if pa.types.is_dictionary(subset["source"].type):
        subset = subset.set_column(0, "source", subset["source"].cast(pa.string()))
    winners = subset.group_by(["source", "model_id"], use_threads=False).aggregate([("_row", "max")])
    last[rows] = False
    last[winners["_row_max"].to_numpy()] = True
    return last


def _key_hashes(source: pa.ChunkedArray, model_id: pa.ChunkedArray) -> np.ndarray:
    """FNV-1a of each row's model_id, seeded by a hash of its source (uint64)."""
    fnv = _fnv()
    source = source.combine_chunks()
    if not pa.types.is_dictionary(source.type):
        source = source.dictionary_encode()
    by_value = np.array([fnv.seed(v) for v in source.dictionary.to_pylist()] or [0], dtype=np.uint64)
    indices = source.indices.fill_null(-1).to_numpy(zero_copy_only=False)
    seeds = np.where(indices >= 0, by_value[np.maximum(indices, 0)], np.uint64(fnv.seed(None)))
    out = np.empty(len(model_id), dtype=np.uint64)
    start = 0
    for chunk in model_id.chunks:
        if pa.types.is_large_string(chunk.type):
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int64)
        else:
            offsets = np.frombuffer(chunk.buffers()[1], dtype=np.int32)
        offsets = offsets[chunk.offset : chunk.offset + len(chunk) + 1]
        data = chunk.buffers()[2]
        data = np.frombuffer(data, dtype=np.uint8) if data is not None else np.zeros(0, dtype=np.uint8)
        fnv.fnv1a(offsets, data, seeds[start : start + len(chunk)], out[start : start + len(chunk)])
        start += len(chunk)
    return out


@functools.cache
def _fnv() -> ModuleType:
    # numba (a dependency for the Hamming kernels) is imported only when an index is loaded for search.
    from pipeline.index import _fnv

    return _fnv


def _parts_of(column: pa.ChunkedArray, shard: ShardRows) -> PartCodes:
    """The kept rows' per-block codes; `row` counts from the shard's offset."""
    lists = (column if shard.keep is None else column.take(pa.array(shard.keep))).combine_chunks()
    if len(lists) == 0:
        return _no_parts()
    parent = pc.list_parent_indices(lists).to_numpy(zero_copy_only=False).astype(np.int64)
    flat = lists.flatten()
    names, raw = flat.field("name"), flat.field("code")
    if raw.null_count:
        raise ModelIndexError(f"shard {shard.path}: a part code is null")
    try:
        fixed = raw.cast(pa.binary(CODE_BYTES))
    except pa.ArrowInvalid as exc:
        lengths = sorted(set(pc.binary_length(raw).to_pylist()) - {CODE_BYTES})
        raise ModelIndexError(
            f"shard {shard.path}: part codes of {lengths} bytes, the index holds {CODE_BYTES}-byte codes"
        ) from exc
    return PartCodes(codes=np.array(_chunk_words(fixed)), row=parent + shard.offset, name=names)


def _no_parts() -> PartCodes:
    codes = np.empty((0, WORDS), dtype=np.uint64)
    return PartCodes(codes=codes, row=np.empty(0, dtype=np.int64), name=pa.array([], pa.string()))


def _join_parts(parts: Sequence[PartCodes | None]) -> PartCodes:
    held = [p for p in parts if p is not None and len(p)]
    if not held:
        return _no_parts()
    codes = np.concatenate([p.codes for p in held])
    codes.flags.writeable = False
    return PartCodes(
        codes=codes,
        row=np.concatenate([p.row for p in held]),
        name=pa.concat_arrays([p.name for p in held]),
    )
