"""Stage 2 by behaviour: is a suspect a pirated copy of a source model, a homolog, or unrelated?

DeepCore (Sun, Zhang, Li, arXiv 2411.00380): a model's confidence grows with an input's distance from its
decision boundary, and pirated models (fine-tuned, pruned, distilled or extracted from the source) follow
it where it is confident, while homologs (same architecture and data, trained apart) follow it less. So we
build *core points*, inputs the source classifies with a set confidence in a label spread over its classes
(`core_points`), and compare the suspect's outputs on them:

- `agreement`: the share of core points on which the suspect predicts the source's label;
- `distance`: the mean Jensen-Shannon divergence (bits, in [0, 1]) of the two output distributions;
- `cluster`: the prediction vectors of the source, reference models and a group of suspects on the core
  points, clustered; suspects on the source's side are pirated (`verify_group`);
- `ddv`: ModelDiff's decision-distance vectors (Li et al., ISSTA 2021), a second opinion that also runs
  when label spaces differ (a new head): the cosine distances between each model's outputs on pairs of
  inputs, compared by cosine similarity.

Every method gives a score and a verdict (`pirated`, `homolog`, `unrelated`) by its `THRESHOLDS`, or
`error` with a reason when the pair cannot be compared (different inputs or label spaces, a suspect that
does not load or run, NaN outputs, a source with no confident outputs). `verify_pair`, `verify_group` and
`verify_uris` never raise: a sweep verifying thousands of candidates must not stop on one bad model.

The source's side (core points, its outputs, its decision distances) is computed once, in a `Probe`
(`make_probe`), and reused for every suspect. All tensors live on the source's device (`device="cuda"`).

Score levels differ by source (a ResNet's homologs agree with it on a quarter of its core points, an MLP's
on four fifths), so one absolute threshold per method ranks poorly across sources. DeepCore calibrates on
references instead: homologs the owner trains itself (same architecture and data, another seed), scored
against the source like any suspect. `calibrate` (or `make_probe(..., references=...)`) turns their scores
into per-source thresholds and a `calibrated_score` comparable across sources (`Calibration`).

What the zoo showed (see THRESHOLDS): on DeepCore's core points, fine-tuned and lightly pruned copies
stand well apart from homologs; copies distilled on soft labels sit just past them; label-only
extractions on the source's own data and heavily pruned (80%) copies fall among the homologs, by every
method here (ROC AUC pirated vs homolog 0.69 with global thresholds, 0.78 with per-source calibration).

With references the owner holds, the probe can do better than calibrate on them: shape the core points
with them. A *conferrable* probe (`make_probe` with three references or more; Lukas et al., "Deep Neural
Network Fingerprinting by Conferrable Adversarial Examples", ICLR 2021) keeps the points that the source
and its surrogates (students the owner distils from it, `pipeline.verify.surrogates`) label alike and the
references do not; on the zoo it ranked every kind of copy above unseen homologs far better (AUC 0.93
by agreement; cross-architecture students and label-only extractions remain the hardest).
"""

from __future__ import annotations

import os
import sys
import threading
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from tqdm import tqdm

from pipeline.errors import VerifyError
from pipeline.settings import redact
from pipeline.verify.core_points import (
    CORE_CONFIDENCE,
    CORE_STEP,
    CorePoints,
    conferrable_points,
    conferrable_size,
    core_points,
    input_spread,
    require_labels,
    token_pool,
)
from pipeline.verify.probe_cache import ProbeCache
from pipeline.verify.runnable import RunnableModel, load_runnable
from pipeline.verify.surrogates import SURROGATE_KINDS, SURROGATE_ROUNDS, SURROGATE_STEPS, distil_surrogates

__all__ = [
    "MARGINS",
    "METHODS",
    "PAIR_METHODS",
    "CONFERRABLE_MIN_REFERENCES",
    "CONFERRABLE_THRESHOLDS",
    "THRESHOLDS",
    "VERDICTS",
    "Calibration",
    "CorePoints",
    "Probe",
    "Thresholds",
    "Verdict",
    "calibrate",
    "core_points",
    "make_probe",
    "prior_corrected",
    "verify_group",
    "verify_pair",
    "verify_uris",
]

# Models by name (a Mapping) or in a list; an exception or a string stands for one that failed to load.
Models = Mapping[str, RunnableModel | BaseException | str] | Sequence[RunnableModel | BaseException | str]

PIRATED, HOMOLOG, UNRELATED, ERROR = "pirated", "homolog", "unrelated", "error"
VERDICTS = (PIRATED, HOMOLOG, UNRELATED, ERROR)
PAIR_METHODS = ("agreement", "distance", "ddv")  # the methods that judge one pair at a time
METHODS = (*PAIR_METHODS, "cluster")


@dataclass(frozen=True, slots=True)
class Thresholds:
    """A method's score cut-offs: `pirated` at or beyond `pirated`, `unrelated` beyond `unrelated`,
    `homolog` between. `higher_is_closer`: agreement, ddv and cluster scores grow with similarity;
    `distance` shrinks."""

    pirated: float
    unrelated: float
    higher_is_closer: bool = True

    def verdict(self, score: float) -> str:
        if not self.higher_is_closer:
            score, pirated, unrelated = -score, -self.pirated, -self.unrelated
        else:
            pirated, unrelated = self.pirated, self.unrelated
        if score >= pirated:
            return PIRATED
        if score < unrelated:
            return UNRELATED
        return HOMOLOG

    def as_dict(self) -> dict[str, Any]:
        return {"pirated": self.pirated, "unrelated": self.unrelated, "higher_is_closer": self.higher_is_closer}


# Calibrated on digits models like the benchmark zoo's (bench.zoo recipes): 4 sources (MLP and CNN, two
# seeds each), 3 homologs each (same architecture and data, other seeds), and copies of each: fine-tuned
# (short, long), pruned 50% and 80%, distilled (soft labels, T=2) and extracted (hard labels on noisy
# queries); with the default probe. Homologs scored agreement 0.71-0.89, distance 0.117-0.18 bits, ddv
# 0.951-0.975; a model trained on permuted labels: agreement 0.02, distance 0.82-0.87. `pirated` sits just
# past the homologs (no false identification there); `unrelated` past the cross-architecture homologs
# (an MLP against a CNN source: agreement 0.30-0.74, distance 0.21-0.51). On bench/verify_zoo.py's zoo
# (no false identification of its 63 homolog pairs, by any method, at these values; ddv calls a third of
# them, the ResNets, unrelated) the scales differ by architecture:
# ResNet homologs agree on 0.21-0.36 of a ResNet's core points, MLP and CNN homologs on 0.67-0.89, so one
# pooled threshold ranks poorly across architectures (ROC AUC 0.66 pooled; per architecture fine-tunes,
# 50% prunes and distillations of MLPs and CNNs separate fully). `cluster` with a homolog reference
# calibrates per source, and so do homolog references given to `calibrate` (MARGINS below).
# bench/verify.py measures them; change them here, where the sweep, the CLI and the benchmark read them.
THRESHOLDS: dict[str, Thresholds] = {
    "agreement": Thresholds(pirated=0.9, unrelated=0.2),
    "distance": Thresholds(pirated=0.11, unrelated=0.6, higher_is_closer=False),
    "ddv": Thresholds(pirated=0.98, unrelated=0.85),
    # ddv across label spaces (a new head): scores run lower and do not separate. A new 2-class head on the
    # source's own body scored 0.54-0.77 on the zoo, and so did new heads on homologs: such a pair is
    # rarely called pirated (a reused backbone is stage 1's finding, by per-block codes), and `unrelated`
    # is kept for scores far below anything seen (uncalibrated: no unrelated cross-head pairs yet).
    "ddv-heads": Thresholds(pirated=0.98, unrelated=0.3),
    # The suspect's side between the source's group and the other (0.5: halfway); `unrelated` comes
    # from the divergence to the source, by the distance method's threshold (see verify_group).
    "cluster": Thresholds(pirated=0.5, unrelated=0.0),
}
# On a conferrable probe (references and surrogates shaped it: `make_probe`) the label methods have their
# own scale: the references' scores on it are low by construction, so they cannot calibrate it, and these
# global cuts judge instead. Chosen on bench/verify_zoo.py's zoo, each probe shaped by 3 references and 4
# surrogates, `agreement` scored with the suspect's class prior divided out (`prior_corrected`): unseen
# same-data homologs and their copies agreed on at most 0.71 of the points (one extracted student of a
# homolog; the next 0.66), other architectures on the same data on at most 0.44, copies fine-tuned or
# lightly pruned on 0.9-1.0, distilled and extracted ones on 0.33-1.0; 0.75 keeps a margin over the
# homologs (a cut chosen on the seed-0 sources alone was 0.64: bench/verify.py's held-out table). `distance`
# (Jensen-Shannon, raw): homologs at least 0.32 bits. `unrelated`: models of other tasks scored 0.005-0.31,
# homologs 0.12 at the least. Fewer references leave homologs closer (see CONFERRABLE_MIN_REFERENCES).
CONFERRABLE_THRESHOLDS: dict[str, Thresholds] = {
    "agreement": Thresholds(pirated=0.75, unrelated=0.05),
    "distance": Thresholds(pirated=0.25, unrelated=0.8, higher_is_closer=False),
}
# A probe shaped by few references rejects them but generalizes poorly: on the zoo, with 2 references per
# source 4.2% of the unseen homologs (9/216) reached CONFERRABLE_THRESHOLDS, with 3 none (0/207; both with
# two surrogates and the raw agreement, then shipped at 0.7); on the tests' MLPs one reference left a homolog
# at 0.75. With fewer usable references than this, `make_probe` keeps DeepCore's core points and calibrates
# on them.
CONFERRABLE_MIN_REFERENCES = 3
# The probe's ddv input pairs.
DDV_PAIRS = 100
# Below this mean confidence on its core points a source's labels say too little: label methods refuse.
MIN_SOURCE_CONFIDENCE = 0.5
# Per-source calibration (`Calibration`): a suspect is pirated when it closes at least this share of the
# gap between the closest homolog reference and the source itself. Chosen on bench/verify_zoo.py's zoo,
# leave-one-out over each source's same-data homologs: the least margin that kept every held-out homolog
# below the cut with two references (agreement: held-out homologs reached 0.48-0.53 of the gap, distance
# 0.33-0.37, ddv 0.30-0.37); with one reference they reach 0.60, 0.40 and 0.45. bench/verify.py measures it.
MARGINS: dict[str, float] = {"agreement": 0.5, "distance": 0.4, "ddv": 0.4}
# ... and unrelated below this share of the farthest reference's closeness (or the global cut if lower).
# On the zoo, leave-one-out: no same-data homolog below it; other-task models below it by agreement and
# distance (78-100%), by ddv 21 of 27 `task-ge5` and none of the shuffled-label ones (the global ddv cut
# called a third of the same-data homologs unrelated).
UNRELATED_SHARE = 0.75


@dataclass(frozen=True, slots=True)
class Verdict:
    """One method's answer for one (source, suspect) pair.

    `score` is None when the pair could not be compared (`verdict == "error"`, `reason` says why).
    `evidence` holds what the score came from (agreement, number of core points, confidences ...) and,
    under `calibration`, which thresholds judged it: "global" (THRESHOLDS) or the source's references
    with their scores. `calibrated_score`: the score against the references (`Calibration`), comparable
    across sources; None without references.
    """

    method: str
    score: float | None
    verdict: str
    thresholds: dict[str, Any]
    evidence: dict[str, Any] = field(default_factory=dict)
    reason: str | None = None
    source: str = ""
    suspect: str = ""
    seconds: float = 0.0
    calibrated_score: float | None = None

    def __post_init__(self) -> None:
        if self.reason:  # it may quote what a server echoed: printed, and written to sweep reports
            object.__setattr__(self, "reason", redact(self.reason))

    def to_dict(self) -> dict[str, Any]:
        return {
            "source": self.source, "suspect": self.suspect, "method": self.method, "verdict": self.verdict,
            "score": self.score, "calibrated_score": self.calibrated_score, "thresholds": self.thresholds,
            "evidence": self.evidence, "reason": self.reason, "seconds": round(self.seconds, 4),
        }


@dataclass(frozen=True)
class Probe:
    """What verifying suspects against one source needs, computed once: core points, the source's
    outputs on them, and the ddv input pairs with the source's decision distances."""

    source: RunnableModel
    core: CorePoints | None  # None when the source's outputs are an embedding (only ddv applies)
    source_probs: torch.Tensor | None  # (n, classes) softmax on the core points
    pairs: torch.Tensor  # (2m, *shape): pair k is (pairs[k], pairs[m + k])
    source_ddv: torch.Tensor  # (m,)
    boundary: CorePoints | None = None  # the contrast set, when asked for
    seconds: float = 0.0
    calibration: Calibration | None = None  # per-source thresholds from references (`calibrate`)
    # A conferrable probe: the models that shaped it {"references": [...], "surrogates": [...],
    # "skipped": {name: why}}; None for DeepCore's own core points.
    shaped_by: dict[str, Any] | None = None


def _closeness(method: str, score: float) -> float:
    """A score in units where larger is closer and 1 is the source itself (distance: 1 - distance)."""
    return 1.0 - score if method == "distance" else score


def _from_closeness(method: str, closeness: float) -> float:
    return 1.0 - closeness if method == "distance" else closeness


@dataclass(frozen=True)
class Calibration:
    """Per-source thresholds from homolog references, DeepCore's calibration.

    References are models the owner trained apart from the source: the same architecture and data,
    another seed. Each is scored against the source's probe like a suspect (`scores`). Per method, in
    closeness units (agreement and ddv as they are, distance as 1 - distance; 1 is the source itself),
    with c_max the closest reference and c_min the farthest:

    - pirated: closeness >= c_max + margin * (1 - c_max), the suspect closes at least `margin` of the gap
      between the closest reference and the source (distance: <= (1 - margin) x the closest reference's);
    - unrelated: closeness < min(THRESHOLDS' unrelated, UNRELATED_SHARE x c_min), a quarter below the
      farthest reference, so a homolog like the references is not called unrelated where a source's
      homologs sit near the global cut (ResNet homologs agree on 0.2-0.3 of the core points);
    - `calibrated_score`: (closeness - c_max) / (1 - c_max), pirated at or above `margin`, <= 0 within
      the references' reach; comparable across sources where raw scores are not.

    Why the closest reference and a share of the gap, not a z-score: with one or two references a mean
    and standard deviation say little, and the gap scales the cut to the source (a source whose homologs
    agree with it on 0.25 of the core points leaves a wide gap, one whose homologs agree on 0.85 a narrow
    one). On the zoo it ranked as well as a z-score, a median/MAD score or the references' spread, and held
    up best with one reference. A method whose closest reference matches the source exactly (no gap) keeps
    the global THRESHOLDS; so does ddv across label spaces.
    """

    source: str
    scores: Mapping[str, Mapping[str, float]]  # method -> {reference name: score}
    failed: Mapping[str, str] = field(default_factory=dict)  # reference -> why it gave no score (or some)
    margins: Mapping[str, float] = field(default_factory=lambda: dict(MARGINS))
    seconds: float = 0.0  # scoring the references (their loading is the caller's)

    def references(self, method: str) -> dict[str, float]:
        """The references' scores by `method` (empty when none could be scored)."""
        return dict(self.scores.get(method, {}))

    def _span(self, method: str) -> tuple[float, float] | None:
        """(c_max, c_min) in closeness units, or None when the method has no usable references."""
        scores = self.scores.get(method)
        if not scores or method not in self.margins:
            return None
        closeness = [_closeness(method, v) for v in scores.values()]
        high = max(closeness)
        return None if 1.0 - high < 1e-6 else (high, min(closeness))

    def thresholds(self, method: str) -> Thresholds | None:
        """This source's cut-offs for `method`, or None (no usable references: the global ones apply)."""
        span = self._span(method)
        if span is None:
            return None
        high, low = span
        pirated = high + self.margins[method] * (1.0 - high)
        unrelated = min(_closeness(method, THRESHOLDS[method].unrelated), UNRELATED_SHARE * low)
        return Thresholds(
            pirated=round(_from_closeness(method, pirated), 6), unrelated=round(_from_closeness(method, unrelated), 6),
            higher_is_closer=THRESHOLDS[method].higher_is_closer,
        )

    def calibrated_score(self, method: str, score: float) -> float | None:
        """`score` against the references: 0 at the closest one, 1 at the source itself, pirated from
        the method's margin on; None without usable references."""
        span = self._span(method)
        if span is None:
            return None
        high, _ = span
        return round((_closeness(method, score) - high) / (1.0 - high), 6)

    def excluding(self, *names: str) -> Calibration:
        """The same calibration without these references (to judge one of them, or a relative)."""
        drop = set(names)
        scores = {m: {n: v for n, v in by.items() if n not in drop} for m, by in self.scores.items()}
        return replace(self, scores=scores, failed={n: r for n, r in self.failed.items() if n not in drop})

    def evidence(self, method: str) -> dict[str, Any]:
        """What a verdict calibrated by this says: the references' scores, the margin, the failures."""
        out: dict[str, Any] = {"references": self.references(method), "margin": self.margins.get(method)}
        if self.failed:
            out["failed"] = dict(self.failed)
        return out


# -------------------------------------------------------------------------------------------- probe


def make_probe(
    source: RunnableModel,
    *,
    seeds: torch.Tensor | np.ndarray | None = None,
    n: int | None = None,
    steps: int | None = None,
    pairs: int = DDV_PAIRS,
    seed: int = 0,
    contrast: bool = False,
    confidence: float = CORE_CONFIDENCE,
    step: float = CORE_STEP,
    references: Mapping[str, RunnableModel | BaseException | str] | Sequence[RunnableModel] | None = None,
    surrogates: Sequence[RunnableModel] | None = None,
    conferrable: bool | None = None,
    cache: ProbeCache | str | os.PathLike[str] | None = None,
    progress: bool = False,
) -> Probe:
    """Core points, the source's outputs on them, and ddv pairs: the source's side of every method.

    The ddv pairs are `pairs` pairs of random draws of the input domain (as core points start: Gaussian
    with the seeds' statistics, seed text windows, or random tokens). A source whose outputs are an
    embedding gets no core points (only ddv applies). `contrast`: also build boundary points, whose
    agreement `agreement` reports beside the core points' (DeepCore's contrast). `n`, `steps`, `seed`,
    `confidence`, `step`: as `core_points`. `references`: homologs the owner trained apart from the
    source; the probe then carries their `calibrate` (per-source thresholds), which `verify_pair` uses.
    `cache` (a `ProbeCache` or its folder): conferrable core points are looked up there by what makes
    them (the models' weights, the seeds, the options) and stored after a search; `shaped_by["cached"]`
    says when they came from it. `progress`: a bar on stderr (where it is a terminal) over the conferrable
    search and the surrogates' training, the part of a probe that takes seconds to minutes.

    Raises:
        VerifyError: the source cannot run on its input domain, or outputs NaN (a reference that cannot
            is reported in the calibration, never raised).
    """
    start_time = time.perf_counter()
    core = boundary = shaped_by = None
    usable, skipped = _comparable(source, references)
    if conferrable is None:
        conferrable = len(usable) >= CONFERRABLE_MIN_REFERENCES
    if conferrable:
        if not usable:
            raise VerifyError("a conferrable probe needs a homolog reference that takes the source's inputs and "
                              f"labels{_skipped_note(skipped)}")
        cache = ProbeCache(cache) if isinstance(cache, (str, os.PathLike)) else cache
        key = cache.key(source, list(usable.values()), surrogates, seeds,
                        {"n": n, "steps": steps, "seed": seed, "step": step}) if cache is not None else ""
        hit = cache.get(key) if cache is not None else None
        if hit is not None:  # the search ran before on these very models, seeds and options
            core, made = hit
            core = replace(core, inputs=core.inputs.to(source.device), labels=core.labels.to(source.device),
                           confidence=core.confidence.to(source.device))
            shaped_by = {"references": list(usable), "surrogates": made.get("surrogates", []),
                         "skipped": {**skipped, **made.get("skipped", {})}, "cached": str(cache.root)}
        else:
            core, shaped_by = _conferrable(source, usable, surrogates, progress, seeds=seeds, n=n, steps=steps,
                                           seed=seed, step=step)
            if cache is not None:
                cache.put(key, core, {"surrogates": shaped_by["surrogates"], "skipped": shaped_by["skipped"]})
            shaped_by["skipped"] = {**skipped, **shaped_by["skipped"]}
    elif source.outputs == "labels":
        core = core_points(source, seeds=seeds, n=n, steps=steps, seed=seed, confidence=confidence, step=step)
    if source.outputs == "labels" and contrast:
        boundary = core_points(source, seeds=seeds, n=n, steps=steps, seed=seed, step=step, variant="boundary")
    gen = torch.Generator().manual_seed(seed + 1)
    domain = source.domain
    if domain.kind == "continuous":
        mean, spread = input_spread(domain, seeds)
        profile = mean + spread * torch.randn((2 * pairs, *domain.shape), generator=gen)
    else:
        profile = token_pool(source, seeds, 2 * pairs, gen)
    profile = profile.to(source.device)
    probe = Probe(
        source=source, core=core, source_probs=source.probs(core.inputs) if core is not None else None,
        pairs=profile, source_ddv=_ddv(source, profile), boundary=boundary,
        seconds=time.perf_counter() - start_time, shaped_by=shaped_by,
    )
    if references is None:
        return probe
    # The references shaped a conferrable probe's core points: only ddv, whose pairs they did not, can
    # calibrate on them.
    methods = ("ddv",) if conferrable else tuple(_PAIR_METHODS)
    return replace(probe, calibration=calibrate(probe, references, methods=methods))


def _conferrable(
    source: RunnableModel,
    usable: Mapping[str, RunnableModel],
    surrogates: Sequence[RunnableModel] | None,
    progress: bool,
    **options: Any,
) -> tuple[CorePoints, dict[str, Any]]:
    """The conferrable search, with the surrogates distilled first when none are given; what shaped it
    (its `skipped` holds the surrogates that could not: the references' are the caller's)."""
    skipped: dict[str, str] = {}
    _, search = conferrable_size(source, options["n"], options["steps"])
    training = SURROGATE_ROUNDS * len(SURROGATE_KINDS) * SURROGATE_STEPS if surrogates is None else 0
    # disable=None: no bar where stderr is no terminal (logs, Ray workers, tests)
    with tqdm(total=training + search, desc=f"{source.name}: conferrable probe", unit="step", file=sys.stderr,
              disable=None if progress else True, leave=False) as bar:
        lock = threading.Lock()  # the students train side by side (`Workers`): one update at a time

        def tick(steps: int) -> None:
            with lock:
                bar.update(steps)

        if surrogates is None:
            try:
                surrogates = distil_surrogates(source, seeds=options["seeds"], seed=options["seed"], progress=tick)
            except VerifyError as exc:  # the references alone still shape the probe
                surrogates, skipped["surrogates"] = [], _reason(exc)
        kept, unusable = _comparable(source, list(surrogates))
        skipped.update(unusable)
        core = conferrable_points(source, list(usable.values()), list(kept.values()), progress=tick, **options)
    return core, {"references": list(usable), "surrogates": list(kept), "skipped": skipped}


def _comparable(source: RunnableModel, models: Models | None) -> tuple[dict[str, RunnableModel], dict[str, str]]:
    """The models that take the source's inputs and answer in its label space, by name; why the others
    cannot shape its probe."""
    usable: dict[str, RunnableModel] = {}
    skipped: dict[str, str] = {}
    for name, model in _named_models(models or ()):
        if not isinstance(model, RunnableModel):
            skipped[name] = _reason(model)
            continue
        try:
            _check_pair(source, model, same_labels=True)
        except VerifyError as exc:
            skipped[name] = str(exc)
            continue
        usable[name] = model
    return usable, skipped


def _skipped_note(skipped: Mapping[str, str]) -> str:
    return "" if not skipped else " (" + "; ".join(f"{n}: {why}" for n, why in skipped.items()) + ")"


def _named_models(models: Models) -> list[tuple[str, RunnableModel | BaseException | str]]:
    """(name, model) pairs: a Mapping's keys, else each model's name (numbered when repeated or failed)."""
    if isinstance(models, Mapping):
        return list(models.items())
    named: list[tuple[str, RunnableModel | BaseException | str]] = []
    for i, model in enumerate(models):
        name = model.name if isinstance(model, RunnableModel) else f"reference {i + 1}"
        named.append((name if all(name != n for n, _ in named) else f"{name} ({i + 1})", model))
    return named


def _ddv(model: RunnableModel, pairs: torch.Tensor) -> torch.Tensor:
    """Decision-distance vector: cosine distance of the model's (centred) outputs on each input pair."""
    out = model.logits(pairs)
    if model.outputs == "labels":
        out = out - out.mean(dim=1, keepdim=True)  # softmax ignores a shift; so does the comparison
    m = len(out) // 2
    return 1.0 - F.cosine_similarity(out[:m], out[m:], dim=1, eps=1e-12)


# ------------------------------------------------------------------------------------------ methods


def _check_pair(source: RunnableModel, suspect: RunnableModel, *, same_labels: bool) -> None:
    why = source.domain.mismatch(suspect.domain)
    if why:
        raise VerifyError(f"{source.name} and {suspect.name} cannot take the same inputs: {why}")
    if same_labels:
        require_labels(source)
        require_labels(suspect)
        if source.n_outputs != suspect.n_outputs:
            raise VerifyError(
                f"label spaces differ ({source.n_outputs} vs {suspect.n_outputs} outputs): agreement, distance "
                "and cluster compare labels; ddv compares models with different heads"
            )


def _js_bits(p: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """Jensen-Shannon divergence per row, in bits (0: same distribution, 1: disjoint)."""
    m = 0.5 * (p + q)

    def kl(a: torch.Tensor) -> torch.Tensor:
        return torch.where(a > 0, a * (torch.log2(a.clamp_min(1e-30)) - torch.log2(m.clamp_min(1e-30))), 0.0).sum(1)

    return (0.5 * kl(p) + 0.5 * kl(q)).clamp(0.0, 1.0)


def _core(probe: Probe) -> tuple[CorePoints, torch.Tensor]:
    if probe.core is None or probe.source_probs is None:
        raise VerifyError(f"{probe.source.name} outputs an embedding, not labels: compare it with ddv")
    confidence = float(probe.core.confidence.mean())
    if probe.core.variant == "core" and confidence < MIN_SOURCE_CONFIDENCE:
        # Near-uniform outputs agree with anything near-uniform: no evidence either way.
        raise VerifyError(
            f"{probe.source.name} is not confident on its core points (mean {confidence:.2f} < "
            f"{MIN_SOURCE_CONFIDENCE}): its labels carry too little to compare (an untrained model?)"
        )
    return probe.core, probe.source_probs


def _inputs_for(probe: Probe, suspect: RunnableModel, x: torch.Tensor) -> torch.Tensor:
    if probe.source.domain.kind == "tokens":
        x = x[:, : suspect.domain.context or x.shape[1]]
    return x.to(suspect.device)


def prior_corrected(probs: torch.Tensor) -> torch.Tensor:
    """A suspect's probabilities over the probe with its own class prior divided out (each row renormalized).

    The prior is the suspect's mean output over the probe's points, whose labels the search spreads evenly
    over the classes. A copy that pruning or quantization tilted toward a few classes keeps its relative
    preferences, which still follow the source's, while its raw argmax collapses onto the favoured classes;
    an independent model's preferences do not follow the source's either way.

    On a conferrable probe, agreement after this correction (`prior_agreement`) is the score. On the zoo's
    probes with four surrogates it ranked copies above homologs at AUC 0.955 against 0.931 for the raw
    agreement (80% pruning 0.73 -> 0.88, the rest level). With two surrogates it had lifted pruned copies
    but lost distilled and extracted ones (misses 17 -> 20 of 27), so it stayed evidence then: the second
    round of surrogates (`surrogates.SURROGATE_ROUNDS`) is what made it pay. The raw agreement stays in
    the evidence; a high prior_agreement beside a low agreement points at a tilted copy of the source.
    """
    corrected = probs / probs.mean(dim=0, keepdim=True).clamp_min(1e-12)
    return corrected / corrected.sum(dim=1, keepdim=True)


def _agreement(probe: Probe, suspect: RunnableModel) -> tuple[float, dict[str, Any]]:
    core, _ = _core(probe)
    _check_pair(probe.source, suspect, same_labels=True)
    probs = suspect.probs(_inputs_for(probe, suspect, core.inputs)).to(probe.source.device)
    labels = core.labels
    agree = float((probs.argmax(dim=1) == labels).float().mean())
    evidence: dict[str, Any] = {
        "agreement": round(agree, 4),
        "core_points": len(labels),
        "source_confidence": round(float(core.confidence.mean()), 4),
        "suspect_confidence": round(float(probs.gather(1, labels[:, None]).mean()), 4),
    }
    if probe.shaped_by is not None:  # labels spread evenly over the classes: the score is prior_corrected's
        agree = float((prior_corrected(probs).argmax(dim=1) == labels).float().mean())
        evidence["prior_agreement"] = round(agree, 4)
    if probe.boundary is not None:
        b = suspect.probs(_inputs_for(probe, suspect, probe.boundary.inputs)).argmax(dim=1).to(probe.source.device)
        evidence["boundary_agreement"] = round(float((b == probe.boundary.labels).float().mean()), 4)
    return agree, evidence


def _distance(probe: Probe, suspect: RunnableModel) -> tuple[float, dict[str, Any]]:
    core, source_probs = _core(probe)
    _check_pair(probe.source, suspect, same_labels=True)
    probs = suspect.probs(_inputs_for(probe, suspect, core.inputs)).to(probe.source.device)
    js = _js_bits(source_probs, probs)
    agree = float((probs.argmax(dim=1) == core.labels).float().mean())
    return float(js.mean()), {
        "js_bits": round(float(js.mean()), 4),
        "js_max": round(float(js.max()), 4),
        "agreement": round(agree, 4),
        "core_points": len(js),
    }


def _ddv_score(probe: Probe, suspect: RunnableModel) -> tuple[float, dict[str, Any]]:
    _check_pair(probe.source, suspect, same_labels=False)
    theirs = _ddv(suspect, _inputs_for(probe, suspect, probe.pairs)).to(probe.source.device)
    sim = float(F.cosine_similarity(probe.source_ddv, theirs, dim=0, eps=1e-12))
    return sim, {
        "ddv_similarity": round(sim, 4),
        "pairs": len(theirs),
        "source_outputs": probe.source.n_outputs,
        "suspect_outputs": suspect.n_outputs,
        # Then THRESHOLDS["ddv-heads"] apply: across heads scores run lower (see THRESHOLDS).
        "label_spaces_differ": probe.source.n_outputs != suspect.n_outputs,
    }


_PAIR_METHODS = {"agreement": _agreement, "distance": _distance, "ddv": _ddv_score}


def calibrate(
    probe: Probe,
    references: Mapping[str, RunnableModel | BaseException | str] | Sequence[RunnableModel | BaseException | str],
    *,
    methods: Sequence[str] = tuple(_PAIR_METHODS),
    margins: Mapping[str, float] | None = None,
) -> Calibration:
    """Score homolog references against the source's probe: per-source thresholds; never raises.

    Args:
        probe: the source's probe.
        references: models the owner trained apart from the source (same architecture and data, another
            seed), by name (a Mapping, e.g. by URI), or in a list named by their model names. An exception
            or a string stands for a reference that failed to load: it is reported in `failed`, skipped.
        methods: the pair methods to calibrate.
        margins: instead of MARGINS.

    Returns:
        The Calibration; a reference that cannot be compared with the source (other inputs or labels,
        NaN outputs) is in `failed` with the reason, per method when only some methods failed.
    """
    start = time.perf_counter()
    named = _named_models(references)
    scores: dict[str, dict[str, float]] = {m: {} for m in methods}
    failed: dict[str, str] = {}
    for name, ref in named:
        if not isinstance(ref, RunnableModel):
            failed[name] = _reason(ref)
            continue
        why: dict[str, str] = {}
        for method in methods:
            try:
                if method not in _PAIR_METHODS:
                    raise VerifyError(f"unknown method {method!r}")
                _check_pair(probe.source, ref, same_labels=method != "ddv")
                if (ref.outputs, ref.n_outputs) != (probe.source.outputs, probe.source.n_outputs):
                    # ddv too: thresholds for same-head suspects never come from a model with another head.
                    raise VerifyError(f"{ref.name} has {ref.n_outputs} outputs ({ref.outputs}), the source "
                                      f"{probe.source.n_outputs} ({probe.source.outputs})")
                score, _ = _PAIR_METHODS[method](probe, ref)
                if not np.isfinite(score):
                    raise VerifyError(f"{method} score is not finite ({score})")
                scores[method][name] = round(score, 6)
            except Exception as exc:  # noqa: BLE001 -- a bad reference is reported, never raised
                why[method] = _reason(exc)
        if why:
            reasons = set(why.values())
            failed[name] = reasons.pop() if len(reasons) == 1 and len(why) == len(methods) else "; ".join(
                f"{m}: {r}" for m, r in why.items())
    return Calibration(
        source=probe.source.name, scores=scores, failed=failed, margins=dict(MARGINS if margins is None else margins),
        seconds=time.perf_counter() - start,
    )


def verify_pair(
    source: RunnableModel | Probe,
    suspect: RunnableModel | BaseException | str,
    method: str = "agreement",
    *,
    thresholds: Thresholds | None = None,
    calibration: Calibration | None = None,
    **probe_options: Any,
) -> Verdict:
    """One method's verdict on a (source, suspect) pair; never raises.

    Args:
        source: the protected model, or its Probe (make one with `make_probe` to verify many suspects).
        suspect: the model to judge; an exception or a string stands for a suspect that failed to load,
            and becomes an `error` verdict with that reason.
        method: "agreement", "distance" or "ddv" ("cluster" needs a group: `verify_group`).
        thresholds: instead of THRESHOLDS[method] and any calibration.
        calibration: per-source thresholds (`calibrate`) instead of the probe's own; without either, or
            for a method it has no usable references for, THRESHOLDS[method] judge.
        probe_options: `make_probe` options (seeds, n, steps, seed, contrast, references) when `source`
            is a model.

    Returns:
        A Verdict; `error` with a reason when the pair cannot be compared. `evidence["calibration"]` says
        which thresholds judged it; `calibrated_score` is set when references did.
    """
    start = time.perf_counter()
    source_name = source.source.name if isinstance(source, Probe) else source.name
    suspect_name = suspect.name if isinstance(suspect, RunnableModel) else ""
    cut = thresholds or THRESHOLDS.get(method)
    cut_dict = cut.as_dict() if cut else {}

    def failed(reason: str) -> Verdict:
        return Verdict(method, None, ERROR, cut_dict, reason=reason, source=source_name, suspect=suspect_name,
                       seconds=time.perf_counter() - start)

    if method == "cluster":
        if isinstance(suspect, RunnableModel):
            # References are homologs: the cluster method anchors the other group with them.
            given = probe_options.pop("references", None) or ()
            models = [r for r in (given.values() if isinstance(given, Mapping) else given)
                      if isinstance(r, RunnableModel)]
            return verify_group(source, [suspect], {"homolog": models} if models else None, thresholds=thresholds,
                                **probe_options)[0]
        return failed(_reason(suspect))
    if method not in _PAIR_METHODS or cut is None:
        return failed(f"unknown method {method!r} (expected one of {', '.join(METHODS)})")
    if not isinstance(suspect, RunnableModel):
        return failed(_reason(suspect))
    try:
        # The cheap checks first: a source's probe costs seconds, a mismatch is known at once.
        _check_pair(source.source if isinstance(source, Probe) else source, suspect, same_labels=method != "ddv")
        probe = source if isinstance(source, Probe) else make_probe(source, **probe_options)
        score, evidence = _PAIR_METHODS[method](probe, suspect)
    except Exception as exc:  # noqa: BLE001 -- one bad pair must never stop a sweep
        return failed(_reason(exc))
    if not np.isfinite(score):
        return failed(f"{method} score is not finite ({score})")
    calibration = calibration or probe.calibration
    calibrated = None
    used = "global"
    if thresholds is not None:
        used = "given"
    elif probe.shaped_by is not None and method in CONFERRABLE_THRESHOLDS:
        cut, used = CONFERRABLE_THRESHOLDS[method], "conferrable (global: the references shaped the probe)"
    elif evidence.get("label_spaces_differ"):
        cut = THRESHOLDS["ddv-heads"]
        if calibration is not None:
            used = "global (the references answer in the source's label space, this suspect does not)"
    elif calibration is not None and (own := calibration.thresholds(method)) is not None:
        cut, calibrated, used = own, calibration.calibrated_score(method, score), "per source"
    elif calibration is not None:
        used = "global (no usable reference: none scored, or one matches the source exactly)"
    # Which thresholds judged, and with references, their scores (or the models that shaped a conferrable
    # probe): the calibration is part of the evidence.
    if probe.shaped_by is not None and method in CONFERRABLE_THRESHOLDS:
        evidence["calibration"] = {"thresholds": used, **probe.shaped_by}
    else:
        evidence["calibration"] = used if calibration is None else {"thresholds": used,
                                                                    **calibration.evidence(method)}
    return Verdict(method, round(score, 6), cut.verdict(score), cut.as_dict(), evidence, source=source_name,
                   suspect=suspect_name, seconds=time.perf_counter() - start, calibrated_score=calibrated)


def verify_group(
    source: RunnableModel | Probe,
    suspects: Sequence[RunnableModel | BaseException | str],
    references: Mapping[str, Sequence[RunnableModel]] | None = None,
    *,
    thresholds: Thresholds | None = None,
    **probe_options: Any,
) -> list[Verdict]:
    """DeepCore's clustering method: one verdict per suspect, in order; never raises.

    Every model's softmax outputs on the core points make one prediction vector; the source, the
    references and the suspects are clustered (average linkage over the mean Jensen-Shannon divergence
    between vectors) into two groups, or one when even the two groups' linkage lies within the
    `distance` method's pirated threshold (everyone is a copy). A suspect's score is its side: its mean
    divergence to the other group over the sum of its mean divergences to both groups (1: deep in the
    source's group, 0: deep in the other). Score at or above THRESHOLDS["cluster"].pirated: pirated;
    below, homolog, or unrelated when its divergence from the source passes the `distance` method's
    unrelated threshold.

    Args:
        references: known models that anchor the groups: `{"homolog": [...], "pirated": [...]}`
            (e.g. a model the owner trained apart from the source on the same data, and a fine-tune).
            Without homolog references, two or more suspects are needed to tell two groups apart.

    Returns:
        One verdict per suspect, in order; `evidence` holds the groups and the suspect's divergence
        from the source.
    """
    start = time.perf_counter()
    cut = thresholds or THRESHOLDS["cluster"]
    source_name = source.source.name if isinstance(source, Probe) else source.name
    verdicts: list[Verdict | None] = [None] * len(suspects)

    def failed(i: int, reason: str) -> None:
        name = suspects[i].name if isinstance(suspects[i], RunnableModel) else ""
        verdicts[i] = Verdict("cluster", None, ERROR, cut.as_dict(), reason=reason, source=source_name,
                              suspect=name, seconds=time.perf_counter() - start)

    model = source.source if isinstance(source, Probe) else source
    refs = [(role, m) for role in ("pirated", "homolog") for m in (references or {}).get(role, ())]
    try:
        for role, ref in refs:
            try:
                _check_pair(model, ref, same_labels=True)
            except VerifyError as exc:
                raise VerifyError(f"reference {ref.name} ({role}) cannot be compared: {exc}") from exc
        usable: list[tuple[int, RunnableModel]] = []  # comparable suspects, checked before the probe's cost
        for i, suspect in enumerate(suspects):
            if not isinstance(suspect, RunnableModel):
                failed(i, _reason(suspect))
                continue
            try:
                _check_pair(model, suspect, same_labels=True)
                usable.append((i, suspect))
            except VerifyError as exc:
                failed(i, _reason(exc))
        if not usable:
            return [v for v in verdicts if v is not None]
        if len(refs) + len(usable) < 2:
            for i, _ in usable:
                failed(i, "clustering needs a group: give two or more suspects, or homolog references")
            return [v for v in verdicts if v is not None]
        probe = source if isinstance(source, Probe) else make_probe(source, **probe_options)
        core, source_probs = _core(probe)
        names: list[str] = [source_name]
        vectors: list[torch.Tensor] = [source_probs]
        roles: list[str] = ["source"]
        for role, ref in refs:
            vectors.append(ref.probs(_inputs_for(probe, ref, core.inputs)).to(model.device))
            names.append(ref.name)
            roles.append(role)
    except Exception as exc:  # noqa: BLE001 -- a broken source or reference fails every verdict, never raises
        for i in range(len(suspects)):
            if verdicts[i] is None:
                failed(i, _reason(exc))
        return [v for v in verdicts if v is not None]
    members: list[int] = []  # suspect index of each vector after the references
    for i, suspect in usable:
        try:
            vectors.append(suspect.probs(_inputs_for(probe, suspect, core.inputs)).to(model.device))
        except Exception as exc:  # noqa: BLE001
            failed(i, _reason(exc))
            continue
        names.append(suspect.name)
        roles.append("suspect")
        members.append(i)
    count = len(vectors)
    dist = np.zeros((count, count))
    for a in range(count):
        for b in range(a + 1, count):
            dist[a, b] = dist[b, a] = float(_js_bits(vectors[a], vectors[b]).mean())
    # Models past the distance method's unrelated threshold are unrelated outright; clustering them
    # would only split them off and leave copies and homologs in one group.
    unrelated_cut = THRESHOLDS["distance"].unrelated
    kept = [k for k in range(count) if k == 0 or roles[k] != "suspect" or dist[k, 0] <= unrelated_cut]
    groups, linkage = _two_groups(dist[np.ix_(kept, kept)], merge_below=THRESHOLDS["distance"].pirated)
    groups = [[kept[k] for k in g] for g in groups]
    own = groups[0]
    other = groups[1] if len(groups) > 1 else []
    group_names = [[names[k] for k in g] for g in groups]
    for offset, i in enumerate(members):
        j = count - len(members) + offset
        to_own = [dist[j, k] for k in own if k != j]
        to_other = [dist[j, k] for k in other if k != j]
        d_own = float(np.mean(to_own)) if to_own else 0.0
        # Nothing else in the other group: the suspect is that group (0), or there is none (as far as can be).
        d_other = float(np.mean(to_other)) if to_other else (0.0 if j in other else 1.0)
        score = d_other / (d_own + d_other) if d_own + d_other > 0 else 1.0
        if dist[j, 0] > unrelated_cut:
            score, verdict = 0.0, UNRELATED
        else:
            verdict = cut.verdict(score)
            verdict = HOMOLOG if verdict == UNRELATED else verdict
        verdicts[i] = Verdict(
            "cluster", round(score, 6), verdict, cut.as_dict(),
            {
                "groups": group_names,
                "in_source_group": j in own,
                "linkage": round(linkage, 4),
                "js_to_source": round(float(dist[j, 0]), 4),
                "core_points": len(core.labels),
                "references": {r: [names[k] for k in range(count) if roles[k] == r] for r in ("pirated", "homolog")},
            },
            source=source_name, suspect=names[j], seconds=time.perf_counter() - start,
        )
    return [v for v in verdicts if v is not None]


def _two_groups(dist: np.ndarray, *, merge_below: float) -> tuple[list[list[int]], float]:
    """Average-linkage clustering down to two groups, the source's (index 0) first.

    Returns one group when the last merge would join groups closer than `merge_below`; and the linkage
    (mean pairwise distance) between the two groups.
    """
    groups: list[list[int]] = [[i] for i in range(len(dist))]

    def link(a: list[int], b: list[int]) -> float:
        return float(dist[np.ix_(a, b)].mean())

    while len(groups) > 2:
        best = min((link(groups[a], groups[b]), a, b) for a in range(len(groups)) for b in range(a + 1, len(groups)))
        _, a, b = best
        groups[a] = groups[a] + groups[b]
        del groups[b]
    linkage = link(groups[0], groups[1]) if len(groups) == 2 else 0.0
    if len(groups) == 2 and linkage <= merge_below:
        groups = [groups[0] + groups[1]]
    groups.sort(key=lambda g: 0 not in g)
    return groups, linkage


def _reason(exc: BaseException | str) -> str:
    if isinstance(exc, str):
        return exc
    text = " ".join(str(exc).split()) or type(exc).__name__
    if isinstance(exc, VerifyError) or type(exc).__module__.startswith("pipeline"):
        return text
    return f"{type(exc).__name__}: {text}"


# --------------------------------------------------------------------------------------------- URIs


def verify_uris(
    source: str,
    suspect: str,
    method: str = "agreement",
    *,
    device: str = "cpu",
    seeds: torch.Tensor | np.ndarray | None = None,
    source_arch: str | None = None,
    suspect_arch: str | None = None,
    references: Sequence[str] = (),
    **probe_options: Any,
) -> Verdict:
    """Load both models (`load_runnable`) and verify the pair; never raises.

    A source or suspect that fails to load gives an `error` verdict with the loader's reason.
    `references`: URIs of homolog references (loaded like the source) to calibrate on (`calibrate`); one
    that fails to load is reported in the verdict's evidence and skipped.
    """
    start = time.perf_counter()
    try:
        model = load_runnable(source, arch=source_arch, device=device)
    except Exception as exc:  # noqa: BLE001
        cut = THRESHOLDS.get(method)
        return Verdict(method, None, ERROR, cut.as_dict() if cut else {}, reason=f"source: {_reason(exc)}",
                       source=source, suspect=suspect, seconds=time.perf_counter() - start)
    try:
        other: RunnableModel | BaseException = load_runnable(suspect, arch=suspect_arch, device=device)
    except Exception as exc:  # noqa: BLE001
        other = exc
    if references:
        probe_options["references"] = {uri: _load_or_error(uri, source_arch, device) for uri in references}
    verdict = verify_pair(model, other, method, seeds=seeds, **probe_options)
    return Verdict(**{**{f: getattr(verdict, f) for f in Verdict.__dataclass_fields__},
                      "suspect": verdict.suspect or suspect, "seconds": time.perf_counter() - start})


def _load_or_error(uri: str, arch: str | None, device: str) -> RunnableModel | BaseException:
    try:
        return load_runnable(uri, arch=arch, device=device)
    except Exception as exc:  # noqa: BLE001 -- reported where it is used
        return exc
