"""The sweep job: a protected set of models against the index, candidate pairs as a Parquet report.

Run as `modelhash sweep PROTECTED --index INDEX --out REPORT`, `python -m jobs.sweep ...`, or through
`ray job submit -- python -m jobs.sweep ...`. PROTECTED is a folder of models, a text file listing one
model URI per line, or another index. Every protected code (whole-model and per-block) is searched
against every code of the index (whole-model and per-block), so a backbone reused under a new head is
found through its block. Stage 1: candidates by Hamming distance, with the spec's verdicts.

Stage 2 (unless `--no-verify`): the candidate model pairs (a whole-model or per-block pair within
`--verify-max-distance` bits, the spec's `related` distance by default; never a model with itself) are
verified by behaviour, nearest first, at most `--verify-max-pairs` of them. Part matches are candidates
too: a backbone reused under a new head is found only through its block, and `ddv` (in `--verify-method
all`) compares models whose label spaces differ. The pairs are grouped by protected model; each group is
one unit of work that loads the protected model and builds its probe once, then loads and judges each
candidate. A model that cannot load or run gives an `error` verdict with the reason; its pairs keep their
stage-1 verdict, and the sweep goes on. `--references FILE` (JSON: a protected model's URI or model_id ->
a list of reference URIs) names homolog references, models the owner trained apart from a protected model
on its data: they are loaded and scored once per protected model, beside its probe, and judge its
candidates by per-source thresholds (`pipeline.verify.behavior.Calibration`); the summary lists them, and
any that could not load or run.

Without `--ray-address` (or RAY_ADDRESS) the protected models are hashed, the index scanned and the
candidates verified in this process, on all its cores. With it, all three run on the Ray cluster: each
scan task reads a few shards of the index and returns its per-query top-k; the driver merges them,
exactly as one scan would rank them; each verify task takes one protected model's group, on a GPU
(`num_gpus=1`, device cuda) when the cluster has GPUs.
"""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
import time
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
from tqdm import tqdm

from jobs.arguments import add_spec, non_negative_int, positive_float, positive_int, torch_device
from jobs.entry import job_main, warn_no_models
from jobs.query import hash_uri
from jobs.stage2 import VERIFY_MAX_PAIRS, load_references, verify_methods, verify_pairs
from pipeline.errors import ModelhashError, ModelIndexError, SourceError
from pipeline.hashing import Spec, get_spec
from pipeline.hashing.model import HashResult, hash_model
from pipeline.index.reader import CodePlan, Codes, IndexReader, ShardRows
from pipeline.index.uris import model_uri
from pipeline.refs import ModelRef, is_checkpoint_name
from pipeline.search import hamming
from pipeline.search.report import (
    Protected,
    SweepSummary,
    apply_stage2,
    tiles_of,
    write_report,
    write_summary,
)
from pipeline.search.sweep import PARTS, WHOLE, Hits, Target, empty_hits, merge, search
from pipeline.settings import Settings
from pipeline.sources import list_models
from pipeline.verify.behavior import PAIR_METHODS
from pipeline.verify.probe_cache import PROBE_CACHE_HELP, cache_dir_option

QUERY_TILE = 4096  # query codes per local pass over the index: the unit of streaming and progress
SCAN_RETRIES = 3  # a scan task lost with its worker is re-run


def sweep(
    protected: str,
    index: str,
    out: str,
    *,
    k: int = 10,
    max_distance: int | None = None,
    spec: str | None = None,
    parts: bool = True,
    ray_address: str | None = None,
    device: str | None = None,
    progress: bool = True,
    verify: bool = True,
    verify_method: str = "agreement",
    verify_max_pairs: int = VERIFY_MAX_PAIRS,
    verify_max_distance: int | None = None,
    verify_timeout: float | None = None,
    verify_references: Mapping[str, Sequence[str]] | None = None,
    verify_probe: str | None = None,
    verify_probe_cache: str | None = None,
) -> SweepSummary:
    """Search every protected code against `index`, verify the candidates by behaviour; write the pairs
    to `out` (Parquet) and a summary.

    Args:
        protected: a folder of models, a file listing model URIs (one per line, `#` comments), or an index.
        index: the index to sweep.
        out: the report's path; the summary goes beside it (`.summary.json`, `.summary.md`).
        k: matches per protected code and kind (whole-model, per-block).
        max_distance: only pairs within this many bits (default: the spec's `related` threshold).
        parts: also search per-block codes.
        ray_address: run on this Ray cluster (`auto`, `host:port`); None: in this process.
        device: "cpu", "cuda", or None (CUDA when torch sees a GPU): the scan, and stage 2 in this process.
        verify: run stage 2 on the candidate model pairs.
        verify_method: "agreement", "distance", "ddv", or "all" (those three; the first that can compare
            a pair gives its verdict).
        verify_max_pairs: verify at most this many candidate model pairs, nearest first; the others are
            reported as not verified.
        verify_max_distance: candidates are model pairs with a pair within this many bits (default: the
            spec's `related` threshold).
        verify_timeout: on Ray, seconds per protected model's task; its unfinished pairs become errors.
        verify_references: homolog references per protected model (its URI or model_id -> reference URIs):
            they shape its conferrable probe (`load_references` reads them from a JSON file).
        verify_probe: "conferrable" (the default with 3+ references) or "core" (DeepCore's core points, the
            references setting per-source thresholds).
        verify_probe_cache: a folder where conferrable probes are kept between sweeps; None: none.

    Raises:
        ModelIndexError: the index is missing, corrupt, or holds no code of the spec.
        SourceError: PROTECTED is neither a folder, a list file nor an index, or none of its models could be
            hashed (an empty PROTECTED gives an empty report).
    """
    started = time.perf_counter()
    chosen = get_spec(spec)
    k = hamming._check_k(k)
    max_distance = chosen.thresholds.related if max_distance is None else max_distance
    hamming._check_max_distance(max_distance)
    methods = verify_methods(verify_method)
    if verify_max_pairs < 0:
        raise ValueError(f"verify_max_pairs must be >= 0, got {verify_max_pairs}")
    within = None
    if verify:
        within = chosen.thresholds.related if verify_max_distance is None else verify_max_distance
        hamming._check_max_distance(within)
    summary = SweepSummary(
        protected=protected, index=index, spec=chosen.name, report=out, k=k, max_distance=max_distance,
        ray=ray_address is not None, verify_method=verify_method if verify else None,
    )
    reader = IndexReader(index)  # a missing index, or a report folder that cannot be made, fails before any
    try:  # model is hashed
        Path(out).parent.mkdir(parents=True, exist_ok=True)
    except OSError as exc:
        raise SourceError(f"cannot make the report's folder {Path(out).parent}: {exc.strerror or exc}") from exc
    if ray_address is not None:
        from jobs.cluster import connect

        connect(ray_address)
    tick = time.perf_counter()
    queries = load_protected(protected, chosen, use_ray=ray_address is not None, progress=progress)
    summary.seconds["hash"] = time.perf_counter() - tick
    if queries.models == 0 and queries.failed:  # a report of nothing would read as "no copies": say why
        first = queries.failed[0]
        raise SourceError(f"{protected}: no protected model could be hashed ({len(queries.failed)} failed; "
                          f"{first['model']}: {first['error']})")
    summary.protected_models, summary.query_codes, summary.failed = queries.models, len(queries.codes), queries.failed

    tick = time.perf_counter()
    words = queries.words()
    searched: Codes | CodePlan  # the index's rows; the report reads the matched rows' identities from it
    if ray_address is not None:
        searched, hits = _scan_on_ray(reader, chosen, words, k, max_distance, parts, device, progress, summary)
        summary.seconds["scan"] = time.perf_counter() - tick
        tiles: Iterable[tuple[slice, dict[str, Hits]]] = tiles_of(hits, len(words), QUERY_TILE)
    else:
        searched = reader.load_codes(chosen.name, parts=parts)
        _check_not_empty(searched, reader, index, chosen)
        summary.index_codes = len(searched)
        summary.index_parts = len(searched.parts) if searched.parts is not None else 0
        summary.seconds["load"] = time.perf_counter() - tick
        tiles = _scan_locally(searched, words, k, max_distance, parts, device, progress)
    tick = time.perf_counter()
    candidates = write_report(out, tiles, queries, searched, chosen, summary, candidates_within=within)
    if ray_address is None:
        summary.seconds["scan"] = time.perf_counter() - tick
    if verify:
        tick = time.perf_counter()
        calibrations: list[dict[str, Any]] = []
        stage2 = verify_pairs(
            candidates, queries, searched, methods, max_pairs=verify_max_pairs, use_ray=ray_address is not None,
            device=device, timeout_s=verify_timeout, progress=progress, references=verify_references,
            calibrations=calibrations, probe=verify_probe, probe_cache=verify_probe_cache,
        )
        apply_stage2(out, stage2, summary)
        summary.stage2_references = calibrations
        summary.seconds["verify"] = time.perf_counter() - tick
    summary.seconds["total"] = time.perf_counter() - started
    summary.seconds = {key: round(v, 3) for key, v in summary.seconds.items()}
    write_summary(summary)
    return summary


def load_protected(protected: str, spec: Spec, *, use_ray: bool = False, progress: bool = True) -> Protected:
    """The protected models' codes: read from an index, or hashed (on Ray when `use_ray`).

    A model that cannot be hashed is recorded in `failed`; the sweep goes on without it.
    """
    out = Protected()
    if IndexReader.exists(protected):
        codes = IndexReader(protected).load_codes(spec.name, parts=True)
        if len(codes) == 0:
            raise ModelIndexError(f"protected index {protected} holds no code of spec {spec.name}")
        _add_indexed(out, codes)
        return out
    items: list[ModelRef | str]
    root: str | None = None  # a listed local folder: its models' ids are relative to it
    if os.path.isfile(protected) and not is_checkpoint_name(protected):
        items = _read_list(protected)
    elif os.path.exists(protected) or "://" in protected:
        items = list(list_models(protected))
        root = os.path.abspath(protected.removeprefix("file://")) if "://" not in protected else None
    else:
        raise SourceError(f"{protected}: no such folder, list file or index")
    results = _hash_all(items, spec.name, use_ray, progress)
    for item, result in zip(items, results, strict=True):
        if isinstance(result, str):
            out.failed.append({"model": item if isinstance(item, str) else item.model_id, "error": result})
        else:
            r = result.ref
            if isinstance(item, str):  # a listed URI loads the model again; a path from any working directory
                uri: str | None = item if "://" in item else os.path.abspath(item)
            else:
                uri = model_uri(r.source, r.model_id, r.revision, root=root)
            out.add(r.source, r.model_id, r.revision, result.code.code, result.code.parts, uri)
    return out


def hash_item(item: ModelRef | str, spec_name: str) -> HashResult | str:
    """Hash a listed model or a model URI; a model that cannot be hashed gives its reason (one line)."""
    try:
        return hash_model(item, get_spec(spec_name)) if isinstance(item, ModelRef) else hash_uri(item, spec_name)
    except ModelhashError as exc:
        return " ".join(str(exc).split())


def scan_shards(
    reader: IndexReader,
    shards: list[ShardRows],
    queries: np.ndarray,
    k: int,
    max_distance: int,
    parts: bool,
    device: str | None,
    threads: int | None = None,
) -> tuple[dict[str, Hits], int]:
    """A Ray task's part of a sweep: read these shards' codes, search them for every query.

    Returns the hits and the number of per-block codes searched.
    """
    codes, rows, part_codes, part_rows, names = [], [], [], [], []
    for shard in shards:
        c, r = reader.read_codes(shard)
        codes.append(c)
        rows.append(r)
        if parts:
            p = reader.read_parts(shard)
            part_codes.append(p.codes)
            part_rows.append(p.row)
            names.append(p.name)
    target = Target.of(
        np.concatenate(codes) if codes else np.empty((0, hamming.WORDS), np.uint64),
        np.concatenate(rows) if rows else np.empty(0, np.int64),
        part_codes=np.concatenate(part_codes) if parts and part_codes else None,
        part_rows=np.concatenate(part_rows) if parts and part_rows else None,
        part_name=pa.chunked_array(names, pa.string()) if parts and names else None,
    )
    hits = search(target, queries, k, max_distance, parts=parts, device=device, threads=threads)
    return hits, len(target.part_codes)


# -- internals ---------------------------------------------------------------------------------------


def _read_list(path: str) -> list[str]:
    lines = Path(path).read_text().splitlines()
    return [s for s in (line.split("#", 1)[0].strip() for line in lines) if s]


def _add_indexed(out: Protected, codes: Codes) -> None:
    by_row: dict[int, list[tuple[str, bytes]]] = {}
    if codes.parts is not None:
        names = codes.parts.name.to_pylist()
        for row, name, words in zip(codes.parts.row.tolist(), names, codes.parts.codes, strict=True):
            by_row.setdefault(row, []).append((name, words.tobytes()))
    ids = codes.identities()  # every row: the protected set is all of this index
    source, model_id, revision = (ids[c].to_pylist() for c in ("source", "model_id", "revision"))
    uris = codes.uris()
    for i in range(len(codes)):
        out.add(source[i], model_id[i], revision[i], codes.codes[i].tobytes(), by_row.get(i, []), uris[i])


def _hash_all(items: list[ModelRef | str], spec_name: str, use_ray: bool, progress: bool) -> list[HashResult | str]:
    bar = functools.partial(tqdm, total=len(items), desc="hashing", unit="model", disable=not progress, file=sys.stderr)
    if not use_ray:
        return [hash_item(item, spec_name) for item in bar(items)]
    import ray

    from jobs.cluster import cluster_cpus

    task = _hash_task()
    limit = 2 * cluster_cpus()
    results: dict[int, HashResult | str] = {}
    in_flight: dict[Any, int] = {}
    queue = iter(enumerate(items))
    with bar() as pbar:
        while True:
            while len(in_flight) < limit and (nxt := next(queue, None)) is not None:
                in_flight[task.remote(nxt[1], spec_name)] = nxt[0]
            if not in_flight:
                break
            ready, _ = ray.wait(list(in_flight), num_returns=1)
            i = in_flight.pop(ready[0])
            try:
                results[i] = ray.get(ready[0])
            except ray.exceptions.RayError as exc:
                results[i] = f"task failed: {' '.join(str(exc).split())[:300]}"
            pbar.update(1)
    return [results[i] for i in range(len(items))]


@functools.cache
def _hash_task() -> Any:
    import ray

    return ray.remote(num_cpus=1, max_retries=SCAN_RETRIES)(hash_item)


@functools.cache
def _scan_task() -> Any:
    import ray

    return ray.remote(num_cpus=1, max_retries=SCAN_RETRIES)(scan_shards)


def _check_not_empty(codes: Codes | CodePlan, reader: IndexReader, index: str, spec: Spec) -> None:
    if len(codes) == 0:
        present = ", ".join(reader.specs()) or "none"
        raise ModelIndexError(f"{index}: no codes of spec {spec.name} (specs in the index: {present})")


def _scan_locally(
    codes: Codes, words: np.ndarray, k: int, max_distance: int, parts: bool, device: str | None, progress: bool
) -> Iterator[tuple[slice, dict[str, Hits]]]:
    if parts and codes.parts is not None:
        target = Target.of(
            codes.codes, part_codes=codes.parts.codes, part_rows=codes.parts.row, part_name=codes.parts.name
        )
    else:
        target = Target.of(codes.codes)
    with tqdm(total=len(words), desc="sweeping", unit="code", disable=not progress, file=sys.stderr) as bar:
        for q0 in range(0, len(words), QUERY_TILE):
            tile = slice(q0, min(q0 + QUERY_TILE, len(words)))
            yield tile, search(target, words[tile], k, max_distance, parts=parts, device=device)
            bar.update(tile.stop - tile.start)


def _scan_on_ray(
    reader: IndexReader,
    spec: Spec,
    words: np.ndarray,
    k: int,
    max_distance: int,
    parts: bool,
    device: str | None,
    progress: bool,
    summary: SweepSummary,
) -> tuple[CodePlan, dict[str, Hits]]:
    """Shards split among Ray tasks, each returning its top-k per query; merged here as they finish."""
    import ray

    from jobs.cluster import cluster_cpus

    plan = reader.plan_codes(spec.name)
    _check_not_empty(plan, reader, reader.index_uri, spec)
    summary.index_codes = len(plan)
    groups = _split(list(plan.shards), 2 * cluster_cpus())
    task = _scan_task()
    reader_ref, words_ref = ray.put(reader), ray.put(words)
    pending = [task.remote(reader_ref, g, words_ref, k, max_distance, parts, device, 1) for g in groups]
    kinds = [WHOLE, PARTS] if parts else [WHOLE]
    merged = {kind: empty_hits(kind, len(words)) for kind in kinds}
    with tqdm(total=len(pending), desc="sweeping", unit="task", disable=not progress, file=sys.stderr) as bar:
        while pending:
            ready, pending = ray.wait(pending, num_returns=1)
            try:
                hits, n_parts = ray.get(ready[0])
            except ray.exceptions.RayTaskError as exc:
                if isinstance(exc.cause, ModelhashError):
                    raise exc.cause from None  # a missing or corrupt shard: one clear line, as locally
                raise
            merged = {kind: merge([merged[kind], hits[kind]], k) for kind in kinds}
            summary.index_parts += n_parts
            bar.update(1)
    return plan, merged


def _split(shards: list[ShardRows], groups: int) -> list[list[ShardRows]]:
    """Consecutive shards in at most `groups` groups of about equal rows (empty shards ride along)."""
    total = sum(len(s) for s in shards)
    target = max(1, -(-total // max(1, groups)))
    out: list[list[ShardRows]] = [[]]
    held = 0
    for shard in shards:
        if held >= target and out[-1]:
            out.append([])
            held = 0
        out[-1].append(shard)
        held += len(shard)
    return [g for g in out if g]


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The sweep's flags, shared by `modelhash sweep` and `python -m jobs.sweep`."""
    parser.add_argument("protected", help="a folder of models, a file listing model URIs, or an index")
    parser.add_argument("--index", required=True, help="the index to sweep (a folder or s3://bucket/prefix)")
    parser.add_argument("--out", required=True, help="the report (Parquet); the summary goes beside it")
    parser.add_argument("-k", type=positive_int, default=10, help="matches per protected code (default 10)")
    parser.add_argument(
        "--max-distance", type=non_negative_int, default=None,
        help="only pairs within this many bits (default: 'related')",
    )
    add_spec(parser)
    parser.add_argument("--no-parts", action="store_true", help="whole-model codes only, no per-block codes")
    parser.add_argument("--device", type=torch_device, default=None,
                        help="stage 2: cpu or cuda[:N] (default: cuda when torch sees a GPU)")
    parser.add_argument(
        "--ray-address", default=None, help="run on this Ray cluster (default: $RAY_ADDRESS, else in this process)"
    )
    parser.add_argument(
        "--verify", action=argparse.BooleanOptionalAction, default=True,
        help="stage 2: verify the candidate model pairs by behaviour (default: on)",
    )
    parser.add_argument(
        "--verify-method", default="agreement", choices=[*PAIR_METHODS, "all"],
        help="stage 2's method (default agreement; all: agreement, distance and ddv)",
    )
    parser.add_argument(
        "--verify-max-pairs", type=non_negative_int, default=VERIFY_MAX_PAIRS,
        help=f"verify at most this many candidate model pairs, nearest first (default {VERIFY_MAX_PAIRS})",
    )
    parser.add_argument(
        "--verify-max-distance", type=non_negative_int, default=None,
        help="stage 2 candidates: model pairs within this many bits (default: 'related')",
    )
    parser.add_argument(
        "--verify-timeout", type=positive_float, default=None, help="on Ray: seconds per protected model's verify task"
    )
    parser.add_argument(
        "--references", default=None, metavar="FILE",
        help="stage 2: homolog references per protected model, a JSON object {URI or model_id: [reference URI, "
        "...]}: they shape a conferrable probe (see --verify-probe)",
    )
    parser.add_argument(
        "--verify-probe", default=None, choices=["conferrable", "core"],
        help="stage 2's probe: conferrable (the default with 3+ references: core points they reject) "
        "or core (DeepCore's; the references set per-source thresholds)",
    )
    parser.add_argument("--probe-cache", default=None, metavar="DIR", help="stage 2: " + PROBE_CACHE_HELP)
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    parser.add_argument("--json", action="store_true", help="print the summary as JSON")


def run(args: argparse.Namespace) -> SweepSummary:
    settings = Settings.from_env(ray_address=args.ray_address)
    return sweep(
        args.protected,
        args.index,
        args.out,
        k=args.k,
        max_distance=args.max_distance,
        spec=args.spec,
        parts=not args.no_parts,
        ray_address=settings.ray_address,
        device=args.device,
        progress=not args.no_progress,
        verify=args.verify,
        verify_method=args.verify_method,
        verify_max_pairs=args.verify_max_pairs,
        verify_max_distance=args.verify_max_distance,
        verify_timeout=args.verify_timeout,
        verify_references=load_references(args.references) if args.references else None,
        verify_probe=args.verify_probe,
        verify_probe_cache=cache_dir_option(args.probe_cache),
    )


def command(args: argparse.Namespace) -> int:
    """Run the sweep and print its summary: `modelhash sweep` and this module's main."""
    summary = run(args)
    print(json.dumps(asdict(summary), indent=2) if args.json else summary.line())
    if summary.protected_models == 0:
        warn_no_models(args.protected, "the report is empty")
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("jobs.sweep", __doc__.splitlines()[0], add_arguments, command, argv)


if __name__ == "__main__":
    raise SystemExit(main())

