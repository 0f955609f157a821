"""The crawl of a hub (the local hub server, through the real huggingface_hub client) on a real local Ray:
duplicates without reading weights, error rows for gated and empty repos, a second crawl that reads no
weights, faults that lose nothing, and a per-model timeout."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from hub_fixtures import build_hub

from infra.hub_server import Faults, HubServer
from jobs.crawl import crawl
from pipeline.index.reader import IndexReader


@pytest.fixture()
def hub(tmp_path: Path, monkeypatch: pytest.MonkeyPatch):
    root = tmp_path / "hub"
    build_hub(root)
    shutil.copytree(root / "acme" / "m0", root / "copycat" / "m0")  # a byte-identical re-upload
    with HubServer(root, page_size=4) as server:
        monkeypatch.setenv("HF_ENDPOINT", server.url)
        monkeypatch.delenv("HF_TOKEN", raising=False)
        yield server


def rows(index: str) -> dict[str, dict]:
    return {r["model_id"]: r for r in IndexReader(index).read_table().to_pylist()}


def test_hub_crawl_marks_duplicates_and_errors_then_reads_no_weights_again(hub, ray_local, tmp_path):
    index = str(tmp_path / "ix")
    first = crawl("hf://", index, progress=False)
    got = rows(index)
    assert first.seen == len(got) == 9
    assert (first.hashed, first.duplicates, first.failed) == (6, 1, 2)
    dup = got["copycat/m0"]
    assert (dup["status"], dup["duplicate_of"], dup["bytes_read"]) == ("duplicate", "hf:acme/m0", 0)
    assert dup["code"] == got["acme/m0"]["code"]
    assert got["acme/m0"]["license"] == "apache-2.0"
    assert got["zzz/tuned"]["declared_base"] == ["acme/m1", "acme/m2"]
    assert "gated" in got["other/gated"]["error"] and "HF_TOKEN" in got["other/gated"]["error"]
    assert "no checkpoint" in got["other/noweights"]["error"]
    assert all(r["revision"] and len(r["revision"]) == 40 for r in got.values())

    hub.reset_stats()
    second = crawl("hf://", index, progress=False)
    assert (second.skipped, second.hashed, second.duplicates, second.failed) == (9, 0, 0, 0)
    assert hub.stats.file_bytes == 0  # not one byte of weights
    assert not [r for r in hub.requests if r["path"].startswith("/api/models/")]  # no per-model calls


def test_filters_narrow_the_hub_crawl(hub, ray_local, tmp_path):
    summary = crawl("hf://", str(tmp_path / "ix"), filters={"author": "acme", "limit": 2}, progress=False)
    assert summary.seen == 2 and set(rows(str(tmp_path / "ix"))) <= {"acme/big", "acme/bin", "acme/m0", "acme/m1"}


def test_faults_on_five_percent_of_responses_lose_no_model(hub, ray_local, tmp_path):
    clean = str(tmp_path / "clean")
    crawl("hf://", clean, progress=False)
    hub.faults = Faults(rate=0.05, kinds=("429", "500", "reset"), seed=3, retry_after=0)
    faulty = str(tmp_path / "faulty")
    crawl("hf://", faulty, progress=False)
    a, b = rows(clean), rows(faulty)
    assert {k: (v["status"], v["code"]) for k, v in a.items()} == {k: (v["status"], v["code"]) for k, v in b.items()}


def test_a_model_past_its_timeout_becomes_an_error_row(hub, ray_local, tmp_path):
    hub.faults = Faults(rate=1.0, kinds=("slow",), delay=20, paths=r"^/cdn/|^/acme/m1/resolve/")
    index = str(tmp_path / "ix")
    summary = crawl("hf://acme/m1", index, timeout_s=3, progress=False)
    assert (summary.seen, summary.failed) == (1, 1)
    assert "timed out after 3 s" in rows(index)["acme/m1"]["error"]
