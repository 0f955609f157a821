"""The index on real Parquet files: commit protocol, latest-row-wins, column pruning, codes into numpy."""

from __future__ import annotations

import dataclasses
import json
import os
import pickle
import shutil
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.fs as pafs
import pyarrow.parquet as pq
import pytest

from pipeline.errors import ModelIndexError
from pipeline.hashing import get_spec
from pipeline.index import store
from pipeline.index.reader import IndexReader, _code_words
from pipeline.index.schema import SCHEMA, STATUS_DUPLICATE, STATUS_ERROR, STATUS_OK
from pipeline.index.writer import ShardWriter, new_run_id
from pipeline.search.matches import rank

SPEC = "nts-v1"


def _row(i: int, *, spec: str = SPEC, revision: str = "r1", status: str = STATUS_OK, **extra: Any) -> dict:
    row: dict[str, Any] = {
        "source": "local",
        "model_id": f"org/model-{i}",
        "revision": revision,
        "spec": spec,
        "status": status,
        "code": i.to_bytes(4, "little") * 8 if status != STATUS_ERROR else None,
    }
    row.update(extra)
    return row


def _full_row() -> dict:
    return {
        "source": "hf",
        "model_id": "acme/bert-tiny",
        "revision": "0123abcd",
        "files": [
            {"name": "model.safetensors", "size": 1234, "sha256": "ab" * 32, "etag": None},
            {"name": "config.json", "size": 56, "sha256": None, "etag": "e1"},
        ],
        "format": "safetensors",
        "arch": "bert",
        "license": "apache-2.0",
        "declared_base": ["google/bert-base"],
        "n_params": 4_400_000,
        "spec": SPEC,
        "code": bytes(range(32)),
        "parts": [{"name": "encoder.0", "code": b"\x01\x02"}, {"name": "head", "code": b""}],
        "bytes_read": 65536,
        "seconds": 0.25,
        "status": STATUS_OK,
        "error": None,
        "duplicate_of": None,
        "indexed_at": datetime(2025, 1, 2, 3, 4, 5, 678901, tzinfo=UTC),
    }


def _commit(index: Path, rows: list[dict], **kw: Any) -> str:
    with ShardWriter(str(index), **kw) as w:
        for r in rows:
            w.add(r)
    return w.run_id


def test_round_trip_all_columns(tmp_path: Path) -> None:
    full = _full_row()
    sparse = {"source": "local", "model_id": "m", "spec": SPEC, "status": STATUS_ERROR, "error": "boom"}
    with ShardWriter(str(tmp_path)) as w:
        w.add(full)
        w.add(sparse)
        record = w.commit({"models": 2})
    assert record.rows == 2 and record.summary == {"models": 2}

    table = IndexReader(str(tmp_path)).read_table()
    assert table.schema == SCHEMA
    got = table.to_pylist()
    assert got[0] == full
    assert got[1]["files"] == [] and got[1]["parts"] == [] and got[1]["declared_base"] == []
    assert got[1]["code"] is None and got[1]["revision"] is None and got[1]["error"] == "boom"
    assert got[1]["indexed_at"].tzinfo is not None  # defaulted to the time of `add`

    doc = json.loads((tmp_path / "runs" / f"{w.run_id}.json").read_text())
    assert doc["run_id"] == w.run_id and doc["summary"] == {"models": 2}
    assert doc["shards"] == [{"path": f"shards/run={w.run_id}/part-00000.parquet", "rows": 2}]
    assert datetime.fromisoformat(doc["committed_at"]) >= datetime.fromisoformat(doc["started_at"])


def test_shards_flush_as_rows_arrive(tmp_path: Path) -> None:
    w = ShardWriter(str(tmp_path), rows_per_shard=10)
    for i in range(25):
        w.add(_row(i))
    shard_dir = tmp_path / "shards" / f"run={w.run_id}"
    assert sorted(p.name for p in shard_dir.iterdir()) == ["part-00000.parquet", "part-00001.parquet"]
    assert w.rows_written == 20
    with pytest.raises(ModelIndexError):  # nothing committed yet
        IndexReader(str(tmp_path))
    record = w.commit()
    assert [s.rows for s in record.shards] == [10, 10, 5]
    assert IndexReader(str(tmp_path)).read_table(["model_id"]).num_rows == 25
    with pytest.raises(RuntimeError):
        w.add(_row(99))


def test_uncommitted_run_is_ignored(tmp_path: Path) -> None:
    _commit(tmp_path, [_row(0), _row(1)])
    orphan = ShardWriter(str(tmp_path), rows_per_shard=2)
    for i in range(10, 14):
        orphan.add(_row(i))  # two shards on disk, never committed
    assert len(list((tmp_path / "shards").glob("run=*/part-*.parquet"))) == 3
    ids = IndexReader(str(tmp_path)).read_table(["model_id"])["model_id"].to_pylist()
    assert ids == ["org/model-0", "org/model-1"]


def test_exception_inside_writer_commits_nothing(tmp_path: Path) -> None:
    _commit(tmp_path, [_row(0)])
    with pytest.raises(KeyError):
        with ShardWriter(str(tmp_path), rows_per_shard=1) as w:
            w.add(_row(1))
            w.add(_row(2))
            raise KeyError("crawl failed")
    assert not (tmp_path / "runs" / f"{w.run_id}.json").exists()
    assert (tmp_path / "shards" / f"run={w.run_id}" / "part-00001.parquet").exists()
    reader = IndexReader(str(tmp_path))
    assert len(reader.runs) == 1
    assert reader.read_table(["model_id"])["model_id"].to_pylist() == ["org/model-0"]


def test_latest_row_wins_across_runs(tmp_path: Path) -> None:
    _commit(tmp_path, [_row(0), _row(1), _row(2), _row(1, spec="other-v1")], run_id="b-first")
    _commit(tmp_path, [_row(1, revision="r2", status=STATUS_ERROR, error="oom"), _row(3)], run_id="a-second")
    reader = IndexReader(str(tmp_path))
    # Ordered by commit time, not by run id: "a-second" committed later and wins.
    assert [r.run_id for r in reader.runs] == ["b-first", "a-second"]
    table = reader.read_table(["model_id", "spec", "revision", "status"])
    got = sorted(zip(*(table[c].to_pylist() for c in table.column_names), strict=True))
    assert got == [
        ("org/model-0", SPEC, "r1", STATUS_OK),
        ("org/model-1", SPEC, "r2", STATUS_ERROR),
        ("org/model-1", "other-v1", "r1", STATUS_OK),  # another spec: its own row
        ("org/model-2", SPEC, "r1", STATUS_OK),
        ("org/model-3", SPEC, "r1", STATUS_OK),
    ]
    # The superseding error row means model-1 has no searchable code of SPEC any more.
    searchable = reader.load_codes(SPEC).identities()["model_id"].to_pylist()
    assert sorted(searchable) == ["org/model-0", "org/model-2", "org/model-3"]
    assert reader.specs() == [SPEC, "other-v1"]


def test_only_requested_columns_are_read(tmp_path: Path) -> None:
    _commit(tmp_path, [_full_row()])
    table = IndexReader(str(tmp_path)).read_table(["n_params", "arch"])
    assert table.column_names == ["n_params", "arch"]
    assert "files" not in table.column_names and "model_id" not in table.column_names
    assert table.to_pylist() == [{"n_params": 4_400_000, "arch": "bert"}]
    with pytest.raises(ValueError):
        IndexReader(str(tmp_path)).read_table(["no_such_column"])


def test_load_codes_across_shards_and_chunks(tmp_path: Path) -> None:
    rng = np.random.default_rng(7)
    n = 700
    codes = [rng.bytes(32) for _ in range(n)]
    rows = []
    for i, code in enumerate(codes):
        status = [STATUS_OK, STATUS_DUPLICATE, STATUS_ERROR][i % 3] if i % 10 else STATUS_OK
        rows.append(_row(i, status=status) | {"code": code if status != STATUS_ERROR else None})
    rows += [_row(i, spec="other-v1") for i in range(50)]  # must not leak into SPEC
    _commit(tmp_path, rows, rows_per_shard=64)

    loaded = IndexReader(str(tmp_path)).load_codes(SPEC)
    keep = [i for i, r in enumerate(rows[:n]) if r["status"] != STATUS_ERROR]
    assert loaded.codes.dtype == np.uint64 and loaded.codes.shape == (len(keep), 4)
    assert not loaded.codes.flags.writeable
    assert len(loaded) == len(keep)
    assert loaded.identities()["model_id"].to_pylist() == [f"org/model-{i}" for i in keep]
    for row, i in enumerate(keep):
        assert loaded.codes[row].tobytes() == codes[i]
    assert loaded.identity(0) == ("local", "org/model-0", "r1")
    assert loaded.identities([len(keep) - 1, 0], ["source"])["source"].to_pylist() == ["local"] * 2


def test_load_codes_single_shard_is_a_view_of_sliced_chunks(tmp_path: Path) -> None:
    # One shard, several row groups: filtering out error rows leaves sliced chunks with offsets.
    rows = [_row(i, status=STATUS_ERROR if i % 5 == 0 else STATUS_OK) for i in range(300)]
    _commit(tmp_path, rows)
    loaded = IndexReader(str(tmp_path)).load_codes(SPEC)
    expected = [r["code"] for r in rows if r["code"] is not None]
    assert [c.tobytes() for c in loaded.codes] == expected
    empty = IndexReader(str(tmp_path)).load_codes("absent-spec")
    assert empty.codes.shape == (0, 4) and empty.identities().num_rows == 0 and empty.nbytes == 0


def test_known_revisions(tmp_path: Path) -> None:
    _commit(tmp_path, [_row(0), _row(1), _row(2, spec="other-v1")])
    _commit(tmp_path, [_row(1, revision="r2", status=STATUS_ERROR), {**_row(5), "source": "hf"}])
    known = IndexReader(str(tmp_path)).known_revisions("local", SPEC)
    assert known == {"org/model-0": ("r1", STATUS_OK), "org/model-1": ("r2", STATUS_ERROR)}
    assert IndexReader(str(tmp_path)).known_revisions("hf", "nope") == {}


def test_missing_index_and_no_runs(tmp_path: Path) -> None:
    assert not IndexReader.exists(str(tmp_path / "nowhere")) and not IndexReader.exists(str(tmp_path))
    with pytest.raises(ModelIndexError, match="does not exist"):
        IndexReader(str(tmp_path / "nowhere"))
    with pytest.raises(ModelIndexError, match="no committed run"):
        IndexReader(str(tmp_path))
    _commit(tmp_path, [])  # an empty run still commits: "nothing new" is a result
    assert IndexReader.exists(str(tmp_path))
    assert IndexReader(str(tmp_path)).read_table().num_rows == 0
    assert IndexReader(str(tmp_path)).specs() == []


def test_missing_shard_is_named(tmp_path: Path) -> None:
    run_id = _commit(tmp_path, [_row(i) for i in range(6)], rows_per_shard=2)
    victim = tmp_path / "shards" / f"run={run_id}" / "part-00001.parquet"
    victim.unlink()
    reader = IndexReader(str(tmp_path))
    with pytest.raises(ModelIndexError, match=r"part-00001\.parquet.*missing"):
        reader.load_codes(SPEC)


def test_corrupt_shard_is_named(tmp_path: Path) -> None:
    run_id = _commit(tmp_path, [_row(i) for i in range(6)], rows_per_shard=3)
    victim = tmp_path / "shards" / f"run={run_id}" / "part-00000.parquet"
    victim.write_bytes(b"not parquet at all" * 10)
    with pytest.raises(ModelIndexError, match=r"part-00000\.parquet.*unreadable"):
        IndexReader(str(tmp_path)).read_table(["model_id"])


def test_corrupt_run_record_is_named(tmp_path: Path) -> None:
    run_id = _commit(tmp_path, [_row(0)])
    (tmp_path / "runs" / f"{run_id}.json").write_text("{truncated")
    with pytest.raises(ModelIndexError, match=run_id):
        IndexReader(str(tmp_path))


def test_bad_rows_are_refused(tmp_path: Path) -> None:
    w = ShardWriter(str(tmp_path))
    with pytest.raises(ValueError, match="32 bytes"):
        w.add(_row(0) | {"code": b"short"})
    with pytest.raises(ValueError, match="unknown"):
        w.add(_row(0) | {"colour": "red"})
    with pytest.raises(ValueError, match="model_id"):
        w.add({k: v for k, v in _row(0).items() if k != "model_id"})
    with pytest.raises(ValueError, match="status"):
        w.add(_row(0, status="fine"))
    with pytest.raises(ValueError, match="n_params"):
        w.add(_row(0, n_params="big"))
    with pytest.raises(ValueError, match="files"):
        w.add(_row(0, files=[{"name": "a", "size": "huge"}]))
    with pytest.raises(ValueError, match="model_id must be valid UTF-8"):  # at add, not a whole shard at flush
        w.add(_row(0) | {"model_id": "bad\udcff"})
    w.abort()
    assert not (tmp_path / "runs").exists()


def test_run_id_is_sortable_and_committed_once(tmp_path: Path) -> None:
    early = new_run_id(datetime(2024, 12, 31, 23, 59, 59, tzinfo=UTC))
    late = new_run_id(datetime(2025, 1, 1, tzinfo=UTC))
    assert early < late and "/" not in early
    _commit(tmp_path, [_row(0)], run_id="fixed")
    with pytest.raises(ModelIndexError, match="already committed"):
        ShardWriter(str(tmp_path), run_id="fixed")
    with pytest.raises(ValueError):
        ShardWriter(str(tmp_path), run_id="../escape")


def test_write_atomic_leaves_no_temp_files(tmp_path: Path) -> None:
    fs, base = store.resolve(str(tmp_path / "a" / ".." / "idx"))
    target = store.join(base, "runs", "x.json")
    store.write_atomic(fs, target, b"one")
    store.write_atomic(fs, target, pa.py_buffer(b"two"))
    assert store.read_bytes(fs, target) == b"two"
    assert os.listdir(tmp_path / "idx" / "runs") == ["x.json"]
    (tmp_path / "idx" / "runs" / ".y.json.tmp-dead").write_bytes(b"")  # a crashed writer's leftover
    assert store.list_files(fs, store.join(base, "runs"), suffix=".json") == [target]
    assert store.list_files(fs, store.join(base, "nope")) == []
    assert store.exists(fs, target) and not store.exists(fs, store.join(base, "nope"))


def test_code_words_handle_offsets_and_nulls() -> None:
    rng = np.random.default_rng(3)
    raw = [rng.bytes(32) for _ in range(40)]
    raw[5] = None
    arr = pa.array(raw, type=pa.binary(32))
    # Slices share the parent's data buffer and start at an offset into it (ecosystem.md 4.2).
    chunked = pa.chunked_array([arr.slice(3, 10), arr.slice(0, 0), arr.slice(17, 23)])
    words = _code_words(chunked)
    expected = [c for c in raw[3:13] + raw[17:40] if c is not None]
    assert words.shape == (len(expected), 4)
    assert [w.tobytes() for w in words] == expected
    sliced = arr.slice(20, 5)
    one = _code_words(pa.chunked_array([sliced]))
    # A single chunk comes back as a view of Arrow's buffer, not a copy.
    assert one.__array_interface__["data"][0] == sliced.buffers()[1].address + 20 * 32
    assert [w.tobytes() for w in one] == raw[20:25]


def test_non_local_filesystem_round_trip(tmp_path: Path) -> None:
    # A filesystem handed in by the caller (as an S3 with custom endpoint would be), taking the
    # generic write path: temporary name, then move.
    fs = pafs.SubTreeFileSystem(str(tmp_path), pafs.LocalFileSystem())
    with ShardWriter("mem://idx", filesystem=fs, rows_per_shard=2) as w:
        for i in range(5):
            w.add(_row(i))
    assert (tmp_path / "idx" / "runs" / f"{w.run_id}.json").exists()
    assert not list(tmp_path.rglob(".*tmp-*"))
    loaded = IndexReader("idx", filesystem=fs).load_codes(SPEC)
    assert [c.tobytes() for c in loaded.codes] == [_row(i)["code"] for i in range(5)]


def test_latest_row_wins_even_when_every_key_hash_collides(tmp_path: Path, monkeypatch) -> None:
    # The 64-bit key hashes only pick the rows that go to Arrow's exact group-by: with every hash equal,
    # the answer must not change.
    from pipeline.index import reader as reader_module

    _commit(tmp_path, [_row(0), _row(1), _row(2)], run_id="first")
    _commit(tmp_path, [_row(1, revision="r2"), _row(3), {**_row(0), "source": "hf"}], run_id="second")
    honest = IndexReader(str(tmp_path)).load_codes(SPEC)
    monkeypatch.setattr(reader_module, "_key_hashes", lambda s, m: np.zeros(len(m), dtype=np.uint64))
    colliding = IndexReader(str(tmp_path)).load_codes(SPEC)
    for loaded in (honest, colliding):
        ids = loaded.identities()
        got = sorted(zip(*(ids[c].to_pylist() for c in ("source", "model_id", "revision")), strict=True))
        assert got == [
            ("hf", "org/model-0", "r1"),
            ("local", "org/model-0", "r1"),
            ("local", "org/model-1", "r2"),
            ("local", "org/model-2", "r1"),
            ("local", "org/model-3", "r1"),
        ]
    assert np.array_equal(honest.codes, colliding.codes)


def test_plan_and_read_codes_shard_by_shard(tmp_path: Path) -> None:
    rows = [_row(i, status=STATUS_ERROR if i % 4 == 0 else STATUS_OK) for i in range(20)]
    rows[5]["parts"] = [{"name": "backbone", "code": bytes([5]) * 32}, {"name": "head", "code": bytes([6]) * 32}]
    _commit(tmp_path, rows, rows_per_shard=6)
    reader = IndexReader(str(tmp_path))
    plan = reader.plan_codes(SPEC)
    loaded = reader.load_codes(SPEC, parts=True)
    assert len(plan) == len(loaded) == 15 and plan.identities().equals(loaded.identities())
    assert [s.offset for s in plan.shards] == [0, 4, 9, 13]
    pieces = [reader.read_codes(s) for s in plan.shards]
    assert np.array_equal(np.concatenate([c for c, _ in pieces]), loaded.codes)
    assert np.concatenate([r for _, r in pieces]).tolist() == list(range(15))
    parts = [reader.read_parts(s) for s in plan.shards]
    assert sum(len(p) for p in parts) == len(loaded.parts) == 2
    row = loaded.identities()["model_id"].to_pylist().index("org/model-5")
    assert loaded.parts.row.tolist() == [row, row] and loaded.parts.name.to_pylist() == ["backbone", "head"]
    assert loaded.parts.codes[1].tobytes() == bytes([6]) * 32
    assert pickle.loads(pickle.dumps(reader)).plan_codes(SPEC).identities().equals(plan.identities())
    assert pickle.loads(pickle.dumps(loaded)).identity(row) == ("local", "org/model-5", "r1")


def test_rows_without_a_code_or_with_bad_part_codes(tmp_path: Path) -> None:
    _commit(tmp_path, [_row(0), _row(1, code=None), _row(2)])  # status ok, yet no code: not searchable
    loaded = IndexReader(str(tmp_path)).load_codes(SPEC, parts=True)
    assert loaded.identities()["model_id"].to_pylist() == ["org/model-0", "org/model-2"]
    assert loaded.codes.shape == (2, 4) and loaded.identity(1) == ("local", "org/model-2", "r1")
    bad = tmp_path / "bad"
    _commit(bad, [_row(0, parts=[{"name": "block", "code": b"short"}])])
    with pytest.raises(ModelIndexError, match="part codes of"):
        IndexReader(str(bad)).load_codes(SPEC, parts=True)
    assert len(IndexReader(str(bad)).load_codes(SPEC)) == 1  # whole-model codes alone still load


# -- lean loading: codes held, identities read on demand ---------------------------------------------


def _regroup(index: Path, row_group_size: int) -> None:
    """Rewrite every shard with small row groups (a crawl's shards hold one): same rows, same run records."""
    for path in index.glob("shards/*/part-*.parquet"):
        table = pq.read_table(path)
        pq.write_table(table, path, row_group_size=row_group_size, compression="zstd")


def _reindexed(index: Path) -> dict[str, tuple[str, str, bytes]]:
    """Three runs over 60 models: re-indexed models, an error hiding an older code, another spec, a null code.

    Returns model_id -> (source, revision, code) of what must be searchable.
    """
    first = [_row(i) for i in range(40)] + [_row(i, spec="other-v1") for i in range(10)]
    _commit(index, first, run_id="a", rows_per_shard=7)
    second = [_row(i, revision="r2", code=bytes([i]) * 32) for i in range(0, 40, 3)]  # a new revision, a new code
    second += [_row(1, revision="r2", status=STATUS_ERROR), _row(2, revision="r2", code=None)]
    second += [_row(i) for i in range(40, 60)]
    _commit(index, second, run_id="b", rows_per_shard=5)
    third = [_row(3, revision="r3", code=bytes([99]) * 32), {**_row(4), "source": "hf"}]
    _commit(index, third, run_id="c")
    truth: dict[tuple[str, str], tuple[str, bytes]] = {}
    for row in first[:40] + second + third:
        key = (row["source"], row["model_id"])
        if row["status"] == STATUS_ERROR or row["code"] is None:
            truth.pop(key, None)
        else:
            truth[key] = (row["revision"], row["code"])
    return {f"{s}:{m}": (s, r, c) for (s, m), (r, c) in truth.items()}


@pytest.mark.parametrize("row_group_size", [None, 3])
def test_loaded_codes_hold_no_identities_and_read_them_back(tmp_path: Path, row_group_size: int | None) -> None:
    truth = _reindexed(tmp_path)
    if row_group_size:
        _regroup(tmp_path, row_group_size)
    loaded = IndexReader(str(tmp_path)).load_codes(SPEC)
    n = len(loaded)
    assert n == len(truth) == 59  # 60 models + hf's model-4, less model-1 (error) and model-2 (no code)
    # Nothing per row beside the codes but the locator: no Arrow column, no string, at most 4 bytes a row.
    held = [getattr(loaded, f.name) for f in dataclasses.fields(loaded)]
    held += [getattr(loaded.plan, f.name) for f in dataclasses.fields(loaded.plan) if f.name != "reader"]
    assert not any(isinstance(v, pa.Array | pa.ChunkedArray | pa.Table | list) for v in held)
    keeps = [s.keep for s in loaded.plan.shards if s.keep is not None]
    assert keeps and all(k.dtype == np.int32 for k in keeps)  # superseded rows: some shards keep a subset
    assert any(s.keep is None and s.rows > 0 for s in loaded.plan.shards)  # whole shards: nothing per row
    assert loaded.nbytes == n * 32 + sum(k.nbytes for k in keeps) <= n * 36
    # Lazily, in any order, repeats included, across shards and runs: the latest row's identity and code.
    rows = np.random.default_rng(0).permutation(np.concatenate([np.arange(n), [5, 5, n - 1]]))
    ids = loaded.identities(rows, ["source", "model_id", "revision", "indexed_at"])
    assert ids.column_names == ["source", "model_id", "revision", "indexed_at"] and ids.num_rows == len(rows)
    for row, who in zip(rows.tolist(), ids.to_pylist(), strict=True):
        source, revision, code = truth[f"{who['source']}:{who['model_id']}"]
        assert (who["source"], who["revision"]) == (source, revision)
        assert loaded.codes[row].tobytes() == code
    assert len({(w["source"], w["model_id"]) for w in ids.to_pylist()}) == n  # every model once
    reindexed = loaded.identities()["model_id"].to_pylist().index("org/model-3")
    assert loaded.identity(reindexed) == ("local", "org/model-3", "r3")
    assert loaded.codes[reindexed].tobytes() == bytes([99]) * 32
    assert loaded.identities([]).num_rows == 0
    with pytest.raises(IndexError):
        loaded.identities([n])
    with pytest.raises(ValueError, match="unknown"):
        loaded.identities([0], ["colour"])


def test_a_shard_gone_after_loading_is_a_clear_error(tmp_path: Path) -> None:
    run_id = _commit(tmp_path, [_row(i) for i in range(9)], rows_per_shard=3)
    loaded = IndexReader(str(tmp_path)).load_codes(SPEC)
    shard = tmp_path / "shards" / f"run={run_id}" / "part-00001.parquet"  # rows 3..5
    shard.rename(tmp_path / "aside.parquet")
    # Rows of the other shards still resolve: proof that nothing was held, and that only touched shards are read.
    assert loaded.identities([0, 8])["model_id"].to_pylist() == ["org/model-0", "org/model-8"]
    with pytest.raises(ModelIndexError, match=r"part-00001\.parquet.*missing"):
        loaded.identities([0, 4])
    with pytest.raises(ModelIndexError, match="missing"):
        rank(loaded, loaded.codes[4].tobytes(), get_spec("nts"), k=3)
    shard.write_bytes(b"PAR1 not parquet PAR1")
    with pytest.raises(ModelIndexError, match=r"part-00001\.parquet.*unreadable"):
        loaded.identity(4)
    # Rewritten with as many rows of another spec: refused rather than misattributed.
    _commit(tmp_path / "other", [_row(i, spec="other-v1") for i in range(3)])
    shutil.copy(next((tmp_path / "other").glob("shards/*/part-*.parquet")), shard)
    with pytest.raises(ModelIndexError, match="no longer holds"):
        loaded.identity(4)
