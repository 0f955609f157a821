"""Portable numerics for the benchmark zoos: trained bytes that should not depend on the x86-64 CPU kind.

Float kernels differ by CPU kind: ATen, oneDNN and MKL pick AVX2 or AVX-512 code paths, which round
differently, so the same training recipe gave other weights on an AMD EPYC than on an Intel Xeon, and
bench/RESULTS.md reproduced only on the CPU kind it was measured on. A zoo is therefore built in a child
process started with ATen held to its AVX2 kernels (`ATEN_CPU_CAPABILITY`, read when torch loads) and MKL
to its AVX2 conditional-numerical-reproducibility branch (`MKL_CBWR`, read when MKL loads), with oneDNN
off (its kernels choose their instructions themselves) and one thread. Measured on an Intel Xeon (AVX-512):
both zoos (250 and 111 models) the same bytes whether MKL may use AVX-512 or only AVX2, while an unpinned
build held to AVX2 differs from them in 168 of the 250 models (and from an unpinned AVX-512 build: every
trained architecture, checked last stop); the builds took 1.5x (quality zoo, 474 s) and 1.9x (verify zoo,
368 s) their unpinned time, two builds side by side. An AMD CPU could not be tried here.
"""

from __future__ import annotations

import contextlib
import os
import subprocess
import sys
import time
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import torch

from bench.cache import is_complete, read_manifest, start_fresh, write_manifest
from bench.zoo import torch_threads

__all__ = ["NUMERICS", "PORTABLE_ENV", "build_in_child", "build_zoo", "is_portable", "portable_kernels"]

PORTABLE_ENV = {"ATEN_CPU_CAPABILITY": "avx2", "MKL_CBWR": "AVX2"}
NUMERICS = "avx2-cbwr-no-onednn"  # in a zoo's build parameters: a zoo built with other numerics is rebuilt
_ROOT = Path(__file__).resolve().parent.parent


def is_portable() -> bool:
    """True in a process started with PORTABLE_ENV (only then are torch's and MKL's kernels pinned)."""
    return all(os.environ.get(k) == v for k, v in PORTABLE_ENV.items())


def build_in_child(module: str, out_dir: Path, size: str, seed: int, force: bool) -> dict:
    """Build a zoo with `python -m MODULE OUT_DIR --size SIZE --seed SEED [--force]` in a child process
    started with PORTABLE_ENV (this process's torch has chosen its kernels already); its log goes to this
    process's stdout. Returns the manifest the child wrote.

    Raises:
        RuntimeError: the build failed (its exit status; its own error is in the log above).
    """
    env = {**os.environ, **PORTABLE_ENV,
           "PYTHONPATH": os.pathsep.join(p for p in (str(_ROOT), os.environ.get("PYTHONPATH", "")) if p)}
    cmd = [sys.executable, "-m", module, str(Path(out_dir).resolve()), "--size", size, "--seed", str(seed)]
    done = subprocess.run([*cmd, "--force"] if force else cmd, env=env, cwd=_ROOT, check=False)
    if done.returncode != 0:
        raise RuntimeError(f"building the zoo in {out_dir} failed ({' '.join(cmd[2:])}: exit status "
                           f"{done.returncode})")
    manifest = read_manifest(out_dir)
    if manifest is None:
        raise RuntimeError(f"building the zoo in {out_dir} wrote no manifest ({' '.join(cmd[2:])})")
    return manifest


def build_zoo(module: str, out_dir: Path, *, version: int, size: str, seed: int, force: bool,
              build: Callable[[Path], list[dict]], extra: dict | None = None,
              extra_files: Iterable[str] = ()) -> dict:
    """A benchmark zoo under `out_dir`: the complete one there, or one built afresh with portable kernels.

    The zoo there is reused when its manifest was written for the same parameters (`version`, `size`,
    `seed`, the torch version, NUMERICS) and every file it names and `extra_files` are on disk. Otherwise,
    in a process started with PORTABLE_ENV, `out_dir` is emptied, `build(out_dir)` writes the models and
    returns their manifest rows, and `zoo.json` is written last; any other process builds in a child
    (`python -m MODULE`, `build_in_child`). `extra`: more manifest fields, saved after `params`.
    """
    out_dir = Path(out_dir)
    params = {"zoo_version": version, "size": size, "seed": seed, "torch": torch.__version__,
              "numerics": NUMERICS}
    old = read_manifest(out_dir)
    if not force and is_complete(old, out_dir, params, extra_files=extra_files):
        return old
    if not is_portable():  # this process's kernels are chosen: build in one that starts portable
        return build_in_child(module, out_dir, size, seed, force)
    start_fresh(out_dir)
    start = time.perf_counter()
    with portable_kernels():
        models = build(out_dir)
    manifest = {"version": version, "params": params, **(extra or {}), "models": models,
                "seconds": round(time.perf_counter() - start, 1)}
    write_manifest(out_dir, manifest)
    return manifest


@contextlib.contextmanager
def portable_kernels() -> Iterator[None]:
    """One torch thread and oneDNN off, restored after: with PORTABLE_ENV, kernels whose results do not
    depend on the CPU kind."""
    enabled = torch.backends.mkldnn.enabled  # (its `flags()` context also sets TF32 and warns about it)
    torch.backends.mkldnn.enabled = False
    try:
        with torch_threads(1):
            yield
    finally:
        torch.backends.mkldnn.enabled = enabled
