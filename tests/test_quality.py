"""The quality benchmark end to end on a tiny zoo: build, hash with every spec, compute the metrics."""

from __future__ import annotations

import json

import pytest

from bench.quality import evaluate, hash_zoo, render
from bench.quality_zoo import build_quality_zoo
from pipeline.hashing import get_spec


@pytest.fixture(scope="module")
def tiny_zoo(tmp_path_factory):
    root = tmp_path_factory.mktemp("quality_zoo")
    return root, build_quality_zoo(root, size="tiny", log=lambda _: None)


def test_tiny_zoo_holds_originals_homologs_and_verified_copies(tiny_zoo):
    root, manifest = tiny_zoo
    models = manifest["models"]
    originals = [m for m in models if m["original"] is None]
    assert {m["arch"] for m in originals} == {"mlp", "cnn"} and len(originals) == 4
    for m in models:
        assert (root / m["name"] / m["file"]).is_file()
        if m["kind"] in ("permute", "rescale", "bnfold"):
            assert m["equivalence_error"] < 1e-4  # verified: the same outputs
    assert json.loads((root / "zoo.json").read_text())["params"]["size"] == "tiny"
    assert build_quality_zoo(root, size="tiny", log=lambda _: None) == manifest  # cached


def test_metrics_for_both_specs(tiny_zoo):
    root, manifest = tiny_zoo
    models = manifest["models"]
    reports = [evaluate(models, hash_zoo(root, models, get_spec(n)), get_spec(n)) for n in ("nts", "wsig")]
    nts, wsig = reports
    for r in reports:
        assert 0 <= r.metrics["mAP"] <= 1 and 0 <= r.metrics["ROC AUC"] <= 1
        assert r.metrics["homolog pairs"] > 0 and r.cost["MB read per model (max)"] > 0
    # The robust spec finds function-preserving copies the positional baseline cannot.
    for kind in ("permute", "rescale", "bnfold"):
        assert wsig.recall[kind][0] == 1.0
        assert nts.recall[kind][0] < 1.0
    assert wsig.metrics["mAP"] > nts.metrics["mAP"]
    assert wsig.metrics["FPR at copy (homologs)"] == 0.0
    table = render(reports, manifest)
    assert "| permute (4) |" in table and "`wsig-v1`" in table
