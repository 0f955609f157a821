"""The demo zoo: built once per module (about 10 s on two cores), then checked file by file."""

from __future__ import annotations

import json
import struct
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from bench.zoo import (
    BIN_NAME,
    MANIFEST_NAME,
    RENAME_PREFIX,
    SAFETENSORS_NAME,
    accuracy,
    build_demo_zoo,
    load_digits_split,
    load_model,
    make_model,
    prune_magnitude,
    rename_keys,
    to_fp16,
)

SEED = 3
COPY_KINDS = ("finetune", "prune30", "fp16", "renamed", "bin", "ft-prune50")


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict]:
    out = tmp_path_factory.mktemp("zoo")
    return out, build_demo_zoo(out, seed=SEED)


def _by_name(manifest: dict) -> dict[str, dict]:
    return {m["name"]: m for m in manifest["models"]}


def _load(out: Path, entry: dict) -> dict[str, torch.Tensor]:
    path = out / entry["name"] / entry["file"]
    if entry["format"] == "torch_zip":
        return torch.load(path, weights_only=True)
    return load_file(path)


def _safetensors_dtypes(path: Path) -> dict[str, str]:
    """Dtypes as written in the file's header, not as a loader reports them."""
    with path.open("rb") as f:
        (n,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(n))
    return {k: v["dtype"] for k, v in header.items() if k != "__metadata__"}


def test_manifest_lists_originals_homolog_and_copies(zoo: tuple[Path, dict]) -> None:
    out, manifest = zoo
    assert json.loads((out / MANIFEST_NAME).read_text()) == manifest
    models = _by_name(manifest)
    expected = {f"mlp-s{SEED}", f"mlp-s{SEED + 1}", f"cnn-s{SEED}"}
    expected |= {f"{arch}-s{SEED}-{kind}" for arch in ("mlp", "cnn") for kind in COPY_KINDS}
    assert set(models) == expected
    assert {p.name for p in out.iterdir() if p.is_dir()} == expected
    for name in (f"mlp-s{SEED}", f"mlp-s{SEED + 1}", f"cnn-s{SEED}"):
        assert models[name]["kind"] == "original" and models[name]["original"] is None
        assert models[name]["n_params"] >= 30_000  # enough weights for a 256-segment hash
        assert models[name]["test_accuracy"] >= 0.93
    for arch in ("mlp", "cnn"):
        for kind in COPY_KINDS:
            entry = models[f"{arch}-s{SEED}-{kind}"]
            assert (entry["kind"], entry["original"], entry["arch"]) == (kind, f"{arch}-s{SEED}", arch)


def test_every_folder_holds_a_loadable_checkpoint(zoo: tuple[Path, dict]) -> None:
    out, manifest = zoo
    data = load_digits_split()
    for entry in manifest["models"]:
        folder = out / entry["name"]
        assert json.loads((folder / "config.json").read_text()) == {"model_type": entry["arch"]}
        want = BIN_NAME if entry["kind"] == "bin" else SAFETENSORS_NAME
        assert sorted(p.name for p in folder.iterdir()) == sorted(["config.json", want])
        state = _load(out, entry)
        prefix = RENAME_PREFIX if entry["kind"] == "renamed" else ""
        model = load_model(entry["arch"], state, prefix)
        assert accuracy(model, data) == pytest.approx(entry["test_accuracy"], abs=1e-4)


@pytest.mark.parametrize("kind,fraction", [("prune30", 0.3), ("ft-prune50", 0.5)])
def test_pruned_copies_zero_the_expected_fraction(zoo: tuple[Path, dict], kind: str, fraction: float) -> None:
    out, manifest = zoo
    models = _by_name(manifest)
    for arch in ("mlp", "cnn"):
        original = _load(out, models[f"{arch}-s{SEED}"])
        pruned = _load(out, models[f"{arch}-s{SEED}-{kind}"])
        assert pruned.keys() == original.keys()
        for name, t in pruned.items():
            if t.is_floating_point() and t.ndim >= 2:
                assert int((t == 0).sum()) == round(fraction * t.numel()), name
            elif kind == "prune30":  # vectors and buffers are not pruned
                assert torch.equal(t, original[name]), name
        if kind == "prune30":
            # Pruning keeps the largest weights exactly as they were.
            for name, t in pruned.items():
                assert torch.equal(t[t != 0], original[name][t != 0]), name


def test_fp16_copies_are_stored_as_f16(zoo: tuple[Path, dict]) -> None:
    out, manifest = zoo
    models = _by_name(manifest)
    for arch in ("mlp", "cnn"):
        entry = models[f"{arch}-s{SEED}-fp16"]
        dtypes = _safetensors_dtypes(out / entry["name"] / entry["file"])
        original = _load(out, models[f"{arch}-s{SEED}"])
        for name, t in original.items():
            assert dtypes[name] == ("F16" if t.is_floating_point() else "I64"), name
        assert entry["test_accuracy"] == pytest.approx(models[f"{arch}-s{SEED}"]["test_accuracy"], abs=0.01)


def test_renamed_and_bin_copies_hold_the_original_weights(zoo: tuple[Path, dict]) -> None:
    out, manifest = zoo
    models = _by_name(manifest)
    for arch in ("mlp", "cnn"):
        original = _load(out, models[f"{arch}-s{SEED}"])
        renamed = _load(out, models[f"{arch}-s{SEED}-renamed"])
        assert all(k.startswith(RENAME_PREFIX) for k in renamed)
        assert {k.removeprefix(RENAME_PREFIX) for k in renamed} == set(original)
        binary = _load(out, models[f"{arch}-s{SEED}-bin"])
        for name, t in original.items():
            assert torch.equal(renamed[RENAME_PREFIX + name], t)
            assert torch.equal(binary[name], t)


def test_fine_tuned_copy_differs_but_keeps_accuracy(zoo: tuple[Path, dict]) -> None:
    out, manifest = zoo
    models = _by_name(manifest)
    data = load_digits_split()
    for arch in ("mlp", "cnn"):
        original = _load(out, models[f"{arch}-s{SEED}"])
        tuned = _load(out, models[f"{arch}-s{SEED}-finetune"])
        for name, t in original.items():
            if t.is_floating_point() and t.ndim >= 2:
                change = float((tuned[name] - t).norm() / t.norm())
                assert 1e-3 < change < 0.5, (name, change)  # every layer moved, none was replaced
        acc_original = accuracy(load_model(arch, original), data)
        acc_tuned = accuracy(load_model(arch, tuned), data)
        assert abs(acc_tuned - acc_original) <= 0.03


def test_second_build_is_a_cached_no_op(zoo: tuple[Path, dict]) -> None:
    out, manifest = zoo
    before = {p: p.stat().st_mtime_ns for p in out.rglob("*")}
    start = time.perf_counter()
    again = build_demo_zoo(out, seed=SEED)
    assert time.perf_counter() - start < 1.0  # no training
    assert again == manifest
    assert {p: p.stat().st_mtime_ns for p in out.rglob("*")} == before


def test_helpers_are_deterministic_and_check_their_input() -> None:
    a, b = make_model("mlp", 7).state_dict(), make_model("mlp", 7).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc1.weight"], make_model("mlp", 8).state_dict()["fc1.weight"])
    with pytest.raises(ValueError):
        prune_magnitude(a, 1.5)
    with pytest.raises(ValueError):
        make_model("transformer", 0)
    half = to_fp16({"w": torch.ones(2, 2), "n": torch.tensor(3)})
    assert half["w"].dtype == torch.float16 and half["n"].dtype == torch.int64
    assert set(rename_keys({"w": torch.ones(1)}, "module.")) == {"module.w"}
