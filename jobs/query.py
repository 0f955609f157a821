"""The query job: hash one model, scan the index, rank the nearest codes ("who copied this model?").

Run as `modelhash query MODEL --index INDEX` or `python -m jobs.query MODEL --index INDEX`. The scan runs
in this process (a few ms per million codes); with `--ray-address` the query model is hashed in a Ray
task, on the cluster's workers, where large or remote checkpoints are cheap to read.
"""

from __future__ import annotations

import argparse
import json
from dataclasses import asdict, dataclass
from typing import Any

from jobs.arguments import MODEL_HELP, add_spec, non_negative_int, positive_int
from jobs.entry import job_main
from pipeline.errors import ModelIndexError
from pipeline.hashing import get_spec
from pipeline.hashing.model import HashResult, hash_model
from pipeline.index.reader import IndexReader
from pipeline.search.matches import Match, rank
from pipeline.settings import Settings
from pipeline.sources import resolve_model


@dataclass
class QueryResult:
    """The query model's identity and code, and its ranked matches."""

    query: dict[str, Any]
    matches: list[Match]

    def to_json(self) -> str:
        return json.dumps({"query": self.query, "matches": [asdict(m) for m in self.matches]}, indent=2)


def describe(result: HashResult) -> dict[str, Any]:
    """A hashed model as the CLI and JSON output show it."""
    return {
        "source": result.ref.source,
        "model_id": result.ref.model_id,
        "revision": result.ref.revision,
        "format": result.format,
        "arch": result.ref.arch,
        "n_params": result.n_params,
        "spec": result.code.spec,
        "code": result.code.code.hex(),
        "parts": {name: code.hex() for name, code in result.code.parts},
        "bytes_read": result.bytes_read,
        "seconds": round(result.seconds, 4),
    }


def hash_uri(model: str, spec_name: str | None = None) -> HashResult:
    """Hash a model given by URI (the CLI's `hash` and `compare`; a Ray worker's part of a remote query)."""
    return hash_model(resolve_model(model), get_spec(spec_name))


def _hash_remotely(model: str, spec_name: str, ray_address: str) -> HashResult:
    import ray

    from jobs.cluster import connect, task_options

    connect(ray_address)
    return ray.get(ray.remote(num_cpus=1)(hash_uri).options(**task_options()).remote(model, spec_name))


def query(
    model: str,
    index: str,
    *,
    k: int = 10,
    max_distance: int | None = None,
    spec: str | None = None,
    ray_address: str | None = None,
) -> QueryResult:
    """Rank the index's models of the same spec by Hamming distance to `model`'s code."""
    chosen = get_spec(spec)
    reader = IndexReader(index)
    indexed = reader.load_codes(chosen.name)
    if len(indexed.codes) == 0:
        present = ", ".join(reader.specs()) or "none"
        raise ModelIndexError(f"{index}: no codes of spec {chosen.name} (specs in the index: {present})")
    result = _hash_remotely(model, chosen.name, ray_address) if ray_address else hash_uri(model, chosen.name)
    return QueryResult(query=describe(result), matches=rank(indexed, result.code.code, chosen, k, max_distance))


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The query's flags, shared by `modelhash query` and `python -m jobs.query`."""
    parser.add_argument("model", help=MODEL_HELP)
    parser.add_argument("--index", required=True, help="index folder or s3://bucket/prefix")
    parser.add_argument("-k", type=positive_int, default=10, help="number of matches (default 10)")
    parser.add_argument("--max-distance", type=non_negative_int, default=None,
                        help="only matches within this many bits")
    add_spec(parser)
    parser.add_argument("--ray-address", default=None, help="hash the query on this Ray cluster")
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")


def run(args: argparse.Namespace) -> QueryResult:
    settings = Settings.from_env(ray_address=args.ray_address)
    return query(
        args.model,
        args.index,
        k=args.k,
        max_distance=args.max_distance,
        spec=args.spec,
        ray_address=settings.ray_address,
    )


def format_matches(result: QueryResult) -> str:
    """A human-readable ranking."""
    q = result.query
    lines = [f"query {q['model_id']} ({q['spec']}, code {q['code'][:16]}...)"]
    if not result.matches:
        return "\n".join([*lines, "no matches"])
    width = max((len(m.model_id) for m in result.matches), default=8)
    lines.append(f"{'rank':>4}  {'model':<{width}}  {'distance':>8}  {'similarity':>10}  verdict")
    for rank_no, m in enumerate(result.matches, 1):
        lines.append(f"{rank_no:>4}  {m.model_id:<{width}}  {m.distance:>8}  {m.similarity:>10.3f}  {m.verdict}")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    """Run the query and print it (ranking, or JSON with --json): `modelhash query` and this module's main."""
    result = run(args)
    print(result.to_json() if args.json else format_matches(result))
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("jobs.query", __doc__.splitlines()[0], add_arguments, command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
