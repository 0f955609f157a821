"""The sweep report: candidate pairs as Parquet rows, and a summary of them as JSON and Markdown.

`write_report` streams a sweep's hits into the Parquet file batch by batch (a batch: some query codes'
hits of every kind). The matched models' identities are read from the index for the rows that matched
only, once per batch (`Codes.identities`: one read per shard touched); `pairs_table` then builds a batch's
rows, the one place that knows the report's columns; the batch is counted into a `SweepSummary`.

Stage 2 (behaviour) judges model pairs, not codes, and only once stage 1 has found them all:
`write_report` also gathers the candidate model pairs (`Candidate`), the sweep verifies them, and
`apply_stage2` rewrites the report batch by batch with each pair's `Stage2` in the `stage2_*` columns of
every row of that pair (null where a pair was not verified), and counts the verdicts into the summary.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Iterator, Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq

from pipeline.hashing.spec import Spec
from pipeline.index.reader import IDENTITY, CodePlan, Codes
from pipeline.index.uris import model_folder
from pipeline.search import hamming
from pipeline.search.sweep import PARTS, Hits
from pipeline.settings import redact

STAGE2_ENTRY = pa.struct(
    [("method", pa.string()), ("verdict", pa.string()), ("score", pa.float64()),
     ("calibrated_score", pa.float64()), ("reason", pa.string())]
)
REPORT_SCHEMA = pa.schema(
    [
        ("query_source", pa.string()),
        ("query_model_id", pa.string()),
        ("query_revision", pa.string()),
        ("part", pa.string()),  # the protected model's block, null for its whole-model code
        ("match_source", pa.string()),
        ("match_model_id", pa.string()),
        ("match_revision", pa.string()),
        ("match_part", pa.string()),  # the indexed model's block, null for its whole-model code
        ("distance", pa.int32()),
        ("similarity", pa.float64()),
        ("verdict", pa.string()),
        ("rank", pa.int32()),  # 1 = nearest, per protected code and kind of match
        ("same_model", pa.bool_()),  # the protected model itself (same source and model_id) in the index
        # Stage 2, the model pair's behaviour (all rows of a pair alike); null where it was not verified.
        ("stage2_method", pa.string()),  # the method stage2_verdict comes from
        ("stage2_verdict", pa.string()),  # pirated, homolog, unrelated, or error (stage2_reason says why)
        ("stage2_score", pa.float64()),  # that method's score
        # that score against the protected model's homolog references (`--references`): 0 at the closest
        # reference, 1 at the protected model itself, comparable across protected models; null without them
        ("stage2_calibrated_score", pa.float64()),
        ("stage2_reason", pa.string()),  # why error, or why a candidate was not verified
        ("stage2_methods", pa.list_(STAGE2_ENTRY)),  # every method's answer (`--verify-method all`)
    ]
)
TOP = 20  # model pairs listed in the summary (each at its nearest code pair)
REWRITE_ROWS = 65_536  # report rows per batch when stage 2 rewrites it
_TOP_KEYS = (
    "query_source", "query_model_id", "part", "match_source", "match_model_id", "match_part", "distance", "verdict"
)
STAGE1_COLUMNS = 13  # the stage-1 columns come first; stage 2's follow


@dataclass(frozen=True, slots=True)
class Stage2:
    """Stage 2's answer for one (protected, indexed) model pair, as the report holds it.

    `verdict` is that of `method`, the first method that could compare the pair (else the first
    method's `error`); None when the pair was not verified, with `reason` saying why. `methods` holds
    every method's {method, verdict, score, calibrated_score, reason}.
    """

    verdict: str | None
    method: str | None = None
    score: float | None = None
    reason: str | None = None
    methods: tuple[dict[str, Any], ...] = ()
    calibrated_score: float | None = None  # `score` against the references, when the pair had them

    def __post_init__(self) -> None:
        if self.reason:  # written to the report: never a secret a server echoed into an error
            object.__setattr__(self, "reason", redact(self.reason))


PairKey = tuple[str, str, str, str]  # (query_source, query_model_id, match_source, match_model_id)


@dataclass(frozen=True, slots=True)
class Candidate:
    """A model pair for stage 2: protected model `owner` (its number in `Protected`) and index row `row`,
    at `distance` bits (the nearest of their whole-model and per-block pairs)."""

    owner: int
    row: int
    distance: int
    key: PairKey


@dataclass
class Protected:
    """The protected models' codes, flattened: query code i belongs to model `owner[i]`, block `part[i]`."""

    source: list[str] = field(default_factory=list)
    model_id: list[str] = field(default_factory=list)
    revision: list[str | None] = field(default_factory=list)
    codes: list[bytes] = field(default_factory=list)
    owner: list[int] = field(default_factory=list)
    part: list[str | None] = field(default_factory=list)
    failed: list[dict[str, str]] = field(default_factory=list)
    uri: list[str | None] = field(default_factory=list)  # per model: what loads it for stage 2

    @property
    def models(self) -> int:
        return len(self.model_id)

    def add(
        self,
        source: str,
        model_id: str,
        revision: str | None,
        code: bytes,
        parts: Iterable[tuple[str, bytes]],
        uri: str | None = None,
    ) -> None:
        m = self.models
        self.source.append(source)
        self.model_id.append(model_id)
        self.revision.append(revision)
        self.uri.append(uri)
        for name, c in [(None, code), *parts]:
            hamming.as_words(c)  # a code of another length is refused here, not matched wrongly
            self.codes.append(bytes(c))
            self.owner.append(m)
            self.part.append(name)

    def words(self) -> np.ndarray:
        """(Q, 4) uint64 query codes."""
        if not self.codes:
            return np.empty((0, hamming.WORDS), dtype=np.uint64)
        return np.frombuffer(b"".join(self.codes), dtype=np.uint64).reshape(-1, hamming.WORDS)

    def columns(self) -> QueryColumns:
        """The query side as arrays, per query code."""
        owner = np.asarray(self.owner, dtype=np.int64)
        folders = [model_folder(u) if s == "local" else None for s, u in zip(self.source, self.uri, strict=True)]
        return QueryColumns(
            source=np.asarray(self.source, dtype=object)[owner],
            model_id=np.asarray(self.model_id, dtype=object)[owner],
            revision=np.asarray(self.revision, dtype=object)[owner],
            part=np.asarray(self.part, dtype=object),
            owner=owner,
            folder=np.asarray(folders, dtype=object)[owner],
        )


@dataclass(frozen=True, slots=True)
class QueryColumns:
    """Per query code: its model's identity, its block (None: the whole-model code), its model's number, and
    a local model's folder (`model_folder`; None elsewhere)."""

    source: np.ndarray
    model_id: np.ndarray
    revision: np.ndarray
    part: np.ndarray
    owner: np.ndarray
    folder: np.ndarray


@dataclass
class SweepSummary:
    """What a sweep found and what it cost; written beside the report as JSON and Markdown."""

    protected: str
    index: str
    spec: str
    report: str
    k: int
    max_distance: int
    ray: bool
    protected_models: int = 0
    query_codes: int = 0
    failed: list[dict[str, str]] = field(default_factory=list)
    index_codes: int = 0
    index_parts: int = 0
    pairs: int = 0
    by_verdict: dict[str, int] = field(default_factory=dict)  # pairs of different models
    same_model: int = 0
    flagged_models: int = 0  # distinct (protected, indexed) model pairs with a copy or related verdict
    top: list[dict[str, Any]] = field(default_factory=list)  # the TOP nearest flagged model pairs, one row each
    verify_method: str | None = None  # stage 2's method (`all`: agreement, distance, ddv); None: not run
    stage2_pairs: int = 0  # candidate model pairs verified
    stage2_skipped: int = 0  # candidate model pairs left unverified (beyond the cap)
    stage2_by_verdict: dict[str, int] = field(default_factory=dict)  # per verified model pair
    stage2_pirated: list[dict[str, Any]] = field(default_factory=list)  # the pairs called pirated, nearest first
    stage2_errors: list[dict[str, Any]] = field(default_factory=list)  # the first TOP pairs that could not be run
    # Per protected model given homolog references: {"protected", "given", "references": {name: {method:
    # score}}, "skipped": {name: why}, "thresholds": "per source" or "global"}.
    stage2_references: list[dict[str, Any]] = field(default_factory=list)
    seconds: dict[str, float] = field(default_factory=dict)

    def line(self) -> str:
        verdicts = ", ".join(f"{n} {v}" for v, n in sorted(self.by_verdict.items())) or "no pairs"
        stage2 = ""
        if self.verify_method is not None:
            judged = ", ".join(f"{n} {v}" for v, n in sorted(self.stage2_by_verdict.items())) or "nothing to verify"
            stage2 = f"; stage 2: {judged}" + (f", {self.stage2_skipped} not verified" if self.stage2_skipped else "")
        return (
            f"{self.protected_models} protected models ({len(self.failed)} failed) against {self.index_codes} "
            f"codes: {verdicts}; {self.flagged_models} flagged model pairs{stage2} "
            f"({self.seconds.get('total', 0):.1f} s; report {self.report})"
        )

    def markdown(self) -> str:
        lines = [
            f"# Sweep of {self.protected} against {self.index}",
            "",
            f"- spec `{self.spec}`, k = {self.k}, max distance {self.max_distance} bits",
            f"- {self.protected_models} protected models ({self.query_codes} codes, {len(self.failed)} failed), "
            f"{self.index_codes} indexed codes and {self.index_parts} block codes",
            f"- {self.pairs} pairs: " + (", ".join(f"{n} {v}" for v, n in sorted(self.by_verdict.items())) or "none")
            + f" (and {self.same_model} of a model with itself)",
            f"- {self.flagged_models} flagged model pairs; "
            + ", ".join(f"{k} {v:.2f} s" for k, v in self.seconds.items()),
        ]
        if self.verify_method is not None:
            judged = ", ".join(f"{n} {v}" for v, n in sorted(self.stage2_by_verdict.items())) or "none"
            lines.append(
                f"- stage 2 (`{self.verify_method}`): {self.stage2_pairs} model pairs verified: {judged}; "
                f"{self.stage2_skipped} not verified"
            )
        if self.top:
            stage2 = self.verify_method is not None
            lines += [
                "",
                f"The {len(self.top)} nearest of {self.flagged_models} flagged model pairs, each at its nearest "
                "code pair:",
                "",
                "| protected | block | indexed | block | distance | verdict |" + (" stage 2 |" if stage2 else ""),
                "|---|---|---|---|---|---|" + ("---|" if stage2 else ""),
            ]
            for t in self.top:
                lines.append(
                    f"| {t['query_model_id']} | {t['part'] or ''} | {t['match_model_id']} | "
                    f"{t['match_part'] or ''} | {t['distance']} | {t['verdict']} |"
                    + (f" {t.get('stage2_verdict') or ''} |" if stage2 else "")
                )
        if self.stage2_pirated:
            lines += ["", "Pirated by behaviour (stage 2):", "", "| protected | indexed | distance | method | score |",
                      "|---|---|---|---|---|"]
            for p in self.stage2_pirated:
                lines.append(
                    f"| {p['query_model_id']} | {p['match_model_id']} | {p['distance']} | {p['method']} | "
                    f"{p['score']:.3f} |"
                )
        if (self.stage2_errors or self.failed) and lines[-1].startswith("|"):
            lines.append("")  # a list after a table must not read as its last row
        for e in self.stage2_errors:
            lines.append(f"- stage 2 error: {e['query_model_id']} ~ {e['match_model_id']}: {e['reason']}")
        for r in self.stage2_references:
            shaped = r.get("shaped_by")
            lines.append(f"- stage 2 references of {r['protected']}: "
                         + (f"{len(shaped['references'])} of {r['given']} shaped a conferrable probe with "
                            f"{len(shaped['surrogates'])} surrogates"
                            + (" (read from the probe cache)" if shaped.get("cached") else "") + ", " if shaped else "")
                         + f"{len(r['references'])} of {r['given']} scored, {r['thresholds']} thresholds"
                         + "".join(f"; skipped {name}: {why}" for name, why in r["skipped"].items()))
        for f in self.failed:
            lines.append(f"- failed: {f['model']}: {f['error']}")
        return "\n".join(lines) + "\n"


def tiles_of(hits: dict[str, Hits], n: int, tile: int) -> Iterator[tuple[slice, dict[str, Hits]]]:
    """Hits of `n` queries (all in memory, as a Ray sweep merges them) in batches of `tile` queries."""
    for q0 in range(0, n, tile):
        part = slice(q0, min(q0 + tile, n))
        yield part, {kind: Hits(h.kind, h.distance[part], h.key[part], h.name[part]) for kind, h in hits.items()}


def pairs_table(
    kind: str,
    hits: Hits,
    first_query: int,
    queries: QueryColumns,
    matched: pa.Table,
    spec: Spec,
    stage2: Mapping[PairKey, Stage2] | None = None,
    match_folder: np.ndarray | None = None,
) -> pa.Table:
    """The report rows of one kind of hits, one per found slot in row-major order.

    Args:
        kind: WHOLE or PARTS.
        hits: the hits of queries `first_query`, `first_query + 1`, ...
        queries: the query side (`Protected.columns()`).
        matched: the identity (IDENTITY columns) of each found slot's index row, in the same order.
        stage2: model pairs' stage-2 answers, when known (the stage-2 columns are null otherwise).
        match_folder: each found slot's local model folder (`local_folders`), None where unknown: a local
            pair is the same model when both folders are known and equal, else when source and model_id are.
    """
    found = hits.key != hamming.NO_MATCH
    qi, slot = np.nonzero(found)
    qi = qi + first_query
    dist = hits.distance[found].astype(np.int32)
    verdicts = _verdicts(spec)
    m_source, m_model, m_revision = (matched[c].to_numpy(zero_copy_only=False) for c in IDENTITY)
    same = (queries.source[qi] == m_source) & (queries.model_id[qi] == m_model)
    if match_folder is not None:
        q_folder = queries.folder[qi]
        known = np.array([a is not None and b is not None for a, b in zip(q_folder, match_folder, strict=True)],
                         dtype=bool)
        same = np.where(known, q_folder == match_folder, same)
    table = pa.table(
        {
            "query_source": queries.source[qi],
            "query_model_id": queries.model_id[qi],
            "query_revision": queries.revision[qi],
            "part": queries.part[qi],
            "match_source": m_source,
            "match_model_id": m_model,
            "match_revision": m_revision,
            "match_part": hits.name[found] if kind == PARTS else np.full(len(qi), None, dtype=object),
            "distance": dist,
            "similarity": 1.0 - dist / spec.bits,
            "verdict": verdicts[dist],
            "rank": (slot + 1).astype(np.int32),
            "same_model": np.asarray(same, dtype=bool),
        },
        schema=pa.schema(list(REPORT_SCHEMA)[:STAGE1_COLUMNS]),
    )
    return with_stage2(table, stage2 or {})


def local_folders(index: Codes | CodePlan, rows: np.ndarray, identities: pa.Table) -> np.ndarray:
    """Each row's local model folder (`model_folder` of its URI); None for remote rows and local rows whose
    crawl recorded no root."""
    folders = np.full(len(rows), None, dtype=object)
    local = np.flatnonzero(identities["source"].to_numpy(zero_copy_only=False) == "local")
    if local.size:
        folders[local] = [model_folder(uri) for uri in index.uris(rows[local])]
    return folders


def with_stage2(table: pa.Table, stage2: Mapping[PairKey, Stage2]) -> pa.Table:
    """A table of report rows with its stage-2 columns (re)set from `stage2`, keyed by model pair."""
    table = table.select(REPORT_SCHEMA.names[:STAGE1_COLUMNS])
    if not stage2:
        for f in list(REPORT_SCHEMA)[STAGE1_COLUMNS:]:
            table = table.append_column(f, pa.nulls(table.num_rows, f.type))
        return table
    answers = [stage2.get(key) for key in _pair_keys(table)]
    columns = {
        "stage2_method": [a.method if a else None for a in answers],
        "stage2_verdict": [a.verdict if a else None for a in answers],
        "stage2_score": [a.score if a else None for a in answers],
        "stage2_calibrated_score": [a.calibrated_score if a else None for a in answers],
        "stage2_reason": [a.reason if a else None for a in answers],
        "stage2_methods": [list(a.methods) if a and a.methods else None for a in answers],
    }
    for name, values in columns.items():
        table = table.append_column(REPORT_SCHEMA.field(name), pa.array(values, REPORT_SCHEMA.field(name).type))
    return table


def write_report(
    out: str,
    tiles: Iterable[tuple[slice, dict[str, Hits]]],
    queries: Protected,
    index: Codes | CodePlan,
    spec: Spec,
    summary: SweepSummary,
    *,
    candidates_within: int | None = None,
) -> list[Candidate]:
    """Stream the pairs into `out` (Parquet, zstd; its folder must exist), batch by batch, and count them into
    `summary`.

    Args:
        tiles: (query slice, hits of those queries by kind) batches, in query order.
        index: the searched index's rows (hits' row numbers count in it), whose identities are read
            for the matched rows only, once per batch.
        candidates_within: gather the model pairs (other than a model with itself) that have a whole-model
            or per-block pair within this many bits, for stage 2; None: gather none.

    Returns:
        The candidate model pairs, nearest first (then by protected model and index row).

    Raises:
        ModelIndexError: a shard of the index went missing or unreadable since it was loaded.
    """
    q = queries.columns()
    found: dict[tuple[int, int], Candidate] = {}
    counts: dict[str, int] = {}
    flagged: set[tuple[int, int]] = set()
    top: dict[tuple[int, int], tuple[int, str, dict[str, Any]]] = {}
    local_queries = any(f is not None for f in q.folder)
    with pq.ParquetWriter(out, REPORT_SCHEMA, compression="zstd") as writer:
        for tile, hits in tiles:
            rows = {kind: h.rows[h.key != hamming.NO_MATCH] for kind, h in hits.items()}
            every = np.concatenate(list(rows.values())) if rows else np.empty(0, np.int64)
            if not every.size:
                continue
            # One identity read for the whole batch, both kinds: shards touched once.
            unique, back = np.unique(every, return_inverse=True)
            identities = index.identities(unique, IDENTITY)
            folders = local_folders(index, unique, identities) if local_queries else None
            start = 0
            for kind, h in hits.items():
                n = len(rows[kind])
                if not n:
                    continue
                slots = back[start : start + n]
                start += n
                table = pairs_table(kind, h, tile.start, q, identities.take(pa.array(slots)), spec,
                                    match_folder=None if folders is None else folders[slots])
                writer.write_table(table)
                qi = np.nonzero(h.key != hamming.NO_MATCH)[0] + tile.start
                top = _count(summary, table, q.owner[qi], rows[kind], spec, counts, flagged, top)
                if candidates_within is not None:
                    _gather(table, q.owner[qi], rows[kind], candidates_within, found)
    summary.by_verdict = counts
    summary.flagged_models = len(flagged)
    summary.top = [{key: t[2][key] for key in _TOP_KEYS} for t in sorted(top.values(), key=_nearest)]
    return sorted(found.values(), key=lambda c: (c.distance, c.owner, c.row))


def apply_stage2(out: str, stage2: Sequence[tuple[Candidate, Stage2]], summary: SweepSummary) -> None:
    """Set the stage-2 columns of the report at `out` (rewritten batch by batch) and count them into `summary`.

    Every row of a model pair gets that pair's answer; the stage-1 columns are left as they are.
    """
    answers = {c.key: a for c, a in stage2}
    if answers:
        _rewrite(out, answers)
    summary.stage2_pairs = sum(1 for _, a in stage2 if a.verdict is not None)
    summary.stage2_skipped = len(stage2) - summary.stage2_pairs
    counts: dict[str, int] = {}
    for _, a in stage2:
        if a.verdict is not None:
            counts[a.verdict] = counts.get(a.verdict, 0) + 1
    summary.stage2_by_verdict = counts

    def pair(c: Candidate, a: Stage2) -> dict[str, Any]:
        return {"query_model_id": c.key[1], "match_model_id": c.key[3], "distance": c.distance,
                "method": a.method, "score": a.score}

    summary.stage2_pirated = [pair(c, a) for c, a in stage2 if a.verdict == "pirated"]
    summary.stage2_errors = [
        {**pair(c, a), "reason": a.reason} for c, a in stage2 if a.verdict == "error"
    ][:TOP]
    for t in summary.top:
        got = answers.get((t["query_source"], t["query_model_id"], t["match_source"], t["match_model_id"]))
        t["stage2_verdict"] = got.verdict if got else None


def _rewrite(out: str, answers: Mapping[PairKey, Stage2]) -> None:
    """Stream the report into a sibling file with its stage-2 columns set, then replace it."""
    tmp = Path(f"{out}.stage2.tmp")
    try:
        with pq.ParquetFile(out) as source, pq.ParquetWriter(tmp, REPORT_SCHEMA, compression="zstd") as writer:
            for batch in source.iter_batches(batch_size=REWRITE_ROWS):
                writer.write_table(with_stage2(pa.Table.from_batches([batch]), answers))
        os.replace(tmp, out)
    finally:
        tmp.unlink(missing_ok=True)


def write_summary(summary: SweepSummary) -> tuple[Path, Path]:
    """Write the summary beside its report: `<report>.summary.json` and `.summary.md` (`.parquet` dropped)."""
    base = summary_base(summary.report)
    as_json, as_md = Path(f"{base}.summary.json"), Path(f"{base}.summary.md")
    as_json.write_text(json.dumps(asdict(summary), indent=2) + "\n")
    as_md.write_text(summary.markdown())
    return as_json, as_md


def summary_base(out: str) -> str:
    return out[: -len(".parquet")] if out.endswith(".parquet") else out


def _gather(
    table: pa.Table, owner: np.ndarray, rows: np.ndarray, within: int, found: dict[tuple[int, int], Candidate]
) -> None:
    """Add one batch's candidate model pairs to `found`, keeping each pair's nearest distance."""
    dist = table["distance"].to_numpy()
    hit = np.flatnonzero(~table["same_model"].to_numpy() & (dist <= within))
    if not hit.size:
        return
    for j, key in zip(hit.tolist(), _pair_keys(table.take(pa.array(hit))), strict=True):
        pair = (int(owner[j]), int(rows[j]))
        held = found.get(pair)
        if held is None or dist[j] < held.distance:
            found[pair] = Candidate(pair[0], pair[1], int(dist[j]), key)


def _pair_keys(table: pa.Table) -> list[PairKey]:
    """Each report row's model pair."""
    columns = [table[c].to_pylist() for c in ("query_source", "query_model_id", "match_source", "match_model_id")]
    return list(zip(*columns, strict=True))


def _verdicts(spec: Spec) -> np.ndarray:
    return np.array([spec.thresholds.verdict(d) for d in range(hamming.BITS + 1)], dtype=object)


def _count(
    summary: SweepSummary,
    table: pa.Table,
    owner: np.ndarray,
    rows: np.ndarray,
    spec: Spec,
    counts: dict[str, int],
    flagged: set[tuple[int, int]],
    top: dict[tuple[int, int], tuple[int, str, dict[str, Any]]],
) -> dict[tuple[int, int], tuple[int, str, dict[str, Any]]]:
    """Count one batch's pairs into `summary`, `counts` (by verdict) and `flagged`; return the new top: the
    TOP nearest flagged model pairs so far, each with its nearest row."""
    same = table["same_model"].to_numpy()
    dist = table["distance"].to_numpy()
    summary.pairs += table.num_rows
    summary.same_model += int(same.sum())
    other = ~same
    verdicts = _verdicts(spec)
    for v, n in zip(*np.unique(verdicts[dist][other].astype(str), return_counts=True), strict=True):
        counts[str(v)] = counts.get(str(v), 0) + int(n)
    hit = other & (dist <= spec.thresholds.related)
    flagged.update(zip(owner[hit].tolist(), rows[hit].tolist(), strict=True))
    order = np.flatnonzero(hit)
    if not order.size:
        return top
    order = order[np.argsort(dist[order], kind="stable")]
    # The first row of each model pair in distance order is its nearest; the TOP nearest pairs of the batch.
    _, first = np.unique(np.stack([owner[order], rows[order]], axis=1), axis=0, return_index=True)
    for j in order[np.sort(first)][:TOP].tolist():
        pair, d = (int(owner[j]), int(rows[j])), int(dist[j])
        if pair not in top or d < top[pair][0]:
            top[pair] = (d, str(table["query_model_id"][j]), table.slice(j, 1).to_pylist()[0])
    return dict(sorted(top.items(), key=lambda item: _nearest(item[1]))[:TOP])


def _nearest(entry: tuple[int, str, dict[str, Any]]) -> tuple[int, str]:
    return entry[0], entry[1]
