"""Stage 2 on real models trained here on digits: copies, homologs, unrelated models and bad inputs.

The models train in a few seconds (module-scoped); every checkpoint goes through the real loader
(`pipeline.formats` -> `load_runnable`), as a sweep would read it.
"""

from __future__ import annotations

import copy
import json
import os
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F
from checkpoints import save_model
from safetensors.torch import save_file
from torch import nn

from bench.quality_zoo import bnfold
from bench.zoo import fine_tune, load_digits_split, make_model, state_dict_of, torch_threads, train_cnn, train_mlp
from pipeline.cli import main as cli_main
from pipeline.errors import VerifyError
from pipeline.verify.archs import TinyGPT
from pipeline.verify.behavior import (
    CONFERRABLE_THRESHOLDS,
    MARGINS,
    THRESHOLDS,
    Calibration,
    calibrate,
    core_points,
    make_probe,
    prior_corrected,
    verify_group,
    verify_pair,
    verify_uris,
)
from pipeline.verify.runnable import RunnableModel, load_runnable
from pipeline.verify.surrogates import distil_surrogates

POINTS = 100  # a smaller probe than the default keeps the file fast; the verdicts hold at this size


def _distill(teacher: nn.Module, data, seed: int, epochs: int = 30, temperature: float = 2.0) -> nn.Module:
    """A student of the same architecture trained only on the teacher's soft labels."""
    student = make_model("mlp", seed)
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(student.parameters(), lr=1e-3)
    student.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(data.x_train), generator=gen).split(64):
            x = data.x_train[batch]
            with torch.no_grad():
                soft = F.softmax(teacher(x) / temperature, dim=1)
            opt.zero_grad()
            F.kl_div(F.log_softmax(student(x) / temperature, dim=1), soft, reduction="batchmean").backward()
            opt.step()
    return student.eval()


def _train_on(model: nn.Module, data, labels: torch.Tensor, seed: int, epochs: int, params=None) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=1e-3)
    model.train()
    for _ in range(epochs):
        for batch in torch.randperm(len(labels), generator=gen).split(64):
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), labels[batch]).backward()
            opt.step()
    return model.eval()


def _new_head(model: nn.Module, data, seed: int) -> nn.Module:
    """Another task on the same body: a 2-class head (digit >= 5) trained on top of frozen layers."""
    torch.manual_seed(seed)
    model = copy.deepcopy(model)
    model.fc3 = nn.Linear(model.fc3.in_features, 2)
    return _train_on(model, data, (data.y_train >= 5).long(), seed, 5, params=model.fc3.parameters())


def _confident_gpt(seed: int) -> dict[str, torch.Tensor]:
    """An untrained TinyGPT whose (tied) head is scaled up: random, but confident like a trained one.

    (Its guess is mostly the last token again, for every seed: fine for the loader and the search, not
    for telling homologs apart.)
    """
    torch.manual_seed(seed)
    state = TinyGPT().state_dict()
    state["transformer.wte.weight"] = state["transformer.wte.weight"] * 100
    return state


@pytest.fixture(scope="module", autouse=True)
def _one_torch_thread():
    """This module's models are tiny: one torch thread for all of it (more only contend on a shared
    machine), the caller's setting restored after it."""
    with torch_threads(1):
        yield


@pytest.fixture(scope="module")
def zoo(tmp_path_factory: pytest.TempPathFactory) -> dict[str, str]:
    """Model folders by role, trained on digits."""
    root = tmp_path_factory.mktemp("verify_zoo")
    data = load_digits_split()
    source = train_mlp(data, seed=0)
    homolog = train_mlp(data, seed=1)
    states = {
        "source": state_dict_of(source),
        "finetuned": state_dict_of(fine_tune(source, data, seed=1000)),
        "distilled": state_dict_of(_distill(source, data, seed=100)),
        "homolog": state_dict_of(homolog),
        "homolog2": state_dict_of(train_mlp(data, seed=2)),
        "homolog3": state_dict_of(train_mlp(data, seed=3)),
        "homolog4": state_dict_of(train_mlp(data, seed=4)),
        # Same inputs and label space, another task: labels permuted.
        "unrelated": state_dict_of(_train_on(make_model("mlp", 50), data, (data.y_train * 3 + 1) % 10, 50, 15)),
        "newhead": state_dict_of(_new_head(source, data, 7)),
        "newhead-homolog": state_dict_of(_new_head(homolog, data, 7)),
    }
    paths = {name: str(save_model(root / name, sd)) for name, sd in states.items()}
    base = states["source"]
    paths["fp16"] = str(save_model(root / "fp16", {k: v.half() for k, v in base.items()}))
    paths["bf16-model"] = str(save_model(root / "bf16", {f"model.{k}": v.bfloat16() for k, v in base.items()}))
    paths["module-bin"] = str(save_model(root / "bin", {f"module.{k}": v for k, v in base.items()}, fmt="bin"))
    nan = {k: v.clone() for k, v in base.items()}
    nan["fc1.weight"][0, :] = float("nan")
    paths["nan"] = str(save_model(root / "nan", nan))
    cnn = state_dict_of(train_cnn(data, seed=0, epochs=2))
    paths["cnn"] = str(save_model(root / "cnn", cnn, arch="cnn"))
    paths["cnn-folded"] = str(save_model(root / "cnn-folded", bnfold("cnn", cnn), arch="cnn"))
    gpt = _confident_gpt(0)
    paths["gpt"] = str(save_model(root / "gpt", gpt, arch="gpt"))
    paths["gpt-renamed"] = str(save_model(root / "gpt-renamed", {f"module.{k}": v for k, v in gpt.items()}, arch="gpt"))
    paths["gpt-homolog"] = str(save_model(root / "gpt-homolog", _confident_gpt(1), arch="gpt"))
    truncated = save_model(root / "truncated", base)
    raw = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(raw[: len(raw) // 2])
    paths["truncated"] = str(truncated)
    paths["unknown-arch"] = str(save_model(root / "unknown", base, arch="nonesuch"))
    np.save(root / "seeds.npy", data.x_test.numpy())
    paths["seeds"] = str(root / "seeds.npy")
    paths["root"] = str(root)
    return paths


@pytest.fixture(scope="module")
def probe(zoo):
    return make_probe(load_runnable(zoo["source"]), n=POINTS)


def _suspect(zoo, name: str):
    return load_runnable(zoo[name])


# ------------------------------------------------------------------------------------- verdicts


def test_fine_tuned_and_distilled_copies_are_pirated_and_above_the_homolog(zoo, probe):
    homolog = {m: verify_pair(probe, _suspect(zoo, "homolog"), m) for m in ("agreement", "distance")}
    assert all(v.verdict == "homolog" for v in homolog.values()), homolog
    for name in ("finetuned", "distilled"):
        agreement = verify_pair(probe, _suspect(zoo, name), "agreement")
        distance = verify_pair(probe, _suspect(zoo, name), "distance")
        assert distance.verdict == "pirated", (name, distance)
        assert agreement.score > homolog["agreement"].score, (name, agreement, homolog)
        assert distance.score < homolog["distance"].score, (name, distance, homolog)
    assert verify_pair(probe, _suspect(zoo, "finetuned"), "agreement").verdict == "pirated"


def test_evidence_names_the_score_the_thresholds_and_the_core_points(zoo, probe):
    v = verify_pair(probe, _suspect(zoo, "finetuned"), "agreement")
    assert v.thresholds == THRESHOLDS["agreement"].as_dict()
    assert v.evidence["core_points"] == POINTS and v.evidence["agreement"] == pytest.approx(v.score, abs=1e-4)
    assert v.evidence["source_confidence"] >= 0.85  # the core points are confident for the source
    assert v.source == "source" and v.suspect == "finetuned" and v.reason is None
    json.dumps(v.to_dict())


def test_a_model_of_another_task_is_unrelated(zoo, probe):
    for method in ("agreement", "distance"):
        v = verify_pair(probe, _suspect(zoo, "unrelated"), method)
        assert v.verdict == "unrelated", v


def test_ddv_compares_models_whose_heads_differ(zoo, probe):
    for name in ("newhead", "newhead-homolog"):
        v = verify_pair(probe, _suspect(zoo, name), "ddv")
        assert v.verdict != "error" and -1.0 <= v.score <= 1.0, v
        assert v.evidence["suspect_outputs"] == 2 and v.evidence["label_spaces_differ"]
        assert v.thresholds == THRESHOLDS["ddv-heads"].as_dict()


def test_cluster_puts_copies_with_the_source(zoo, probe):
    # (A distilled copy behaves much like a homolog on digits: clustering groups it with them.)
    suspects = [_suspect(zoo, n) for n in ("finetuned", "homolog2", "fp16", "unrelated")]
    verdicts = verify_group(probe, suspects, {"homolog": [_suspect(zoo, "homolog")]})
    assert [v.verdict for v in verdicts] == ["pirated", "homolog", "pirated", "unrelated"], verdicts
    assert verdicts[0].score > 0.5 > verdicts[1].score
    assert verdicts[0].evidence["references"]["homolog"] == ["homolog"]
    # Without references, the suspects alone make the group; the unrelated model stays out of it.
    verdicts = verify_group(probe, suspects)
    assert [v.verdict for v in verdicts] == ["pirated", "homolog", "pirated", "unrelated"], verdicts
    alone = verify_pair(probe, _suspect(zoo, "finetuned"), "cluster")
    assert alone.verdict == "error" and "group" in alone.reason


def test_probe_is_deterministic(zoo):
    source = load_runnable(zoo["source"])
    a, b = core_points(source, n=20, seed=3), core_points(source, n=20, seed=3)
    assert torch.equal(a.inputs, b.inputs) and torch.equal(a.labels, b.labels)
    assert sorted(set(a.labels.tolist())) == list(range(10))  # targets spread over every class
    boundary = core_points(source, n=20, variant="boundary")
    assert float(boundary.confidence.mean()) < float(a.confidence.mean())


# ------------------------------------------------------------------------------------ calibration


def test_the_calibration_rule():
    cal = Calibration("s", {"agreement": {"a": 0.8, "b": 0.6}, "distance": {"a": 0.2, "b": 0.3}})
    agreement, distance = cal.thresholds("agreement"), cal.thresholds("distance")
    # Pirated: half the gap from the closest reference (0.8) to the source (1.0); unrelated: the global cut,
    # lower than 3/4 of the farthest reference's 0.6.
    assert (agreement.pirated, agreement.unrelated) == pytest.approx((0.9, 0.2))
    assert cal.calibrated_score("agreement", 0.9) == pytest.approx(MARGINS["agreement"])
    assert cal.calibrated_score("agreement", 0.7) < 0 < cal.calibrated_score("agreement", 0.85)
    # Distance in closeness units (1 - distance): pirated within (1 - margin) x the closest reference's.
    assert not distance.higher_is_closer and distance.pirated == pytest.approx((1 - MARGINS["distance"]) * 0.2)
    assert distance.unrelated == pytest.approx(THRESHOLDS["distance"].unrelated)
    assert cal.calibrated_score("distance", 0.1) == pytest.approx(0.5)
    # Without the closest reference the cut follows the next; a source far from its homologs gets a wide gap.
    assert cal.excluding("a").thresholds("agreement").pirated == pytest.approx(0.8)
    far = Calibration("s", {"agreement": {"a": 0.25, "b": 0.2}}).thresholds("agreement")
    assert far.pirated == pytest.approx(0.625) and far.unrelated == pytest.approx(0.15)
    # No references, or one that matches the source exactly: no per-source cut (the global ones judge).
    assert cal.thresholds("ddv") is None and cal.calibrated_score("ddv", 0.9) is None
    assert Calibration("s", {"agreement": {"twin": 1.0}}).thresholds("agreement") is None


def test_references_put_a_held_out_homolog_below_the_cut_and_copies_above(zoo, probe):
    cal = calibrate(probe, [_suspect(zoo, "homolog2")])
    assert set(cal.references("agreement")) == {"homolog2"} and not cal.failed
    for method in ("agreement", "distance", "ddv"):
        homolog = verify_pair(probe, _suspect(zoo, "homolog"), method, calibration=cal)
        tuned = verify_pair(probe, _suspect(zoo, "finetuned"), method, calibration=cal)
        assert homolog.verdict == "homolog" and tuned.verdict == "pirated", (homolog, tuned)
        assert homolog.calibrated_score < MARGINS[method] <= tuned.calibrated_score, (homolog, tuned)
        assert tuned.thresholds == cal.thresholds(method).as_dict() != THRESHOLDS[method].as_dict()
        assert tuned.evidence["calibration"]["thresholds"] == "per source"
        assert tuned.evidence["calibration"]["references"] == {"homolog2": cal.references(method)["homolog2"]}
    # A probe made with references carries them; without, the global thresholds judge and say so.
    own = make_probe(load_runnable(zoo["source"]), n=POINTS, references=[_suspect(zoo, "homolog2")],
                     conferrable=False)
    assert own.calibration.references("agreement") == cal.references("agreement") and own.shaped_by is None
    plain = verify_pair(probe, _suspect(zoo, "finetuned"), "agreement")
    assert plain.calibrated_score is None and plain.evidence["calibration"] == "global"


def test_a_reference_that_cannot_load_or_compare_is_reported_and_skipped(zoo, probe):
    missing = os.path.join(zoo["root"], "missing")
    refs = {"homolog2": _suspect(zoo, "homolog2"), missing: VerifyError(f"{missing}: no such file or folder"),
            "gpt": _suspect(zoo, "gpt"), "newhead": _suspect(zoo, "newhead")}
    cal = calibrate(probe, refs)
    assert set(cal.references("agreement")) == set(cal.references("ddv")) == {"homolog2"}
    assert "no such file" in cal.failed[missing] and "input kinds differ" in cal.failed["gpt"]
    assert "2 outputs" in cal.failed["newhead"]  # another head: not a reference for ddv either
    v = verify_pair(probe, _suspect(zoo, "homolog"), "agreement", calibration=cal)
    assert v.evidence["calibration"]["failed"] == cal.failed and v.calibrated_score is not None
    # Nothing usable: the global thresholds judge, and the verdict says why.
    none = calibrate(probe, {missing: "cannot load"})
    v = verify_pair(probe, _suspect(zoo, "finetuned"), "agreement", calibration=none)
    assert v.verdict == "pirated" and v.thresholds == THRESHOLDS["agreement"].as_dict()
    assert v.evidence["calibration"]["thresholds"].startswith("global (no usable reference")
    # verify_uris loads references by URI; a broken one never stops the pair.
    v = verify_uris(zoo["source"], zoo["finetuned"], "distance", n=40, references=[zoo["homolog2"], missing],
                    conferrable=False)
    assert v.verdict == "pirated" and v.evidence["calibration"]["thresholds"] == "per source"
    assert list(v.evidence["calibration"]["failed"]) == [missing]


# ------------------------------------------------------------------------------------ conferrable


@pytest.fixture(scope="module")
def conferrable(zoo):
    """A conferrable probe of the source: three homolog references, two surrogates distilled from it."""
    seeds = np.load(zoo["seeds"])
    return make_probe(load_runnable(zoo["source"]), seeds=seeds, n=POINTS,
                      references=[_suspect(zoo, n) for n in ("homolog2", "homolog3", "homolog4")])


def test_surrogates_are_fresh_students_that_answer_like_the_source(zoo):
    source = load_runnable(zoo["source"])
    data = load_digits_split()
    students = distil_surrogates(source, seeds=data.x_test.numpy())
    assert [m.name.split("(")[-1] for m in students] == ["soft)", "labels)", "soft, round 2)", "labels, round 2)"]
    want = source.logits(data.x_test).argmax(1)
    for student in students:
        assert (student.logits(data.x_test).argmax(1) == want).float().mean() > 0.85
        weights = dict(student.module.named_parameters())
        for name, p in source.module.named_parameters():  # new weights, none of the source's
            assert not torch.allclose(p, weights[name], atol=1e-3), name


def test_conferrable_probe_keeps_copies_and_rejects_homologs(zoo, conferrable):
    assert conferrable.core.variant == "conferrable" and len(conferrable.core.labels) == POINTS
    assert conferrable.shaped_by["references"] == ["homolog2", "homolog3", "homolog4"]
    assert len(conferrable.shaped_by["surrogates"]) == 4
    # The search pushed the reference away: it rarely gives the source's label on these points.
    reference = verify_pair(conferrable, _suspect(zoo, "homolog2"), "agreement")
    tuned = verify_pair(conferrable, _suspect(zoo, "finetuned"), "agreement")
    distilled = verify_pair(conferrable, _suspect(zoo, "distilled"), "agreement")
    homolog = verify_pair(conferrable, _suspect(zoo, "homolog"), "agreement")  # unseen by the probe
    unrelated = verify_pair(conferrable, _suspect(zoo, "unrelated"), "agreement")
    assert reference.score < 0.2 and unrelated.score < 0.1 and unrelated.verdict != "pirated"
    assert tuned.verdict == "pirated" and homolog.verdict == "homolog"
    assert tuned.score >= CONFERRABLE_THRESHOLDS["agreement"].pirated > homolog.score
    # A student distilled on the clean training inputs alone (no noisy queries) is no surrogate's match:
    # it ranks below the fine-tune, among the homologs.
    assert tuned.score > distilled.score
    calibration = tuned.evidence["calibration"]
    assert calibration["thresholds"].startswith("conferrable") and calibration["references"][0] == "homolog2"
    # ddv's input pairs are not shaped by the references: they calibrate it as before.
    cal = conferrable.calibration
    assert cal.references("agreement") == {} and "homolog2" in cal.references("ddv")
    ddv = verify_pair(conferrable, _suspect(zoo, "finetuned"), "ddv")
    assert ddv.evidence["calibration"]["thresholds"] == "per source"


class _Tilted(nn.Module):
    """A model whose logits lean toward class 0, as a copy pruned into a favoured class does."""

    def __init__(self, module: nn.Module, lean: float) -> None:
        super().__init__()
        self.inner, self.lean = module, lean

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.inner(x)
        return out + F.one_hot(torch.zeros(len(out), dtype=torch.long), out.shape[1]) * self.lean


def _tilted(model, lean: float):
    return RunnableModel(_Tilted(model.module, lean), model.domain, model.n_outputs, name=f"{model.name} tilted",
                         arch=model.arch)


def test_conferrable_score_divides_out_a_suspects_class_prior(zoo, conferrable):
    probs = torch.tensor([[0.7, 0.2, 0.1], [0.6, 0.3, 0.1], [0.5, 0.1, 0.4]])
    corrected = prior_corrected(probs)
    assert torch.allclose(corrected.sum(1), torch.ones(3))
    assert corrected.argmax(1).tolist() == [0, 1, 2]  # raw argmax: all class 0
    # The source itself, tilted until most of its raw labels collapse onto class 0: divided by its prior,
    # its preferences follow the source's again; a tilted homolog's do not. The score is the corrected
    # agreement; the raw one stays in the evidence.
    source = load_runnable(zoo["source"])
    lean = float(source.logits(conferrable.core.inputs).std()) * 3
    copy_ = verify_pair(conferrable, _tilted(source, lean), "agreement")
    homolog = verify_pair(conferrable, _tilted(_suspect(zoo, "homolog"), lean), "agreement")
    raw, corrected = copy_.evidence["agreement"], copy_.evidence["prior_agreement"]
    assert copy_.score == corrected >= raw + 0.1 and raw < 0.5
    assert homolog.verdict != "pirated"
    assert homolog.score == homolog.evidence["prior_agreement"] < CONFERRABLE_THRESHOLDS["agreement"].pirated
    assert corrected > homolog.score + 0.1, (copy_.evidence, homolog.evidence)


def test_conferrable_probe_needs_a_reference_that_fits(zoo):
    source = load_runnable(zoo["source"])
    with pytest.raises(VerifyError, match="input kinds differ"):
        make_probe(source, n=20, references={"gpt": _suspect(zoo, "gpt")}, conferrable=True)
    # By default fewer than three usable references leave DeepCore's core points, calibrated on them.
    probe = make_probe(source, n=20, references={"gpt": _suspect(zoo, "gpt"), "homolog2": _suspect(zoo, "homolog2")})
    assert probe.shaped_by is None and probe.core.variant == "core"
    assert "input kinds differ" in probe.calibration.failed["gpt"] and probe.calibration.references("agreement")
    # A surrogate that does not fit is skipped with the reason; the references still shape the probe.
    probe = make_probe(source, n=20, steps=5, references=[_suspect(zoo, "homolog2")],
                       surrogates=[_suspect(zoo, "newhead")], conferrable=True)
    assert probe.shaped_by["surrogates"] == [] and "label spaces differ" in probe.shaped_by["skipped"]["newhead"]


def test_conferrable_token_probe_and_surrogates(zoo):
    source = load_runnable(zoo["gpt"])
    (student,) = distil_surrogates(source, kinds=("soft",), steps=3, rounds=1)
    assert student.domain == source.domain and student.n_outputs == 256
    probe = make_probe(source, n=10, steps=2, pairs=10, references=[load_runnable(zoo["gpt-homolog"])],
                       surrogates=[student], conferrable=True)
    assert probe.core.variant == "conferrable" and probe.core.inputs.dtype == torch.int64
    assert verify_pair(probe, load_runnable(zoo["gpt-renamed"]), "agreement").score == 1.0


def test_conferrable_search_halves_its_pool_to_the_most_conferrable(zoo, monkeypatch):
    from pipeline.verify import core_points as cp

    source, refs, seeds = load_runnable(zoo["source"]), [_suspect(zoo, "homolog2")], np.load(zoo["seeds"])
    searched, scored = [], []
    gradient, score = cp._Shaping.gradient, cp._Shaping.score

    def spy_gradient(self, x, targets):
        searched.append(x.detach().clone())
        return gradient(self, x, targets)

    def spy_score(self, x, targets):
        scored.append((x.clone(), score(self, x, targets)))
        return scored[-1][1]

    monkeypatch.setattr(cp._Shaping, "gradient", spy_gradient)
    monkeypatch.setattr(cp._Shaping, "score", spy_score)
    core = cp.conferrable_points(source, refs, seeds=seeds, n=10, steps=4, pool=4, halve=((0.5, 2),))
    # 40 starts for two steps, then the 20 most conferrable for the other two, the 10 best of those kept.
    assert [len(x) for x in searched] == [40, 40, 20, 20] and [len(x) for x, _ in scored] == [40, 20]
    (at_cut, cut_scores), (at_end, end_scores) = scored
    order = cut_scores.argsort(descending=True)
    assert cut_scores[order[:20]].min() >= cut_scores[order[20:]].max()
    assert torch.equal(searched[2], at_cut[order[:20]])
    assert torch.equal(core.inputs, at_end[end_scores.argsort(descending=True)[:10]])
    with pytest.raises(ValueError, match="halving"):
        cp.conferrable_points(source, refs, n=10, steps=4, halve=((0.5, 8),))


def test_probe_progress_counts_every_training_and_search_step(zoo, capsys):
    from pipeline.verify import core_points as cp

    source, refs, seeds = load_runnable(zoo["source"]), [_suspect(zoo, "homolog2")], np.load(zoo["seeds"])
    trained, searched = [], []
    students = distil_surrogates(source, seeds=seeds, steps=3, rounds=2, progress=trained.append)
    assert sum(trained) == 2 * 2 * 3 and len(students) == 4
    cp.conferrable_points(source, refs, students, seeds=seeds, n=5, steps=4, progress=searched.append)
    assert sum(searched) == 4
    # Asked for on the CLI's behalf: no bar where stderr is no terminal, and the same probe.
    options = {"seeds": seeds, "n": 5, "steps": 4, "references": refs, "surrogates": students, "conferrable": True}
    shown, quiet = make_probe(source, **options, progress=True), make_probe(source, **options)
    assert torch.equal(shown.core.inputs, quiet.core.inputs)
    assert "conferrable probe" not in capsys.readouterr().err


def test_workers_run_jobs_side_by_side_on_one_torch_thread_each():
    import threading

    from pipeline.verify.workers import Workers

    with torch_threads(2):
        with Workers(4) as workers:
            seen = workers.map(lambda i: (i, threading.current_thread().name, torch.get_num_threads()), range(4))
        assert [i for i, _, _ in seen] == [0, 1, 2, 3]  # the items' order
        assert all(name.startswith("modelhash-probe") and n == 1 for _, name, n in seen)
        assert torch.get_num_threads() == 2  # restored
        assert Workers(4, "cuda").size == 1 and Workers(1).size == 1  # a GPU's jobs, or one job: in the caller
    with torch_threads(1), Workers(4) as workers:
        assert workers.map(lambda _: threading.current_thread(), [0]) == [threading.current_thread()]
    with torch_threads(2):
        with pytest.raises(ZeroDivisionError), Workers(2) as workers:
            workers.map(lambda i: 1 / i, [1, 0])
        assert torch.get_num_threads() == 2  # restored after a failed job too


def test_conferrable_probe_is_the_same_built_side_by_side(zoo):
    from pipeline.verify import core_points as cp

    source, refs, seeds = load_runnable(zoo["source"]), [_suspect(zoo, "homolog2")], np.load(zoo["seeds"])
    runs = []
    for n in (1, 2):  # one after another in the caller's thread; two workers of one torch thread each
        with torch_threads(n):
            students = distil_surrogates(source, seeds=seeds, steps=5, rounds=2)
            core = cp.conferrable_points(source, refs, students, seeds=seeds, n=10, steps=6)
        runs.append(([m.module.state_dict() for m in students], core))
    (weights_1, core_1), (weights_2, core_2) = runs
    for a, b in zip(weights_1, weights_2, strict=True):
        assert all(torch.equal(a[k], b[k]) for k in a)
    assert torch.equal(core_1.inputs, core_2.inputs) and torch.equal(core_1.labels, core_2.labels)


class _BranchyCNN(nn.Module):
    """A BatchNorm CNN whose forward branches on its input's values: torch.fx cannot trace it."""

    def __init__(self) -> None:
        super().__init__()
        self.conv, self.bn, self.fc = nn.Conv2d(1, 4, 3, padding=1), nn.BatchNorm2d(4), nn.Linear(256, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = F.relu(self.bn(self.conv(x.reshape(-1, 1, 8, 8))))
        return self.fc(h.flatten(1)) if float(x.detach().sum()) > -1e9 else self.fc(h.flatten(1)) * 0


def test_search_runs_a_folded_channels_last_copy_with_the_same_outputs():
    from pipeline.verify.archs import DigitsCNN, DigitsResNet
    from pipeline.verify.core_points import _for_search
    from pipeline.verify.runnable import InputDomain

    torch.manual_seed(0)
    x = torch.randn(32, 64)
    for module in (DigitsCNN(), DigitsResNet(), _BranchyCNN()):
        for bn in (m for m in module.modules() if isinstance(m, nn.BatchNorm2d)):  # eval statistics not 0 / 1
            bn.running_mean.uniform_(-1, 1)
            bn.running_var.uniform_(0.5, 2)
            bn.weight.data.uniform_(0.5, 2)
        model = RunnableModel(module, InputDomain("continuous", (64,)), 10, name=type(module).__name__, arch="x")
        run = _for_search(model, model.device)
        inputs = x.clone().requires_grad_(True)
        out = run(inputs)
        assert torch.allclose(out, model.logits(x), atol=1e-4), model.name
        (grad,) = torch.autograd.grad(out.sum(), inputs)  # the search's gradient flows to the inputs
        assert grad.abs().sum() > 0
        assert any(isinstance(m, nn.BatchNorm2d) for m in model.module.modules())  # the model is left as it was
        assert not any(p.requires_grad for p in model.module.parameters())


def test_probe_cache_pays_the_search_once_and_survives_a_bad_entry(zoo, tmp_path, caplog):
    from pipeline.verify.probe_cache import ProbeCache

    source = load_runnable(zoo["source"])
    refs = [_suspect(zoo, "homolog2")]
    options = {"n": 20, "steps": 5, "references": refs, "conferrable": True}
    first = make_probe(source, cache=tmp_path, **options)
    entries = list(tmp_path.glob("*.safetensors"))
    assert len(entries) == 1 and "cached" not in first.shaped_by
    again = make_probe(source, cache=ProbeCache(tmp_path), **options)
    assert again.shaped_by["cached"] == str(tmp_path) and again.shaped_by["surrogates"] == first.shaped_by["surrogates"]
    assert torch.equal(again.core.inputs, first.core.inputs) and torch.equal(again.core.labels, first.core.labels)
    assert again.seconds < first.seconds and again.core.seconds == first.core.seconds  # the search's own time
    # Anything that decides the points makes a new entry: another reference, another seed, other weights.
    make_probe(source, cache=tmp_path, **{**options, "references": [_suspect(zoo, "homolog3")]})
    make_probe(source, cache=tmp_path, seed=1, **options)
    make_probe(_suspect(zoo, "finetuned"), cache=tmp_path, **options)
    assert len(list(tmp_path.glob("*.safetensors"))) == 4
    # A truncated entry is a miss: logged, searched again, rewritten.
    entries[0].write_bytes(entries[0].read_bytes()[:100])
    with caplog.at_level("WARNING"):
        redone = make_probe(source, cache=tmp_path, **options)
    assert "unreadable" in caplog.text and "cached" not in redone.shaped_by
    assert torch.equal(redone.core.inputs, first.core.inputs)
    assert make_probe(source, cache=tmp_path, **options).shaped_by["cached"]
    # A cache that cannot be written to costs the next query a search, never this one its probe.
    (tmp_path / "file").write_text("not a folder")
    caplog.clear()
    with caplog.at_level("WARNING"):
        unstored = make_probe(source, cache=tmp_path / "file" / "probes", **options)
    assert "cannot store" in caplog.text and torch.equal(unstored.core.inputs, first.core.inputs)


def test_cli_conferrable_by_default_with_references(zoo, capsys, probe_cache):
    rc = cli_main(["verify", zoo["source"], zoo["finetuned"], zoo["homolog"], "--reference", zoo["homolog2"],
                   "--reference", zoo["homolog3"], "--reference", zoo["homolog4"], "--seeds", zoo["seeds"],
                   "--points", "60", "--method", "all"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "60 conferrable points" in out and "conferrable probe: shaped by 3 references and 4 surrogates" in out
    assert "conferrable (global: the references shaped the probe) (shaped by 3 references)" in out
    assert "per-source thresholds, ddv" in out
    assert "probe cache" not in out
    # Asked again, the command reads the probe from its default cache; --probe-cache off searches anew.
    args = ["verify", zoo["source"], zoo["finetuned"], "--reference", zoo["homolog2"], "--reference", zoo["homolog3"],
            "--reference", zoo["homolog4"], "--seeds", zoo["seeds"], "--points", "60"]
    assert cli_main(args) == 0
    assert f"read from the probe cache in {probe_cache}" in capsys.readouterr().out
    assert cli_main([*args, "--probe-cache", "off"]) == 0
    assert "probe cache" not in capsys.readouterr().out


# ---------------------------------------------------------------------------------------- loading


@pytest.mark.parametrize("variant", ["fp16", "bf16-model", "module-bin"])
def test_cast_renamed_and_bin_copies_load_and_agree_fully(zoo, probe, variant):
    v = verify_pair(probe, _suspect(zoo, variant), "agreement")
    assert v.verdict == "pirated" and v.score >= 0.99, v


def test_folded_batchnorm_loads_and_behaves_the_same(zoo):
    plain, folded = load_runnable(zoo["cnn"]), load_runnable(zoo["cnn-folded"])
    assert "folded BatchNorm" in folded.notes and not plain.notes
    x = torch.randn(16, 64)
    assert torch.allclose(plain.logits(x), folded.logits(x), atol=1e-4)
    v = verify_pair(plain, folded, "distance", n=30)
    assert v.verdict == "pirated" and v.score < 1e-3


def test_token_models_probe_by_greedy_search(zoo):
    source = load_runnable(zoo["gpt"])
    assert source.domain.kind == "tokens" and source.domain.vocab == 256 and source.n_outputs == 256
    probe = make_probe(source, n=20, steps=3, pairs=20)
    assert float(probe.core.confidence.mean()) > 0.5  # the greedy search found confident sequences
    same = verify_pair(probe, load_runnable(zoo["gpt-renamed"]), "agreement")
    other = verify_pair(probe, load_runnable(zoo["gpt-homolog"]), "distance")
    assert same.score == 1.0 and other.verdict != "error"


# -------------------------------------------------------------------------------------- bad input


@pytest.mark.parametrize(
    ("suspect", "method", "reason"),
    [
        ("gpt", "agreement", "cannot take the same inputs: input kinds differ"),
        ("gpt", "ddv", "input kinds differ"),
        ("newhead", "agreement", "label spaces differ (10 vs 2 outputs)"),
        ("newhead", "cluster", "label spaces differ"),
        ("nan", "agreement", "non-finite outputs"),
        ("truncated", "distance", "truncated"),
        ("unknown-arch", "agreement", "nonesuch"),
        ("missing", "ddv", "no such file or folder"),
    ],
)
def test_bad_suspects_get_an_error_verdict_with_a_reason(zoo, suspect, method, reason):
    uri = zoo.get(suspect, os.path.join(zoo["root"], suspect))
    v = verify_uris(zoo["source"], uri, method, n=20)
    assert v.verdict == "error" and v.score is None, v
    assert reason in v.reason, v.reason


def test_a_source_that_cannot_run_is_an_error_too(zoo):
    v = verify_uris(zoo["nan"], zoo["source"], "agreement", n=20)
    assert v.verdict == "error" and "non-finite" in v.reason
    v = verify_uris(zoo["truncated"], zoo["source"], "agreement")
    assert v.verdict == "error" and v.reason.startswith("source: ")


def test_unknown_method_is_an_error_verdict(zoo, probe):
    v = verify_pair(probe, _suspect(zoo, "finetuned"), "telepathy")
    assert v.verdict == "error" and "unknown method" in v.reason


class _Call:
    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return (self.func, self.args)


def test_a_hostile_pickle_is_refused_and_never_runs(zoo, tmp_path):
    pwned = tmp_path / "pwned"
    folder = tmp_path / "hostile"
    folder.mkdir()
    with zipfile.ZipFile(folder / "pytorch_model.bin", "w") as out:
        out.writestr("archive/data.pkl", pickle.dumps({"fc1.weight": _Call(os.system, f"touch {pwned}")}))
        out.writestr("archive/version", "3\n")
    (folder / "config.json").write_text(json.dumps({"model_type": "mlp"}))
    v = verify_uris(zoo["source"], str(folder), "agreement")
    assert v.verdict == "error" and "forbidden global" in v.reason
    assert not pwned.exists()


def test_vision_libraries_are_optional(zoo):
    for package in ("torchvision", "timm"):
        try:
            __import__(package)
        except Exception:  # noqa: BLE001 -- absent, or a wheel built for another torch
            with pytest.raises(VerifyError, match=f"{package} (is not installed|does not import)"):
                load_runnable(zoo["source"], arch=f"{package}:resnet18")


# ------------------------------------------------------------------------------------------- CLI


def test_cli_prints_the_evidence(zoo, capsys):
    rc = cli_main(["verify", zoo["source"], zoo["finetuned"], zoo["homolog"], zoo["truncated"],
                   "--method", "all", "--points", "40"])
    out = capsys.readouterr().out
    assert rc == 0
    assert "core points" in out and "suspect finetuned" in out and "suspect homolog" in out
    for method in ("agreement", "distance", "ddv", "cluster"):
        assert method in out
    assert f"pirated >= {THRESHOLDS['agreement'].pirated}" in out and "score" in out
    assert "error" in out and "truncated" in out  # the broken suspect is reported, not fatal


def test_cli_prints_the_references_and_the_per_source_thresholds(zoo, capsys):
    missing = os.path.join(zoo["root"], "missing")
    rc = cli_main(["verify", zoo["source"], zoo["finetuned"], zoo["homolog"], "--reference", zoo["homolog2"],
                   "--reference", missing, "--points", "40", "--method", "all", "--probe", "core"])
    out = capsys.readouterr().out
    assert rc == 0
    assert f"reference {zoo['homolog2']}: agreement 0." in out and "distance 0." in out
    assert f"reference {missing}: skipped:" in out and "no such file" in out
    assert "per-source thresholds, agreement (margin 0.5): pirated >= " in out
    assert "calibrated" in out and "per source (margin" in out
    assert cli_main(["verify", zoo["source"], zoo["finetuned"], "--reference", zoo["homolog2"], "--json",
                     "--points", "30", "--probe", "core"]) == 0
    report = json.loads(capsys.readouterr().out)
    cal = report["source"]["calibration"]
    assert list(cal["references"]) == [zoo["homolog2"]] and set(cal["thresholds"]) == {"agreement", "distance", "ddv"}
    (verdict,) = report["verdicts"]
    assert verdict["verdict"] == "pirated" and verdict["calibrated_score"] >= MARGINS["agreement"]
    assert verdict["thresholds"] == cal["thresholds"]["agreement"]


def test_cli_json_and_a_source_that_cannot_run(zoo, capsys):
    assert cli_main(["verify", zoo["source"], zoo["finetuned"], "--json", "--points", "30",
                     "--seeds", zoo["seeds"]]) == 0
    report = json.loads(capsys.readouterr().out)
    assert report["source"]["core_points"] == 30
    assert [v["verdict"] for v in report["verdicts"]] == ["pirated"]
    assert cli_main(["verify", zoo["unknown-arch"], zoo["finetuned"]]) == 2
    assert "nonesuch" in capsys.readouterr().err


# ------------------------------------------------------------------------------ Hugging Face models


def _save_hf(folder: Path, model: nn.Module, *, rename=None, drop=(), config: dict | None = None) -> str:
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in model.state_dict().items() if k not in drop}
    save_file({(rename(k) if rename else k): v for k, v in state.items()}, str(folder / "model.safetensors"))
    if config is None:
        config = {**model.config.to_dict(), "architectures": [type(model).__name__]}
    (folder / "config.json").write_text(json.dumps(config))
    return str(folder)


def _confident(model: nn.Module) -> nn.Module:
    """An untrained classifier's head scaled up, so that it is confident somewhere (as a trained one is)."""
    with torch.no_grad():
        model.classifier.weight.mul_(300)
    return model.eval()


@pytest.fixture(scope="module")
def hf(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """Tiny transformers models built from configs here (nothing downloaded), and their checkpoints."""
    transformers = pytest.importorskip("transformers")
    root = tmp_path_factory.mktemp("hf")
    small = {"vocab_size": 300, "hidden_size": 32, "num_hidden_layers": 2, "num_attention_heads": 2,
             "intermediate_size": 64, "max_position_embeddings": 64}
    torch.manual_seed(0)
    bert = _confident(transformers.BertForSequenceClassification(transformers.BertConfig(**small, num_labels=3)))
    torch.manual_seed(1)
    bert2 = _confident(transformers.BertForSequenceClassification(transformers.BertConfig(**small, num_labels=3)))
    gpt2 = transformers.GPT2LMHeadModel(
        transformers.GPT2Config(vocab_size=300, n_embd=32, n_layer=2, n_head=2, n_positions=64,
                                bos_token_id=0, eos_token_id=0)
    ).eval()
    encoder = transformers.BertModel(transformers.BertConfig(**small)).eval()
    return {
        "bert-model": bert,
        "gpt2-model": gpt2,
        "bert": _save_hf(root / "bert", bert),
        "bert-renamed": _save_hf(root / "bert-renamed", bert, rename=lambda k: f"module.{k}"),
        "bert-other": _save_hf(root / "bert-other", bert2),
        # The LM head is tied to the embedding: checkpoints leave it out.
        "gpt2": _save_hf(root / "gpt2", gpt2, drop=("lm_head.weight",)),
        "encoder": _save_hf(root / "encoder", encoder),
        "bert-partial": _save_hf(root / "bert-partial", bert, drop=("classifier.weight", "classifier.bias")),
        "root": root,
    }


def test_transformers_classifier_loads_from_its_config_and_runs_as_built(hf):
    model = load_runnable(hf["bert"])
    assert model.arch == "hf:BertForSequenceClassification" and model.n_outputs == 3
    assert model.domain.kind == "tokens" and model.domain.vocab == 300 and model.domain.context == 64
    x = torch.randint(0, 300, (5, 16))
    with torch.no_grad():
        assert torch.allclose(model.logits(x), hf["bert-model"](input_ids=x).logits, atol=1e-5)
    probe = make_probe(model, n=20, steps=3, pairs=20)
    assert float(probe.core.confidence.mean()) > 0.5
    assert verify_pair(probe, load_runnable(hf["bert-renamed"]), "agreement").score == 1.0
    assert verify_pair(probe, load_runnable(hf["bert-other"]), "distance").verdict != "pirated"
    # An untrained model's near-uniform outputs are no evidence: the label methods refuse them.
    lm = make_probe(load_runnable(hf["gpt2"]), n=10, steps=1, pairs=10)
    v = verify_pair(lm, load_runnable(hf["gpt2"]), "agreement")
    assert v.verdict == "error" and "not confident" in v.reason


def test_transformers_lm_with_a_tied_head_loads(hf):
    model = load_runnable(hf["gpt2"])
    assert model.n_outputs == 300 and not model.notes
    x = torch.randint(0, 300, (3, 10))
    with torch.no_grad():
        assert torch.allclose(model.logits(x), hf["gpt2-model"](input_ids=x).logits[:, -1], atol=1e-5)


def test_a_bare_encoder_is_compared_by_ddv_only(hf):
    encoder = load_runnable(hf["encoder"])
    assert encoder.outputs == "embedding" and encoder.n_outputs == 32
    assert verify_pair(encoder, encoder, "ddv", pairs=20).score == pytest.approx(1.0)
    v = verify_pair(encoder, encoder, "agreement")
    assert v.verdict == "error" and "embedding" in v.reason


def test_transformers_checkpoints_that_do_not_fit_are_refused(hf):
    with pytest.raises(VerifyError, match="lacks 2 tensors"):
        load_runnable(hf["bert-partial"])
    v = verify_uris(hf["bert"], hf["gpt2"], "agreement")
    assert v.verdict == "error" and "label spaces differ (3 vs 300 outputs)" in v.reason


def test_custom_code_is_never_run(hf, tmp_path):
    pwned = tmp_path / "pwned"
    folder = Path(_save_hf(hf["root"] / "custom", hf["bert-model"], config={
        "model_type": "evil-net", "architectures": ["EvilModel"], "auto_map": {"AutoModel": "evil.EvilModel"},
    }))
    (folder / "evil.py").write_text(f"open({str(pwned)!r}, 'w').close()\n")
    with pytest.raises(VerifyError, match="custom code is never run"):
        load_runnable(str(folder))
    assert not pwned.exists()


def test_seeds_that_are_not_a_npy_array_are_a_clear_error(tmp_path):
    from jobs.verify import load_seeds

    text = tmp_path / "seeds.txt"
    text.write_text("0.1 0.2\n")
    with pytest.raises(VerifyError, match="not a .npy array"):
        load_seeds(str(text))
    with pytest.raises(VerifyError, match="cannot read seeds"):
        load_seeds(str(tmp_path / "missing.npy"))
    np.save(tmp_path / "ok.npy", np.ones((3, 64), np.float32))
    assert load_seeds(str(tmp_path / "ok.npy")).shape == (3, 64)


def test_a_broken_checkpoint_without_config_is_reported_as_broken(zoo, tmp_path):
    from pipeline.errors import FormatError

    folder = tmp_path / "bare"
    folder.mkdir()
    whole = next(Path(zoo["source"]).glob("*.safetensors")).read_bytes()
    (folder / "model.safetensors").write_bytes(whole[:100])  # no config.json, and a cut header
    with pytest.raises(FormatError):
        load_runnable(str(folder))
    (folder / "model.safetensors").write_bytes(whole)
    with pytest.raises(VerifyError, match="no config.json beside the checkpoint"):
        load_runnable(str(folder))
