"""The `modelhash` command as a user runs it: a subprocess, its stdout, stderr and exit code."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from checkpoints import COPIES, UNRELATED, mlp_state, save_model

from pipeline.hashing import get_spec

MODELHASH = [sys.executable, "-m", "pipeline.cli"]


def run(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "RAY_USAGE_STATS_ENABLED": "0"}
    proc = subprocess.run([*MODELHASH, *args], capture_output=True, text=True, env=env, timeout=300)
    if check and proc.returncode != 0:
        raise AssertionError(f"modelhash {' '.join(args)} failed: {proc.stderr}")
    return proc


def test_hash_json(library):
    info = json.loads(run("hash", str(library["orig"]), "--json").stdout)
    assert info["model_id"] == "orig" and info["spec"] == get_spec().name  # the default spec
    assert len(bytes.fromhex(info["code"])) == 32 and info["format"] == "safetensors"
    plain = run("hash", str(library["orig"])).stdout
    assert info["code"] in plain


def test_compare_prints_distance_verdict_and_evidence(library):
    out = run("compare", str(library["orig"]), str(library["fp16"])).stdout
    assert "copy" in out and "distance" in out
    report = json.loads(run("compare", str(library["orig"]), str(library["other1"]), "--json").stdout)
    assert report["verdict"] == "unrelated" and report["distance"] > report["thresholds"]["related"]


def test_compare_says_when_no_block_is_in_common(library, tmp_path):
    renamed = {k.replace("net.", "fc"): v for k, v in mlp_state(3).items()}  # fc0.weight: blocks fc0, fc2, fc4
    other = save_model(tmp_path / "renamed", renamed)
    report = json.loads(run("compare", str(library["orig"]), str(other), "--json").stdout)
    assert report["blocks"] == []
    assert "no block in common" in run("compare", str(library["orig"]), str(other)).stdout


@pytest.mark.parametrize(
    ("bad", "message"),
    [("nan", "NaN"), ("truncated", "truncated"), ("nocheckpoint", "no checkpoint"), ("lying", "")],
)
def test_bad_models_get_one_clear_line(library, bad, message):
    proc = run("hash", str(library[bad]), check=False)
    assert proc.returncode == 2
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("modelhash: error: ")
    assert message.lower() in lines[0].lower()
    assert "Traceback" not in proc.stderr


def test_malicious_pickle_runs_nothing(tmp_path):
    marker = tmp_path / "pwned"

    class Payload:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    folder = tmp_path / "evil"
    folder.mkdir()
    torch.save({"w": torch.ones(64, 64), "x": Payload()}, folder / "pytorch_model.bin")
    proc = run("hash", str(folder), check=False)
    assert proc.returncode == 2 and "system" in proc.stderr
    assert not marker.exists()


def test_crawl_then_query_json(library, tmp_path, ray_local):
    # A Ray runs on this machine (the session's): a crawl with no address starts its own, never joins it.
    drivers = len(ray_local._private.state.jobs())
    index = tmp_path / "index"
    out = run("crawl", str(library["root"]), "--index", str(index), "--no-progress").stdout
    assert "hashed" in out and "4 failed" in out
    assert len(ray_local._private.state.jobs()) == drivers
    again = run("crawl", str(library["root"]), "--index", str(index), "--no-progress").stdout
    assert "0 hashed" in again
    result = json.loads(run("query", str(library["orig"]), "--index", str(index), "--json", "-k", "7").stdout)
    assert result["query"]["model_id"] == "orig"
    matches = result["matches"]
    assert len(matches) == 7
    assert set(matches[0]) == {"source", "model_id", "revision", "distance", "similarity", "verdict"}
    ranked = [m["model_id"] for m in matches]
    assert set(ranked[:5]) == {"orig", *(f"copies/{c}" for c in COPIES)}
    assert set(ranked[5:]) == set(UNRELATED)


def test_query_of_a_missing_index_is_one_clear_line(library, tmp_path):
    proc = run("query", str(library["orig"]), "--index", str(tmp_path / "none"), check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "modelhash crawl SOURCE --index" in proc.stderr  # says how to make one


def test_crawl_of_a_source_with_no_models_warns(tmp_path):
    (tmp_path / "empty").mkdir()
    proc = run("crawl", str(tmp_path / "empty"), "--index", str(tmp_path / "index"), "--no-progress")
    assert "0 models seen" in proc.stdout
    assert "warning: no models found" in proc.stderr and not (tmp_path / "index").exists()


def test_unknown_spec(library):
    proc = run("hash", str(library["orig"]), "--spec", "nope", check=False)
    assert proc.returncode == 2 and "unknown spec" in proc.stderr


def test_a_fresh_checkpoint_is_hashed_the_same_by_path_and_folder(tmp_path):
    folder = save_model(tmp_path / "m", mlp_state(5))
    by_folder = json.loads(run("hash", str(folder), "--json").stdout)["code"]
    by_file = json.loads(run("hash", str(Path(folder) / "model.safetensors"), "--json").stdout)["code"]
    assert by_folder == by_file


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        (["query", "{orig}", "--index", "{tmp}", "-k", "0"], "argument -k: must be a positive integer"),
        (["sweep", "{orig}", "--index", "{tmp}", "--out", "{tmp}/r.parquet", "--max-distance", "-1"],
         "argument --max-distance: must be a non-negative integer"),
        (["crawl", "{orig}", "--index", "{tmp}/ix", "--max-rps", "0"], "argument --max-rps: must be a positive"),
        (["verify", "{orig}", "{orig}", "--points", "-5"], "argument --points: must be a positive integer"),
        (["verify", "{orig}", "{orig}", "--device", "tpu"], "argument --device: not a device"),
    ],
)
def test_bad_flag_values_are_usage_errors_before_any_work(library, tmp_path, args, expected):
    proc = run(*(a.format(orig=library["orig"], tmp=tmp_path) for a in args), check=False)
    assert proc.returncode == 2 and expected in proc.stderr and "Traceback" not in proc.stderr
    assert not (tmp_path / "ix").exists() and not (tmp_path / "r.parquet").exists()


def test_a_gpu_torch_does_not_see_is_a_usage_error(library):
    # Here (a CPU build): any GPU. Where torch sees N GPUs: the one past them, cuda:N.
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    device, expected = (f"cuda:{count}", f"torch sees {count} GPU(s)") if count else ("cuda", "torch sees no GPU")
    proc = run("verify", str(library["orig"]), str(library["fp16"]), "--device", device, check=False)
    assert proc.returncode == 2 and expected in proc.stderr


def test_an_index_path_that_cannot_hold_an_index_fails_before_hashing(library, tmp_path):
    a_file = tmp_path / "index.txt"
    a_file.write_text("not an index")
    proc = run("crawl", str(library["orig"]), "--index", str(a_file), "--no-progress", check=False)
    assert proc.returncode == 2 and "is a file" in proc.stderr and a_file.read_text() == "not an index"
    # The models' own folder given as the index (arguments swapped): refused, nothing mixed into it.
    before = sorted(p.name for p in library["root"].iterdir())
    proc = run("crawl", str(library["orig"]), "--index", str(library["root"]), "--no-progress", check=False)
    assert proc.returncode == 2 and "not an index" in proc.stderr
    assert sorted(p.name for p in library["root"].iterdir()) == before
    proc = run("query", str(library["orig"]), "--index", str(library["root"]), check=False)
    assert proc.returncode == 2 and "is not an index" in proc.stderr


def test_sweep_of_nothing_warns_and_of_only_failures_is_an_error(tmp_path, library):
    index = tmp_path / "index"
    run("crawl", str(library["orig"]), "--index", str(index), "--no-progress")
    (tmp_path / "empty").mkdir()
    out = tmp_path / "r.parquet"
    proc = run("sweep", str(tmp_path / "empty"), "--index", str(index), "--out", str(out), "--no-progress")
    assert "warning: no models found" in proc.stderr and out.exists()
    listing = tmp_path / "list.txt"
    listing.write_text(f"{tmp_path / 'gone'}\n")
    proc = run("sweep", str(listing), "--index", str(index), "--out", str(out), "--no-progress", check=False)
    assert proc.returncode == 2 and "no protected model could be hashed (1 failed" in proc.stderr
    # A report folder that cannot be made: one line, before any model is hashed.
    proc = run("sweep", str(library["orig"]), "--index", str(index), "--out", str(listing / "r.parquet"),
               "--no-progress", check=False)
    assert proc.returncode == 2 and len(proc.stderr.strip().splitlines()) == 1
    assert "cannot make the report's folder" in proc.stderr
