"""Sweeps: merged per-target hits against one search, and the sweep job on real models, locally and on Ray."""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pyarrow.parquet as pq
import pytest
import torch
from checkpoints import mlp_state, save_model

from jobs.sweep import sweep as run_sweep
from pipeline.errors import ModelIndexError, SourceError, SpecMismatchError
from pipeline.hashing import get_spec
from pipeline.hashing.model import hash_model
from pipeline.index.reader import IndexReader
from pipeline.index.rows import ok_row
from pipeline.index.writer import ShardWriter
from pipeline.search import hamming
from pipeline.search.sweep import PARTS, WHOLE, Target, merge, search
from pipeline.sources import list_models

# The sweep's machinery is spec-agnostic; these tests pin `nts`, whose block codes are named by top-level
# module (`backbone`, `head`), so that the expected pairs are exact.
SPEC = "nts"


def sweep(*args, **kwargs):
    kwargs.setdefault("spec", SPEC)
    return run_sweep(*args, **kwargs)


def _backbone_model(backbone_seed: int, head_seed: int) -> dict[str, torch.Tensor]:
    """Two top-level blocks, each large enough for its own code: `backbone` and `head`."""
    torch.manual_seed(backbone_seed)
    layers = {"backbone.0": torch.nn.Linear(64, 256), "backbone.1": torch.nn.Linear(256, 128)}
    torch.manual_seed(head_seed)
    layers["head"] = torch.nn.Linear(128, 100)
    return {f"{name}.{k}": v.detach().clone() for name, m in layers.items() for k, v in m.state_dict().items()}


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Protected models, a source holding copies of one of them, and its index (written without Ray)."""
    root = tmp_path_factory.mktemp("sweep")
    save_model(root / "protected" / "orig", _backbone_model(0, 0))
    save_model(root / "protected" / "mlp", mlp_state(5))
    src = root / "src"
    save_model(src / "copy", _backbone_model(0, 0))
    save_model(src / "fp16", {k: v.half() for k, v in _backbone_model(0, 0).items()})
    save_model(src / "newhead", _backbone_model(0, 7))  # the backbone reused under a new head
    save_model(src / "unrelated", _backbone_model(3, 3))
    save_model(src / "other", mlp_state(1))
    save_model(src / "orig", _backbone_model(0, 0))  # the protected model itself, indexed too
    spec = get_spec(SPEC)
    index = root / "index"
    with ShardWriter(str(index), rows_per_shard=2) as writer:  # several shards, for the Ray split
        for ref in list_models(str(src)):
            writer.add(ok_row(hash_model(ref, spec)))
    return {"root": root, "protected": root / "protected", "src": src, "index": index}


def test_merged_targets_equal_one_search() -> None:
    rng = np.random.default_rng(5)
    n = 3000
    codes = rng.integers(0, 2**64, size=(n, 4), dtype=np.uint64) & np.uint64(0x0101010101010101)  # many ties
    part_rows = np.repeat(np.arange(n, dtype=np.int64), 2)
    part_codes = np.repeat(codes, 2, axis=0) ^ np.uint64(1)
    names = ["a", "b"] * n
    queries = np.concatenate([codes[[0, 7, 2999]], rng.integers(0, 2**64, size=(3, 4), dtype=np.uint64)])
    whole = search(Target.of(codes, part_codes=part_codes, part_rows=part_rows, part_name=names), queries, 9, 40)
    pieces = []
    for lo, hi in ((0, 1000), (1000, 1001), (1001, 3000)):
        sel = (part_rows >= lo) & (part_rows < hi)
        target = Target.of(
            codes[lo:hi],
            np.arange(lo, hi),
            part_codes=part_codes[sel],
            part_rows=part_rows[sel],
            part_name=[x for x, s in zip(names, sel, strict=True) if s],
        )
        pieces.append(search(target, queries, 9, 40))
    for kind in (WHOLE, PARTS):
        merged = merge([p[kind] for p in pieces], 9)
        assert np.array_equal(merged.distance, whole[kind].distance)
        assert np.array_equal(merged.key, whole[kind].key)
        assert merged.name.tolist() == whole[kind].name.tolist()
    ref_idx, ref_dist = hamming.top_k_many(codes, queries, 9, 40)
    assert np.array_equal(whole[WHOLE].key, ref_idx) and np.array_equal(whole[WHOLE].distance, ref_dist)
    assert set(whole[PARTS].name[whole[PARTS].key >= 0].tolist()) == {"a", "b"}


def _pairs(report: Path) -> set[tuple]:
    rows = pq.read_table(report).to_pylist()
    return {(r["query_model_id"], r["part"], r["match_model_id"], r["match_part"], r["distance"]) for r in rows}


def test_sweep_finds_copies_and_a_reused_backbone(world, tmp_path) -> None:
    out = tmp_path / "report.parquet"
    summary = sweep(str(world["protected"]), str(world["index"]), str(out), progress=False)
    table = pq.read_table(out)
    assert table.column_names[:4] == ["query_source", "query_model_id", "query_revision", "part"]
    rows = table.to_pylist()
    by_match = {}
    for r in rows:
        by_match.setdefault(r["match_model_id"], []).append(r)
    assert "unrelated" not in by_match and "other" not in by_match  # beyond `related`
    assert {r["verdict"] for r in by_match["copy"]} == {"copy"}
    reused = [r for r in by_match["newhead"] if r["part"] == "backbone" and r["match_part"] == "backbone"]
    assert reused and reused[0]["distance"] == 0 and reused[0]["verdict"] == "copy"
    assert all(r["same_model"] == (r["match_model_id"] == "orig") for r in rows)
    assert all(r["similarity"] == pytest.approx(1 - r["distance"] / 256) for r in rows)
    spec = get_spec(SPEC)
    assert all(r["verdict"] == spec.thresholds.verdict(r["distance"]) for r in rows)
    assert summary.protected_models == 2 and summary.failed == []
    assert summary.flagged_models == 3  # orig ~ copy, fp16, newhead; never orig ~ orig
    listed = [(t["query_model_id"], t["match_model_id"]) for t in summary.top]
    assert len(set(listed)) == len(listed) == 3  # the summary lists each flagged model pair once, nearest first
    assert [t["distance"] for t in summary.top] == sorted(t["distance"] for t in summary.top)
    assert summary.same_model > 0 and summary.pairs == len(rows)
    doc = json.loads((tmp_path / "report.summary.json").read_text())
    assert doc["by_verdict"] == summary.by_verdict and doc["index_codes"] == 6
    assert "newhead" in (tmp_path / "report.summary.md").read_text()


def test_sweep_on_ray_equals_the_local_sweep(world, ray_local, tmp_path) -> None:
    local = sweep(str(world["protected"]), str(world["index"]), str(tmp_path / "l.parquet"), k=3, progress=False)
    remote = sweep(
        str(world["protected"]), str(world["index"]), str(tmp_path / "r.parquet"), k=3, ray_address="auto",
        progress=False,
    )
    assert pq.read_table(tmp_path / "r.parquet").equals(pq.read_table(tmp_path / "l.parquet"))
    assert (remote.pairs, remote.by_verdict, remote.index_parts) == (local.pairs, local.by_verdict, local.index_parts)


def test_protected_as_list_file_and_as_index(world, tmp_path) -> None:
    listing = tmp_path / "protected.txt"
    listing.write_text(f"# the crown jewels\n{world['protected'] / 'orig'}\n\n{tmp_path / 'gone'}\n")
    from_list = sweep(str(listing), str(world["index"]), str(tmp_path / "a.parquet"), progress=False)
    assert from_list.protected_models == 1 and len(from_list.failed) == 1  # a missing model is reported
    assert "gone" in from_list.failed[0]["model"]
    from_index = sweep(str(world["index"]), str(world["index"]), str(tmp_path / "b.parquet"), k=2, progress=False)
    assert from_index.protected_models == 6
    pairs = _pairs(tmp_path / "b.parquet")
    assert ("copy", None, "copy", None, 0) in pairs and ("newhead", "backbone", "copy", "backbone", 0) in pairs


def test_k_beyond_the_index_and_a_tight_radius(world, tmp_path) -> None:
    out = tmp_path / "r.parquet"
    wide = sweep(str(world["protected"]), str(world["index"]), str(out), k=1000, max_distance=256, progress=False)
    assert (wide.protected_models, wide.index_codes) == (2, 6) and wide.query_codes > 2 and wide.index_parts > 6
    assert wide.pairs == wide.query_codes * (wide.index_codes + wide.index_parts)  # every code against every code
    tight = sweep(str(world["protected"]), str(world["index"]), str(out), max_distance=0, progress=False)
    assert {r["distance"] for r in pq.read_table(out).to_pylist()} == {0}
    assert tight.pairs < wide.pairs


def test_bad_inputs_are_clear_errors(world, tmp_path) -> None:
    out = str(tmp_path / "r.parquet")
    with pytest.raises(SourceError, match="no such"):
        sweep(str(tmp_path / "nothing"), str(world["index"]), out, progress=False)
    with pytest.raises(ModelIndexError, match="does not exist"):
        sweep(str(world["protected"]), str(tmp_path / "noindex"), out, progress=False)
    with pytest.raises(SpecMismatchError, match="unknown spec"):
        sweep(str(world["protected"]), str(world["index"]), out, spec="nts-v0", progress=False)
    (tmp_path / "empty").mkdir()
    nothing = sweep(str(tmp_path / "empty"), str(world["index"]), out, progress=False)  # the right empty answer
    assert (nothing.protected_models, nothing.pairs) == (0, 0) and pq.read_table(out).num_rows == 0
    other = tmp_path / "other-spec"
    with ShardWriter(str(other)) as writer:  # codes of another spec only: nothing comparable
        writer.add({"source": "local", "model_id": "m", "spec": "other-v1", "status": "ok", "code": bytes(32)})
    with pytest.raises(ModelIndexError, match="no codes of spec"):
        sweep(str(world["protected"]), str(other), out, progress=False)
    with pytest.raises(ModelIndexError, match="no code of spec"):
        sweep(str(other), str(world["index"]), out, progress=False)
    broken = tmp_path / "broken"
    shutil.copytree(world["index"], broken)
    victim = sorted(broken.glob("shards/*/part-*.parquet"))[1]
    victim.unlink()
    with pytest.raises(ModelIndexError, match="missing"):
        sweep(str(world["protected"]), str(broken), out, progress=False)
    victim.write_bytes(b"PAR1 garbage")
    with pytest.raises(ModelIndexError, match="unreadable"):
        sweep(str(world["protected"]), str(broken), out, progress=False)


def test_a_missing_shard_fails_a_ray_sweep_with_the_same_error(world, ray_local, tmp_path) -> None:
    broken = tmp_path / "broken"
    shutil.copytree(world["index"], broken)
    sorted(broken.glob("shards/*/part-*.parquet"))[-1].unlink()
    with pytest.raises(ModelIndexError, match="missing"):
        sweep(str(world["protected"]), str(broken), str(tmp_path / "r.parquet"), ray_address="auto", progress=False)


def test_load_codes_with_parts(world) -> None:
    codes = IndexReader(str(world["index"])).load_codes(get_spec(SPEC).name, parts=True)
    assert len(codes) == 6 and codes.parts is not None
    assert {"backbone", "head"} <= set(codes.parts.name.to_pylist())
    ids, names = codes.identities()["model_id"].to_pylist(), codes.parts.name.to_pylist()
    rows = codes.parts.row.tolist()
    assert rows == sorted(rows) and len(rows) == len(names) == len(codes.parts.codes)
    backbone = {ids[r]: c.tobytes() for r, n, c in zip(rows, names, codes.parts.codes, strict=True) if n == "backbone"}
    assert backbone["newhead"] == backbone["copy"] == backbone["orig"]


def test_cli_sweep(world, tmp_path) -> None:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    out = tmp_path / "cli.parquet"
    cmd = [sys.executable, "-m", "pipeline.cli", "sweep", str(world["protected"]), "--index", str(world["index"])]
    cmd += ["--spec", SPEC]
    proc = subprocess.run([*cmd, "--out", str(out), "--json", "--no-progress"], capture_output=True, text=True, env=env)
    assert proc.returncode == 0, proc.stderr
    assert json.loads(proc.stdout)["flagged_models"] == 3 and out.exists()
    bad = subprocess.run(
        [*cmd[:4], str(tmp_path / "nothing"), *cmd[5:], "--out", str(out)], capture_output=True, text=True, env=env
    )
    assert bad.returncode == 2 and bad.stderr.count("\n") == 1 and "no such" in bad.stderr


def test_a_local_model_is_itself_by_its_folder_not_its_relative_id(world, tmp_path) -> None:
    index = tmp_path / "index"
    writer = ShardWriter(str(index))
    for ref in list_models(str(world["src"])):
        writer.add(ok_row(hash_model(ref, get_spec(SPEC))))
    writer.commit({"root": str(world["src"])})  # as a crawl records it: local rows can be found again
    # src/orig copies protected/orig in another folder under the same relative id: a copy, not itself.
    summary = sweep(str(world["protected"]), str(index), str(tmp_path / "a.parquet"), progress=False)
    rows = pq.read_table(tmp_path / "a.parquet").to_pylist()
    assert not any(r["same_model"] for r in rows) and summary.same_model == 0
    assert any(r["query_model_id"] == "orig" and r["match_model_id"] == "orig" and r["distance"] == 0 for r in rows)
    # The indexed model itself, given by its bare checkpoint file (model_id `model.safetensors`), is itself.
    sweep(str(world["src"] / "orig" / "model.safetensors"), str(index), str(tmp_path / "b.parquet"), progress=False)
    rows = pq.read_table(tmp_path / "b.parquet").to_pylist()
    assert {r["match_model_id"] for r in rows if r["same_model"]} == {"orig"}
    assert {r["match_model_id"] for r in rows if not r["same_model"] and r["verdict"] == "copy"} >= {"copy", "fp16"}
