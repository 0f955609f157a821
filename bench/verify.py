"""Stage 2 on the verification zoo (bench/verify_zoo.py): DeepCore's own figures, per method.

Every original of the zoo is a source; each is verified against its comparison set (`comparisons`: its
pirated copies, its homologs, unrelated models) with every method of `pipeline.verify.behavior`
(`agreement`, `distance`, `ddv` pair by pair; `cluster` one suspect at a time with two references the
owner has, a homolog and a fine-tune of the source; `cluster-all` with all of a source's suspects in one
group and the homolog reference). Reported per method, side by side:
- ROC AUC of pirated vs homolog pairs, overall, over the copies that still work (accuracy >= 0.9x the
  original's) and per pirated kind (each kind against all homologs);
- missed identification rate (pirated not called pirated) per pirated kind, and false identification
  rate (called pirated) over homologs and over unrelated models, per kind, at the `THRESHOLDS` in
  pipeline/verify/behavior.py;
- a calibration: a threshold chosen on the seed-0 lineages (false identification <= 1% there), and the
  held-out lineages' rates at it, beside those at the shipped thresholds;
- seconds on CPU (1 torch thread): loading a model, the source's probe (core points, once per source),
  each method's pair, and a pair from scratch (load both, probe, verify);
- per-source calibration against homolog references (`pipeline.verify.behavior.calibrate`, DeepCore's
  protocol), leave-one-out: a source's references are its same-data homologs (`homolog-seed`: the extra
  seeds, then the other originals of its architecture) less the suspect and the suspect's own original;
  all of them, the first two, or the first one. The calibrated scores pooled over sources (AUC per
  kind), the rates at the per-source thresholds, and what the references cost per source.
Four probes, for contrast: core points grown from real inputs (the digits test split, `seeds.npy`),
core points grown from generated inputs (Gaussian draws, no data), near-boundary points from the real
inputs (what IPGuard-style fingerprints use; DeepCore's argument is that homologs part there), and the
conferrable probe (`conferrable-real`, the default when references are given): points grown from the
real inputs that the source and four surrogates distilled from it label alike and three homolog references
(the architecture's extra seeds, then no suspects) do not. For that probe, `METHOD+stage1` also judges
each pair with the default weight hash's verdict: a stage-1 copy is pirated whatever its behaviour.

    python -m bench.verify [--zoo DIR] [--size full|tiny] [--probes core-real,...] [--no-write]
                           [--probe-seed N] [--json PATH] [--from-json PATH]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import roc_auc_score

from bench.results import cpu_model, write_section
from bench.verify_zoo import DEFAULT_DIR, HOMOLOG_KINDS, PIRATED_KINDS, UNRELATED_KINDS, build_verify_zoo, comparisons
from bench.zoo import torch_threads
from jobs.query import hash_uri
from pipeline.cli import compare
from pipeline.verify.behavior import (
    CONFERRABLE_THRESHOLDS,
    MARGINS,
    PAIR_METHODS,
    THRESHOLDS,
    Probe,
    Verdict,
    core_points,
    make_probe,
    verify_group,
    verify_pair,
)
from pipeline.verify.behavior import calibrate as calibrate_on_references
from pipeline.verify.probe_cache import ProbeCache
from pipeline.verify.runnable import RunnableModel, load_runnable

METHODS = (*PAIR_METHODS, "cluster", "cluster-all")
# Reference sets for the per-source calibration: suffix of the method's name -> how many references
# (None: every same-data homolog left after leaving out the suspect and its original).
REFERENCE_SETS = {"+refs": None, "+2refs": 2, "+1ref": 1}
REF_METHODS = tuple(f"{m}{suffix}" for m in PAIR_METHODS for suffix in REFERENCE_SETS)
# probe name -> (seed inputs: "real" or "generated", points: "core" or "boundary")
PROBES = {"core-real": ("real", "core"), "core-generated": ("generated", "core"), "boundary-real": ("real", "boundary"),
          "conferrable-real": ("real", "conferrable")}
CONFERRABLE = "conferrable-real"
DISTANCES = ("distance", "distance+stage1")  # raw distances: lower is closer (calibrated scores are closeness)
TARGET_FIR = 0.01
WORKING = 0.9  # a copy "still works" at >= 0.9x its original's test accuracy (bench/quality.py's rule)
CALIBRATION_SEED = 0  # lineages of this seed choose the calibrated thresholds; the others are held out
Timings = dict[str, dict[str, tuple[float, float]]]  # step -> model name -> (wall, CPU seconds)


@dataclass
class Pair:
    """One method's verdict on one (source, suspect) pair under one probe.

    A calibrated method (`agreement+refs`, ...) holds the calibrated score and the verdict at the
    per-source thresholds."""

    probe: str
    method: str
    source: str
    suspect: str
    relation: str
    kind: str
    calibration: bool
    score: float | None
    verdict: str
    seconds: float  # wall
    cpu: float  # this process's CPU time (the machine is shared: wall time includes others' load)
    reason: str | None = None
    working: bool = True  # a pirated copy whose test accuracy is at least WORKING x its original's
    stage1: str | None = None  # the weight hash's verdict on the pair: "copy" when the whole model or a block is


# --------------------------------------------------------------------------------------------- run


def _boundary_probe(probe: Probe, seeds: np.ndarray | None, seed: int = 0) -> Probe:
    """The same probe with near-boundary points in place of the core points (ddv pairs unchanged)."""
    start = time.perf_counter()
    points = core_points(probe.source, seeds=seeds, variant="boundary", seed=seed)
    return Probe(source=probe.source, core=points, source_probs=probe.source.probs(points.inputs),
                 pairs=probe.pairs, source_ddv=probe.source_ddv, seconds=time.perf_counter() - start)


def run(root: Path, manifest: dict, probes: Sequence[str] = tuple(PROBES),
        log: Callable[[str], None] = print, seed: int = 0) -> tuple[list[Pair], Timings]:
    """Verify every comparison pair with every method under every probe, each probe searched from `seed`
    (its random starts and, for the conferrable probe, its surrogates: another seed tells how much a
    figure owes to one draw).

    Returns:
        The pairs, and timings: `load` {model: (wall, CPU seconds)}, `probe:NAME` {source: (wall, CPU)},
        `calibrate:NAME` {source: (wall, CPU)} (scoring all its references), `cached:NAME` {source: (wall,
        CPU)} (a later pair from scratch, the conferrable probe read from the probe cache).
    """
    cache_root = root / ".probe-cache"
    shutil.rmtree(cache_root, ignore_errors=True)  # every run searches afresh: its probe timings are cold
    real = np.load(root / manifest["seeds"])
    rows = {m["name"]: m for m in manifest["models"]}
    times: Timings = defaultdict(dict)
    loaded: dict[str, RunnableModel] = {}

    def model(name: str) -> RunnableModel:
        if name not in loaded:
            start, cpu = time.perf_counter(), time.process_time()
            loaded[name] = load_runnable(str(root / name))
            times["load"][name] = (time.perf_counter() - start, time.process_time() - cpu)
        return loaded[name]

    by_source: dict[str, list[tuple[dict, str, str]]] = defaultdict(list)
    for src, suspect, relation, kind in comparisons(manifest):
        by_source[src["name"]].append((suspect, relation, kind))
    pairs: list[Pair] = []
    for source_name, suspects in by_source.items():
        src_row = rows[source_name]
        source = model(source_name)
        calibration = src_row["seed"] == CALIBRATION_SEED

        def works(row: dict, src_row: dict = src_row) -> bool:
            return row["relation"] != "pirated" or row["accuracy"] >= WORKING * src_row["accuracy"]
        # The cluster method's references, known to the owner and not scored there: a homolog (the
        # architecture's last extra seed) and a pirated copy (the source's own short fine-tune).
        ref_homolog = max((m["name"] for m in manifest["models"]
                           if m["arch"] == src_row["arch"] and m["kind"] == "homolog-seed"), default=None)
        ref_pirated = next((m["name"] for m in manifest["models"]
                            if m["lineage"] == source_name and m["kind"] == "ft-short"), None)
        # The calibration's references: same-data homologs the owner could train, extra seeds first.
        pool = [m["name"] for m in manifest["models"] if m["arch"] == src_row["arch"] and m["name"] != source_name
                and m["kind"] == "homolog-seed"]
        pool += [m["name"] for m in manifest["models"] if m["arch"] == src_row["arch"]
                 and m["name"] != source_name and m["relation"] == "original"]
        base: Probe | None = None
        for probe_name in probes:
            inputs, points = PROBES[probe_name]
            seeds = real if inputs == "real" else None
            start, cpu = time.perf_counter(), time.process_time()
            if points == "conferrable":
                # The owner's homolog references shape the probe (surrogates: distilled by make_probe);
                # they are then no suspects of this probe.
                shaping = _shaping_references(manifest, source_name)
                cache = ProbeCache(cache_root / probe_name)
                probe = make_probe(source, seeds=seeds, references={n: model(n) for n in shaping}, cache=cache,
                                   seed=seed)
                times[f"probe:{probe_name}"][source_name] = (time.perf_counter() - start, time.process_time() - cpu)
                times[f"cached:{probe_name}"][source_name] = _cached_pair(root, source_name, shaping, suspects, seeds,
                                                                          cache, seed)
                for suspect_row, relation, kind in suspects:
                    if suspect_row["name"] in shaping:
                        continue
                    for method in PAIR_METHODS:
                        start, cpu = time.perf_counter(), time.process_time()
                        v = verify_pair(probe, model(suspect_row["name"]), method)
                        pairs.append(Pair(probe_name, method, source_name, suspect_row["name"], relation, kind,
                                          calibration, v.score, v.verdict, time.perf_counter() - start,
                                          time.process_time() - cpu, v.reason, works(suspect_row)))
                continue
            if points == "core":
                probe = make_probe(source, seeds=seeds, seed=seed)
                if inputs == "real":
                    base = probe
            else:
                core = base if base is not None else make_probe(source, seeds=seeds, seed=seed)
                probe = _boundary_probe(core, seeds, seed)
            times[f"probe:{probe_name}"][source_name] = (time.perf_counter() - start, time.process_time() - cpu)
            methods = PAIR_METHODS if points == "core" else ("agreement", "distance")
            references = {n: model(n) for n in pool}
            start, cpu = time.perf_counter(), time.process_time()
            every = calibrate_on_references(probe, references, methods=methods)
            times[f"calibrate:{probe_name}"][source_name] = (time.perf_counter() - start, time.process_time() - cpu)
            for suspect_row, relation, kind in suspects:
                suspect = model(suspect_row["name"])
                # Leave-one-out: never the suspect among its own references, nor the original it derives from.
                usable = [n for n in pool if n not in (suspect_row["name"], suspect_row["lineage"])]
                for method in methods:
                    start, cpu = time.perf_counter(), time.process_time()
                    v = verify_pair(probe, suspect, method)
                    pairs.append(Pair(probe_name, method, source_name, suspect_row["name"], relation, kind,
                                      calibration, v.score, v.verdict, time.perf_counter() - start,
                                      time.process_time() - cpu, v.reason, works(suspect_row)))
                    for suffix, k in REFERENCE_SETS.items():
                        kept = usable if k is None else usable[:k]
                        start, cpu = time.perf_counter(), time.process_time()
                        v = verify_pair(probe, suspect, method,
                                        calibration=every.excluding(*(n for n in pool if n not in kept)))
                        pairs.append(Pair(probe_name, f"{method}{suffix}", source_name, suspect_row["name"],
                                          relation, kind, calibration, v.calibrated_score, v.verdict,
                                          time.perf_counter() - start, time.process_time() - cpu, v.reason,
                                          works(suspect_row)))
            scored = [(r, rel, k) for r, rel, k in suspects if r["name"] not in (ref_homolog, ref_pirated)]
            # cluster: each suspect alone with both references (its verdict does not hang on the others).
            refs = {"homolog": [model(n) for n in (ref_homolog,) if n],
                    "pirated": [model(n) for n in (ref_pirated,) if n]}
            for suspect_row, relation, kind in scored:
                start, cpu = time.perf_counter(), time.process_time()
                v = verify_group(probe, [model(suspect_row["name"])], refs)[0]
                pairs.append(Pair(probe_name, "cluster", source_name, suspect_row["name"], relation, kind,
                                  calibration, v.score, v.verdict, time.perf_counter() - start,
                                  time.process_time() - cpu, v.reason, works(suspect_row)))
            # cluster-all: all of the source's suspects in one group with the homolog reference, as DeepCore
            # clusters a batch; per-pair seconds are the group's over its size.
            group = [model(r["name"]) for r, _, _ in scored]
            start, cpu = time.perf_counter(), time.process_time()
            verdicts = verify_group(probe, group, {"homolog": refs["homolog"]})
            per_pair = (time.perf_counter() - start) / max(1, len(scored))
            per_pair_cpu = (time.process_time() - cpu) / max(1, len(scored))
            for (suspect_row, relation, kind), v in zip(scored, verdicts, strict=True):
                pairs.append(Pair(probe_name, "cluster-all", source_name, suspect_row["name"], relation, kind,
                                  calibration, v.score, v.verdict, per_pair, per_pair_cpu, v.reason,
                                  works(suspect_row)))
        log(f"{source_name}: {len(suspects)} suspects, {len(probes)} probes")
    return pairs, dict(times)


def _cached_pair(root: Path, source: str, shaping: list[str], suspects: list[tuple[dict, str, str]],
                 seeds: np.ndarray | None, cache: ProbeCache, seed: int = 0) -> tuple[float, float]:
    """(wall, CPU) of a later query about the same source: the source, its references and a suspect
    loaded from disk, the probe read from the cache the first query filled, one `agreement` pair."""
    suspect = next(row["name"] for row, _, _ in suspects if row["name"] not in shaping)
    start, cpu = time.perf_counter(), time.process_time()
    source_model = load_runnable(str(root / source))
    references = {n: load_runnable(str(root / n)) for n in shaping}
    probe = make_probe(source_model, seeds=seeds, references=references, cache=cache, seed=seed)
    verify_pair(probe, load_runnable(str(root / suspect)), "agreement")
    seconds = (time.perf_counter() - start, time.process_time() - cpu)
    if not (probe.shaped_by or {}).get("cached"):
        raise RuntimeError(f"{source}: the probe cache missed the probe the first query stored")
    return seconds


def first_pirated(manifest: dict) -> dict[str, str]:
    """Each source of the zoo and its first pirated suspect: the pair a cold query is timed on."""
    firsts: dict[str, str] = {}
    for src, suspect, relation, _ in comparisons(manifest):
        if relation == "pirated":
            firsts.setdefault(src["name"], suspect["name"])
    return firsts


def cold_pair(root: Path, manifest: dict, source: str, suspect: str, seeds: np.ndarray,
              device: str = "cpu") -> tuple[float, float, Verdict]:
    """(wall, CPU seconds, verdict) of a first `agreement` pair from scratch on `device`: the source, its
    shaping references and the suspect loaded, the conferrable probe built with nothing cached, the pair."""
    start, cpu = time.perf_counter(), time.process_time()
    model = load_runnable(str(root / source), device=device)
    references = {n: load_runnable(str(root / n), device=device) for n in _shaping_references(manifest, source)}
    probe = make_probe(model, seeds=seeds, references=references)
    verdict = verify_pair(probe, load_runnable(str(root / suspect), device=device), "agreement")
    return time.perf_counter() - start, time.process_time() - cpu, verdict


def cold_on_all_cores(root: Path, manifest: dict, log: Callable[[str], None] = print) -> dict[str, tuple[float, float]]:
    """(wall, CPU) of a first `agreement` pair from scratch on every core, per source (`cold_pair`; the
    surrogates and the search side by side, `pipeline.verify.workers`). The rest of the bench runs on one
    torch thread."""
    real = np.load(root / manifest["seeds"])
    out: dict[str, tuple[float, float]] = {}
    with torch_threads(os.cpu_count() or 1):
        for source, suspect in first_pirated(manifest).items():
            wall, cpu, _ = cold_pair(root, manifest, source, suspect, real)
            out[source] = (wall, cpu)
            log(f"{source}: a cold conferrable pair on {torch.get_num_threads()} threads in {wall:.1f} s")
    return out


def stage1_verdicts(root: Path, manifest: dict) -> dict[tuple[str, str], str]:
    """The default spec's verdict on every comparison pair: "copy" when the whole-model code or any
    per-block code is within `copy`, else the whole model's verdict (what the sweep's stage 1 says)."""
    codes = {m["name"]: hash_uri(str(root / m["name"])) for m in manifest["models"]}
    out = {}
    for src, suspect, _, _ in comparisons(manifest):
        report = compare(codes[src["name"]], codes[suspect["name"]])
        copy = report["verdict"] == "copy" or any(b["verdict"] == "copy" for b in report["blocks"])
        out[src["name"], suspect["name"]] = "copy" if copy else report["verdict"]
    return out


def with_stage1(pairs: list[Pair], probe: str) -> list[Pair]:
    """`METHOD+stage1` pairs of `probe`: the verdict of both stages together, as the sweep reports them. A pair
    stage 1 calls a copy is pirated whatever its behaviour (its score set to the method's closest), the others
    keep their stage-2 score and verdict."""
    out = []
    for p in pairs:
        if p.probe == probe and p.method in PAIR_METHODS:
            copy = p.stage1 == "copy"
            closest = 0.0 if p.method == "distance" else 1.0
            out.append(replace(p, method=f"{p.method}+stage1", score=closest if copy else p.score,
                               verdict="pirated" if copy else p.verdict))
    return out


def _shaping_references(manifest: dict, source: str) -> list[str]:
    """The homolog references that shape a source's conferrable probe: its architecture's extra seeds."""
    arch = next(m["arch"] for m in manifest["models"] if m["name"] == source)
    return [m["name"] for m in manifest["models"] if m["arch"] == arch and m["kind"] == "homolog-seed"]


# ------------------------------------------------------------------------------------------ metrics


def _closeness(p: Pair) -> float:
    """The score oriented so that larger means closer to the source; an error is the farthest."""
    if p.score is None:
        return -np.inf
    return -p.score if p.method in DISTANCES else p.score


def _auc(pos: list[Pair], neg: list[Pair]) -> float | None:
    if not pos or not neg:
        return None
    s = np.array([_closeness(p) for p in pos + neg])
    s[~np.isfinite(s)] = np.nanmin(np.where(np.isfinite(s), s, np.nan)) - 1 if np.isfinite(s).any() else 0
    return float(roc_auc_score([1] * len(pos) + [0] * len(neg), s))


def _rate(pairs: list[Pair], called: Callable[[Pair], bool]) -> tuple[float | None, int, int]:
    hits = sum(called(p) for p in pairs)
    return (hits / len(pairs) if pairs else None), hits, len(pairs)


def calibrate(pos: list[Pair], neg: list[Pair], target: float = TARGET_FIR) -> float | None:
    """A closeness cut with false identification <= target over `neg`: halfway between the highest
    negative it must exclude and the next score above it (a positive's, when there is one).

    Returns None without negatives."""
    negs = np.sort([_closeness(p) for p in neg])[::-1]
    if not len(negs):
        return None
    allowed = int(np.floor(target * len(negs)))
    edge = negs[allowed]
    above = [c for c in (_closeness(p) for p in pos) if c > edge]
    if not np.isfinite(edge):
        return float(min(above)) if above else None
    return float((edge + min(above)) / 2) if above else float(edge + 1e-6)


@dataclass
class Report:
    """The figures for one (probe, method)."""

    probe: str
    method: str
    auc: dict[str, float | None]  # "all" and per pirated kind: pirated vs homolog
    auc_per_source: float | None  # the mean over sources of each one's pirated vs homolog AUC
    auc_vs_all: float | None  # pirated vs homolog and unrelated
    missed: dict[str, tuple[float | None, int, int]]  # per pirated kind and "all"
    false_homolog: dict[str, tuple[float | None, int, int]]  # per homolog kind and "all"
    false_unrelated: dict[str, tuple[float | None, int, int]]
    errors: int
    calibrated: float | None  # the cut in the method's own score units
    held_out: dict[str, tuple[float | None, int, int]]  # "MIR", "FIR homolog", "FIR unrelated" at the cut
    held_out_shipped: dict[str, tuple[float | None, int, int]]  # the same at the shipped thresholds


def evaluate(pairs: list[Pair], probe: str, method: str) -> Report:
    ps = [p for p in pairs if p.probe == probe and p.method == method]
    pirated = [p for p in ps if p.relation == "pirated"]
    homolog = [p for p in ps if p.relation == "homolog"]
    unrelated = [p for p in ps if p.relation == "unrelated"]

    def is_pirated(p: Pair) -> bool:
        return p.verdict == "pirated"

    working = [p for p in pirated if p.working]
    auc = {"all": _auc(pirated, homolog), "working": _auc(working, homolog)}
    per_source = [_auc([p for p in pirated if p.source == s], [p for p in homolog if p.source == s])
                  for s in sorted({p.source for p in ps})]
    per_source = [a for a in per_source if a is not None]
    missed = {"all": _rate(pirated, lambda p: not is_pirated(p)),
              "working": _rate(working, lambda p: not is_pirated(p))}
    for kind in PIRATED_KINDS:
        of_kind = [p for p in pirated if p.kind == kind]
        if of_kind:
            auc[kind] = _auc(of_kind, homolog)
            missed[kind] = _rate(of_kind, lambda p: not is_pirated(p))
    false_h = {"all": _rate(homolog, is_pirated)}
    false_h.update({k: _rate([p for p in homolog if p.kind == k], is_pirated) for k in HOMOLOG_KINDS
                    if any(p.kind == k for p in homolog)})
    false_u = {"all": _rate(unrelated, is_pirated)}
    false_u.update({k: _rate([p for p in unrelated if p.kind == k], is_pirated) for k in UNRELATED_KINDS
                    if any(p.kind == k for p in unrelated)})

    cal = [p for p in ps if p.calibration]
    test = [p for p in ps if not p.calibration]
    cut = calibrate([p for p in cal if p.relation == "pirated"], [p for p in cal if p.relation != "pirated"])

    def rates(called: Callable[[Pair], bool]) -> dict[str, tuple[float | None, int, int]]:
        return {
            "MIR": _rate([p for p in test if p.relation == "pirated"], lambda p: not called(p)),
            "FIR homolog": _rate([p for p in test if p.relation == "homolog"], called),
            "FIR unrelated": _rate([p for p in test if p.relation == "unrelated"], called),
        }

    held_out = rates(lambda p: cut is not None and _closeness(p) >= cut)
    score_cut = None if cut is None else (-cut if method in DISTANCES else cut)
    return Report(probe, method, auc, float(np.mean(per_source)) if per_source else None,
                  _auc(pirated, homolog + unrelated), missed, false_h, false_u,
                  sum(p.verdict == "error" for p in ps), score_cut, held_out, rates(is_pirated))


# ------------------------------------------------------------------------------------------- render


def _pct(r: tuple[float | None, int, int]) -> str:
    rate, hits, n = r
    return "-" if rate is None else f"{100 * rate:.1f}% ({hits}/{n})"


def _f(v: float | None, digits: int = 3) -> str:
    return "-" if v is None else f"{v:.{digits}f}"


def _seconds(values: Sequence[tuple[float, float]]) -> str:
    """Median / p90 of wall seconds, then of CPU seconds."""
    if not values:
        return "- | -"
    wall, cpu = np.array(values).T
    return (f"{np.median(wall):.3f} / {np.percentile(wall, 90):.3f} | "
            f"{np.median(cpu):.3f} / {np.percentile(cpu, 90):.3f}")


def render(reports: dict[tuple[str, str], Report], pairs: list[Pair], times: Timings,
           manifest: dict) -> str:
    models = manifest["models"]
    n_by = defaultdict(int)
    for m in models:
        n_by[m["relation"]] += 1
    main = [reports["core-real", m] for m in METHODS if ("core-real", m) in reports]
    head = "| | " + " | ".join(f"`{r.method}`" for r in main) + " |\n|---|" + "---|" * len(main)
    shipped = ", ".join(
        f"`{m}` pirated {'>=' if t.higher_is_closer else '<='} {t.pirated}" for m, t in THRESHOLDS.items())
    lines = [
        "## Behavioural verification (`python -m bench.verify`)",
        "",
        f"Zoo (bench/verify_zoo.py, cached in bench/.cache/verify_zoo, built in {manifest.get('seconds', '?')} s "
        f"wall on 1 torch thread, beside other jobs on a shared 2-core machine, {cpu_model()}; like the quality zoo, "
        f"trained with portable numerics, bench/numerics.py, whose bytes should not depend on the CPU kind; the "
        f"surrogates the probes train run on the machine's own kernels): {len(models)} models, "
        f"{n_by['original']} originals "
        f"({', '.join(sorted({m['arch'] for m in models}))}), {n_by['pirated']} pirated copies, "
        f"{n_by['homolog']} shared homologs, {n_by['unrelated']} other-task models. "
        f"{len({(p.source, p.suspect) for p in pairs})} (source, suspect) pairs. Shipped thresholds "
        f"(pipeline/verify/behavior.py): {shipped}; `cluster` calls pirated whatever lands in the source's "
        "group.",
        "",
    ]
    if not main:  # no core-real probe run (`--probes`): the conferrable probe's figures only
        return "\n".join(lines + _render_conferrable(reports, manifest)) + "\n"
    lines += [
        "### Core points from real inputs (the digits test split): ROC AUC, pirated vs homolog",
        "",
        head,
    ]
    kinds = ["all", "working", *[k for k in PIRATED_KINDS if k in main[0].auc]]
    n_pirated = {k: main[0].missed[k][2] for k in kinds}
    n_homolog = main[0].false_homolog["all"][2]
    by_name = {m["name"]: m for m in models}
    acc = {k: np.mean([m["accuracy"] for m in models if m["relation"] == "pirated" and (
        k in ("all", m["kind"]) or k == "working" and m["accuracy"] >= WORKING * by_name[m["lineage"]]["accuracy"])])
        for k in kinds}
    for k in kinds:
        lines.append(f"| {k} ({n_pirated[k]} vs {n_homolog}; accuracy {acc[k]:.2f}) | "
                     + " | ".join(_f(r.auc.get(k)) for r in main) + " |")
    lines.append("| pirated vs homolog + unrelated | " + " | ".join(_f(r.auc_vs_all) for r in main) + " |")
    lines.append("| pirated vs homolog, each source apart (mean) | " + " | ".join(_f(r.auc_per_source) for r in main)
                 + " |")
    lines += ["", "Missed identification rate (pirated not called pirated) at the shipped thresholds:", "", head]
    for k in kinds:
        lines.append(f"| {k} | " + " | ".join(_pct(r.missed.get(k, (None, 0, 0))) for r in main) + " |")
    lines += ["", "False identification rate (called pirated) at the shipped thresholds:", "", head]
    for label, attr in (("homolog", "false_homolog"), ("unrelated", "false_unrelated")):
        for k in getattr(main[0], attr):
            name = f"{label}: all" if k == "all" else k
            lines.append(f"| {name} | " + " | ".join(_pct(getattr(r, attr).get(k, (None, 0, 0))) for r in main) + " |")
    lines.append("| errors (no verdict) | " + " | ".join(str(r.errors) for r in main) + " |")
    lines += ["", f"Calibration: the cut with false identification <= {100 * TARGET_FIR:g}% on the seed-"
              f"{CALIBRATION_SEED} lineages (homologs and unrelated together), then the held-out lineages:", "", head,
              "| calibrated cut (score units) | " + " | ".join(_f(r.calibrated, 4) for r in main) + " |"]
    for key in ("MIR", "FIR homolog", "FIR unrelated"):
        lines.append(f"| held out, {key}, calibrated / shipped | " + " | ".join(
            f"{_pct(r.held_out[key])} / {_pct(r.held_out_shipped[key])}" for r in main) + " |")
    lines += _render_references(reports, times, manifest)
    lines += _render_conferrable(reports, manifest)
    others = [p for p in PROBES if p != "core-real" and any((p, m) in reports for m in METHODS)]
    if others:
        lines += ["", "### The probes side by side: AUC pirated vs homolog (all) / MIR / FIR homolog / FIR unrelated "
                  "at the shipped thresholds", "", "| probe | " + " | ".join(f"`{m}`" for m in METHODS)
                  + " |\n|---|" + "---|" * len(METHODS)]
        for probe in ("core-real", *others):
            cells = []
            for m in METHODS:
                r = reports.get((probe, m))
                cells.append("-" if r is None else f"{_f(r.auc['all'])} / {_pct(r.missed['all']).split(' ')[0]} / "
                             f"{_pct(r.false_homolog['all']).split(' ')[0]} / "
                             f"{_pct(r.false_unrelated['all']).split(' ')[0]}")
            lines.append(f"| {probe} | " + " | ".join(cells) + " |")
        lines += ["", "AUC per pirated kind, per probe:", "", "| probe, method | " + " | ".join(kinds)
                  + " |\n|---|" + "---|" * len(kinds)]
        for probe in ("core-real", *others):
            for m in METHODS:
                r = reports.get((probe, m))
                if r is not None:
                    lines.append(f"| {probe}, `{m}` | " + " | ".join(_f(r.auc.get(k)) for k in kinds) + " |")
    loads = list(times.get("load", {}).values())
    arch = {m["name"]: m["arch"] for m in models}
    lines += ["", "### Seconds on CPU (1 torch thread): median / p90, wall clock and this process's CPU time", "",
              "| step | wall | CPU |", "|---|---|---|",
              f"| load a model (`load_runnable`, {len(loads)} models) | {_seconds(loads)} |"]
    for probe in PROBES:
        by_source = times.get(f"probe:{probe}", {})
        for a in sorted({arch[s] for s in by_source}):
            values = [v for s, v in by_source.items() if arch[s] == a]
            lines.append(f"| probe of a source, {probe}, {a} ({len(values)} sources) | {_seconds(values)} |")
    for m in METHODS:
        values = [(p.seconds, p.cpu) for p in pairs if p.probe == "core-real" and p.method == m]
        lines.append(f"| one pair, `{m}`, given the probe | {_seconds(values)} |")
    scratch = {m: _from_scratch(pairs, times, m) for m in METHODS}
    for m in METHODS:
        lines.append(f"| a pair from scratch, `{m}`: load both, the core-real probe, the pair | "
                     f"{_seconds(scratch[m])} |")
    cold = _cold_conferrable(pairs, times, manifest)
    for a, values in sorted(cold.items()):
        lines.append(f"| a pair from scratch, `agreement`, the conferrable probe cold, {a}: load the source, its 3 "
                     f"references and the suspect, distil the surrogates, search the probe, the pair | "
                     f"{_seconds(values)} |")
    cores: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for source, values in times.get(f"cores:{CONFERRABLE}", {}).items():
        cores[arch[source]].append(values)
    for a, values in sorted(cores.items()):
        lines.append(f"| the same on all {os.cpu_count()} cores (the students and the search's models side by "
                     f"side), {a} ({len(values)} sources) | {_seconds(values)} |")
    cached = list(times.get(f"cached:{CONFERRABLE}", {}).values())
    if cached:
        lines.append("| a pair from scratch, `agreement`, the conferrable probe in the probe cache: load the source, "
                     f"its 3 references and the suspect, read the probe, the pair | {_seconds(cached)} |")
    lines += ["", "Goals (issue 6): AUC >= 0.95 pirated vs homolog; false identification <= 1% at the calibrated "
              "threshold (held out); a verified pair under 10 s on CPU:", ""]
    for r in main:
        p90 = np.percentile([w for w, _ in scratch[r.method]], 90) if scratch[r.method] else float("nan")
        fir = [r.held_out[k] for k in ("FIR homolog", "FIR unrelated")]
        hits, n = sum(f[1] for f in fir), sum(f[2] for f in fir)
        lines.append(f"- `{r.method}`: AUC {_f(r.auc['all'])} ({'met' if (r.auc['all'] or 0) >= 0.95 else 'not met'}); "
                     f"held-out FIR {_pct((hits / n if n else None, hits, n))} at the calibrated cut "
                     f"({'met' if n and hits / n <= TARGET_FIR else 'not met'}), held-out MIR there "
                     f"{_pct(r.held_out['MIR'])}; "
                     f"pair from scratch p90 {p90:.2f} s ({'met' if p90 < 10 else 'not met'}).")
    for m in PAIR_METHODS:
        r = reports.get(("core-real", f"{m}+refs"))
        if r is None:
            continue
        fir = [r.false_homolog["all"], r.false_unrelated["all"]]
        hits, n = sum(f[1] for f in fir), sum(f[2] for f in fir)
        extra = [np.add(c, _reference_loads(times, manifest, s_)) for s_, c in
                 times.get("calibrate:core-real", {}).items()]
        pair = np.percentile([w for w, _ in scratch[m]], 90) if scratch[m] else float("nan")
        refs = np.percentile([w for w, _ in extra], 90) if extra else 0.0
        met = "met" if n and hits / n <= TARGET_FIR else "not met"
        lines.append(f"- `{m}` with per-source thresholds (leave-one-out references): AUC {_f(r.auc['all'])} "
                     f"({'met' if (r.auc['all'] or 0) >= 0.95 else 'not met'}); FIR "
                     f"{_pct((hits / n if n else None, hits, n))} at the shipped margin ({met}), MIR there "
                     f"{_pct(r.missed['all'])}; a pair from scratch p90 {pair:.2f} s + the references p90 "
                     f"{refs:.2f} s ({'met' if pair + refs < 10 else 'not met'}).")
    probe_times = list(times.get(f"probe:{CONFERRABLE}", {}).values())
    cold_p90 = {a: float(np.percentile([w for w, _ in v], 90)) for a, v in sorted(cold.items())}
    cold_text = ", ".join(f"{a} {t:.1f} s ({'met' if t < 10 else 'not met'})" for a, t in cold_p90.items())
    if cores:
        cores_p90 = {a: float(np.percentile([w for w, _ in v], 90)) for a, v in sorted(cores.items())}
        cold_text += f"; on all {os.cpu_count()} cores " + ", ".join(
            f"{a} {t:.1f} s ({'met' if t < 10 else 'not met'})" for a, t in cores_p90.items())
    for m in ("agreement", "distance"):
        r = reports.get((CONFERRABLE, m))
        if r is None or not probe_times:
            continue
        fir = [r.false_homolog["all"], r.false_unrelated["all"]]
        hits, n = sum(f[1] for f in fir), sum(f[2] for f in fir)
        given = [p.seconds for p in pairs if p.probe == CONFERRABLE and p.method == m]
        lines.append(f"- `{m}` on the conferrable probe (3 references shape it): AUC {_f(r.auc['all'])} "
                     f"({'met' if (r.auc['all'] or 0) >= 0.95 else 'not met'}), {_f(r.auc['working'])} over the "
                     f"copies that still work; FIR {_pct((hits / n if n else None, hits, n))} at the shipped "
                     f"threshold ({'met' if n and hits / n <= TARGET_FIR else 'not met'}), MIR there "
                     f"{_pct(r.missed['all'])}; a pair given the probe p90 {np.percentile(given, 90):.3f} s, the "
                     f"probe (surrogates and search, once per source) p90 "
                     f"{np.percentile([w for w, _ in probe_times], 90):.1f} s; a cold pair from scratch (load, "
                     f"surrogates, search, the pair) p90 {cold_text}"
                     + (f"; a later pair from scratch, the probe read from the probe cache, p90 "
                        f"{np.percentile([w for w, _ in cached], 90):.2f} s "
                        f"({'met' if np.percentile([w for w, _ in cached], 90) < 10 else 'not met'})" if cached else "")
                     + ".")
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


def _render_conferrable(reports: dict[tuple[str, str], Report], manifest: dict) -> list[str]:
    """The conferrable probe's figures: AUC per kind, rates at its thresholds, a held-out cut."""
    methods = (*PAIR_METHODS, *(f"{m}+stage1" for m in PAIR_METHODS))
    rows = [(m, reports[CONFERRABLE, m]) for m in methods if (CONFERRABLE, m) in reports]
    if not rows:
        return []
    kinds = ["all", "working", *[k for k in PIRATED_KINDS if k in rows[0][1].auc]]
    sources = [m["name"] for m in manifest["models"] if m["relation"] == "original"]
    shaping = {len(_shaping_references(manifest, s)) for s in sources}
    cuts = ", ".join(f"`{m}` pirated {'>=' if t.higher_is_closer else '<='} {t.pirated}"
                     for m, t in CONFERRABLE_THRESHOLDS.items())
    lines = [
        "", f"### Conferrable probe (`{CONFERRABLE}`): core points the owner's references reject", "",
        "The default probe when three references or more are given (pipeline/verify/behavior.py `make_probe`). "
        "Each source's "
        f"probe is shaped by {'/'.join(map(str, sorted(shaping)))} homolog references (its architecture's extra "
        "seeds, `homolog-seed`) and four surrogates the library distils from the source on the seeds (soft "
        "labels and top-1 labels, two rounds: `pipeline.verify.surrogates`): points the source and the "
        "surrogates label alike and the references do not (`conferrable_points`). `agreement` is scored with "
        "the suspect's class prior divided out (`prior_corrected`). The shaping references are no suspects here; every "
        f"other pair is as above. Thresholds: CONFERRABLE_THRESHOLDS ({cuts}); `ddv`, whose input pairs the "
        "references do not shape, keeps per-source thresholds calibrated on them. `METHOD+stage1`: both stages "
        "together, as a sweep reports a pair: one the default weight hash calls a copy (the whole model or a block "
        "within its `copy` threshold) is pirated whatever its behaviour.", "",
        "ROC AUC, pirated vs homolog:", "",
        "| | " + " | ".join(kinds) + " | vs homolog + unrelated | each source apart (mean) |",
        "|---|" + "---|" * (len(kinds) + 2),
    ]
    for m, r in rows:
        lines.append(f"| `{m}` | " + " | ".join(_f(r.auc.get(k)) for k in kinds)
                     + f" | {_f(r.auc_vs_all)} | {_f(r.auc_per_source)} |")
    miss_kinds = ["all", "working", *[k for k in PIRATED_KINDS if k in rows[0][1].missed]]
    fir_kinds = list(rows[0][1].false_homolog)
    lines += ["", "Missed identification rate at the thresholds:", "",
              "| | " + " | ".join(miss_kinds) + " |", "|---|" + "---|" * len(miss_kinds)]
    for m, r in rows:
        lines.append(f"| `{m}` | " + " | ".join(_pct(r.missed[k]) for k in miss_kinds) + " |")
    lines += ["", "False identification rate at the thresholds:", "",
              "| | " + " | ".join(f"homolog: {k}" for k in fir_kinds) + " | unrelated | errors |",
              "|---|" + "---|" * (len(fir_kinds) + 2)]
    for m, r in rows:
        lines.append(f"| `{m}` | " + " | ".join(_pct(r.false_homolog[k]) for k in fir_kinds)
                     + f" | {_pct(r.false_unrelated['all'])} | {r.errors} |")
    lines += ["", f"A cut chosen on the seed-{CALIBRATION_SEED} sources (FIR <= {100 * TARGET_FIR:g}% there), then "
              "the held-out sources, beside the shipped thresholds:", ""]
    return lines + _held_out_table([(f"`{m}`", r) for m, r in rows])


def _held_out_table(rows: list[tuple[str, Report]]) -> list[str]:
    """Per row: the cut chosen on the calibration sources, and the held-out rates at it and as shipped."""
    lines = ["| | cut | held-out MIR, cut / shipped | held-out FIR homolog, cut / shipped | held-out FIR unrelated, "
             "cut / shipped |", "|---|---|---|---|---|"]
    for label, r in rows:
        lines.append(f"| {label} | {_f(r.calibrated, 4)} | " + " | ".join(
            f"{_pct(r.held_out[k])} / {_pct(r.held_out_shipped[k])}" for k in ("MIR", "FIR homolog", "FIR unrelated"))
            + " |")
    return lines


def _reference_pool(manifest: dict, source: str) -> list[str]:
    """The calibration's references of a source (as `run` picks them): same-data homologs, extra seeds first."""
    models = manifest["models"]
    arch = next(m["arch"] for m in models if m["name"] == source)
    return ([m["name"] for m in models if m["arch"] == arch and m["kind"] == "homolog-seed"]
            + [m["name"] for m in models if m["arch"] == arch and m["relation"] == "original" and m["name"] != source])


def _reference_loads(times: Timings, manifest: dict, source: str) -> tuple[float, float]:
    """(wall, CPU) seconds loading all of a source's references."""
    load = times.get("load", {})
    got = [load[n] for n in _reference_pool(manifest, source) if n in load]
    return (float(sum(w for w, _ in got)), float(sum(c for _, c in got))) if got else (0.0, 0.0)


def _render_references(reports: dict[tuple[str, str], Report], times: Timings, manifest: dict) -> list[str]:
    """The per-source calibration's figures beside the global thresholds' (core-real, then other probes)."""
    rows = [row for m in PAIR_METHODS for row in
            [(m, "global", reports.get(("core-real", m)))]
            + [(m, suffix, reports.get(("core-real", f"{m}{suffix}"))) for suffix in REFERENCE_SETS]]
    rows = [(m, label, r) for m, label, r in rows if r is not None]
    if not any(label != "global" for _, label, _ in rows):
        return []
    names = {"global": "global THRESHOLDS", "+refs": "4-5 references", "+2refs": "2 references", "+1ref": "1 reference"}
    kinds = ["all", "working", *[k for k in PIRATED_KINDS if k in rows[0][2].auc]]
    pools = {len(_reference_pool(manifest, m["name"])) for m in manifest["models"] if m["relation"] == "original"}
    margins = ", ".join(f"{m} {v}" for m, v in MARGINS.items())
    lines = [
        "", "### Per-source calibration against homolog references (core-real, leave-one-out)", "",
        f"Each source's references are its same-data homologs (`homolog-seed`: {', '.join(map(str, sorted(pools)))} "
        "per source, the architecture's extra seeds first, then its other originals), less the suspect and the "
        "original the suspect derives from: all that are left (4-5), or the first 2, or the first 1 "
        "(pipeline/verify/behavior.py `calibrate`). Per-source thresholds (`Calibration`): pirated when the "
        f"suspect closes a share of the gap between the closest reference and the source (MARGINS: {margins}); "
        "unrelated below 3/4 of the farthest reference's closeness (or the global cut, if lower). AUC over the "
        "calibrated scores (0 at the closest reference, 1 at the source itself), pooled over all 9 sources; the "
        "global rows are the raw scores and THRESHOLDS, as above. MARGINS were chosen on this zoo, leave-one-out "
        "over these same homologs (the least margins that kept every held-out same-data homolog below the cut with "
        "two references), so the rates at them are in-sample; the table of cuts chosen on the seed-0 sources is the "
        "held-out check.", "",
        "ROC AUC, pirated vs homolog:", "",
        "| | " + " | ".join(kinds) + " | each source apart (mean) |",
        "|---|" + "---|" * (len(kinds) + 1),
    ]
    for m, label, r in rows:
        lines.append(f"| `{m}`, {names[label]} | " + " | ".join(_f(r.auc.get(k)) for k in kinds)
                     + f" | {_f(r.auc_per_source)} |")
    fir_kinds = [k for k in rows[0][2].false_homolog if k != "all"]
    lines += ["", "Missed and false identification rates at the thresholds (per-source ones for the calibrated rows):",
              "", "| | MIR all | MIR working | FIR homolog | " + " | ".join(f"FIR {k}" for k in fir_kinds)
              + " | FIR unrelated | errors |", "|---|" + "---|" * (len(fir_kinds) + 5)]
    for m, label, r in rows:
        lines.append(f"| `{m}`, {names[label]} | {_pct(r.missed['all'])} | {_pct(r.missed['working'])} | "
                     f"{_pct(r.false_homolog['all'])} | " + " | ".join(_pct(r.false_homolog[k]) for k in fir_kinds)
                     + f" | {_pct(r.false_unrelated['all'])} | {r.errors} |")
    miss_kinds = [k for k in PIRATED_KINDS if k in rows[0][2].missed]
    lines += ["", "Missed identification rate per pirated kind:", "",
              "| | " + " | ".join(miss_kinds) + " |", "|---|" + "---|" * len(miss_kinds)]
    for m, label, r in rows:
        lines.append(f"| `{m}`, {names[label]} | " + " | ".join(_pct(r.missed[k]).split(" ")[0] for k in miss_kinds)
                     + " |")
    lines += ["", f"A cut chosen on the seed-{CALIBRATION_SEED} sources (FIR <= {100 * TARGET_FIR:g}% there; "
              "calibrated units for the calibrated rows), then the held-out sources, beside the shipped ones:", ""]
    lines += _held_out_table([(f"`{m}`, {names[label]}", r) for m, label, r in rows])
    others = [p for p in PROBES if p != "core-real" and any((p, f"{m}+refs") in reports for m in PAIR_METHODS)]
    if others:
        lines += ["", "Other probes: AUC pirated vs homolog (all) / MIR / FIR homolog / FIR unrelated, global and with "
                  "4-5 references:", "", "| probe, method | global | 4-5 references | 2 references | 1 reference |",
                  "|---|---|---|---|---|"]
        for probe in others:
            for m in PAIR_METHODS:
                cells = []
                for key in (m, *(f"{m}{suffix}" for suffix in REFERENCE_SETS)):
                    r = reports.get((probe, key))
                    cells.append("-" if r is None else f"{_f(r.auc['all'])} / {_pct(r.missed['all']).split(' ')[0]} / "
                                 f"{_pct(r.false_homolog['all']).split(' ')[0]} / "
                                 f"{_pct(r.false_unrelated['all']).split(' ')[0]}")
                if any(c != "-" for c in cells):
                    lines.append(f"| {probe}, `{m}` | " + " | ".join(cells) + " |")
    arch = {m["name"]: m["arch"] for m in manifest["models"]}
    scored = times.get("calibrate:core-real", {})
    lines += ["", "What the references cost per source (all of its references, CPU, 1 torch thread): median / p90, "
              "wall | CPU:", "", "| step | wall | CPU |", "|---|---|---|"]
    for a in sorted({arch[s] for s in scored}):
        sources = [s for s in scored if arch[s] == a]
        n = len(_reference_pool(manifest, sources[0]))
        lines.append(f"| score {n} references against the core-real probe, {a} ({len(sources)} sources) | "
                     f"{_seconds([scored[s] for s in sources])} |")
        loads = [_reference_loads(times, manifest, s) for s in sources]
        lines.append(f"| load {n} references, {a} | {_seconds(loads)} |")
    return lines


def _cold_conferrable(pairs: list[Pair], times: Timings, manifest: dict) -> dict[str, list[tuple[float, float]]]:
    """(wall, CPU) per `agreement` pair of the conferrable probe from scratch, by architecture: loading the
    source, its shaping references and the suspect, the probe (surrogates and search, nothing cached), the
    pair."""
    load, probe = times.get("load", {}), times.get(f"probe:{CONFERRABLE}", {})
    arch = {m["name"]: m["arch"] for m in manifest["models"]}
    out: dict[str, list[tuple[float, float]]] = defaultdict(list)
    for p in pairs:
        if p.probe == CONFERRABLE and p.method == "agreement" and p.source in probe:
            models = [p.source, *_shaping_references(manifest, p.source), p.suspect]
            total = np.sum([load[m] for m in models], axis=0) + probe[p.source] + (p.seconds, p.cpu)
            out[arch[p.source]].append((float(total[0]), float(total[1])))
    return dict(out)


def _from_scratch(pairs: list[Pair], times: Timings, method: str) -> list[tuple[float, float]]:
    """(wall, CPU) per pair from scratch: loading both models (and, for `cluster`, its two references,
    at the median load), the source's core-real probe, the method's pair."""
    load, probe = times.get("load", {}), times.get("probe:core-real", {})
    median_load = np.median(list(load.values()), axis=0) if load else np.zeros(2)
    out = []
    for p in pairs:
        if p.probe == "core-real" and p.method == method and p.source in probe:
            total = np.add(load[p.source], load[p.suspect]) + probe[p.source] + (p.seconds, p.cpu)
            if method == "cluster":
                total = total + 2 * median_load
            out.append((float(total[0]), float(total[1])))
    return out


NOTES = """Notes. Relations per source (bench/verify_zoo.py `comparisons`): pirated = its own copies (weights
kept: ft-short, ft-long, prune50, prune80, prune80-ft, ft-prune-int8; no weights kept: distill and
distill-xarch on soft labels at temperature 4, extract on top-1 labels, all three queried on the attacker's
inputs, never the test split); homolog = same architecture outside its lineage (homolog-seed: other
originals and extra seeds; homolog-half: trained on one of two disjoint halves of the training split;
homolog-copy: other lineages' copies and students of that architecture); unrelated = other
architectures' originals (other-arch, trained on the same data) and the other-task models (task-ge5,
task-shuffled). `cluster` clusters each suspect with the source and two references (a homolog: the
architecture's last extra seed; a pirated copy: the source's ft-short), which are then not scored;
`cluster-all` clusters all of a source's suspects at once with the homolog reference, and its per-pair
seconds are the group's divided by its size. `working`: the pirated copies whose test accuracy is at least
0.9x their original's (bench/quality.py's rule; plain 80% pruning leaves CNNs and ResNets near chance,
and 50% pruning the ResNets). Pair counts in the first table are `agreement`'s (`cluster`
lacks its references). An error verdict counts as not pirated. The calibrated cut uses the seed-0 sources
only; held-out rates are over the other sources. Every probe here is one draw, searched from seed 0
(its random starts and surrogates); `--probe-seed N` searches another and prints its figures. Wall seconds
include the load of other jobs on this shared 2-core machine; CPU seconds are this process's own. No GPU
was at hand: `python -m bench.gpu` is the prepared check, a cold pair per source on CUDA and on all of that
machine's CPU cores."""


# --------------------------------------------------------------------------------------------- main


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.verify", description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=Path, default=DEFAULT_DIR, help="the zoo folder (built there if missing)")
    p.add_argument("--size", default="full", help="zoo size: full or tiny")
    p.add_argument("--probes", default=",".join(PROBES), help="comma-separated: " + ", ".join(PROBES))
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    p.add_argument("--probe-seed", type=int, default=0, metavar="N",
                   help="search every probe from seed N (default 0, the figures in RESULTS.md); another seed "
                        "prints only, as --no-write")
    p.add_argument("--json", type=Path, help="also write every pair's verdict and the timings here")
    p.add_argument("--from-json", type=Path, help="render the verdicts a previous --json wrote; verify nothing")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    """The bench on one torch thread (the caller's setting restored after): verify, render, write."""
    with torch_threads(1):
        return _bench(args)


def _bench(args: argparse.Namespace) -> int:
    manifest = build_verify_zoo(args.zoo, args.size, log=lambda s: print(s, flush=True))
    probes = [p for p in args.probes.split(",") if p]
    seed = args.probe_seed
    if args.from_json:
        saved = json.loads(args.from_json.read_text())
        seed = saved.get("probe_seed", 0)
        pairs = [Pair(**p) for p in saved["pairs"]]
        times = {k: {n: tuple(v) for n, v in d.items()} for k, d in saved["times"].items()}
        probes = [p for p in probes if any(x.probe == p for x in pairs)]
    else:
        start = time.perf_counter()
        pairs, times = run(args.zoo, manifest, probes, log=lambda s: print(s, flush=True), seed=seed)
        if CONFERRABLE in probes:
            times[f"cores:{CONFERRABLE}"] = cold_on_all_cores(args.zoo, manifest, log=lambda s: print(s, flush=True))
        print(f"{len(pairs)} verdicts in {time.perf_counter() - start:.1f} s", flush=True)
    if any(p.stage1 is None for p in pairs):
        stage1 = stage1_verdicts(args.zoo, manifest)
        pairs = [replace(p, stage1=stage1[p.source, p.suspect]) for p in pairs]
    judged = pairs + with_stage1(pairs, CONFERRABLE)
    every = (*METHODS, *REF_METHODS, *(f"{m}+stage1" for m in PAIR_METHODS))
    reports = {(p, m): evaluate(judged, p, m) for p in probes for m in every
               if any(x.probe == p and x.method == m for x in judged)}
    if args.json and not args.from_json:
        saved = {"pairs": [asdict(p) for p in pairs], "times": times, "probe_seed": seed}
        args.json.write_text(json.dumps(saved) + "\n")
    table = render(reports, judged, times, manifest)
    print(table)
    if seed != 0:
        print(f"(every probe searched from seed {seed}; bench/RESULTS.md holds seed 0's and is left alone)")
    elif not args.no_write:
        write_section("verify", table)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
