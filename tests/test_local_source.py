"""A local folder as a source: models, identity, revisions, and what is not a model."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
import torch
from checkpoints import mlp_state, save_model
from safetensors.torch import save_file

from pipeline.errors import NoCheckpointError, SourceError
from pipeline.formats import open_model
from pipeline.sources import list_models, resolve_model, source_name


def test_every_checkpoint_folder_is_a_model(library):
    ids = [ref.model_id for ref in list_models(str(library["root"]))]
    assert ids == sorted(ids)
    assert {"orig", "copies/fp16", "copies/bin", "other1", "bad/nocheckpoint"} <= set(ids)
    assert "copies" not in ids and "bad" not in ids  # folders of folders are not models


def test_identity_and_files(library):
    ref = resolve_model(str(library["orig"]))
    assert (ref.source, ref.model_id, ref.arch) == ("local", "orig", "mlp")
    assert [f.name for f in ref.files] == ["model.safetensors"]
    assert ref.files[0].size == os.path.getsize(library["orig"] / "model.safetensors")
    assert len(ref.revision) == 40


def test_revision_changes_with_the_files_only(tmp_path):
    folder = save_model(tmp_path / "m", mlp_state(0))
    first = resolve_model(str(folder)).revision
    assert resolve_model(str(folder)).revision == first
    save_model(folder, mlp_state(1))
    os.utime(folder / "model.safetensors", ns=(1, 1))
    assert resolve_model(str(folder)).revision != first


def test_a_single_file_is_a_model(library):
    ref = resolve_model(str(library["bin"] / "pytorch_model.bin"))
    assert ref.model_id == "pytorch_model.bin" and len(ref.files) == 1
    assert ref.arch == resolve_model(str(library["bin"])).arch == "mlp"  # its folder's config.json says so
    assert [r.model_id for r in list_models(str(library["bin"] / "pytorch_model.bin"))] == ["pytorch_model.bin"]


def test_safetensors_preferred_and_trainer_files_ignored(tmp_path):
    folder = save_model(tmp_path / "both", mlp_state(0))
    torch.save(mlp_state(0), folder / "pytorch_model.bin")
    (folder / "training_args.bin").write_bytes(b"\x80\x04 not weights")
    ref = resolve_model(str(folder))
    assert [f.name for f in ref.files] == ["model.safetensors", "pytorch_model.bin"]
    assert open_model(ref.files).format == "safetensors"


def test_sharded_checkpoint_files(tmp_path):
    folder = tmp_path / "sharded"
    folder.mkdir()
    state = mlp_state(0)
    names = sorted(state)
    half = len(names) // 2
    shards = {"model-00001-of-00002.safetensors": names[:half], "model-00002-of-00002.safetensors": names[half:]}
    for shard, keys in shards.items():
        save_file({k: state[k] for k in keys}, str(folder / shard))
    weight_map = {k: shard for shard, keys in shards.items() for k in keys}
    (folder / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    files = [f.name for f in resolve_model(str(folder)).files]
    assert sorted(files) == sorted(["model.safetensors.index.json", *shards])


def test_folder_without_checkpoint(library):
    with pytest.raises(NoCheckpointError, match="no checkpoint") as caught:
        resolve_model(str(library["nocheckpoint"]))
    assert "crawl" not in str(caught.value)
    with pytest.raises(NoCheckpointError, match="its sub-folders hold models: index them with `modelhash crawl"):
        resolve_model(str(library["root"]))  # a folder of models given where one model is expected


def test_missing_path_and_unsupported_scheme(tmp_path):
    with pytest.raises(SourceError, match="no such file"):
        resolve_model(str(tmp_path / "nope"))
    with pytest.raises(SourceError, match="not supported"):
        source_name("ftp://host/x")


def test_a_name_that_is_not_utf8_becomes_an_error_model_not_a_crash(tmp_path):
    from pipeline.index.rows import error_row

    root = tmp_path / "src"
    bad = os.fsdecode(os.fsencode(str(root)) + b"/bad\xff")  # a byte no UTF-8 decoder takes
    save_model(Path(bad), mlp_state(1))
    save_model(root / "good", mlp_state(2))
    refs = {r.model_id: r for r in list_models(str(root))}
    assert set(refs) == {"bad\\udcff", "good"}  # shown escaped, so the index row can hold it
    assert refs["bad\\udcff"].error and "not valid UTF-8" in refs["bad\\udcff"].error and not refs["good"].error
    row = error_row(refs["bad\\udcff"], "spec", f"{bad}: cannot open")
    assert row["error"].encode("utf-8") and "\\udcff" in row["error"]
    with pytest.raises(SourceError, match="not valid UTF-8"):
        resolve_model(bad)
