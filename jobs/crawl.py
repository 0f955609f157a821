"""The crawl job: list a source, skip what the index holds, mark byte-identical re-uploads as duplicates,
hash the rest in Ray tasks, and commit the rows run by run as they arrive.

Run as `modelhash crawl SOURCE --index INDEX`, `python -m jobs.crawl SOURCE --index INDEX`, or through
`ray job submit -- python -m jobs.crawl ...` (the driver joins the job's cluster).
"""

from __future__ import annotations

import argparse
import functools
import os
import sys
import time
from collections.abc import Iterator
from dataclasses import asdict, dataclass, field
from typing import Any

from tqdm import tqdm

from jobs.arguments import add_spec, non_negative_float, positive_float, positive_int
from jobs.entry import job_main, warn_no_models
from pipeline.errors import ModelhashError
from pipeline.hashing import get_spec
from pipeline.hashing.model import hash_model
from pipeline.index.plan import ContentKey, IndexState, content_key, load_state
from pipeline.index.rows import duplicate_row, error_row, ok_row
from pipeline.index.schema import STATUS_DUPLICATE, STATUS_OK
from pipeline.index.writer import ShardWriter, check_index_folder
from pipeline.refs import ModelRef
from pipeline.retry import RATE_ENV
from pipeline.settings import Settings
from pipeline.sources import list_models, source_name

TASK_RETRIES = 3  # a worker that dies mid-task (OOM, node loss) gets its task re-run this many times
CHECKPOINT_ROWS = 1000  # rows per committed run: a killed crawl loses at most this much work
POLL_SECONDS = 1.0


@dataclass
class CrawlSummary:
    """What a crawl did; also stored in the commit record of each of its runs."""

    source: str
    index: str
    spec: str
    root: str | None = None  # a local source's absolute path: index rows' model_ids are relative to it
    runs: list[str] = field(default_factory=list)
    seen: int = 0
    skipped: int = 0
    hashed: int = 0
    duplicates: int = 0
    failed: int = 0
    seconds: float = 0.0
    interrupted: bool = False

    def line(self) -> str:
        runs = len(self.runs)
        return (
            f"{self.seen} models seen, {self.skipped} skipped as unchanged, {self.hashed} hashed, "
            f"{self.duplicates} duplicates, {self.failed} failed ({self.seconds:.1f} s, {runs} run{'s' * (runs != 1)})"
        )

    def count(self, row: dict[str, Any]) -> None:
        if row["status"] == STATUS_OK:
            self.hashed += 1
        elif row["status"] == STATUS_DUPLICATE:
            self.duplicates += 1
        else:
            self.failed += 1


@dataclass(frozen=True)
class TaskOptions:
    """How each model's Ray task runs."""

    max_in_flight: int
    timeout_s: float | None = None  # per model; a task past it is cancelled and becomes an error row
    memory_bytes: int | None = None  # Ray schedules no more tasks on a node than its memory allows
    num_gpus: float = 0.0


def hash_to_row(ref: ModelRef, spec_name: str) -> dict[str, Any]:
    """A model's index row: its codes, or an error row with the reason. Never raises for a bad model."""
    spec = get_spec(spec_name)
    start = time.perf_counter()
    if ref.error:
        return error_row(ref, spec.name, ref.error)
    try:
        return ok_row(hash_model(ref, spec))
    except ModelhashError as exc:
        return error_row(ref, spec.name, str(exc), time.perf_counter() - start)
    except Exception as exc:  # a checkpoint that trips a library bug must not stop the crawl
        reason = f"unexpected {type(exc).__name__}: {exc}"
        return error_row(ref, spec.name, reason, time.perf_counter() - start)


@functools.cache
def _hash_task() -> Any:
    """`hash_to_row` as a Ray task; built on first use so that importing this module does not import Ray."""
    import ray

    return ray.remote(num_cpus=1, max_retries=TASK_RETRIES)(hash_to_row)


class _Scheduler:
    """Ray tasks for the models to hash, at most `max_in_flight` at once, with duplicates held back.

    A model whose files are byte-identical to one hashed in this run waits for that one's row instead of
    being hashed again.
    """

    def __init__(self, spec_name: str, options: TaskOptions, state: IndexState):
        import ray

        self._ray = ray
        self._spec = spec_name
        self._options = options
        self._state = state
        from jobs.cluster import task_options

        extra: dict[str, Any] = task_options()
        if options.memory_bytes:
            extra["memory"] = options.memory_bytes
        if options.num_gpus:
            # GPU tasks default to max_calls=1 (a new process per task): keep workers, and their CUDA, warm.
            extra.update(num_gpus=options.num_gpus, max_calls=0)
        self._task = _hash_task().options(**extra) if extra else _hash_task()
        self._in_flight: dict[Any, tuple[ModelRef, float]] = {}
        self._waiting: dict[ContentKey, list[ModelRef]] = {}

    @property
    def full(self) -> bool:
        return len(self._in_flight) >= self._options.max_in_flight

    @property
    def busy(self) -> bool:
        return bool(self._in_flight)

    def submit(self, ref: ModelRef) -> Iterator[dict[str, Any]]:
        """Start hashing `ref`, or yield its row at once when it duplicates a model already hashed."""
        key = content_key(ref)
        if key is not None and key in self._state.originals:
            yield duplicate_row(ref, self._state.originals[key])
        elif key is not None and key in self._waiting:
            self._waiting[key].append(ref)
        else:
            if key is not None:
                self._waiting[key] = []
            self._in_flight[self._task.remote(ref, self._spec)] = (ref, time.monotonic())

    def collect(self, block: bool) -> Iterator[dict[str, Any]]:
        """Rows of finished tasks (waiting for one when `block`), timed-out tasks, and their duplicates."""
        if not self._in_flight:
            return
        ready, _ = self._ray.wait(list(self._in_flight), num_returns=1, timeout=POLL_SECONDS if block else 0)
        for obj in ready:
            ref, _started = self._in_flight.pop(obj)
            try:
                row = self._ray.get(obj)
            except self._ray.exceptions.RayTaskError as exc:  # hash_to_row itself raised: a bug, not the model
                row = error_row(ref, self._spec, f"task raised {type(exc.cause).__name__}: {exc.cause}")
            except self._ray.exceptions.RayError as exc:  # the worker or node died, TASK_RETRIES times
                reason = f"task lost after {TASK_RETRIES} retries: {type(exc).__name__}"
                row = error_row(ref, self._spec, reason)
            yield from self._finish(ref, row)
        if self._options.timeout_s:
            now = time.monotonic()
            for obj, (ref, started) in list(self._in_flight.items()):
                if now - started > self._options.timeout_s:
                    self._ray.cancel(obj, force=True)
                    del self._in_flight[obj]
                    reason = f"timed out after {self._options.timeout_s:g} s"
                    yield from self._finish(ref, error_row(ref, self._spec, reason, now - started))

    def _finish(self, ref: ModelRef, row: dict[str, Any]) -> Iterator[dict[str, Any]]:
        yield row
        self._state.remember(ref, row)
        key = content_key(ref)
        for twin in self._waiting.pop(key, []) if key is not None else []:
            if row["status"] == STATUS_OK:
                yield duplicate_row(twin, row)
            else:
                yield error_row(twin, self._spec, f"same files as {ref.model_id}, which failed: {row['error']}")


class _Committer:
    """Rows to shards as they arrive, committed as a run every `every` rows, and at the end."""

    def __init__(self, index: str, summary: CrawlSummary, every: int):
        self._index, self._summary, self._every = index, summary, every
        self._writer: ShardWriter | None = None
        self._pending = 0

    def add(self, row: dict[str, Any]) -> None:
        if self._writer is None:
            self._writer = ShardWriter(self._index, rows_per_shard=self._every)
        self._writer.add(row)
        self._summary.count(row)
        self._pending += 1
        if self._pending >= self._every:
            self.commit()

    def commit(self) -> None:
        if self._writer is not None:
            self._summary.runs.append(self._writer.run_id)
            self._writer.commit(asdict(self._summary))
            self._writer, self._pending = None, 0


def crawl(
    source: str,
    index: str,
    *,
    spec: str | None = None,
    ray_address: str | None = None,
    filters: dict[str, Any] | None = None,
    max_in_flight: int | None = None,
    timeout_s: float | None = None,
    memory_bytes: int | None = None,
    num_gpus: float | None = None,
    retry_errors: bool = False,
    checkpoint_rows: int = CHECKPOINT_ROWS,
    progress: bool = True,
) -> CrawlSummary:
    """Index every new or changed model of `source` into `index`.

    The listing streams: models are skipped, marked duplicate or sent to Ray as they are listed, and rows
    are committed every `checkpoint_rows`, so the driver never holds the crawl and a killed crawl,
    re-run, hashes only what it had not committed. Ctrl-C (or SIGTERM) commits what is done.
    """
    started = time.perf_counter()
    chosen = get_spec(spec)
    check_index_folder(index)
    state = load_state(index, source_name(source), chosen.name)
    summary = CrawlSummary(source=source, index=index, spec=chosen.name, root=_local_root(source))
    committer = _Committer(index, summary, checkpoint_rows)
    bar = tqdm(desc="crawl", unit="model", disable=not progress, file=sys.stderr)
    scheduler: _Scheduler | None = None
    try:
        unchanged = functools.partial(state.unchanged, retry_errors=retry_errors)
        listing = list_models(source, unchanged=unchanged, **(filters or {}))
        for ref in listing:
            summary.seen += 1
            if state.unchanged(ref.model_id, ref.revision, retry_errors):
                summary.skipped += 1
                bar.update()
                continue
            if scheduler is None:
                scheduler = _start_scheduler(
                    chosen.name, ray_address, state, max_in_flight, timeout_s, memory_bytes, num_gpus
                )
            for row in scheduler.submit(ref):
                committer.add(row)
                bar.update()
            while scheduler.full:
                for row in scheduler.collect(block=True):
                    committer.add(row)
                    bar.update()
        while scheduler is not None and scheduler.busy:
            for row in scheduler.collect(block=True):
                committer.add(row)
                bar.update()
    except KeyboardInterrupt:
        summary.interrupted = True
    finally:
        bar.close()
        summary.seconds = time.perf_counter() - started
        committer.commit()
    if summary.interrupted:
        raise KeyboardInterrupt(summary.line())
    return summary


def _local_root(source: str) -> str | None:
    """The absolute path of a local source (stage 2 finds a local row's model from it), else None."""
    if source_name(source) != "local":
        return None
    return os.path.abspath(source.removeprefix("file://"))


def _start_scheduler(
    spec_name: str,
    ray_address: str | None,
    state: IndexState,
    max_in_flight: int | None,
    timeout_s: float | None,
    memory_bytes: int | None,
    num_gpus: float | None,
) -> _Scheduler:
    from jobs.cluster import cluster_cpus, cluster_has_gpus, connect

    connect(ray_address)
    if num_gpus is None:  # ask for a GPU share only where the spec has GPU kernels and the cluster GPUs
        num_gpus = 0.25 if get_spec(spec_name).uses_gpu and cluster_has_gpus() else 0.0
    options = TaskOptions(max_in_flight or 2 * cluster_cpus(), timeout_s, memory_bytes, num_gpus)
    return _Scheduler(spec_name, options, state)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The crawl's flags, shared by `modelhash crawl` and `python -m jobs.crawl`."""
    parser.add_argument("source", help="a folder or checkpoint file, s3://bucket/prefix, or hf:// (with filters)")
    parser.add_argument("--index", required=True, help="index folder or s3://bucket/prefix (created if missing)")
    add_spec(parser)
    parser.add_argument("--author", default=None, help="hf:// only: models of this author or organisation")
    parser.add_argument("--search", default=None, help="hf:// only: models whose id contains this")
    parser.add_argument("--limit", type=positive_int, default=None, help="hf:// only: at most this many models")
    parser.add_argument("--ray-address", default=None, help="Ray cluster (default: $RAY_ADDRESS, else a local Ray)")
    parser.add_argument("--max-in-flight", type=positive_int, default=None,
                        help="tasks in flight (default: 2 x cluster CPUs)")
    parser.add_argument("--timeout", type=positive_float, default=None,
                        help="seconds per model before it is an error row")
    parser.add_argument("--task-memory", type=positive_int, default=None, help="bytes of memory to reserve per task")
    parser.add_argument("--num-gpus", type=non_negative_float, default=None, help="GPUs per task (default: auto)")
    parser.add_argument("--max-rps", type=positive_float, default=None,
                        help="requests per second per host, per process (default: no cap)")
    parser.add_argument("--checkpoint-rows", type=positive_int, default=CHECKPOINT_ROWS, help="rows per committed run")
    parser.add_argument("--retry-errors", action="store_true", help="re-hash unchanged models that failed before")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def run(args: argparse.Namespace) -> CrawlSummary:
    settings = Settings.from_env(ray_address=args.ray_address)
    if args.max_rps:
        os.environ[RATE_ENV] = str(args.max_rps)  # this process's hosts, and every task's (cluster.task_options)
    filters = {k: v for k, v in (("author", args.author), ("search", args.search), ("limit", args.limit)) if v}
    return crawl(
        args.source,
        args.index,
        spec=args.spec,
        ray_address=settings.ray_address,
        filters=filters,
        max_in_flight=args.max_in_flight,
        timeout_s=args.timeout,
        memory_bytes=args.task_memory,
        num_gpus=args.num_gpus,
        retry_errors=args.retry_errors,
        checkpoint_rows=args.checkpoint_rows,
        progress=not args.no_progress,
    )


def command(args: argparse.Namespace) -> int:
    """Run the crawl and print its summary: `modelhash crawl` and this module's main."""
    summary = run(args)
    print(summary.line())
    if summary.seen == 0:  # a mistyped path or filter: the index stays unwritten
        warn_no_models(args.source, f"nothing was written to {args.index}")
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("jobs.crawl", __doc__.splitlines()[0], add_arguments, command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
