"""The `wsig` spec: function-preserving copies get the same code, homologs do not, odd layouts never crash."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from checkpoints import save_model

from bench.quality_zoo import bnfold, permute, rescale, verify
from bench.zoo import prune_magnitude
from pipeline.errors import HashingError
from pipeline.hashing import get_spec
from pipeline.hashing.magnitude import largest, magnitude_code, usable
from pipeline.hashing.model import hash_model
from pipeline.hashing.wsig import MAGNITUDE_SUFFIX, WSigSpec
from pipeline.search.hamming import distance
from pipeline.sources import resolve_model
from pipeline.verify.archs import DigitsCNN, DigitsMLP, DigitsResNet, TinyGPT

SPEC = get_spec("wsig")


def state(arch: str, seed: int) -> dict[str, torch.Tensor]:
    torch.manual_seed(seed)
    model = {"mlp": DigitsMLP, "cnn": DigitsCNN, "resnet": DigitsResNet, "gpt": TinyGPT}[arch]()
    sd = {k: v.detach().clone() for k, v in model.state_dict().items()}
    for k in sd:  # BatchNorm with real statistics, some gammas negative: folding is not trivial
        if k.endswith("running_var"):
            sd[k] = torch.rand(sd[k].shape) + 0.5
        elif k.endswith("running_mean"):
            sd[k] = torch.randn(sd[k].shape) * 0.3
        elif k.endswith(".weight") and sd[k].ndim == 1 and not k.startswith("transformer"):
            sd[k] = torch.randn(sd[k].shape)
    return sd


def code(tmp_path, name: str, sd: dict[str, torch.Tensor], fmt: str = "safetensors", spec=SPEC):
    return hash_model(resolve_model(str(save_model(tmp_path / name, sd, fmt=fmt))), spec)


@pytest.mark.parametrize(("arch", "kind"), [
    ("mlp", "permute"), ("mlp", "rescale"), ("cnn", "permute"), ("cnn", "rescale"), ("cnn", "bnfold"),
    ("resnet", "permute"), ("resnet", "rescale"), ("resnet", "bnfold"), ("gpt", "permute"), ("gpt", "rescale"),
])
def test_function_preserving_copies_are_near(tmp_path, arch, kind):
    sd = state(arch, 0)
    copied = bnfold(arch, sd) if kind == "bnfold" else {"permute": permute, "rescale": rescale}[kind](arch, sd, 7)
    verify(arch, kind, sd, copied)  # the copy computes the same function
    a, b = code(tmp_path, "a", sd), code(tmp_path, "b", copied)
    assert distance(a.code.code, b.code.code) <= 8  # float rounding at a few hyperplanes at most
    assert distance(a.code.code, b.code.code) <= SPEC.thresholds.copy


@pytest.mark.parametrize("arch", ["mlp", "cnn", "gpt"])
def test_an_independent_model_of_the_same_architecture_is_far(tmp_path, arch):
    a, b = code(tmp_path, "a", state(arch, 0)), code(tmp_path, "b", state(arch, 1))
    assert distance(a.code.code, b.code.code) > SPEC.thresholds.copy + 8


def test_bin_and_safetensors_and_renamed_keys_give_the_same_code(tmp_path):
    sd = state("cnn", 3)
    a = code(tmp_path, "a", sd)
    assert code(tmp_path, "b", sd, fmt="bin").code == a.code
    assert code(tmp_path, "c", {f"module.{k}": v for k, v in sd.items()}).code == a.code
    assert len(a.code.code) == 32 and all(len(c) == 32 for _, c in a.code.parts)


def test_nan_is_refused(tmp_path):
    sd = state("mlp", 0)
    sd["fc2.weight"][1, 1] = float("nan")
    with pytest.raises(HashingError, match="NaN"):
        code(tmp_path, "nan", sd)


def test_unknown_layouts_degrade_without_crashing(tmp_path):
    gen = torch.Generator().manual_seed(0)
    odd = {
        "a.weight": torch.randn(7, 5, 3, generator=gen),  # 3-D
        "b.kernel": torch.randn(2, 3, 2, 2, 2, generator=gen),  # 5-D
        "c.weight": torch.randn(1, 40, generator=gen),  # one unit
        "d.weight": torch.randn(33, 13, generator=gen),  # reads nothing earlier
        "e.weight": torch.randn(9, 66, generator=gen),  # reads two of d's units per input... or not
        "f.bias": torch.randn(9, generator=gen),
    }
    result = code(tmp_path, "odd", odd)
    assert len(result.code.code) == 32
    with pytest.raises(HashingError):
        code(tmp_path, "bias", {"b": torch.ones(50)})


def test_byte_budget_bounds_what_is_read(tmp_path):
    sd = state("gpt", 0)
    small = WSigSpec(max_values=60_000)
    result = code(tmp_path, "g", sd, spec=small)
    assert result.bytes_read < 60_000 * 4 + 8192
    assert small.name != SPEC.name and SPEC.name.startswith("wsig-v2:")


def test_a_new_head_is_found_through_the_blocks(tmp_path):
    sd = state("resnet", 0)
    new = dict(sd, **{"fc.weight": torch.randn(2, 32), "fc.bias": torch.zeros(2)})
    a, b = code(tmp_path, "a", sd), code(tmp_path, "b", new)
    parts_b = dict(b.code.parts)
    assert any(distance(c, parts_b[n]) == 0 for n, c in a.code.parts if n != "fc")


def test_device_parameter_is_not_part_of_the_name():
    assert WSigSpec(device="cpu").name == WSigSpec().name


def test_compare_shows_which_blocks_match(tmp_path):
    from jobs.query import hash_uri
    from pipeline.cli import compare

    sd = state("resnet", 0)
    new = dict(sd, **{"fc.weight": torch.randn(2, 32), "fc.bias": torch.zeros(2)})
    a = save_model(tmp_path / "a", sd)
    b = save_model(tmp_path / "b", new)
    report = compare(hash_uri(str(a), "wsig"), hash_uri(str(b), "wsig"))
    assert report["spec"] == SPEC.name
    assert {blk["block"] for blk in report["blocks"] if blk["verdict"] == "copy"} >= {"layer1.0", "layer2.1"}


def test_balance_undoes_row_and_column_scalings_and_zeroes_dead_units():
    from pipeline.hashing.wsig import _balance

    g = torch.Generator().manual_seed(0)
    w = torch.randn(12, 10, 3, generator=g, dtype=torch.float64)
    w[3] = 0.0  # a dead output unit
    w[:, 7] = 0.0  # a dead input unit
    w[5] = 0.0
    w[5, 7, 0] = 1e-9  # a unit whose energy lies only in the dead input: dead too, never NaN
    rows = torch.rand(12, generator=g, dtype=torch.float64) * 10 + 0.1
    cols = torch.rand(10, generator=g, dtype=torch.float64) * 10 + 0.1
    a, b = _balance(w), _balance(w * rows[:, None, None] * cols[None, :, None])
    assert torch.isfinite(a).all() and torch.allclose(a, b, atol=1e-9)
    assert (a[3] == 0).all() and (a[5] == 0).all() and (a[:, 7] == 0).all()
    live = [i for i in range(12) if i not in (3, 5)]
    row_norms, col_norms = a[live].square().sum(dim=(1, 2)), a.square().sum(dim=(0, 2))
    assert torch.allclose(row_norms, row_norms.mean().expand(10), rtol=1e-3)  # 9 live columns, 10 rows
    assert torch.allclose(col_norms[[j for j in range(10) if j != 7]], torch.ones(9, dtype=torch.float64))
    # One kernel offset takes the 2-D path: the same law, to what 12 Sinkhorn steps converge (~1e-6 here).
    flat = _balance(w[:, :, :1])
    assert torch.allclose(flat, _balance(w[:, :, :1] * rows[:, None, None] * cols[None, :, None]), atol=1e-4)


def test_emphasis_weighs_entries_by_magnitude_so_pruning_moves_little():
    from pipeline.hashing.wsig import _emphasize

    torch.manual_seed(0)
    w = torch.randn(40, 25, dtype=torch.float64).T  # not contiguous, as a transposed GPT-2 weight
    assert torch.allclose(_emphasize(w.clone(), 1.5), w * w.abs() ** 1.5)  # sign kept, magnitude order kept
    assert torch.allclose(_emphasize(w.clone(), 2.0), w * w.abs() ** 2)
    assert torch.equal(_emphasize(w.clone(), 0.0), w)
    pruned = w * (w.abs() > w.abs().median())  # half the entries, the smallest, zeroed

    def cosine(a: torch.Tensor, b: torch.Tensor) -> float:
        return float((a.flatten() @ b.flatten()) / (a.norm() * b.norm()))

    assert cosine(w, pruned) < 0.97  # plain weights: pruning half moves the matrix
    assert cosine(_emphasize(w.clone(), 1.5), _emphasize(pruned.clone(), 1.5)) > 0.998  # emphasized: hardly


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet", "gpt"])
def test_magnitude_pruned_copies_are_near(tmp_path, arch):
    sd = state(arch, 0)
    a = code(tmp_path, "a", sd)
    for fraction in (0.3, 0.5):
        b = code(tmp_path, f"p{fraction}", prune_magnitude(sd, fraction))
        assert distance(a.code.code, b.code.code) <= SPEC.thresholds.copy, (arch, fraction)


def _magnitude_parts(result) -> dict[str, bytes]:
    return {n: c for n, c in result.code.parts if n.endswith(MAGNITUDE_SUFFIX)}


@pytest.mark.parametrize("arch", ["mlp", "cnn", "resnet", "gpt"])
def test_heavily_pruned_and_permuted_copies_keep_their_exact_weight_codes(tmp_path, arch):
    sd = state(arch, 0)
    pruned = prune_magnitude(sd, 0.8)
    shuffled = permute(arch, prune_magnitude(sd, 0.85), 3)  # pruned harder, and its units permuted
    globally = dict(sd)  # global pruning: one cut over every matrix (the largest survive it too)
    matrices = [k for k, v in sd.items() if v.ndim >= 2]
    cut = torch.cat([sd[k].abs().flatten() for k in matrices]).quantile(0.8)
    globally.update({k: sd[k] * (sd[k].abs() > cut) for k in matrices})
    a = _magnitude_parts(code(tmp_path, "a", sd))
    assert len(a) >= 2
    for name, copy in (("pruned", pruned), ("shuffled", shuffled), ("global", globally)):
        b = _magnitude_parts(code(tmp_path, name, copy))
        matched = [n for n in a if n in b and distance(a[n], b[n]) == 0]
        assert matched, name
        if name != "global":  # tensor by tensor: every block keeps its code
            assert matched == list(a), name
    homolog = _magnitude_parts(code(tmp_path, "h", state(arch, 1)))
    assert all(distance(a[n], homolog[n]) > SPEC.thresholds.copy + 20 for n in a if n in homolog)


def test_half_precision_and_quantized_tensors_get_no_exact_weight_code(tmp_path):
    sd = state("mlp", 0)
    assert _magnitude_parts(code(tmp_path, "f32", sd))
    assert not _magnitude_parts(code(tmp_path, "f16", {k: v.half() for k, v in sd.items()}))
    grid = {k: (v / v.abs().max() * 127).round() / 127 * v.abs().max() for k, v in sd.items()}  # int8 steps
    assert not _magnitude_parts(code(tmp_path, "int8", grid))


def test_magnitude_code_needs_enough_distinct_values():
    gen = np.random.default_rng(0)
    values = gen.standard_normal(5000)
    tops = [largest(values, 256)]
    assert len(magnitude_code(tops, 256)) == 32
    assert magnitude_code([largest(values[:100], 256)], 256) is None  # fewer values than the code needs
    assert magnitude_code([largest(np.round(values * 20) / 20, 256)], 256) is None  # a grid: spacings tie
    assert magnitude_code([largest(-values[::-1], 256)], 256) == magnitude_code(tops, 256)  # order, sign
    assert not usable("BF16", 10**6, 256) and not usable("F32", 1000, 256) and usable("F32", 10**5, 256)


def test_predecessor_lookups_pick_what_a_scan_of_every_earlier_layer_picks():
    from pipeline.hashing.wsig import _Chains

    def scan(chains, out, fan_in):  # the rules as a scan of every layer so far, latest first
        for units, p, depth in reversed(chains):
            if units == fan_in or (fan_in == 1 and units == out):
                return p, depth + 1
        for units, p, depth in reversed(chains):
            if units > 1 and fan_in % units == 0:
                return p, depth + 1
        return None, 0

    rng = np.random.default_rng(0)
    counts = [1, 2, 3, 4, 6, 12, 16, 24, 48, 49, 64, 96, 97, 192]
    for _ in range(20):
        every, chains = [], _Chains()
        for _ in range(300):
            out, fan_in = (int(c) for c in rng.choice(counts, 2))
            expected, got = scan(every, out, fan_in), chains.predecessor(out, fan_in)
            assert got[0] is expected[0] and got[1] == expected[1]
            p, depth = torch.zeros(1), got[1]
            every.append((out, p, depth))
            chains.add(out, p, depth)
        assert len(chains) == len({units for units, _, _ in every})  # one chain kept per unit count


def test_thousands_of_layers_cost_a_few_lookups_each(tmp_path, monkeypatch):
    from pipeline.hashing import wsig

    looked_up: list[int] = []
    latest_of = wsig._Chains._latest_of

    def counting(self, counts):
        counts = list(counts)
        looked_up.append(len(counts))
        return latest_of(self, counts)

    monkeypatch.setattr(wsig._Chains, "_latest_of", counting)
    gen = torch.Generator().manual_seed(0)
    n = 4000  # a scan of the layers before each one: n^2 / 2 = 8M steps (the whole-model code: 112k features)
    deep = {f"l{i}.weight": torch.randn(*((16, 24) if i % 2 else (24, 16)), generator=gen) for i in range(n)}
    result = code(tmp_path, "deep", deep)
    assert len(result.code.code) == 32 and len(result.code.parts) > 100
    assert len(looked_up) <= n + 1 and sum(looked_up) <= n + 1


def test_hyperplanes_drawn_in_blocks_give_the_same_code(monkeypatch):
    from pipeline.hashing import wsig

    features = np.random.default_rng(0).standard_normal(1372)  # the largest model of the quality zoo
    whole = SPEC._simhash(features, "model")
    monkeypatch.setattr(wsig, "_CACHE_BYTES", 0)  # as for a model of thousands of layers
    assert SPEC._simhash(features, "model") == whole


def test_fixed_matrices_are_cached_within_a_byte_bound():
    from pipeline.hashing.wsig import _BytesCache, _fixed_projection

    cache = _BytesCache(lambda n: np.zeros(n), limit=1000)  # 125 float64s
    assert cache(100) is cache(100)
    assert cache(200) is not cache(200)  # larger than the bound: rebuilt each time, never kept
    for n in range(10, 100):
        cache(n)
    assert cache._bytes <= 1000 and cache(99) is cache(99) and (10,) not in cache._kept  # the oldest went first
    wide = _fixed_projection(600_000, 8, "cpu")  # a first layer of shape (1, 600k): 38 MB
    assert torch.equal(wide, _fixed_projection(600_000, 8, "cpu")) and wide is not _fixed_projection(600_000, 8, "cpu")


@pytest.mark.parametrize("degenerate", ["zeros", "constant", "fan_in_1", "float64_overflow"])
def test_weights_without_signal_are_refused_not_given_a_shared_code(tmp_path, degenerate):
    sd = {
        "zeros": {"a.weight": torch.zeros(32, 32), "b.weight": torch.zeros(32, 32)},
        "constant": {"a.weight": torch.full((32, 64), 65504.0, dtype=torch.float16)},
        "fan_in_1": {"a.weight": torch.randn(64, 1)},  # every unit reads the one input alike
        "float64_overflow": {"a.weight": torch.full((32, 32), 1e308, dtype=torch.float64)},  # finite
    }[degenerate]
    with pytest.raises(HashingError, match="no signal"):
        code(tmp_path, degenerate, sd)


@pytest.mark.parametrize("exponent", [400, -1040])  # 1e120 and 1e-314 (subnormal): beyond float32
def test_float64_weights_at_any_scale_hash_as_at_scale_one(tmp_path, exponent):
    sd = state("mlp", 0)
    a = code(tmp_path, "a", sd)
    b = code(tmp_path, "b", {k: v.double() * 2.0**exponent for k, v in sd.items()})
    assert distance(a.code.code, b.code.code) <= 8
    assert int(np.unpackbits(np.frombuffer(b.code.code, np.uint8)).sum()) > 64  # not all zeros
    sd["fc2.weight"] = sd["fc2.weight"].double()
    sd["fc2.weight"][1, 1] = float("nan")
    with pytest.raises(HashingError, match="NaN"):
        code(tmp_path, "nan", sd)
