"""The checks that need a GPU, as one short run for a session that is lent one: `python -m bench.gpu`.

What a CPU-only session cannot check, in one command of a few minutes (a device lease is 15 minutes):
1. `wsig` on the GPU against the CPU: every model of the verify zoo and of the pack (below) hashed on
   both devices, whole-model and per-block codes compared bit for bit, and seconds per model on each.
   The spec keeps `device="cpu"` (`WSigSpec.uses_gpu`) until this shows the same codes.
2. The Hamming scan's torch path on the GPU against the numba scan: the same ids and distances, and the
   time of the same many-query scan on each.
3. Stage 2: a cold conferrable pair (load, surrogates, search, the pair) per source of the verify zoo, on
   the GPU and on every CPU core of the same machine, with each verdict (issue 6's 10 s goal).

The zoos are not in git: before the call, build them here (`python -m bench.verify`, `python -m
bench.quality`) and pack the quality zoo's GPT models, which the verify zoo lacks (transposed Conv1D
layouts): `python -m bench.gpu --pack`. Then, on the device machine:

    run(command="PYTHONUNBUFFERED=1 python3 -m bench.gpu --out $OUT/gpu.md",
        carry=["bench/.cache/verify_zoo", "bench/.cache/gpu_pack"], timeout_s=480)

and paste its section into bench/RESULTS.md (`--out` writes the section alone; without `--no-write` it
is written to RESULTS.md there, which does not come back). `--device cpu` runs every check on the CPU
against itself: a smoke run of this script.

    python -m bench.gpu [--device cuda|cpu] [--zoo DIR] [--pack-dir DIR] [--quick] [--out FILE] [--no-write]
    python -m bench.gpu --pack
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path

import numpy as np
import torch

from bench.hamming import median_seconds
from bench.quality import hash_one
from bench.quality_zoo import DEFAULT_DIR as QUALITY_ZOO_DIR
from bench.results import cpu_model, write_section
from bench.verify import cold_pair, first_pirated
from bench.verify_zoo import DEFAULT_DIR as VERIFY_ZOO_DIR
from bench.zoo import torch_threads
from pipeline.hashing import get_spec
from pipeline.search import hamming

PACK_DIR = Path(__file__).with_name(".cache") / "gpu_pack"
PACK_ARCHS = ("gpt",)  # quality-zoo architectures the verify zoo lacks (it has mlp, cnn and resnet)
K = 10


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.gpu", description=__doc__.splitlines()[0])
    p.add_argument("--device", default="cuda", help="the device checked against the CPU (default cuda)")
    p.add_argument("--zoo", type=Path, default=VERIFY_ZOO_DIR, help="the verify zoo (built by bench.verify)")
    p.add_argument("--pack-dir", type=Path, default=PACK_DIR, help="more models to hash (see --pack)")
    p.add_argument("--pack", action="store_true", help="copy the quality zoo's GPT models to --pack-dir; check nothing")
    p.add_argument("--quick", action="store_true", help="a smoke run: fewer models, codes and sources")
    p.add_argument("--out", type=Path, help="also write the section here")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    args = p.parse_args(argv)
    if args.pack:
        print(f"packed {pack(QUALITY_ZOO_DIR, args.pack_dir)} models into {args.pack_dir}")
        return 0
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("bench.gpu: no CUDA device here (use --device cpu for a smoke run on the CPU)")
    manifest_path = args.zoo / "zoo.json"
    if not manifest_path.exists():
        raise SystemExit(f"bench.gpu: no verify zoo at {args.zoo}: build it with `python -m bench.verify` first")
    manifest = json.loads(manifest_path.read_text())
    started = time.perf_counter()
    _warm_up(args.device)
    lines = [f"## GPU checks ({datetime.now(UTC):%Y-%m-%d}, `python -m bench.gpu`)", "", _machine(args.device), ""]
    print("\n".join(lines), flush=True)
    folders = sorted(d for root in (args.zoo, args.pack_dir) if root.is_dir()
                     for d in root.iterdir() if d.is_dir() and any(d.iterdir()))
    if args.quick:
        folders = folders[:: max(1, len(folders) // 12)]
    sizes = (20_000, 100_000) if args.quick else (1_000_000, 10_000_000)
    sources = list(first_pirated(manifest).items())
    checks: list[tuple[str, Callable[[], tuple[str, list[str]]]]] = [
        ("wsig", lambda: check_wsig(folders, args.device)),
        ("hamming", lambda: check_hamming(args.device, sizes, queries=100 if args.quick else 1000)),
        ("stage 2", lambda: check_stage2(args.zoo, manifest, sources[:2] if args.quick else sources, args.device)),
    ]
    for name, check in checks:  # each on its own: one that breaks on the device leaves the others' figures
        try:
            lines += _section(check())
        except Exception as exc:  # noqa: BLE001 - reported in the section, with the traceback on stderr
            traceback.print_exc()
            lines += _section((f"{name}: failed", [f"- {type(exc).__name__}: {exc}"]))
        if args.out:
            args.out.write_text("\n".join(lines) + "\n")
    lines.append(f"Whole run: {time.perf_counter() - started:.0f} s.")
    text = "\n".join(lines) + "\n"
    if args.out:
        args.out.write_text(text)
    if not args.no_write:
        write_section("gpu", text)
    return 0


def pack(zoo: Path, out: Path, archs: Sequence[str] = PACK_ARCHS) -> int:
    """Copy the quality zoo's models of `archs` into `out` (replacing it): the models to carry."""
    if not (zoo / "zoo.json").exists():
        raise SystemExit(f"bench.gpu: no quality zoo at {zoo}: build it with `python -m bench.quality` first")
    shutil.rmtree(out, ignore_errors=True)
    out.mkdir(parents=True)
    names = [d.name for d in sorted(zoo.iterdir()) if d.is_dir() and d.name.split("-")[0] in archs]
    for name in names:
        shutil.copytree(zoo / name, out / name)
    return len(names)


def check_wsig(folders: Sequence[Path], device: str) -> tuple[str, list[str]]:
    """Every folder hashed by the default spec on the CPU and on `device`; the codes compared."""
    cpu_spec = get_spec()
    dev_spec = dataclasses.replace(cpu_spec, device=device)
    hash_one(folders[0], dev_spec)  # the device's first kernels (and the fixed projections) off the clock
    whole_diff, part_diff, parts_total = [], 0, 0
    cpu_secs, dev_secs = [], []
    with torch_threads(1):  # as a crawl's tasks hash, and bench.quality measures
        hashed = [(hash_one(folder, cpu_spec), hash_one(folder, dev_spec)) for folder in folders]
    for on_cpu, on_dev in hashed:
        cpu_secs.append(on_cpu.seconds)
        dev_secs.append(on_dev.seconds)
        whole_diff.append(hamming.distance(on_cpu.code, on_dev.code))
        parts_total += len(on_cpu.parts)
        part_diff += sum(on_dev.parts.get(k) != v for k, v in on_cpu.parts.items()) + len(
            set(on_dev.parts) - set(on_cpu.parts))
    diff = np.array(whole_diff)
    rows = [
        f"- models: {len(folders)} (the verify zoo's MLPs, CNNs and ResNets; the pack's GPT-2-style models)",
        f"- whole-model codes identical: {int((diff == 0).sum())} of {len(diff)}; most bits apart {int(diff.max())}",
        f"- per-block codes identical: {parts_total - part_diff} of {parts_total}",
        f"- seconds per model, median (max): CPU {np.median(cpu_secs):.3f} ({max(cpu_secs):.3f}), "
        f"{device} {np.median(dev_secs):.3f} ({max(dev_secs):.3f})",
    ]
    return f"`{cpu_spec.name}` on {device} against the CPU (1 torch thread)", rows


def check_hamming(device: str, sizes: Sequence[int], queries: int) -> tuple[str, list[str]]:
    """top_k_many on `device` (torch) against the numba scan: identical results, and the time of each."""
    rng = np.random.default_rng(20261207)
    codes = rng.integers(0, 2**64, size=(max(sizes), 4), dtype=np.uint64)
    q = rng.integers(0, 2**64, size=(queries, 4), dtype=np.uint64)
    dev = torch.device(device)
    hamming.top_k_many(codes[:5000], q[:5], K)  # numba's compile and torch's first kernels, off the clock
    hamming.top_k_many(codes[:5000], q[:5], K, device=dev)
    rows = []
    for n in sizes:
        c = codes[:n]
        ref_i, ref_d = hamming.top_k_many(c, q, K)
        got_i, got_d = hamming.top_k_many(c, q, K, device=dev)
        same = np.array_equal(ref_i, got_i) and np.array_equal(ref_d, got_d)
        t_numba = median_seconds(lambda _, c=c: hamming.top_k_many(c, q, K), 3)
        t_dev = median_seconds(lambda _, c=c: hamming.top_k_many(c, q, K, device=dev), 3)
        rows.append(f"- N = {n:,}, {queries} queries, k = {K}: {'identical' if same else 'DIFFERENT'}; numba on "
                    f"{os.cpu_count()} cores {t_numba:.3f} s, torch on {device} {t_dev:.3f} s (codes copied "
                    f"to the device in each call; medians of 3)")
    return "The Hamming scan's torch path against the numba scan", rows


def check_stage2(root: Path, manifest: dict, sources: Sequence[tuple[str, str]], device: str) -> tuple[str, list[str]]:
    """A cold conferrable pair per source on `device`, then on every CPU core, with the verdicts."""
    seeds = np.load(root / manifest["seeds"])
    rows = ["| source | suspect | on " + device + ": seconds, verdict | on " + f"{os.cpu_count()} CPU cores"
            + ": seconds, verdict |", "|---|---|---|---|"]
    walls: dict[str, list[float]] = {f"on {device}": [], f"on {os.cpu_count()} CPU cores": []}
    with torch_threads(os.cpu_count() or 1):
        for source, suspect in sources:
            cells = []
            for on, times in zip((device, "cpu"), walls.values(), strict=True):
                try:
                    wall, _, verdict = cold_pair(root, manifest, source, suspect, seeds, device=on)
                except Exception as exc:  # noqa: BLE001 - one pair's failure is a cell, not the end of the run
                    cells.append(f"failed: {type(exc).__name__}: {exc}")
                    continue
                times.append(wall)
                cells.append(f"{wall:.1f} s, {verdict.verdict} ({verdict.score:.2f})" if verdict.score is not None
                             else f"{wall:.1f} s, {verdict.verdict}: {verdict.reason}")
            rows.append(f"| {source} | {suspect} | {cells[0]} | {cells[1]} |")
            print(f"stage 2: {source}: {' / '.join(cells)}", flush=True)
    medians = ", ".join(f"{on} {np.median(w):.1f}" if w else f"{on} none" for on, w in walls.items())
    rows += ["", f"Median seconds: {medians}; the goal is under 10 s."]
    return "Stage 2: a cold conferrable pair (`agreement`), from loading to verdict", rows


def _section(titled: tuple[str, list[str]]) -> list[str]:
    title, rows = titled
    out = [f"### {title}", "", *rows, ""]
    print("\n".join(out), flush=True)
    return out


def _warm_up(device: str) -> None:
    """The device's context and first kernels, off every clock."""
    x = torch.ones(64, 64, device=device)
    (x @ x).sum().item()


def _machine(device: str) -> str:
    gpu = (f"{torch.cuda.get_device_name(device)}, " if device.startswith("cuda") else "no GPU (a smoke run), ")
    return (f"Machine: {gpu}CPU {cpu_model()} with {os.cpu_count()} cores; Python {sys.version.split()[0]}, "
            f"torch {torch.__version__}, numpy {np.__version__}.")


if __name__ == "__main__":
    sys.exit(main())
