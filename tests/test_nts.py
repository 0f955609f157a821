"""The `nts` spec on real checkpoints: copies near, unrelated far, bad weights refused."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import COPIES, UNRELATED, mlp_state, save_model

from pipeline.errors import HashingError
from pipeline.formats import open_model
from pipeline.hashing import get_spec
from pipeline.hashing.canonical import natural_key, strip_common_prefix
from pipeline.hashing.model import hash_model
from pipeline.hashing.nts import NTSSpec, _normal_test_statistic
from pipeline.search.hamming import distance
from pipeline.sources import resolve_model

SPEC = get_spec("nts")


def code_of(path) -> bytes:
    return hash_model(resolve_model(str(path)), SPEC).code.code


def test_code_is_256_bits_balanced_and_deterministic(library):
    code = code_of(library["orig"])
    assert len(code) == 32
    ones = int(np.unpackbits(np.frombuffer(code, np.uint8)).sum())
    assert ones == 128  # median split: exactly half the segments above the median
    assert code_of(library["orig"]) == code


@pytest.mark.parametrize("copy", ["renamed", "bin"])
def test_lossless_copies_give_the_same_code(library, copy):
    assert code_of(library[copy]) == code_of(library["orig"])


@pytest.mark.parametrize("copy", COPIES)
def test_copies_fall_within_the_copy_threshold(library, copy):
    assert distance(code_of(library[copy]), code_of(library["orig"])) <= SPEC.thresholds.copy


@pytest.mark.parametrize("other", UNRELATED)
def test_unrelated_models_are_far(library, other):
    d = distance(code_of(library[other]), code_of(library["orig"]))
    assert d > SPEC.thresholds.related


def test_magnitude_pruning_below_keep_leaves_the_selection_unchanged(tmp_path):
    base = mlp_state(3)
    pruned = {}
    for k, v in base.items():
        if v.ndim >= 2:
            cut = v.abs().flatten().kthvalue(int(0.3 * v.numel())).values
            v = torch.where(v.abs() <= cut, torch.zeros_like(v), v)
        pruned[k] = v
    a = code_of(save_model(tmp_path / "a", base))
    b = code_of(save_model(tmp_path / "b", pruned))
    assert a == b


def test_nan_weights_are_refused(library):
    with pytest.raises(HashingError, match="NaN"):
        code_of(library["nan"])


def test_too_small_a_model_is_refused(tmp_path):
    tiny = save_model(tmp_path / "tiny", {"w": torch.ones(4, 4)})
    with pytest.raises(HashingError, match="too few weights"):
        code_of(tiny)


def test_no_weight_matrices_is_refused(tmp_path):
    only_bias = save_model(tmp_path / "bias", {"b": torch.ones(5000)})
    with pytest.raises(HashingError, match="no weight matrices"):
        code_of(only_bias)


def test_parts_cover_each_top_level_block(tmp_path):
    state = {f"encoder.{k}": v for k, v in mlp_state(0).items()} | {
        f"head.{k}": v for k, v in mlp_state(1, (64, 128, 64)).items()
    }
    result = hash_model(resolve_model(str(save_model(tmp_path / "m", state))), SPEC)
    assert [name for name, _ in result.code.parts] == ["encoder", "head"]
    assert all(len(code) == 32 for _, code in result.code.parts)


def test_normal_test_statistic_equals_scipy():
    from scipy import stats  # a dev dependency: the reference implementation
    rng = np.random.default_rng(0)
    segments = np.concatenate(
        [rng.normal(size=(50, 300)), rng.laplace(size=(50, 300)), rng.uniform(size=(50, 300)) ** 3]
    )
    expected = stats.normaltest(segments, axis=1).statistic
    np.testing.assert_allclose(_normal_test_statistic(segments), expected, rtol=1e-9)
    assert _normal_test_statistic(np.zeros((2, 40))).tolist() == [0.0, 0.0]


def test_spec_name_pins_parameters():
    assert NTSSpec().name == "nts-v1:bits=256,keep=0.5,max_params=4000000"
    assert NTSSpec(keep=0.3).name != NTSSpec().name
    assert get_spec(NTSSpec().name) is get_spec("nts")


def test_canonical_names():
    assert strip_common_prefix(["module.net.0.weight", "module.net.2.weight"]) == {
        "module.net.0.weight": "0.weight",
        "module.net.2.weight": "2.weight",
    }
    assert strip_common_prefix(["w"]) == {"w": "w"}
    assert sorted(["l.10.w", "l.2.w", "l.1.w"], key=natural_key) == ["l.1.w", "l.2.w", "l.10.w"]


def test_bytes_read_counts_only_what_was_hashed(library):
    ref = resolve_model(str(library["orig"]))
    result = hash_model(ref, SPEC)
    directory = open_model(ref.files)
    matrices = sum(e.nbytes for e in directory.values() if len(e.shape) >= 2)
    assert matrices <= result.bytes_read <= matrices + 8 + 4096  # the header and the weight matrices


def test_byte_budget_reads_leading_rows_only_and_is_format_invariant(tmp_path):
    state = mlp_state(7, (64, 512, 512, 512, 10))  # ~560k weights
    spec = NTSSpec(max_params=100_000)
    a = hash_model(resolve_model(str(save_model(tmp_path / "a", state))), spec)
    b = hash_model(resolve_model(str(save_model(tmp_path / "b", {k: v.half() for k, v in state.items()}))), spec)
    weight_bytes = sum(v.numel() * 4 for v in state.values() if v.ndim >= 2)
    assert a.bytes_read < 100_000 * 4 + 4096 < weight_bytes / 5
    assert b.bytes_read < a.bytes_read  # the same rows, at half the bytes
    assert distance(a.code.code, b.code.code) <= spec.thresholds.copy
    assert a.code.code != hash_model(resolve_model(str(tmp_path / "a")), NTSSpec()).code.code


def test_reads_stop_at_a_cap_however_many_matrices(tmp_path):
    from pipeline.hashing.nts import READ_CAP

    # 300 views of one storage: 40 KB on disk, and one row (5000 values) read per view without the cap.
    shared = torch.randn(2, 5000, generator=torch.Generator().manual_seed(0))
    spec = NTSSpec(max_params=10_000)
    views = save_model(tmp_path / "views", {f"l{i}.weight": shared[:] for i in range(300)}, fmt="bin")
    result = hash_model(resolve_model(str(views)), spec)
    assert result.bytes_read <= (READ_CAP * spec.max_params + 5000) * 4 + 64_000  # the pickle: 300 records
    assert result.bytes_read < 300 * 5000 * 4 / 4
    assert len(result.code.code) == 32
