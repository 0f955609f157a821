"""The sweep's stage 2: candidate model pairs verified by behaviour, one group per protected model.

Each group is one unit of work (`pipeline.verify.candidates.verify_candidates`): it loads the protected
model and builds its probe once, scores its homolog references if it has any, then loads and judges each
candidate. Groups run in this process, or as Ray tasks, bounded in flight, on a GPU each when the cluster
has GPUs. Nothing here raises for a model: every failure becomes an `error` answer with its reason.
"""

from __future__ import annotations

import functools
import json
import os
import sys
import time
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from pipeline.errors import SourceError
from pipeline.index.reader import CodePlan, Codes
from pipeline.search.report import Candidate, Protected, Stage2
from pipeline.verify.behavior import PAIR_METHODS

if TYPE_CHECKING:
    from pipeline.verify.behavior import Verdict

VERIFY_MAX_PAIRS = 1000  # candidate model pairs verified per sweep, nearest first
VERIFY_RETRIES = 1  # a verify task lost with its worker (out of memory on a big model) is re-run once
POLL_SECONDS = 1.0


def verify_methods(method: str) -> tuple[str, ...]:
    """The pair methods `--verify-method` names: one of PAIR_METHODS, or `all` of them.

    Raises:
        ValueError: another name.
    """
    if method == "all":
        return PAIR_METHODS
    if method not in PAIR_METHODS:
        raise ValueError(f"unknown verify method {method!r} (expected one of {', '.join(PAIR_METHODS)} or all)")
    return (method,)


def load_references(path: str) -> dict[str, list[str]]:
    """Homolog references per protected model from a JSON file: `{"URI or model_id": ["URI", ...]}`.

    A relative local path is made absolute (as in a list of protected models), so workers load it from
    anywhere.

    Raises:
        SourceError: the file cannot be read, or is not such a mapping.
    """
    try:
        doc = json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SourceError(f"{path}: cannot read references (a JSON object of lists of URIs): {exc}") from exc
    if not isinstance(doc, dict) or not all(
        isinstance(v, list) and all(isinstance(u, str) for u in v) for v in doc.values()
    ):
        raise SourceError(f"{path}: references must be a JSON object mapping a model to a list of URIs")
    return {key: [u if "://" in u else os.path.abspath(u) for u in uris] for key, uris in doc.items()}


def verify_pairs(
    candidates: list[Candidate],
    queries: Protected,
    index: Codes | CodePlan,
    methods: tuple[str, ...],
    *,
    max_pairs: int = VERIFY_MAX_PAIRS,
    use_ray: bool = False,
    device: str | None = None,
    timeout_s: float | None = None,
    progress: bool = True,
    references: Mapping[str, Sequence[str]] | None = None,
    calibrations: list[dict[str, Any]] | None = None,
    probe: str | None = None,
    probe_cache: str | None = None,
) -> list[tuple[Candidate, Stage2]]:
    """Stage 2: the nearest `max_pairs` candidates verified by behaviour, one group per protected model.

    Never raises for a model: one that has no URI, cannot load or cannot run, and a task that fails or
    times out, give an `error` answer with the reason. Candidates beyond `max_pairs` get an answer with
    no verdict and the reason. `references`: homolog references per protected model, by its URI or
    model_id (they shape a conferrable probe and calibrate ddv: `make_probe`); `calibrations`, when
    given, gets one entry per protected model that has references: the references scored, those skipped
    with the reason, and what shaped its probe. `probe`: "conferrable" (the default with 3+ references) or
    "core" (DeepCore's core points; the references then set per-source thresholds for every method).
    `probe_cache`: a folder where conferrable probes are kept between sweeps (on each Ray node its own,
    unless the folder is shared storage); None: none.

    Returns:
        (candidate, answer) for every candidate, in the order given.
    """
    chosen, rest = candidates[:max_pairs], candidates[max_pairs:]
    answers: dict[tuple[int, int], Stage2] = {}
    skipped = Stage2(
        None, reason=f"not verified: {len(candidates)} candidate pairs, the nearest {max_pairs} verified "
        "(--verify-max-pairs)"
    )
    for c in rest:
        answers[(c.owner, c.row)] = skipped
    rows = sorted({c.row for c in chosen})
    uri_of = dict(zip(rows, index.uris(rows), strict=True)) if rows else {}
    groups: dict[int, list[Candidate]] = {}
    for c in chosen:
        groups.setdefault(c.owner, []).append(c)
    work: list[tuple[str, list[Candidate]]] = []  # (protected URI, its candidates that have a URI)
    refs_of: dict[str, tuple[str, ...]] = {}  # protected URI -> its references' URIs
    lookup: dict[str, Sequence[str]] = {}  # references by key as given, and by a local key's absolute path
    for key, uris in (references or {}).items():
        lookup.setdefault(key, uris)
        if "://" not in key:
            lookup.setdefault(os.path.abspath(key), uris)
    for owner, group in groups.items():
        source = queries.uri[owner]
        if source is None:
            name = queries.model_id[owner]
            reason = f"protected model {name}: no URI to load it from (its index run recorded no root)"
            answers.update({(c.owner, c.row): Stage2("error", reason=reason) for c in group})
            continue
        located = []
        for c in group:
            if uri_of[c.row] is None:
                reason = f"{c.key[3]}: no URI to load it from (its index run recorded no root; crawl it again)"
                answers[(c.owner, c.row)] = Stage2("error", reason=reason)
            else:
                located.append(c)
        if located:
            work.append((source, located))
            refs_of[source] = tuple(lookup.get(source, lookup.get(queries.model_id[owner], ())))
    total = sum(len(g) for _, g in work)
    with tqdm(total=total, desc="verifying", unit="pair", disable=not progress, file=sys.stderr) as bar:
        run = _verify_on_ray if use_ray else _verify_locally
        conferrable = None if probe is None else probe == "conferrable"
        results = run(_Groups(work, uri_of, methods, refs_of, conferrable, probe_cache), device, timeout_s, bar)
        for (source, group), (got_all, calibration) in zip(work, results, strict=True):
            for c, got in zip(group, got_all, strict=True):
                answers[(c.owner, c.row)] = got
            if refs_of[source] and calibrations is not None:
                calibrations.append({"protected": source, "given": len(refs_of[source]), **calibration})
    return [(c, answers[(c.owner, c.row)]) for c in candidates]


def _answer(verdicts: list[Verdict]) -> Stage2:
    """A pair's answer: the first method that could compare it leads; every method's answer kept."""
    lead = next((v for v in verdicts if v.verdict != "error"), verdicts[0])
    every = tuple({"method": v.method, "verdict": v.verdict, "score": v.score,
                   "calibrated_score": v.calibrated_score, "reason": v.reason} for v in verdicts)
    return Stage2(lead.verdict, lead.method, lead.score, lead.reason, every, lead.calibrated_score)


Calibrated = dict[str, Any]  # a group's references as its verdicts' evidence shows them: scored, skipped


def _answers(verdicts: list[list[Verdict]]) -> tuple[list[Stage2], Calibrated]:
    """A group's answers, and its references: scored ({name: {method: score}}), skipped ({name: why}),
    the thresholds that judged ("per source", "conferrable", both, or "global"), and the models that
    shaped a conferrable probe ({"references", "surrogates"}, or None)."""
    scored: dict[str, dict[str, float]] = {}
    skipped: dict[str, str] = {}
    kinds: set[str] = set()
    shaped: dict[str, list[str]] | None = None
    for v in (v for per_suspect in verdicts for v in per_suspect):
        cal = v.evidence.get("calibration")
        if not isinstance(cal, dict):
            continue
        if "surrogates" in cal:  # a conferrable probe: the references shaped its core points
            shaped = {"references": list(cal["references"]), "surrogates": list(cal["surrogates"])}
            if cal.get("cached"):  # read from the probe cache, not searched again
                shaped["cached"] = cal["cached"]
            skipped.update(cal.get("skipped", {}))
            kinds.add("conferrable")
            continue
        for name, score in cal.get("references", {}).items():
            scored.setdefault(name, {})[v.method] = score
        skipped.update(cal.get("failed", {}))
        if cal["thresholds"] == "per source":
            kinds.add("per source")
    thresholds = " + ".join(sorted(kinds)) or "global"
    return [_answer(v) for v in verdicts], {"references": scored, "skipped": skipped, "thresholds": thresholds,
                                            "shaped_by": shaped}


@dataclass(frozen=True, slots=True)
class _Groups:
    """Stage 2's work: per protected model (its URI), its candidates; where each candidate loads from;
    the methods; each protected model's references."""

    work: list[tuple[str, list[Candidate]]]
    uri_of: dict[int, str | None]
    methods: tuple[str, ...]
    refs_of: dict[str, tuple[str, ...]]
    conferrable: bool | None = None  # the probe: conferrable, DeepCore's core points, or None (by references)
    probe_cache: str | None = None  # where conferrable probes are kept between runs


def _verify_locally(
    groups: _Groups, device: str | None, timeout_s: float | None, bar: tqdm
) -> Iterator[tuple[list[Stage2], Calibrated]]:
    """Each group in this process, in order (no timeout: nothing to cancel a group with here)."""
    from pipeline.verify.candidates import verify_candidates

    if device is None:
        import torch

        device = "cuda" if torch.cuda.is_available() else "cpu"
    for source, group in groups.work:
        verdicts = verify_candidates(source, [str(groups.uri_of[c.row]) for c in group], groups.methods,
                                     device=device, references=groups.refs_of.get(source, ()),
                                     conferrable=groups.conferrable, cache=groups.probe_cache)
        bar.update(len(group))
        yield _answers(verdicts)


def _verify_on_ray(
    groups: _Groups, device: str | None, timeout_s: float | None, bar: tqdm
) -> list[tuple[list[Stage2], Calibrated]]:
    """One Ray task per group, bounded in flight; on a GPU each when the cluster has GPUs.

    `device` is this process's: the tasks run on "cuda" when they get a GPU, else on "cpu".
    """
    import ray

    from jobs.cluster import cluster_cpus, cluster_has_gpus, task_options

    work, uri_of, methods, refs_of = groups.work, groups.uri_of, groups.methods, groups.refs_of

    extra: dict[str, Any] = task_options()
    gpus = cluster_has_gpus()
    if gpus:
        # GPU tasks default to max_calls=1 (a new process per task): keep workers, and their CUDA, warm.
        extra.update(num_gpus=1, max_calls=0)
    task = _verify_task().options(**extra) if extra else _verify_task()
    slots = max(1, int(ray.cluster_resources().get("GPU", 0)) if gpus else cluster_cpus())
    # A timeout counts from submission: then submit no more than can start at once, so none waits its time out.
    limit = slots if timeout_s else 2 * slots
    results: dict[int, tuple[list[Stage2], Calibrated]] = {}
    in_flight: dict[Any, tuple[int, float]] = {}
    queue = iter(enumerate(work))

    def failed(i: int, reason: str) -> None:
        results[i] = [Stage2("error", reason=reason)] * len(work[i][1]), {"references": {}, "skipped": {},
                                                                          "thresholds": "none: " + reason}
        bar.update(len(work[i][1]))

    while True:
        while len(in_flight) < limit and (nxt := next(queue, None)) is not None:
            i, (source, group) = nxt
            obj = task.remote(source, [uri_of[c.row] for c in group], methods, device="cuda" if gpus else "cpu",
                              references=refs_of.get(source, ()), conferrable=groups.conferrable,
                              cache=groups.probe_cache)
            in_flight[obj] = (i, time.monotonic())
        if not in_flight:
            break
        ready, _ = ray.wait(list(in_flight), num_returns=1, timeout=POLL_SECONDS)
        for obj in ready:
            i, _started = in_flight.pop(obj)
            try:
                results[i] = _answers(ray.get(obj))
                bar.update(len(work[i][1]))
            except ray.exceptions.RayError as exc:  # the worker died (VERIFY_RETRIES times), or a bug
                failed(i, f"verify task failed: {' '.join(str(exc).split())[:300]}")
        if timeout_s:
            now = time.monotonic()
            for obj, (i, started) in list(in_flight.items()):
                if now - started > timeout_s:
                    ray.cancel(obj, force=True)
                    del in_flight[obj]
                    failed(i, f"verify task timed out after {timeout_s:g} s")
    return [results[i] for i in range(len(work))]


@functools.cache
def _verify_task() -> Any:
    import ray

    from pipeline.verify.candidates import verify_candidates

    return ray.remote(num_cpus=1, max_retries=VERIFY_RETRIES)(verify_candidates)
