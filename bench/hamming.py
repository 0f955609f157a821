"""Hamming scan benchmark: our kernels against faiss `IndexBinaryFlat` and this machine's memory bandwidth.

Run as `python -m bench.hamming` (what `make bench` does; needs `pip install -e '.[bench]'` for faiss).
Everything is measured in one process on the same random codes, side by side, and every timing is the
median of several repeats. It checks that our results equal a plain numpy reference (ties included),
measures one query and 1,000 queries (top-10) on a curve up to N = 10M, the sweep's working memory
against Q x k and N, and loading a 10M-row Parquet index (time cold and warm, memory held against
N x 32 bytes, identities read back on demand); it writes the `hamming` section of bench/RESULTS.md and
prints it. `--only load` measures the index load alone and replaces only its part of that section.
"""

from __future__ import annotations

import argparse
import gc
import multiprocessing
import os
import platform
import re
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from concurrent.futures import ProcessPoolExecutor
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.results import cpu_model, read_section, write_section
from pipeline.index import store
from pipeline.index.reader import IndexReader
from pipeline.index.schema import SCHEMA
from pipeline.index.writer import (
    DEFAULT_ROWS_PER_SHARD,
    SHARDS_DIR,
    RunRecord,
    ShardEntry,
    new_run_id,
    run_record_path,
)
from pipeline.search import hamming
from pipeline.search.sweep import Target, search

SPEC = "bench-v1"
K = 10


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.hamming", description=__doc__.splitlines()[0])
    parser.add_argument("--n", type=int, default=10_000_000, help="largest index (default 10M codes)")
    parser.add_argument("--queries", type=int, default=1000, help="queries of the many-query runs (default 1000)")
    parser.add_argument("--repeats", type=int, default=3, help="repeats of the many-query runs (default 3)")
    parser.add_argument("--quick", action="store_true", help="a smoke run: 1M codes, 100 queries, no index load")
    parser.add_argument("--no-write", action="store_true", help="print only; leave RESULTS.md alone")
    parser.add_argument(
        "--only", choices=["load"], default=None, help="load: the index load alone (its part of RESULTS.md only)"
    )
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.repeats = 1_000_000, 100, 2
    if args.only == "load":
        section = _index_load(args.n, np.random.default_rng(20261122))  # prints its own lines
        if not args.no_write:
            _replace_load_part(section)
        return 0
    try:
        import faiss
    except ImportError as exc:
        raise SystemExit("bench.hamming needs faiss: pip install -e '.[bench]'") from exc

    started = time.perf_counter()
    rng = np.random.default_rng(20261122)
    out: list[str] = [f"## Hamming scan ({datetime.now(UTC):%Y-%m-%d}, `python -m bench.hamming`)", ""]
    out += _machine(faiss)
    bw_copy, bw_read = _bandwidth()
    out += [
        f"Memory bandwidth: `np.copyto` of 1 GiB uint64, **{bw_copy:.1f} GB/s** counting bytes read plus "
        f"written (the yardstick below); a read-only `sum()` streams {bw_read:.1f} GB/s. Medians of 5.",
        "",
    ]
    print("\n".join(out), flush=True)

    codes = rng.integers(0, 2**64, size=(args.n, 4), dtype=np.uint64)
    queries = rng.integers(0, 2**64, size=(max(args.queries, 16), 4), dtype=np.uint64)
    sizes = [s for s in (100_000, 1_000_000, 10_000_000) if s < args.n] + [args.n]
    index = faiss.IndexBinaryFlat(256)
    index.add(codes.view(np.uint8))
    hamming.top_k_many(codes[:5000], queries[:5], K)  # compile (or load the cached kernels) off the clock

    section = _correctness(codes, queries, index)
    section += _one_query(codes, queries, index, sizes, bw_copy)
    section += _many_queries(codes, queries[: args.queries], index, sizes, args.repeats)
    del index
    gc.collect()
    section += _sweep_memory(codes, queries, sizes)
    if not args.quick:
        del codes
        gc.collect()
        section += _index_load(args.n, rng)
    section += _notes()
    section.append(f"Whole benchmark: {time.perf_counter() - started:.0f} s.")
    text = "\n".join(out + section) + "\n"
    print("\n".join(section), flush=True)
    if not args.no_write:
        write_section("hamming", text)
    return 0


# -- measurements ------------------------------------------------------------------------------------


def _machine(faiss) -> list[str]:
    import numba

    cpu = cpu_model()
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    simd = ", ".join(f for f in ("avx2", "avx512f", "avx512_vpopcntdq") if f" {f}" in flags) or "none"
    return [
        f"Machine: {cpu}, {os.cpu_count()} cores visible ({hamming.default_threads()} used), SIMD: {simd}; "
        f"shared and noisy (load average {os.getloadavg()[0]:.1f} at the start). Python {platform.python_version()}, "
        f"numpy {np.__version__}, numba {numba.__version__}, faiss-cpu {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} OpenMP threads).",
        "",
    ]


def median_seconds(fn: Callable[[int], object], repeats: int) -> float:
    """Median wall seconds of `fn(r)` for r in range(repeats)."""
    times = []
    for r in range(repeats):
        t = time.perf_counter()
        fn(r)
        times.append(time.perf_counter() - t)
    return float(np.median(times))


def _bandwidth() -> tuple[float, float]:
    src = np.ones(1 << 27, dtype=np.uint64)  # 1 GiB
    dst = np.empty_like(src)
    np.copyto(dst, src)
    copy = median_seconds(lambda _: np.copyto(dst, src), 5)
    read = median_seconds(lambda _: src.sum(), 5)
    return 2 * src.nbytes / copy / 1e9, src.nbytes / read / 1e9


def _reference(codes: np.ndarray, query: np.ndarray, k: int) -> tuple[list[int], list[int]]:
    """Plain numpy: every distance, then sort by (distance, index)."""
    d = np.zeros(codes.shape[0], dtype=np.int64)
    for start in range(0, codes.shape[0], 1 << 20):
        block = codes[start : start + (1 << 20)]
        d[start : start + len(block)] = np.bitwise_count(block ^ query).sum(axis=1)
    order = np.lexsort((np.arange(len(d)), d))[:k]
    return order.tolist(), d[order].tolist()


def _correctness(codes: np.ndarray, queries: np.ndarray, index) -> list[str]:
    n = codes.shape[0]
    small = codes[:100_000]
    checks = []
    ok = True
    for qi in range(5):  # one query at full size, against the reference
        idx, dist = hamming.top_k(codes, queries[qi], K)
        ok &= (idx.tolist(), dist.tolist()) == _reference(codes, queries[qi], K)
    checks.append(f"one query, N = {n:,}, 5 queries: {'identical' if ok else 'DIFFERENT'}")
    many_idx, many_dist = hamming.top_k_many(small, queries, K)
    ok = all(
        (many_idx[i].tolist(), many_dist[i].tolist()) == _reference(small, q, K) for i, q in enumerate(queries)
    )
    checks.append(f"{len(queries)} queries, N = 100,000: {'identical' if ok else 'DIFFERENT'}")
    near = codes[1234].copy()
    near[0] ^= np.uint64(0b1011)  # a planted near-duplicate (3 bits away) and a radius query
    w_idx, w_dist = hamming.within(codes, near, 100)
    ref_order, ref_dist = _reference(codes, near, 10_000)
    keep = [i for i, d in zip(ref_order, ref_dist, strict=True) if d <= 100]
    ok = w_idx.tolist() == keep and w_idx[0] == 1234 and w_dist[0] == 3
    checks.append(f"`within(r = 100)`, N = {n:,}: {len(w_idx)} rows, {'identical' if ok else 'DIFFERENT'}")
    try:
        import torch

        t_idx, t_dist = hamming.top_k_many(small, queries[:64], K, device=torch.device("cpu"))
        ok = np.array_equal(t_idx, many_idx[:64]) and np.array_equal(t_dist, many_dist[:64])
        checks.append(f"torch path (on the CPU), 64 queries, N = 100,000: {'identical' if ok else 'DIFFERENT'}")
    except ImportError:
        checks.append("torch path: torch not installed")
    fd, fi = index.search(queries[:100].view(np.uint8), K)
    ours_i, ours_d = hamming.top_k_many(codes, queries[:100], K)
    same_d = np.array_equal(fd, ours_d)
    agree = float((fi == ours_i).mean())
    checks.append(
        f"faiss, 100 queries, N = {n:,}: distances {'identical' if same_d else 'DIFFERENT'}, indices agree "
        f"on {agree:.1%} of slots (faiss does not order ties by index)"
    )
    print("\n".join(checks), flush=True)
    return ["### Results against a plain numpy reference (ties by lower index)", "", *[f"- {c}" for c in checks], ""]


def _one_query(codes, queries, index, sizes, bw_copy) -> list[str]:
    import faiss

    default = faiss.omp_get_max_threads()
    rows = []
    for n in sizes:
        view = codes[:n]
        sub = index if n == codes.shape[0] else _faiss_index(view)
        reps = 21 if n <= 1_000_000 else 11
        ours = median_seconds(lambda r, v=view: hamming.top_k(v, queries[r % len(queries)], K), reps)
        ours1 = median_seconds(lambda r, v=view: hamming.top_k(v, queries[r % len(queries)], K, threads=1), reps)
        fa_by_threads = {}
        for threads in (1, default):
            faiss.omp_set_num_threads(threads)
            fa_by_threads[threads] = median_seconds(
                lambda r, s=sub: s.search(queries[r % len(queries)].view(np.uint8)[None, :], K), reps
            )
        faiss.omp_set_num_threads(default)
        fa = min(fa_by_threads.values())  # faiss at its best thread count on this machine
        rate = n * 32 / ours / 1e9
        rows.append(
            f"| {n:,} | {ours * 1e3:.2f} | {ours1 * 1e3:.2f} | {fa_by_threads[1] * 1e3:.2f} | "
            f"{fa_by_threads[default] * 1e3:.2f} | **{fa / ours:.2f}x** | {rate:.1f} | **{rate / bw_copy:.0%}** |"
        )
        print(rows[-1], flush=True)
    return [
        f"### One query, top-{K} (median ms)",
        "",
        "Scan rate = N x 32 bytes / time; the goal is >= 50% of the copy bandwidth above and at least faiss's speed.",
        "",
        "faiss runs with 1 and with all OpenMP threads (on a busy 2-core machine its spinning threads can "
        "lose badly); the ratio takes faiss's better time.",
        "",
        "| N | ours, all threads | ours, 1 thread | faiss, 1 thread | faiss, all threads | faiss / ours "
        "| scan GB/s | of bandwidth |",
        "|---|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _many_queries(codes, queries, index, sizes, repeats) -> list[str]:
    rows = []
    nq = len(queries)
    for n in sizes:
        view = codes[:n]
        sub = index if n == codes.shape[0] else _faiss_index(view)
        ours = median_seconds(lambda _, v=view: hamming.top_k_many(v, queries, K), repeats)
        fa = median_seconds(lambda _, s=sub: s.search(queries.view(np.uint8), K), repeats)
        pairs = n * nq
        rows.append(
            f"| {n:,} | {ours:.3f} | {fa:.3f} | **{fa / ours:.2f}x** | {ours * 2 / pairs * 1e9:.2f} | "
            f"{fa * 2 / pairs * 1e9:.2f} |"
        )
        print(rows[-1], flush=True)
    return [
        f"### {nq:,} queries, top-{K} (median s of {repeats})",
        "",
        "Compute-bound (each block of codes stays in cache while every query passes over it); "
        "ns per (query, code) pair per core.",
        "",
        "| N | ours (s) | faiss (s) | faiss / ours | ours ns/pair/core | faiss ns/pair/core |",
        "|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _faiss_index(codes: np.ndarray):
    import faiss

    index = faiss.IndexBinaryFlat(256)
    index.add(codes.view(np.uint8))
    return index


def _sweep_memory(codes, queries, sizes) -> list[str]:
    """Peak memory of one sweep pass beyond its inputs: tracemalloc (numpy) and the process's peak RSS."""
    rows = []
    cases = [(n, 256, K) for n in sizes] + [(sizes[-1] if sizes[-1] <= 1_000_000 else 1_000_000, q, k)
                                              for q, k in ((256, 100), (1024, 10))]
    for n, nq, k in cases:
        target = Target.of(codes[:n])
        qs = queries[:nq] if nq <= len(queries) else np.resize(queries, (nq, 4))
        search(target, qs[:4], k)  # warm
        gc.collect()
        rss0 = _reset_peak_rss()
        tracemalloc.start()
        t = time.perf_counter()
        search(target, qs, k)
        elapsed = time.perf_counter() - t
        traced = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        peak_rss = _peak_rss() - rss0 if rss0 is not None else None
        rss_text = f"{peak_rss / 2**20:.1f}" if peak_rss is not None else "n/a"
        rows.append(
            f"| {n:,} | {nq} x {k} | {nq * k * 8 / 2**20:.2f} | {traced / 2**20:.2f} | {rss_text} | "
            f"{n * 32 / 2**20:.0f} | {elapsed:.2f} |"
        )
        print(rows[-1], flush=True)
    return [
        "### Sweep working memory (one `pipeline.search.sweep.search` pass, whole-model codes)",
        "",
        "Peak bytes allocated during the pass (tracemalloc: all numpy buffers; the kernels allocate nothing) "
        "and the growth of the process's peak RSS, against Q x k and N. The codes themselves are the input.",
        "",
        "| N | Q x k | Q x k x 8 B (MiB) | traced peak (MiB) | peak RSS growth (MiB) | codes (MiB) | time (s) |",
        "|---|---|---|---|---|---|---|",
        *rows,
        "",
    ]


def _reset_peak_rss() -> int | None:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
    except OSError:
        return None
    return _status_kib("VmRSS")


def _peak_rss() -> int:
    return _status_kib("VmHWM")


def _status_kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"no {field} in /proc/self/status")


LOAD_TITLE = "### Loading a 10M-row index"
# Measured once (2026-11-23) against the reader of commit 73c3497, which held identities as Arrow strings:
# both readers alternating on the same 10M-row index of this benchmark, on this machine, the figure this
# part is compared with.
_BEFORE = (
    "Before (commit 73c3497) the loaded index also held source, model_id and revision of every row as Arrow "
    "strings: 618 MiB beside the 305 MiB of codes, 96.8 B/row. A/B on this machine, that reader and this one "
    "alternating on the same 10M-row index, 5 processes each, load average ~4.5 from other jobs: cold load "
    "median 11.2 s before, 5.7 s now (the first pass no longer reads revision); warm, median of 10 loads, "
    "7.0 s before, 4.4 s now; RSS held after the load 1,361-1,503 MiB before, 425-438 MiB now; peak RSS "
    "growth ~1,600 MiB before, ~830 MiB now."
)


def _index_load(n: int, rng: np.random.Generator) -> list[str]:
    """Load an n-row index: time cold (shard pages evicted) and warm, bytes held against N x 32, lookups.

    The loads run in a fresh process, so that its RSS counts the load alone: not this process's freed
    but still resident pages (writing the index leaves plenty), nor its imports.
    """
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        t = time.perf_counter()
        _write_index(tmp, n, rng)
        written = time.perf_counter() - t
        shards = sorted(Path(tmp).rglob("*.parquet"))
        size = sum(p.stat().st_size for p in shards)
        load = os.getloadavg()[0]
        m = _in_child(_measure_load, tmp, n)
        # glibc's dynamic mmap threshold keeps freed numpy temporaries of a few MB resident; fixed, it does not.
        fixed = _in_child(_measure_load, tmp, n, rss_only=True, env={"MALLOC_MMAP_THRESHOLD_": str(1 << 20)})
    cold, warm, held, codes_bytes, locator = m["cold"], m["warm"], m["held"], m["codes"], m["locator"]
    held_rss, peak, arrow_held, one, many, batch = m["rss"], m["peak"], m["arrow"], m["one"], m["many"], m["batch"]
    evicted = m["evicted"]
    mib = 2**20
    rss_text = (
        f"held RSS growth **{held_rss / mib:,.0f} MiB** after the load (peak growth {peak / mib:,.0f} MiB while "
        "reading: the first pass's source and model_id columns, then freed); with "
        "`MALLOC_MMAP_THRESHOLD_=1048576` (glibc then hands back freed numpy temporaries of a few MB, which its "
        f"dynamic mmap threshold otherwise keeps resident) the same load holds {fixed['rss'] / mib:,.0f} MiB "
        f"(peak {fixed['peak'] / mib:,.0f} MiB)"
        if held_rss is not None and peak is not None and fixed["rss"] is not None
        else "RSS: n/a"
    )
    cold_text = "shard pages evicted from the page cache first" if evicted else "page cache not evicted (no fadvise)"
    lines = [
        f"{n:,} rows in {len(shards)} Parquet shards of at most 1M rows, row groups of {DEFAULT_ROWS_PER_SHARD:,} "
        f"(what one crawl shard holds; {size / mib:,.0f} MiB, written in {written:.1f} s); measured "
        f"{datetime.now(UTC):%Y-%m-%d}, load average {load:.1f} when the loads began (a shared 2-core machine).",
        "",
        "| | load time | held by the loaded index | per row | against N x 32 B |",
        "|---|---|---|---|---|",
        f"| cold ({cold_text}) | **{cold:.1f} s** | {held / mib:,.1f} MiB: codes {codes_bytes / mib:,.1f} MiB + "
        f"row locators {locator / mib:,.2f} MiB | **{held / n:.2f} B** | {held / (n * 32):.3f}x |",
        f"| warm (median of 2) | **{warm:.1f} s** | same | | |",
        "",
        f"Process memory (the loads run in a fresh process): {rss_text}; Arrow memory still allocated after "
        f"the load {arrow_held / mib:,.1f} MiB.",
        "",
        f"Identities are read from the shards on demand: those of {K} random rows (a query's top-{K}) in "
        f"**{one * 1e3:.0f} ms**, of {batch:,} random rows (one sweep batch, 4,096 query codes x top-{K}) "
        f"in {many:.2f} s (medians of 5 and 3).",
        "",
        _BEFORE,
    ]
    print("\n".join(lines), flush=True)
    return [LOAD_TITLE, "", *lines, ""]


def _in_child(fn: Callable[..., dict], *args: object, env: dict[str, str] | None = None, **kwargs: object) -> dict:
    """fn(*args, **kwargs) in a fresh (spawned) process, with `env` added to its environment."""
    saved = {k: os.environ.get(k) for k in env or {}}
    os.environ.update(env or {})
    try:
        with ProcessPoolExecutor(max_workers=1, mp_context=multiprocessing.get_context("spawn")) as child:
            return child.submit(fn, *args, **kwargs).result()
    finally:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def _measure_load(path: str, n: int, *, rss_only: bool = False) -> dict:
    """In a fresh process: the numbers `_index_load` reports (the cold load's memory alone if `rss_only`)."""
    with tempfile.TemporaryDirectory(prefix="bench-index-small-") as small:
        _write_index(small, 1000, np.random.default_rng(0), per_shard=500)
        IndexReader(small).load_codes(SPEC)  # imports, and numba's key-hash kernel, off the clock
    gc.collect()
    evicted = _evict(sorted(Path(path).rglob("*.parquet")))
    arrow0 = pa.total_allocated_bytes()
    rss0 = _reset_peak_rss()
    t = time.perf_counter()
    loaded = IndexReader(path).load_codes(SPEC)
    cold = time.perf_counter() - t
    peak = _peak_rss() - rss0 if rss0 is not None else None
    gc.collect()
    held_rss = _status_kib("VmRSS") - rss0 if rss0 is not None else None
    if rss_only:
        return {"rss": held_rss, "peak": peak}
    lookup = np.random.default_rng(1)
    batch = min(4096 * K, n)  # a sweep's batch: 4,096 query codes x top-10
    out = {
        "cold": cold,
        "evicted": evicted,
        "peak": peak,
        "rss": held_rss,
        "arrow": pa.total_allocated_bytes() - arrow0,
        "held": loaded.nbytes,
        "codes": loaded.codes.nbytes,
        "locator": loaded.plan.nbytes,
        "one": median_seconds(lambda _, c=loaded: c.identities(lookup.choice(n, K, replace=False)), 5),
        "many": median_seconds(lambda _, c=loaded: c.identities(lookup.choice(n, batch, replace=False)), 3),
        "batch": batch,
    }
    del loaded
    gc.collect()
    out["warm"] = median_seconds(lambda _: IndexReader(path).load_codes(SPEC), 2)
    return out


def _evict(paths: list[Path]) -> bool:
    """Drop these files' pages from the page cache (they were fsynced when written): a cold read."""
    if not hasattr(os, "posix_fadvise"):
        return False
    for path in paths:
        fd = os.open(path, os.O_RDONLY)
        try:
            os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_DONTNEED)
        finally:
            os.close(fd)
    return True


def _replace_load_part(section: list[str]) -> None:
    """Put the index-load part into the existing `hamming` section, the rest of it untouched."""
    current = read_section("hamming")
    part = "\n".join(section).strip() + "\n\n"
    if current is None:
        write_section("hamming", part)
        return
    pattern = re.compile(re.escape(LOAD_TITLE) + r".*?(?=^### |^Whole benchmark|\Z)", re.DOTALL | re.MULTILINE)
    if pattern.search(current):
        text = pattern.sub(lambda _: part, current, count=1)
    else:
        text = current.rstrip("\n") + "\n\n" + part
    write_section("hamming", text)


def _write_index(path: str, n: int, rng: np.random.Generator, per_shard: int = 1_000_000) -> None:
    """An index of n random codes, written shard by shard with pyarrow (ShardWriter's per-row checks
    would take minutes at this size), then committed with a run record like a crawl's. Row groups hold
    DEFAULT_ROWS_PER_SHARD rows, as a crawl's shards do, so that reading a row back costs what it would."""
    fs, base = store.resolve(path)
    run_id = new_run_id()
    shards = []
    for s0 in range(0, n, per_shard):
        m = min(per_shard, n - s0)
        words = rng.integers(0, 2**64, size=(m, 4), dtype=np.uint64)
        number = pc.cast(pa.array(np.arange(s0, s0 + m)), pa.string())
        columns = {
            "source": pa.DictionaryArray.from_arrays(np.zeros(m, np.int32), ["hf"]).cast(pa.string()),
            "model_id": pc.binary_join_element_wise("org/model-", number, ""),
            "revision": pc.binary_join_element_wise(pc.cast(pa.array(np.arange(s0, s0 + m) % 9973), pa.string()),
                                                     "a" * 32, ""),
            "spec": pa.DictionaryArray.from_arrays(np.zeros(m, np.int32), [SPEC]).cast(pa.string()),
            "status": pa.DictionaryArray.from_arrays(np.zeros(m, np.int32), ["ok"]).cast(pa.string()),
            "code": pa.FixedSizeBinaryArray.from_buffers(pa.binary(32), m, [None, pa.py_buffer(words)]),
        }
        table = pa.Table.from_arrays(
            [columns[f.name] if f.name in columns else pa.nulls(m, f.type) for f in SCHEMA], schema=SCHEMA
        )
        rel = f"{SHARDS_DIR}/run={run_id}/part-{len(shards):05d}.parquet"
        sink = pa.BufferOutputStream()
        pq.write_table(table, sink, compression="zstd", row_group_size=DEFAULT_ROWS_PER_SHARD)
        store.write_atomic(fs, store.join(base, rel), sink.getvalue())
        shards.append(ShardEntry(rel, m))
    now = datetime.now(UTC)
    record = RunRecord(run_id=run_id, started_at=now, committed_at=now, shards=tuple(shards))
    store.write_atomic(fs, run_record_path(base, run_id), record.to_json())


def _notes() -> list[str]:
    return [
        "### Notes",
        "",
        "- GPU: not measured. No GPU was lent to the session that ran this; the torch path "
        "(`pipeline/search/torch_hamming.py`, `top_k_many(..., device=\"cuda\")`) is checked for identical "
        "results on the CPU above and in tests/test_hamming.py. On a GPU, `python -m bench.gpu` checks "
        "it against the numba scan and times both.",
        "- Sub-linear search (multi-index hashing) is not used: the sweep's radius is the spec's `related` "
        "distance (59 of 256 bits for the default `wsig`, 80 for `nts`), where pigeonhole over 16 substrings "
        "of 16 bits leaves radius >= 3 per substring (>= 5 for `nts`): hundreds to thousands of probes per "
        "table and a large share of the index as candidates; it pays only for radii below ~16 bits "
        "(ecosystem.md section 5).",
        "",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
