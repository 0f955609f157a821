"""The crawl under faults: checkpointed commits, a killed crawl resumed, a node lost mid-crawl."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from checkpoints import mlp_state, save_model

from jobs.crawl import crawl
from pipeline.errors import SourceError
from pipeline.index.reader import IndexReader

HERE = Path(__file__).parent


def make_source(root: Path, n: int, widths: tuple[int, ...] = (64, 256, 128, 10)) -> Path:
    for i in range(n):
        save_model(root / f"m{i:03d}", mlp_state(100 + i, widths))
    return root


def committed_rows_per_model(index: str) -> dict[str, int]:
    """How many rows each model has across every committed run (not only the latest)."""
    counts: dict[str, int] = {}
    for run in IndexReader(index).runs:
        for shard in run.shards:
            for model_id in pq.read_table(Path(index) / shard.path, columns=["model_id"])["model_id"].to_pylist():
                counts[model_id] = counts.get(model_id, 0) + 1
    return counts


def test_filters_do_not_apply_to_a_local_folder(tmp_path):
    with pytest.raises(SourceError, match="filters"):
        crawl(str(make_source(tmp_path / "src", 1)), str(tmp_path / "ix"), filters={"author": "x"}, progress=False)


def test_rows_are_committed_run_by_run(tmp_path, ray_local):
    source = make_source(tmp_path / "src", 7)
    summary = crawl(str(source), str(tmp_path / "ix"), checkpoint_rows=3, progress=False)
    assert summary.hashed == 7 and len(summary.runs) == 3  # 3 + 3 + 1
    assert [r.rows for r in IndexReader(str(tmp_path / "ix")).runs] == [3, 3, 1]
    assert set(committed_rows_per_model(str(tmp_path / "ix")).values()) == {1}


def test_a_killed_crawl_resumes_without_losing_or_repeating_a_model(tmp_path, ray_local):
    n = 60
    source = make_source(tmp_path / "src", n, widths=(64, 512, 512, 10))
    index = tmp_path / "ix"
    cmd = [sys.executable, "-m", "jobs.crawl", str(source), "--index", str(index), "--no-progress",
           "--checkpoint-rows", "5", "--max-in-flight", "1"]
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, start_new_session=True)
    runs = index / "runs"
    deadline = time.monotonic() + 120
    while not (runs.exists() and len(list(runs.glob("*.json"))) >= 2) and time.monotonic() < deadline:
        time.sleep(0.02)
    os.killpg(proc.pid, signal.SIGKILL)  # no chance to commit: the last, partial run is lost
    proc.wait()
    before = committed_rows_per_model(str(index))
    assert 0 < len(before) < n, "the crawl was not killed half-way"

    summary = crawl(str(source), str(index), progress=False)
    assert (summary.skipped, summary.hashed, summary.failed) == (len(before), n - len(before), 0)
    after = committed_rows_per_model(str(index))
    assert sorted(after) == sorted(f"m{i:03d}" for i in range(n))
    assert set(after.values()) == {1}  # nothing lost, nothing indexed twice


def test_a_node_lost_mid_crawl_loses_no_model(tmp_path):
    """A real multi-node Ray (ray.cluster_utils.Cluster) in its own process; the worker node is killed."""
    n = 30
    source = make_source(tmp_path / "src", n, widths=(64, 512, 512, 10))
    index = tmp_path / "ix"
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0", "PYTHONPATH": f"{HERE}:{HERE.parent}"}
    proc = subprocess.run(
        [sys.executable, str(HERE / "cluster_crawl.py"), str(source), str(index), str(tmp_path / "report.json")],
        env=env, capture_output=True, text=True, timeout=420,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    report = json.loads((tmp_path / "report.json").read_text())
    assert report["finished"] and report["runs_before_kill"] < n // 5
    summary = report["summary"]
    assert (summary["seen"], summary["hashed"], summary["failed"]) == (n, n, 0)
    counts = committed_rows_per_model(str(index))
    assert len(counts) == n and set(counts.values()) == {1}
