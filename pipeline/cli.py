"""The `modelhash` command: hash, crawl, query, verify and compare models.

Every error we raise on purpose (ModelhashError) ends as one line on stderr and exit code 2 (jobs/entry.py).
"""

from __future__ import annotations

import argparse
import json
from typing import Any

from jobs.arguments import MODEL_HELP, add_spec
from jobs.entry import guarded
from jobs.query import describe, hash_uri
from pipeline.errors import SpecMismatchError
from pipeline.hashing import get_spec
from pipeline.hashing.model import HashResult
from pipeline.search.hamming import distance
from pipeline.search.matches import similarity


def cmd_hash(args: argparse.Namespace) -> int:
    info = describe(hash_uri(args.model, args.spec))
    if args.json:
        print(json.dumps(info, indent=2))
    else:
        for key in ("model_id", "revision", "format", "arch", "n_params", "spec", "code", "bytes_read", "seconds"):
            print(f"{key:<10} {info[key]}")
        for name, code in info["parts"].items():
            print(f"{'part':<10} {name}: {code}")
    return 0


def compare(a: HashResult, b: HashResult) -> dict[str, Any]:
    """Distance, similarity and verdict of two models' codes, and per-block evidence."""
    if a.code.spec != b.code.spec:
        raise SpecMismatchError(f"cannot compare codes of {a.code.spec} and {b.code.spec}")
    spec = get_spec(a.code.spec)
    dist = distance(a.code.code, b.code.code)
    parts_b = dict(b.code.parts)
    blocks = []
    for name, code in a.code.parts:
        if name in parts_b:
            d = distance(code, parts_b[name])
            blocks.append({"block": name, "distance": d, "verdict": spec.thresholds.verdict(d)})
    return {
        "a": a.ref.model_id,
        "b": b.ref.model_id,
        "spec": spec.name,
        "distance": dist,
        "similarity": round(similarity(dist, spec.bits), 4),
        "verdict": spec.thresholds.verdict(dist),
        "thresholds": {"copy": spec.thresholds.copy, "related": spec.thresholds.related},
        "blocks": blocks,
    }


def cmd_compare(args: argparse.Namespace) -> int:
    report = compare(hash_uri(args.a, args.spec), hash_uri(args.b, args.spec))
    if args.json:
        print(json.dumps(report, indent=2))
        return 0
    t = report["thresholds"]
    print(f"{report['a']} vs {report['b']} ({report['spec']})")
    print(
        f"distance {report['distance']} bits, similarity {report['similarity']:.3f}: {report['verdict']} "
        f"(copy <= {t['copy']}, related <= {t['related']})"
    )
    for block in report["blocks"]:
        print(f"  block {block['block']}: distance {block['distance']} ({block['verdict']})")
    if not report["blocks"]:
        print("  no block in common (per-block codes are compared by name)")
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jobs import crawl, query, sweep, verify

    parser = argparse.ArgumentParser(prog="modelhash", description="Find copies of neural-network models.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("hash", help="print a model's code and metadata")
    p.add_argument("model", help=MODEL_HELP)
    add_spec(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_hash)

    jobs = (
        ("crawl", crawl, "index every model of a source"),
        ("query", query, "rank the index's models by distance to a model"),
        ("sweep", sweep, "search a protected set of models against the index"),
        ("verify", verify, "stage 2: is a suspect a pirated copy, a homolog or unrelated (runs both)"),
    )
    for name, job, summary in jobs:
        p = commands.add_parser(name, help=summary)
        job.add_arguments(p)
        p.set_defaults(func=job.command)

    p = commands.add_parser("compare", help="distance and verdict for two models")
    p.add_argument("a", help="first model (" + MODEL_HELP + ")")
    p.add_argument("b", help="second model")
    add_spec(p)
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return guarded(lambda: args.func(args))


if __name__ == "__main__":
    raise SystemExit(main())
