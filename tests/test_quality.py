"""The quality benchmark end to end on a tiny zoo: build, hash with every spec, compute the metrics."""

from __future__ import annotations

import json

import pytest
import torch

from bench.numerics import NUMERICS, build_in_child, is_portable, portable_kernels
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
    params = json.loads((root / "zoo.json").read_text())["params"]
    assert params["size"] == "tiny" and params["numerics"] == NUMERICS  # built in a child with pinned kernels
    assert build_quality_zoo(root, size="tiny", log=lambda _: None) == manifest  # cached


def test_zoos_build_in_a_child_with_portable_kernels(tmp_path):
    assert not is_portable()  # this process's torch chose its kernels when it loaded
    with pytest.raises(RuntimeError, match="exit status"):
        build_in_child("bench.no_such_zoo", tmp_path, "tiny", 0, False)
    enabled = torch.backends.mkldnn.enabled
    with portable_kernels():
        assert not torch.backends.mkldnn.enabled and torch.get_num_threads() == 1
    assert torch.backends.mkldnn.enabled == enabled


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
    assert "| permute (4) |" in table and "`wsig-v2`" in table


def test_homologs_outside_the_zoo_are_counted_against_the_copy_threshold(tiny_zoo):
    from bench.quality import outside_homologs, render_outside

    root, manifest = tiny_zoo
    # The verify zoo's manifest shape over this zoo's models: originals as independent homologs of each
    # other, fine-tunes and prunes as weight-kept copies of their original.
    kinds = {"original": ("original", "original"), "ft-short": ("pirated", "ft-short"),
             "prune50": ("pirated", "prune50")}
    models = [dict(m, relation=kinds[m["kind"]][0], kind=kinds[m["kind"]][1])
              for m in manifest["models"] if m["kind"] in kinds]
    spec = get_spec("wsig")
    out = outside_homologs(root, models, spec)
    assert {arch: v[1] for arch, v in out.independent.items()} == {"mlp": 1, "cnn": 1}  # two seeds each
    assert all(within <= pairs and closest > 0 for within, pairs, closest in out.independent.values())
    assert out.recall["ft-short"] == (4, 4) and out.recall["prune50"][1] == 4
    assert out.cross_lineage[1] > 2  # copies of one lineage against the other lineage count too
    lines = "\n".join(render_outside([out]))
    assert "| independent cnn pairs |" in lines and "| recall ft-short | 4 / 4 |" in lines
