"""The benchmark zoos' cache: a folder of models with a manifest (`zoo.json`) written last, atomically.

A zoo is reused only when its manifest was written for the same build parameters and every file it names
is still on disk; otherwise it is rebuilt. The manifest goes first when a rebuild starts, so a crash
never leaves a zoo that claims to be complete.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
from collections.abc import Iterable
from pathlib import Path

MANIFEST_NAME = "zoo.json"


def read_manifest(out_dir: Path) -> dict | None:
    """The manifest in `out_dir`, or None where there is none or it does not parse."""
    try:
        return json.loads((Path(out_dir) / MANIFEST_NAME).read_text())
    except (OSError, ValueError):
        return None


def is_complete(manifest: dict | None, out_dir: Path, params: dict, extra_files: Iterable[str] = ()) -> bool:
    """True if `manifest` was written for `params` and every checkpoint it names (and `extra_files`) is on disk."""
    if not isinstance(manifest, dict) or manifest.get("params") != params:
        return False
    out_dir = Path(out_dir)
    try:
        return all((out_dir / name).is_file() for name in extra_files) and all(
            (out_dir / m["name"] / m["file"]).is_file() for m in manifest["models"]
        )
    except (KeyError, TypeError):  # a hand-edited or foreign zoo.json: rebuild
        return False


def start_fresh(out_dir: Path) -> None:
    """Drop the manifest (first), then everything in `out_dir`, and make it again, empty."""
    out_dir = Path(out_dir)
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    if out_dir.exists():
        shutil.rmtree(out_dir)
    out_dir.mkdir(parents=True)


def write_manifest(out_dir: Path, manifest: dict, indent: int = 1) -> None:
    """Write `zoo.json` atomically: it appears whole, and last."""
    out_dir = Path(out_dir)
    tmp = out_dir / f"{MANIFEST_NAME}.tmp-{os.getpid()}"
    tmp.write_text(json.dumps(manifest, indent=indent) + "\n")
    os.replace(tmp, out_dir / MANIFEST_NAME)


def parse_zoo_args(prog: str, description: str, default_dir: Path, sizes: Iterable[str],
                   argv: list[str] | None = None) -> argparse.Namespace:
    """A zoo builder's command line: `[OUT_DIR] [--size S] [--seed N] [--force]`."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("out_dir", type=Path, nargs="?", default=default_dir)
    p.add_argument("--size", choices=sorted(sizes), default="full")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--force", action="store_true", help="rebuild even if the cached zoo is complete")
    return p.parse_args(argv)
