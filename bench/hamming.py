"""Hamming scan benchmark: our kernels against faiss `IndexBinaryFlat` and this machine's memory bandwidth.

Run as `python -m bench.hamming` (what `make bench` does; needs `pip install -e '.[bench]'` for faiss).
Everything is measured in one process on the same random codes, side by side, and every timing is the
median of several repeats. It checks that our results equal a plain numpy reference (ties included),
measures one query and 1,000 queries (top-10) on a curve up to N = 10M, the sweep's working memory
against Q x k and N, and loading a 10M-row Parquet index; it writes the `hamming` section of
bench/RESULTS.md and prints it.
"""

from __future__ import annotations

import argparse
import gc
import os
import platform
import tempfile
import time
import tracemalloc
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.parquet as pq

from bench.results import write_section
from pipeline.index import store
from pipeline.index.reader import IndexReader
from pipeline.index.schema import SCHEMA
from pipeline.index.writer import SHARDS_DIR, RunRecord, ShardEntry, new_run_id, run_record_path
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
    args = parser.parse_args(argv)
    if args.quick:
        args.n, args.queries, args.repeats = 1_000_000, 100, 2
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

    cpu = "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    simd = ", ".join(f for f in ("avx2", "avx512f", "avx512_vpopcntdq") if f" {f}" in flags) or "none"
    return [
        f"Machine: {cpu}, {os.cpu_count()} cores visible ({hamming.default_threads()} used), SIMD: {simd}; "
        f"shared and noisy (load average {os.getloadavg()[0]:.1f} at the start). Python {platform.python_version()}, "
        f"numpy {np.__version__}, numba {numba.__version__}, faiss-cpu {faiss.__version__} "
        f"({faiss.omp_get_max_threads()} OpenMP threads).",
        "",
    ]


def _median(fn: Callable[[int], object], repeats: int) -> float:
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
    copy = _median(lambda _: np.copyto(dst, src), 5)
    read = _median(lambda _: src.sum(), 5)
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
        ours = _median(lambda r, v=view: hamming.top_k(v, queries[r % len(queries)], K), reps)
        ours1 = _median(lambda r, v=view: hamming.top_k(v, queries[r % len(queries)], K, threads=1), reps)
        fa_by_threads = {}
        for threads in (1, default):
            faiss.omp_set_num_threads(threads)
            fa_by_threads[threads] = _median(
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
        ours = _median(lambda _, v=view: hamming.top_k_many(v, queries, K), repeats)
        fa = _median(lambda _, s=sub: s.search(queries.view(np.uint8), K), repeats)
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


def _index_load(n: int, rng: np.random.Generator) -> list[str]:
    with tempfile.TemporaryDirectory(prefix="bench-index-") as tmp:
        t = time.perf_counter()
        _write_index(tmp, n, rng)
        written = time.perf_counter() - t
        size = sum(p.stat().st_size for p in Path(tmp).rglob("*.parquet"))
        gc.collect()
        rss0 = _reset_peak_rss()
        t = time.perf_counter()
        loaded = IndexReader(tmp).load_codes(SPEC)
        first = time.perf_counter() - t
        peak = _peak_rss() - rss0 if rss0 is not None else None
        ids = sum(_nbytes(c) for c in (loaded.source, loaded.model_id, loaded.revision))
        codes_mib = loaded.codes.nbytes / 2**20
        del loaded
        gc.collect()
        second = _median(lambda _: IndexReader(tmp).load_codes(SPEC), 2)
    peak_text = f"{peak / 2**20:,.0f} MiB" if peak is not None else "n/a"
    line = (
        f"{n:,} rows in {len(list(range(0, n, 1_000_000)))} Parquet shards ({size / 2**20:,.0f} MiB, written in "
        f"{written:.1f} s): `load_codes` took **{first:.1f} s** (then {second:.1f} s, median of 2); codes "
        f"{codes_mib:,.0f} MiB (N x 32 B) + identity columns {ids / 2**20:,.0f} MiB; peak RSS growth {peak_text} "
        "(memory-mapped shard pages count there too)."
    )
    print(line, flush=True)
    return ["### Loading a 10M-row index", "", line, ""]


def _nbytes(column) -> int:
    chunks = column.chunks if isinstance(column, pa.ChunkedArray) else [column]
    return sum(c.nbytes for c in chunks)


def _write_index(path: str, n: int, rng: np.random.Generator, per_shard: int = 1_000_000) -> None:
    """An index of n random codes, written shard by shard with pyarrow (ShardWriter's per-row checks
    would take minutes at this size), then committed with a run record like a crawl's."""
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
        pq.write_table(table, sink, compression="zstd")
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
        "results on the CPU above and in tests/test_hamming.py. On a GPU, run the same benchmark's torch rows "
        "(`device=\"cuda\"`) against the GPU's bandwidth.",
        "- Sub-linear search (multi-index hashing) is not used: the sweep's radius is the spec's `related` "
        "distance (80 of 256 bits for nts), where pigeonhole over m substrings leaves radius >= 5 per 16-bit "
        "substring, thousands of probes per table and a large share of the index as candidates; it pays only "
        "for radii below ~16 bits (ecosystem.md section 5).",
        "",
    ]


if __name__ == "__main__":
    raise SystemExit(main())
