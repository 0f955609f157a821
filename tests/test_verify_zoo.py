"""The verification benchmark's tiny zoo: relations, comparison pairs, and students that share no weights."""

from __future__ import annotations

import json
from collections import Counter

import numpy as np
import pytest
import torch

from bench.verify_zoo import FRESH_KINDS, build_verify_zoo, comparisons, load_zoo_model


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    root = tmp_path_factory.mktemp("verify_zoo")
    return root, build_verify_zoo(root, size="tiny", log=lambda _: None)


def test_manifest_relations_and_files(tiny):
    root, manifest = tiny
    models = manifest["models"]
    by_name = {m["name"]: m for m in models}
    for m in models:
        assert (root / m["name"] / m["file"]).is_file()
        assert json.loads((root / m["name"] / "config.json").read_text())["model_type"] == m["arch"]
        if m["relation"] == "original":
            assert m["lineage"] == m["name"]
        elif m["relation"] == "pirated":
            assert by_name[m["lineage"]]["relation"] == "original"
        else:
            assert m["relation"] in ("homolog", "unrelated") and m["lineage"] is None
    kinds = Counter(m["kind"] for m in models)
    assert kinds["original"] == 3 and kinds["distill"] == kinds["extract"] == kinds["distill-xarch"] == 3
    assert kinds["homolog-half"] == 4 and kinds["task-ge5"] == 2
    # The cross-architecture students are of another architecture than their teachers.
    assert all(m["arch"] != by_name[m["lineage"]]["arch"] for m in models if m["kind"] == "distill-xarch")
    seeds = np.load(root / manifest["seeds"])
    assert seeds.shape == (450, 64) and seeds.dtype == np.float32
    assert build_verify_zoo(root, size="tiny", log=lambda _: None) == manifest  # cached


def test_comparison_pairs(tiny):
    _, manifest = tiny
    pairs = comparisons(manifest)
    rel = Counter((src["name"], relation) for src, _, relation, _ in pairs)
    # mlp-s0: 9 copies; homologs: mlp-s1, its copies of the mlp architecture, h10, two halves, the
    # mlp student of cnn-s0; unrelated: cnn-s0 and the 4 other-task models.
    assert rel["mlp-s0", "pirated"] == 9
    assert rel["mlp-s0", "unrelated"] == 5
    assert rel["mlp-s0", "homolog"] == 1 + 8 + 1 + 2 + 1
    for src, suspect, relation, _ in pairs:
        assert suspect is not src
        if relation == "pirated":
            assert suspect["lineage"] == src["name"]
        if relation == "homolog":
            assert suspect["arch"] == src["arch"] and suspect["lineage"] != src["name"]


def test_students_learn_the_task_and_share_no_weights(tiny):
    root, manifest = tiny
    models = manifest["models"]
    by_name = {m["name"]: m for m in models}
    students = [m for m in models if m["kind"] in FRESH_KINDS]
    assert len(students) == 9
    for m in students:
        assert m["accuracy"] > 0.85, m
        teacher = by_name[m["lineage"]]
        assert m["accuracy"] > teacher["accuracy"] - 0.1
        if m["arch"] != teacher["arch"]:
            continue
        a = load_zoo_model(root, m).state_dict()
        b = load_zoo_model(root, teacher).state_dict()
        for key, wa in a.items():
            if wa.is_floating_point() and wa.ndim >= 2:  # weight matrices and kernels: fresh, uncorrelated
                corr = torch.corrcoef(torch.stack([wa.flatten(), b[key].flatten()]))[0, 1]
                assert abs(float(corr)) < 0.2, (m["name"], key, float(corr))
    # The weight-keeping copies do share their original's weights.
    pruned = next(m for m in models if m["kind"] == "prune50")
    a = load_zoo_model(root, pruned).state_dict()
    b = load_zoo_model(root, by_name[pruned["lineage"]]).state_dict()
    keep = a["fc1.weight" if pruned["arch"] == "mlp" else "conv1.weight"] != 0
    key = "fc1.weight" if pruned["arch"] == "mlp" else "conv1.weight"
    assert torch.equal(a[key][keep], b[key][keep])


def test_bench_verify_end_to_end(tiny):
    from bench.verify import METHODS, REF_METHODS, calibrate, evaluate, render, run
    from bench.zoo import torch_threads

    root, manifest = tiny
    with torch_threads(1):  # as the bench runs: two threads on a busy 2-core box run many times slower
        pairs, times = run(root, manifest, probes=("core-real",), log=lambda _: None)
    assert {p.method for p in pairs} == {*METHODS, *REF_METHODS}
    assert all(p.verdict in ("pirated", "homolog", "unrelated") and p.score is not None for p in pairs
               if p.method in METHODS), [p for p in pairs if p.verdict == "error"]
    # Calibrated against references: a score wherever a reference is left once the suspect is left out (the
    # tiny zoo's CNN has one: judging that one, the global thresholds judge, and there is no calibrated score).
    calibrated = [p for p in pairs if p.method in REF_METHODS]
    assert all(p.verdict != "error" for p in calibrated)
    assert all(p.score is not None for p in calibrated if p.suspect != "cnn-h10")
    assert len(times["load"]) == len(manifest["models"]) and len(times["probe:core-real"]) == 3
    assert len(times["calibrate:core-real"]) == 3
    reports = {("core-real", m): evaluate(pairs, "core-real", m) for m in (*METHODS, *REF_METHODS)}
    for r in reports.values():
        assert r.auc["all"] is not None and 0 <= r.auc["all"] <= 1
        assert r.missed["all"][2] > 0 and r.false_homolog["all"][2] > 0 and r.false_unrelated["all"][2] > 0
    # The calibrated cut lets at most 1% of the calibration negatives through.
    r = reports["core-real", "agreement"]
    cal_neg = [p for p in pairs if p.method == "agreement" and p.calibration and p.relation != "pirated"]
    cut = calibrate([p for p in pairs if p.method == "agreement" and p.calibration and p.relation == "pirated"],
                    cal_neg)
    assert cut == r.calibrated and sum(p.score >= cut for p in cal_neg) <= 0.01 * len(cal_neg)
    table = render(reports, pairs, times, manifest)
    assert "| ft-short (" in table and "`cluster-all`" in table and "a pair from scratch" in table
    assert "Per-source calibration against homolog references" in table and "| `ddv`, 1 reference |" in table


def test_bench_verify_probe_seed(tiny, tmp_path, capsys):
    """`--probe-seed` searches other core points (the figures' spread over draws), and a run from another
    seed never replaces RESULTS.md's seed-0 section: neither the run itself nor its --json rendered later."""
    from bench.results import RESULTS
    from bench.verify import main, parse_args, run
    from bench.zoo import torch_threads

    root, manifest = tiny
    with torch_threads(1):
        seed0 = run(root, manifest, probes=("core-generated",), log=lambda _: None)[0]
    saved = tmp_path / "seed1.json"
    before = RESULTS.read_bytes() if RESULTS.exists() else None
    common = ["--zoo", str(root), "--size", "tiny", "--probes", "core-generated"]
    try:
        assert main(parse_args([*common, "--probe-seed", "1", "--json", str(saved)])) == 0
        assert main(parse_args([*common, "--from-json", str(saved)])) == 0
        assert (RESULTS.read_bytes() if RESULTS.exists() else None) == before
    finally:  # a failure must not leave the repository's RESULTS.md holding a tiny zoo's figures
        if before is not None:
            RESULTS.write_bytes(before)
    assert capsys.readouterr().out.count("searched from seed 1") == 2
    data = json.loads(saved.read_text())
    assert data["probe_seed"] == 1
    scores = [{(p["method"], p["source"], p["suspect"]): p["score"] for p in data["pairs"]},
              {(p.method, p.source, p.suspect): p.score for p in seed0}]
    assert scores[0].keys() == scores[1].keys()
    assert any(scores[0][k] != scores[1][k] for k in scores[0])
