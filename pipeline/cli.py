"""The `modelhash` command: hash, crawl, query and compare models.

Every error we raise on purpose (ModelhashError) is caught here once and printed as one line.
"""

from __future__ import annotations

import argparse
import json
import sys
from typing import Any

from pipeline.errors import ModelhashError, SpecMismatchError
from pipeline.hashing import get_spec
from pipeline.hashing.model import HashResult, hash_model
from pipeline.search.hamming import distance
from pipeline.search.matches import similarity
from pipeline.sources import resolve_model


def _hash(uri: str, spec: str | None) -> HashResult:
    return hash_model(resolve_model(uri), get_spec(spec))


def cmd_hash(args: argparse.Namespace) -> int:
    from jobs.query import describe

    info = describe(_hash(args.model, args.spec))
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
    report = compare(_hash(args.a, args.spec), _hash(args.b, args.spec))
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
    return 0


def cmd_crawl(args: argparse.Namespace) -> int:
    from jobs import crawl

    print(crawl.run(args).line())
    return 0


def cmd_query(args: argparse.Namespace) -> int:
    from jobs import query

    result = query.run(args)
    print(result.to_json() if args.json else query.format_matches(result))
    return 0


def build_parser() -> argparse.ArgumentParser:
    from jobs import crawl, query

    parser = argparse.ArgumentParser(prog="modelhash", description="Find copies of neural-network models.")
    commands = parser.add_subparsers(dest="command", required=True)

    p = commands.add_parser("hash", help="print a model's code and metadata")
    p.add_argument("model", help="a checkpoint file or a model folder")
    p.add_argument("--spec", default=None, help="hashing spec (default: the default spec)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_hash)

    p = commands.add_parser("crawl", help="index every model of a source")
    crawl.add_arguments(p)
    p.set_defaults(func=cmd_crawl)

    p = commands.add_parser("query", help="rank the index's models by distance to a model")
    query.add_arguments(p)
    p.set_defaults(func=cmd_query)

    p = commands.add_parser("compare", help="distance and verdict for two models")
    p.add_argument("a", help="first model")
    p.add_argument("b", help="second model")
    p.add_argument("--spec", default=None, help="hashing spec (default: the default spec)")
    p.add_argument("--json", action="store_true", help="one JSON object on stdout")
    p.set_defaults(func=cmd_compare)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ModelhashError as exc:
        print(f"modelhash: error: {' '.join(str(exc).split())}", file=sys.stderr)
        return 2
    except KeyboardInterrupt as exc:
        print(f"modelhash: interrupted{': ' + str(exc) if str(exc) else ''}", file=sys.stderr)
        return 130


if __name__ == "__main__":
    raise SystemExit(main())
