"""The crawl and query jobs on a real local Ray over real checkpoints and a real Parquet index."""

from __future__ import annotations

import shutil

from checkpoints import BAD, COPIES, UNRELATED, mlp_state, save_model

from jobs.crawl import crawl
from jobs.query import query
from pipeline.index.reader import IndexReader


def test_crawl_indexes_every_model_and_records_errors(library, ray_local, tmp_path):
    index = str(tmp_path / "index")
    summary = crawl(str(library["root"]), index, progress=False)
    n_models = 1 + len(COPIES) + len(UNRELATED) + len(BAD)
    assert (summary.seen, summary.skipped, summary.hashed, summary.failed) == (n_models, 0, n_models - 4, 4)

    table = IndexReader(index).read_table().to_pylist()
    by_id = {row["model_id"]: row for row in table}
    assert len(by_id) == n_models
    assert by_id["orig"]["status"] == "ok" and len(by_id["orig"]["code"]) == 32
    assert by_id["orig"]["files"][0]["name"] == "model.safetensors"
    assert by_id["orig"]["bytes_read"] > 0 and by_id["orig"]["n_params"] > 30_000
    errors = {k: by_id[f"bad/{k}"]["error"] for k in BAD}
    assert all(by_id[f"bad/{k}"]["status"] == "error" and by_id[f"bad/{k}"]["code"] is None for k in BAD)
    assert "NaN" in errors["nan"]
    assert "no checkpoint" in errors["nocheckpoint"]
    assert all("\n" not in e for e in errors.values())


def test_second_crawl_of_an_unchanged_source_hashes_nothing(library, ray_local, tmp_path):
    index = str(tmp_path / "index")
    first = crawl(str(library["root"]), index, progress=False)
    second = crawl(str(library["root"]), index, progress=False)
    assert (second.seen, second.skipped, second.hashed, second.failed) == (first.seen, first.seen, 0, 0)
    again = crawl(str(library["root"]), index, progress=False, retry_errors=True)
    assert (again.hashed, again.failed) == (0, len(BAD))


def test_changed_model_is_rehashed_and_its_latest_row_wins(tmp_path, ray_local):
    source = tmp_path / "src"
    save_model(source / "a", mlp_state(0))
    save_model(source / "b", mlp_state(1))
    index = str(tmp_path / "index")
    crawl(str(source), index, progress=False)
    old = {r["model_id"]: r["code"] for r in IndexReader(index).read_table().to_pylist()}
    shutil.rmtree(source / "b")
    save_model(source / "b", mlp_state(2))
    summary = crawl(str(source), index, progress=False)
    assert (summary.skipped, summary.hashed) == (1, 1)
    rows = IndexReader(index).read_table().to_pylist()
    assert len(rows) == 2
    new = {r["model_id"]: r["code"] for r in rows}
    assert new["a"] == old["a"] and new["b"] != old["b"]


def test_query_ranks_copies_above_unrelated_models(library, ray_local, tmp_path):
    index = str(tmp_path / "index")
    crawl(str(library["root"]), index, progress=False)
    result = query(str(library["orig"]), index, k=20)
    ranked = [m.model_id for m in result.matches]
    assert result.matches[0].distance == 0
    assert "orig" in {m.model_id for m in result.matches if m.distance == 0}
    copies = {f"copies/{c}" for c in COPIES}
    assert set(ranked[: 1 + len(copies)]) == copies | {"orig"}
    assert {m.verdict for m in result.matches if m.model_id in copies} == {"copy"}
    assert {m.verdict for m in result.matches if m.model_id in UNRELATED} == {"unrelated"}
    assert all(m.model_id.split("/")[0] != "bad" for m in result.matches)  # error rows have no code
    near = {m.model_id for m in query(str(library["orig"]), index, k=20, max_distance=0).matches}
    assert {"orig", "copies/renamed", "copies/bin"} <= near <= {"orig", *copies}  # lossless copies at 0


def test_query_hashed_on_ray_equals_the_local_query(library, ray_local, tmp_path):
    index = str(tmp_path / "index")
    crawl(str(library["root"]), index, progress=False)
    local = query(str(library["fp16"]), index, k=5)
    remote = query(str(library["fp16"]), index, k=5, ray_address="auto")
    assert remote.query["code"] == local.query["code"] and remote.matches == local.matches


def test_demo_zoo_ranks_every_copy_above_every_unrelated_model(demo_zoo, ray_local, tmp_path):
    """What `make run` shows, checked: for each original, its copies come before everything else."""
    index = str(tmp_path / "index")
    summary = crawl(str(demo_zoo["root"]), index, progress=False)
    assert summary.failed == 0
    copied = {m["original"] for m in demo_zoo["models"]} - {None}
    assert copied == {"mlp-s0", "cnn-s0"}
    for original in copied:
        copies = {m["name"] for m in demo_zoo["models"] if m["original"] == original}
        assert len(copies) >= 5
        matches = query(str(demo_zoo["root"] / original), index, k=100).matches
        ranked = [m.model_id for m in matches]
        assert set(ranked[: len(copies) + 1]) == copies | {original}, ranked
        lossless = {f"{original}-{kind}" for kind in ("bin", "renamed")}
        assert all(m.distance == 0 for m in matches if m.model_id in lossless)
        assert all(m.verdict == "copy" for m in matches if m.model_id in copies)
