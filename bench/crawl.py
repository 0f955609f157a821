"""Crawl benchmark on the local hub server (issue: the nightly crawl), measured side by side in one run.

- a crawl of N small repositories (default 10,000) through a local Ray with 1 and with 2 workers;
- a second crawl of the unchanged hub: weight bytes read (goal: 0) and its time against the first;
- a large generated safetensors checkpoint (default 2 GiB): bytes read against its size (goal < 1%), and
  the code identical to the one from the local file;
- 5% of responses failing (429, 500, reset): models lost (goal: 0) and retries;
- a crawl killed half-way (SIGKILL) and resumed: models lost or indexed twice (goal: 0).

The hub server runs in its own process (so its threads do not share the driver's GIL), controlled through
a pipe. Run: `python -m bench.crawl [--repos N] [--large-gib G]`; `make bench` runs it.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow.parquet as pq

from bench.results import write_section
from pipeline.hashing import get_spec

CACHE = Path(__file__).parent / ".cache"
ORGS = 10  # repositories are spread over org00..org09, so `--author org03` is a tenth of the hub
SMALL_WIDTHS = (64, 96, 64)  # 12,288 weights: enough for a 256-segment code, ~49 KB per checkpoint


# -- the hub, on disk ---------------------------------------------------------------------------------


def _write_safetensors(path: Path, tensors: dict[str, tuple[tuple[int, ...], Any]]) -> None:
    """A safetensors file written tensor by tensor; each value is an array or a generator of F32 chunks."""
    header: dict[str, Any] = {}
    offset = 0
    for name, (shape, _) in tensors.items():
        size = int(np.prod(shape)) * 4
        header[name] = {"dtype": "F32", "shape": list(shape), "data_offsets": [offset, offset + size]}
        offset += size
    raw = json.dumps(header).encode()
    raw += b" " * (-len(raw) % 8)
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "wb") as f:
        f.write(len(raw).to_bytes(8, "little") + raw)
        for _, (_, data) in tensors.items():
            for chunk in data if not isinstance(data, np.ndarray) else [data]:
                f.write(np.ascontiguousarray(chunk, dtype="<f4").tobytes())


def build_small_hub(root: Path, n: int) -> None:
    """`n` repositories of a small random MLP each, distinct weights, cached between runs."""
    marker = root / f".complete-{n}"
    if marker.exists():
        return
    shutil.rmtree(root, ignore_errors=True)
    for i in range(n):
        rng = np.random.default_rng(i)
        tensors = {
            f"layers.{j}.weight": ((b, a), rng.normal(0, a**-0.5, (b, a)).astype(np.float32))
            for j, (a, b) in enumerate(zip(SMALL_WIDTHS, SMALL_WIDTHS[1:], strict=False))
        }
        repo = root / f"org{i % ORGS:02d}" / f"model-{i:05d}"
        _write_safetensors(repo / "model.safetensors", tensors)
        (repo / "config.json").write_text('{"model_type": "mlp"}')
    marker.write_text("")


def build_large_checkpoint(folder: Path, gib: float) -> Path:
    """A safetensors checkpoint of about `gib` GiB: square F32 matrices of 4096 x 4096 (64 MiB each)."""
    path = folder / "model.safetensors"
    side = 4096
    count = max(1, round(gib * 2**30 / (side * side * 4)))
    if path.exists() and path.stat().st_size > count * side * side * 4:
        return path

    def chunks(seed: int):
        rng = np.random.default_rng(seed)
        for _ in range(8):
            yield rng.normal(0, side**-0.5, (side // 8, side)).astype(np.float32)

    _write_safetensors(path, {f"blocks.{k}.weight": ((side, side), chunks(k)) for k in range(count)})
    (folder / "config.json").write_text('{"model_type": "mlp"}')
    return path


# -- the hub server in its own process -----------------------------------------------------------------


def _serve(root: str, conn: Any) -> None:
    from infra.hub_server import Faults, HubServer

    with HubServer(Path(root), page_size=1000) as hub:
        conn.send(hub.url)
        while True:
            cmd, arg = conn.recv()
            if cmd == "stop":
                return
            if cmd == "faults":
                hub.faults = Faults(**arg)
                conn.send(None)
            elif cmd == "reset":
                hub.reset_stats()
                conn.send(None)
            elif cmd == "stats":
                s = hub.stats
                conn.send({"file_bytes": s.file_bytes, "requests": s.total_requests, "faults": s.total_faults})


class HubProcess:
    """The local hub server in a child process; `stats()`, `faults(...)`, `reset()`."""

    def __init__(self, root: Path):
        ctx = mp.get_context("spawn")
        self._conn, child = ctx.Pipe()
        self._proc = ctx.Process(target=_serve, args=(str(root), child), daemon=True)
        self._proc.start()
        self.url: str = self._conn.recv()

    def _ask(self, cmd: str, arg: Any = None) -> Any:
        self._conn.send((cmd, arg))
        return self._conn.recv()

    def stats(self) -> dict[str, int]:
        return self._ask("stats")

    def faults(self, **faults: Any) -> None:
        self._ask("faults", faults)

    def reset(self) -> None:
        self._ask("reset")

    def stop(self) -> None:
        self._conn.send(("stop", None))
        self._proc.join(10)


# -- measurements --------------------------------------------------------------------------------------


def _crawl(index: Path, workers: int, **kwargs: Any) -> tuple[Any, float]:
    import ray

    from jobs.crawl import crawl

    ray.shutdown()
    ray.init(num_cpus=workers, include_dashboard=False, log_to_driver=False, logging_level="ERROR")
    start = time.perf_counter()
    summary = crawl("hf://", str(index), progress=False, **kwargs)
    return summary, time.perf_counter() - start


def _rows_per_model(index: Path) -> dict[str, int]:
    from pipeline.index.reader import IndexReader

    counts: dict[str, int] = {}
    for run in IndexReader(str(index)).runs:
        for shard in run.shards:
            for m in pq.read_table(index / shard.path, columns=["model_id"])["model_id"].to_pylist():
                counts[m] = counts.get(m, 0) + 1
    return counts


def measure_throughput(hub: HubProcess, work: Path, n: int) -> list[dict[str, Any]]:
    rows = []
    for workers in (1, 2):
        index = work / f"ix-w{workers}"
        shutil.rmtree(index, ignore_errors=True)
        hub.reset()
        summary, seconds = _crawl(index, workers, max_in_flight=4 * workers)
        rows.append({"what": f"first crawl, {workers} worker(s)", "models": summary.seen, "hashed": summary.hashed,
                     "failed": summary.failed, "seconds": seconds, "models/s": summary.seen / seconds,
                     "weight bytes": hub.stats()["file_bytes"]})
    hub.reset()
    summary, seconds = _crawl(work / "ix-w2", 2)
    rows.append({"what": "second crawl, unchanged hub", "models": summary.seen, "hashed": summary.hashed,
                 "failed": summary.failed, "seconds": seconds, "models/s": summary.seen / seconds,
                 "weight bytes": hub.stats()["file_bytes"]})
    return rows


def measure_large(hub: HubProcess, large: Path) -> dict[str, Any]:
    from jobs.query import hash_uri

    size = large.stat().st_size
    hub.reset()
    start = time.perf_counter()
    remote = hash_uri("hf://big/large")
    remote_s = time.perf_counter() - start
    served = hub.stats()["file_bytes"]
    start = time.perf_counter()
    local = hash_uri(str(large.parent))
    local_s = time.perf_counter() - start
    return {"size": size, "bytes read (hub)": served, "fraction": served / size, "seconds (hub)": remote_s,
            "bytes read (local)": local.bytes_read, "seconds (local)": local_s,
            "same code": remote.code.code == local.code.code}


def measure_faults(hub: HubProcess, work: Path) -> dict[str, Any]:
    clean, faulty = work / "ix-clean", work / "ix-faulty"
    for index in (clean, faulty):
        shutil.rmtree(index, ignore_errors=True)
    _crawl(clean, 2, filters={"author": "org01"})
    hub.reset()
    hub.faults(rate=0.05, kinds=("429", "500", "reset"), seed=7, retry_after=0)
    summary, seconds = _crawl(faulty, 2, filters={"author": "org01"})
    injected = hub.stats()["faults"]
    hub.faults(rate=0.0)
    from pipeline.index.reader import IndexReader

    a = {r["model_id"]: r["code"] for r in IndexReader(str(clean)).read_table(["model_id", "code"]).to_pylist()}
    b = {r["model_id"]: r["code"] for r in IndexReader(str(faulty)).read_table(["model_id", "code"]).to_pylist()}
    lost = sum(1 for m, code in a.items() if b.get(m) != code or code is None)
    return {"models": summary.seen, "faults injected": injected, "failed": summary.failed, "lost": lost,
            "seconds": seconds}


def measure_resume(hub: HubProcess, work: Path, n: int) -> dict[str, Any]:
    index = work / "ix-resume"
    every = max(2, n // ORGS // 10)  # a tenth of the crawl per committed run
    shutil.rmtree(index, ignore_errors=True)
    env = {**os.environ, "HF_ENDPOINT": hub.url, "RAY_USAGE_STATS_ENABLED": "0"}
    cmd = [sys.executable, "-m", "jobs.crawl", "hf://", "--author", "org02", "--index", str(index),
           "--no-progress", "--checkpoint-rows", str(every)]
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    runs = index / "runs"
    deadline = time.monotonic() + 300
    while not (runs.exists() and len(list(runs.glob("*.json"))) >= 3) and time.monotonic() < deadline:
        time.sleep(0.05)
    os.killpg(proc.pid, signal.SIGKILL)
    proc.wait()
    before = _rows_per_model(index)
    summary, _ = _crawl(index, 2, filters={"author": "org02"})
    after = _rows_per_model(index)
    expected = summary.seen
    return {"rows per run": every, "committed before kill": len(before), "hashed on resume": summary.hashed,
            "models": len(after), "expected": expected, "lost": expected - len(after),
            "indexed twice": sum(1 for c in after.values() if c > 1)}


# -- report --------------------------------------------------------------------------------------------


def _table(rows: list[dict[str, Any]]) -> str:
    keys = list(rows[0])

    def fmt(v: Any) -> str:
        if isinstance(v, float):
            return f"{v:.4f}" if v < 1 else f"{v:,.1f}"
        return f"{v:,}" if isinstance(v, int) and not isinstance(v, bool) else str(v)

    lines = ["| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
    lines += ["| " + " | ".join(fmt(r[k]) for k in keys) + " |" for r in rows]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.crawl", description=__doc__.splitlines()[0])
    parser.add_argument("--repos", type=int, default=10_000, help="small repositories on the hub")
    parser.add_argument("--large-gib", type=float, default=2.0, help="size of the large checkpoint")
    parser.add_argument("--work", type=Path, default=CACHE / "crawl", help="hub and indexes (cached)")
    args = parser.parse_args(argv)
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

    hub_root = args.work / f"hub-{args.repos}"
    start = time.perf_counter()
    build_small_hub(hub_root, args.repos)
    large = build_large_checkpoint(hub_root / "big" / "large", args.large_gib)
    print(f"hub: {args.repos} small repos and a {large.stat().st_size / 2**30:.2f} GiB checkpoint "
          f"({time.perf_counter() - start:.0f} s to build or find)")

    hub = HubProcess(hub_root)
    os.environ["HF_ENDPOINT"] = hub.url
    os.environ.pop("HF_TOKEN", None)
    try:
        throughput = measure_throughput(hub, args.work, args.repos)
        large_row = measure_large(hub, large)
        faults = measure_faults(hub, args.work)
        resume = measure_resume(hub, args.work, args.repos)
    finally:
        hub.stop()
        import ray

        ray.shutdown()

    first = {r["what"]: r for r in throughput}
    ratio = first["second crawl, unchanged hub"]["seconds"] / first["first crawl, 2 worker(s)"]["seconds"]
    speedup = first["first crawl, 2 worker(s)"]["models/s"] / first["first crawl, 1 worker(s)"]["models/s"]
    text = "\n\n".join([
        f"Local hub server (its own process) with {args.repos:,} small repositories plus one large checkpoint, "
        f"a local Ray on this 2-core machine, the default spec `{get_spec().name}`. "
        "One run of `python -m bench.crawl`.",
        _table(throughput),
        f"2 workers against 1: {speedup:.2f}x models/s. The second crawl of the unchanged hub took "
        f"{ratio:.3f} of the first's time and read {first['second crawl, unchanged hub']['weight bytes']} "
        "weight bytes.",
        "Large checkpoint (`hf://big/large`, generated safetensors):",
        _table([large_row]),
        "5% of responses failing (429, 500, connection reset), a tenth of the hub:",
        _table([faults]),
        "A crawl of a tenth of the hub killed with SIGKILL after its third committed run, then resumed:",
        _table([resume]),
    ])
    print(text)
    write_section("crawl", text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
