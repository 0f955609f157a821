"""Ranked matches of one code against the index's codes, with the spec's verdicts."""

from __future__ import annotations

from dataclasses import dataclass

from pipeline.hashing.spec import Spec
from pipeline.index.reader import Codes
from pipeline.search.hamming import as_words, top_k


@dataclass(frozen=True, slots=True)
class Match:
    """One indexed model near the query."""

    source: str
    model_id: str
    revision: str | None
    distance: int
    similarity: float
    verdict: str


def similarity(distance: int, bits: int) -> float:
    """1 - distance / bits (DESIGN.md, Hashing)."""
    return 1.0 - distance / bits


def rank(indexed: Codes, code: bytes, spec: Spec, k: int = 10, max_distance: int | None = None) -> list[Match]:
    """The `k` nearest indexed models (ties by index order), within `max_distance` when given."""
    rows, dists = top_k(indexed.codes, as_words(code), k, max_distance=max_distance)
    found = indexed.identities(rows).to_pylist()  # only the k matches' identities, read from their shards
    matches = []
    for who, d in zip(found, dists, strict=True):
        dist = int(d)
        score = round(similarity(dist, spec.bits), 4)
        matches.append(
            Match(who["source"], who["model_id"], who["revision"], dist, score, spec.thresholds.verdict(dist))
        )
    return matches
