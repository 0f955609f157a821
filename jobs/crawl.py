"""The crawl job: list a source, skip what the index already holds, hash the rest on Ray, commit a run.

Run as `modelhash crawl SOURCE --index INDEX`, `python -m jobs.crawl SOURCE --index INDEX`, or through
`ray job submit -- python -m jobs.crawl ...`.
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass
from typing import Any

from tqdm import tqdm

from jobs.entry import guarded
from pipeline.errors import ModelhashError
from pipeline.hashing import get_spec
from pipeline.hashing.model import hash_model
from pipeline.index.reader import IndexReader
from pipeline.index.rows import error_row, ok_row
from pipeline.index.schema import STATUS_ERROR, STATUS_OK
from pipeline.index.writer import ShardWriter
from pipeline.refs import ModelRef
from pipeline.settings import Settings
from pipeline.sources import list_models, source_name

TASK_RETRIES = 3  # a worker that dies mid-task (OOM, node loss) gets its task re-run this many times


@dataclass
class CrawlSummary:
    """What a crawl did; also stored in the run's commit record."""

    source: str
    index: str
    spec: str
    run_id: str
    seen: int = 0
    skipped: int = 0
    hashed: int = 0
    failed: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    def line(self) -> str:
        return (
            f"{self.seen} models seen, {self.skipped} skipped as unchanged, {self.hashed} hashed, "
            f"{self.failed} failed ({self.seconds:.1f} s; run {self.run_id})"
        )


def hash_to_row(ref: ModelRef, spec_name: str) -> dict[str, Any]:
    """A model's index row: its codes, or an error row with the reason. Never raises for a bad model."""
    spec = get_spec(spec_name)
    start = time.perf_counter()
    try:
        return ok_row(hash_model(ref, spec))
    except ModelhashError as exc:
        return error_row(ref, spec.name, str(exc), time.perf_counter() - start)
    except Exception as exc:  # a checkpoint that trips a library bug must not stop the crawl
        reason = f"unexpected {type(exc).__name__}: {exc}"
        return error_row(ref, spec.name, reason, time.perf_counter() - start)


@functools.cache
def _hash_task() -> Callable[..., Any]:
    """`hash_to_row` as a Ray task; built on first use so that importing this module does not import Ray."""
    import ray

    return ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(hash_to_row)


def _pending_models(
    refs: Iterable[ModelRef], known: dict[str, tuple[str, str]], retry_errors: bool, summary: CrawlSummary
) -> list[ModelRef]:
    todo = []
    for ref in refs:
        summary.seen += 1
        held = known.get(ref.model_id)
        if held and held[0] == ref.revision and (held[1] != STATUS_ERROR or not retry_errors):
            summary.skipped += 1
        else:
            todo.append(ref)
    return todo


def crawl(
    source: str,
    index: str,
    *,
    spec: str | None = None,
    ray_address: str | None = None,
    max_in_flight: int | None = None,
    retry_errors: bool = False,
    progress: bool = True,
) -> CrawlSummary:
    """Index every new or changed model of `source` into `index` as one committed run.

    Rows stream to shards as tasks finish: the driver holds at most `max_in_flight` results.
    Ctrl-C commits what was hashed so far, so a re-run resumes where this one stopped.
    """
    started = time.perf_counter()
    chosen = get_spec(spec)
    known = {}
    if IndexReader.exists(index):
        known = IndexReader(index).known_revisions(source_name(source), chosen.name)
    with ShardWriter(index) as writer:
        summary = CrawlSummary(source=source, index=index, spec=chosen.name, run_id=writer.run_id)
        todo = _pending_models(list_models(source), known, retry_errors, summary)
        if todo:
            from jobs.cluster import cluster_cpus, connect

            connect(ray_address)
            limit = max_in_flight or 2 * cluster_cpus()
            try:
                for row in tqdm(
                    _run_tasks(todo, chosen.name, limit),
                    total=len(todo),
                    desc="hashing",
                    unit="model",
                    disable=not progress,
                    file=sys.stderr,
                ):
                    writer.add(row)
                    if row["status"] == STATUS_OK:
                        summary.hashed += 1
                    else:
                        summary.failed += 1
            except KeyboardInterrupt:
                summary.interrupted = True
        summary.seconds = time.perf_counter() - started
        writer.commit(asdict(summary))
    if summary.interrupted:
        raise KeyboardInterrupt(summary.line())
    return summary


def _run_tasks(todo: list[ModelRef], spec_name: str, limit: int) -> Iterable[dict[str, Any]]:
    """Rows in completion order, at most `limit` tasks in flight; a task lost to Ray becomes an error row."""
    import ray

    task = _hash_task()
    queue = iter(todo)
    in_flight: dict[ray.ObjectRef, ModelRef] = {}
    while True:
        while len(in_flight) < limit and (ref := next(queue, None)) is not None:
            in_flight[task.remote(ref, spec_name)] = ref
        if not in_flight:
            return
        ready, _ = ray.wait(list(in_flight), num_returns=1)
        model = in_flight.pop(ready[0])
        try:
            yield ray.get(ready[0])
        except ray.exceptions.RayError as exc:
            yield error_row(model, spec_name, f"task failed after {TASK_RETRIES} retries: {exc}")


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m jobs.crawl", description=__doc__.splitlines()[0])
    add_arguments(parser)
    return parser.parse_args(argv)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The crawl's flags, shared by `modelhash crawl` and `python -m jobs.crawl`."""
    parser.add_argument("source", help="a folder of models or a checkpoint file")
    parser.add_argument("--index", required=True, help="index folder (created if missing)")
    parser.add_argument("--spec", default=None, help="hashing spec (default: the default spec)")
    parser.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--max-in-flight", type=int, default=None, help="tasks in flight (default: 2 x cluster CPUs)")
    parser.add_argument("--retry-errors", action="store_true", help="re-hash unchanged models that failed before")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> CrawlSummary:
    settings = Settings.from_env(ray_address=args.ray_address)
    return crawl(
        args.source,
        args.index,
        spec=args.spec,
        ray_address=settings.ray_address,
        max_in_flight=args.max_in_flight,
        retry_errors=args.retry_errors,
        progress=not args.no_progress,
    )


def command(args: argparse.Namespace) -> int:
    """Run the crawl and print its summary: `modelhash crawl` and this module's main."""
    print(run(args).line())
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    return guarded(lambda: command(args), "jobs.crawl")


if __name__ == "__main__":
    raise SystemExit(main())
