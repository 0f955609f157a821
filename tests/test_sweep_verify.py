"""The sweep's stage 2 on real trained models: candidates from the Hamming scan verified by behaviour,
locally and in Ray tasks, with bad models given a reason instead of stopping the sweep."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pyarrow.parquet as pq
import pytest
import torch

from bench.zoo import fine_tune, load_digits_split, save_checkpoint, state_dict_of, torch_threads, train_mlp
from jobs.crawl import crawl
from jobs.stage2 import load_references
from jobs.sweep import sweep
from pipeline.errors import SourceError
from pipeline.hashing import get_spec
from pipeline.index.reader import IndexReader
from pipeline.index.uris import crawled_root, model_uri
from pipeline.search.report import REPORT_SCHEMA

STAGE2 = [
    "stage2_method", "stage2_verdict", "stage2_score", "stage2_calibrated_score", "stage2_reason", "stage2_methods",
]
# Every pair a candidate: the homolog (another seed) lies beyond `related`, and stage 2 must see it.
WIDE = {"max_distance": 256, "verify_max_distance": 256}


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory, ray_local) -> dict[str, Path]:
    """A protected MLP and an index (crawled from a relative path) of it, its copies, a homolog and bad models."""
    root = tmp_path_factory.mktemp("stage2")
    with torch_threads(1):  # tiny batches: more threads only contend on a shared machine
        data = load_digits_split()
        original = train_mlp(data, seed=0)
        tuned = fine_tune(original, data, seed=1000)
        homolog = train_mlp(data, seed=5)
        reference = train_mlp(data, seed=6)  # the owner's own homologs: references, not in the index
        reference2 = train_mlp(data, seed=7)
        reference3 = train_mlp(data, seed=8)
    weights = state_dict_of(original)
    save_checkpoint(root / "refs" / "h6", state_dict_of(reference), "mlp")
    save_checkpoint(root / "refs" / "h7", state_dict_of(reference2), "mlp")
    save_checkpoint(root / "refs" / "h8", state_dict_of(reference3), "mlp")
    src = root / "src"
    save_checkpoint(src / "orig", weights, "mlp")  # the protected model, indexed too: never verified against itself
    save_checkpoint(src / "finetuned", state_dict_of(tuned), "mlp")
    save_checkpoint(src / "homolog", state_dict_of(homolog), "mlp")
    save_checkpoint(src / "wrongarch", weights, "cnn")  # the same weights, a config that cannot run them
    torch.manual_seed(7)
    newhead = {**weights, "fc3.weight": torch.randn(5, 128) * 0.1, "fc3.bias": torch.zeros(5)}
    save_checkpoint(src / "newhead", newhead, "mlp")  # 5 labels, not 10: agreement cannot compare it
    cwd = os.getcwd()
    os.chdir(root)
    try:  # a relative source: the run must record its absolute root
        crawl("src", "index", progress=False)
    finally:
        os.chdir(cwd)
    return {"root": root, "protected": src / "orig", "src": src, "index": root / "index",
            "reference": root / "refs" / "h6", "reference2": root / "refs" / "h7",
            "reference3": root / "refs" / "h8"}


def _by_match(report: Path) -> dict[str, list[dict]]:
    out: dict[str, list[dict]] = {}
    for row in pq.read_table(report).to_pylist():
        out.setdefault(row["match_model_id"], []).append(row)
    return out


def _one(rows: list[dict], column: str):
    values = {json.dumps(r[column], sort_keys=True) for r in rows}
    assert len(values) == 1, (column, values)  # every row of a model pair carries the pair's answer
    return rows[0][column]


def test_rows_become_uris(zoo, tmp_path) -> None:
    reader = IndexReader(str(zoo["index"]))
    assert crawled_root(reader.runs[0].summary) == str(zoo["src"].resolve())
    codes = reader.load_codes(get_spec(None).name)
    ids = codes.identities()["model_id"].to_pylist()
    assert dict(zip(ids, codes.uris(), strict=True)) == {m: str(zoo["src"].resolve() / m) for m in ids}
    assert codes.uris([1]) == [str(zoo["src"].resolve() / ids[1])]
    assert model_uri("hf", "org/name", "abc123") == "hf://org/name@abc123"
    assert model_uri("s3", "bucket/models/m") == "s3://bucket/models/m"
    assert model_uri("local", "m", root=None) is None
    single = tmp_path / "model.safetensors"
    single.write_bytes(b"")
    assert model_uri("local", "model.safetensors", root=str(single)) == str(single)  # a crawled file
    assert model_uri("local", tmp_path.name, root=str(tmp_path)) == str(tmp_path)  # a crawled model folder
    assert crawled_root({"source": "/models"}) == "/models" and crawled_root({"source": "models"}) is None
    assert crawled_root({"source": "hf://"}) is None


def test_stage2_verdicts(zoo, tmp_path) -> None:
    out = tmp_path / "report.parquet"
    summary = sweep(str(zoo["protected"]), str(zoo["index"]), str(out), progress=False, **WIDE)
    assert pq.read_schema(out).names == REPORT_SCHEMA.names
    pairs = _by_match(out)
    assert _one(pairs["finetuned"], "stage2_verdict") == "pirated"
    assert _one(pairs["finetuned"], "stage2_method") == "agreement" and _one(pairs["finetuned"], "stage2_score") > 0.9
    assert _one(pairs["homolog"], "stage2_verdict") in ("homolog", "unrelated")
    assert _one(pairs["finetuned"], "stage2_calibrated_score") is None  # no references given
    # A model that cannot run: a clear reason, and its stage-1 verdict kept.
    assert _one(pairs["wrongarch"], "stage2_verdict") == "error"
    assert "conv1.weight" in _one(pairs["wrongarch"], "stage2_reason")
    assert {r["verdict"] for r in pairs["wrongarch"] if r["part"] is None and r["match_part"] is None} == {"copy"}
    assert _one(pairs["newhead"], "stage2_verdict") == "error"
    assert "label spaces differ" in _one(pairs["newhead"], "stage2_reason")
    assert all(r["stage2_verdict"] is None and r["same_model"] for r in pairs["orig"])  # never itself
    assert summary.stage2_pairs == 4 and summary.stage2_skipped == 0
    assert summary.stage2_by_verdict["pirated"] == 1 and summary.stage2_by_verdict["error"] == 2
    assert [p["match_model_id"] for p in summary.stage2_pirated] == ["finetuned"]
    doc = json.loads((tmp_path / "report.summary.json").read_text())
    assert doc["stage2_by_verdict"] == summary.stage2_by_verdict and doc["verify_method"] == "agreement"
    md = (tmp_path / "report.summary.md").read_text()
    assert "Pirated by behaviour" in md and "finetuned" in md and "stage 2 error: orig ~ wrongarch" in md


def test_stage2_on_ray_with_every_method(zoo, tmp_path) -> None:
    out = tmp_path / "ray.parquet"
    summary = sweep(
        str(zoo["protected"]), str(zoo["index"]), str(out), progress=False, ray_address="auto",
        verify_method="all", **WIDE,
    )
    pairs = _by_match(out)
    assert _one(pairs["finetuned"], "stage2_verdict") == "pirated"
    assert [m["method"] for m in _one(pairs["finetuned"], "stage2_methods")] == ["agreement", "distance", "ddv"]
    assert _one(pairs["homolog"], "stage2_method") == "agreement"
    assert _one(pairs["homolog"], "stage2_verdict") != "pirated"
    # The new head: agreement and distance cannot compare 5 labels with 10; ddv can, and leads.
    methods = _one(pairs["newhead"], "stage2_methods")
    assert [m["verdict"] for m in methods][:2] == ["error", "error"] and methods[2]["verdict"] != "error"
    assert _one(pairs["newhead"], "stage2_method") == "ddv"
    assert _one(pairs["wrongarch"], "stage2_verdict") == "error"
    assert summary.ray and summary.stage2_pairs == 4 and "verify" in summary.seconds


def test_no_verify_and_the_pair_cap(zoo, tmp_path) -> None:
    off = tmp_path / "off.parquet"
    summary = sweep(str(zoo["protected"]), str(zoo["index"]), str(off), progress=False, verify=False, **WIDE)
    table = pq.read_table(off)
    assert table.num_rows > 0 and all(table[c].null_count == table.num_rows for c in STAGE2)
    assert summary.verify_method is None and summary.stage2_pairs == 0
    capped = tmp_path / "capped.parquet"
    summary = sweep(str(zoo["protected"]), str(zoo["index"]), str(capped), progress=False, verify_max_pairs=1, **WIDE)
    assert (summary.stage2_pairs, summary.stage2_skipped) == (1, 3)
    pairs = _by_match(capped)
    nearest = {m: min(r["distance"] for r in pairs[m]) for m in ("finetuned", "homolog", "wrongarch", "newhead")}
    verified = [m for m in nearest if _one(pairs[m], "stage2_verdict") is not None]
    assert len(verified) == 1 and nearest[verified[0]] == min(nearest.values())  # the nearest pair first
    rest = [m for m in nearest if m != verified[0]]
    assert all("--verify-max-pairs" in _one(pairs[m], "stage2_reason") for m in rest)


def test_protected_as_index_and_as_list_file(zoo, tmp_path) -> None:
    out = tmp_path / "from-index.parquet"
    summary = sweep(str(zoo["index"]), str(zoo["index"]), str(out), progress=False)  # the index's rows load too
    rows = [r for r in pq.read_table(out).to_pylist() if r["part"] is None and r["match_part"] is None]
    answer = {(r["query_model_id"], r["match_model_id"]): (r["stage2_verdict"], r["stage2_reason"]) for r in rows}
    assert answer[("orig", "finetuned")][0] == "pirated" and answer[("finetuned", "orig")][0] == "pirated"
    verdict, reason = answer[("wrongarch", "orig")]  # a protected model that cannot run: every pair says so
    assert verdict == "error" and reason.startswith("protected model") and "conv1.weight" in reason
    assert summary.stage2_pairs > 0 and summary.stage2_by_verdict["pirated"] >= 2
    listing = tmp_path / "protected.txt"
    listing.write_text("src/orig\n")
    cwd = os.getcwd()
    os.chdir(zoo["root"])
    try:  # a relative path in the list: verified from wherever the models are loaded
        listed = sweep(str(listing), "index", str(tmp_path / "listed.parquet"), progress=False)
    finally:
        os.chdir(cwd)
    assert [p["match_model_id"] for p in listed.stage2_pirated] == ["finetuned"]


def test_stage2_with_homolog_references(zoo, tmp_path) -> None:
    listing = tmp_path / "references.json"
    listing.write_text(json.dumps({"orig": [str(zoo["reference"]), "refs/missing"]}))
    cwd = os.getcwd()
    os.chdir(zoo["root"])
    try:  # relative reference paths are made absolute where the file is read
        references = load_references(str(listing))
    finally:
        os.chdir(cwd)
    missing = str(zoo["root"] / "refs" / "missing")
    assert references == {"orig": [str(zoo["reference"]), missing]}
    out = tmp_path / "refs.parquet"
    summary = sweep(str(zoo["protected"]), str(zoo["index"]), str(out), progress=False, verify_method="all",
                    verify_references=references, **WIDE)  # one usable reference: DeepCore's core points
    pairs = _by_match(out)
    assert _one(pairs["finetuned"], "stage2_verdict") == "pirated"
    assert _one(pairs["homolog"], "stage2_verdict") != "pirated"
    # Judged against the reference: the copy closes most of the gap to the source, the homolog does not.
    assert _one(pairs["finetuned"], "stage2_calibrated_score") > _one(pairs["homolog"], "stage2_calibrated_score")
    (calibrated,) = summary.stage2_references
    assert calibrated["protected"] == str(zoo["protected"].resolve()) and calibrated["given"] == 2
    assert calibrated["thresholds"] == "per source"
    assert set(calibrated["references"]) == {str(zoo["reference"])}
    assert set(calibrated["references"][str(zoo["reference"])]) == {"agreement", "distance", "ddv"}
    assert "no such file" in calibrated["skipped"][missing]
    md = (tmp_path / "refs.summary.md").read_text()
    assert "stage 2 references of" in md and "1 of 2 scored, per source thresholds; skipped" in md
    # By default three references or more shape a conferrable probe (with two surrogates distilled from it).
    conferrable = tmp_path / "conferrable.parquet"
    references = {"orig": [*references["orig"], str(zoo["reference2"]), str(zoo["reference3"])]}
    summary = sweep(str(zoo["protected"]), str(zoo["index"]), str(conferrable), progress=False, verify_method="all",
                    verify_references=references, verify_probe_cache=str(tmp_path / "probes"), **WIDE)
    pairs = _by_match(conferrable)
    assert _one(pairs["finetuned"], "stage2_verdict") == "pirated"
    assert _one(pairs["homolog"], "stage2_verdict") != "pirated"
    assert _one(pairs["finetuned"], "stage2_score") > _one(pairs["homolog"], "stage2_score")
    (calibrated,) = summary.stage2_references
    assert calibrated["shaped_by"]["references"] == [str(zoo[r]) for r in ("reference", "reference2", "reference3")]
    assert len(calibrated["shaped_by"]["surrogates"]) == 4 and "no such file" in calibrated["skipped"][missing]
    assert calibrated["thresholds"] == "conferrable + per source"  # ddv is still calibrated on the reference
    assert "shaped a conferrable probe with 4 surrogates" in (tmp_path / "conferrable.summary.md").read_text()
    assert "cached" not in calibrated["shaped_by"]
    # The next sweep reads the protected model's probe from the cache: the same verdicts, no search.
    again = sweep(str(zoo["protected"]), str(zoo["index"]), str(tmp_path / "again.parquet"), progress=False,
                  verify_method="all", verify_references=references, verify_probe_cache=str(tmp_path / "probes"),
                  **WIDE)
    assert again.stage2_references[0]["shaped_by"]["cached"] == str(tmp_path / "probes")
    assert "4 surrogates (read from the probe cache)" in (tmp_path / "again.summary.md").read_text()
    again_pairs = _by_match(tmp_path / "again.parquet")
    for name in ("finetuned", "homolog"):
        assert _one(again_pairs[name], "stage2_score") == _one(pairs[name], "stage2_score")
    bad = tmp_path / "bad.json"
    bad.write_text(json.dumps({"orig": "not a list"}))
    with pytest.raises(SourceError, match="list of URIs"):
        load_references(str(bad))
