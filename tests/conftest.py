"""Shared fixtures: a library of real checkpoints, and one real local Ray for the session."""

from __future__ import annotations

import os
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from checkpoints import build_library  # noqa: E402


@pytest.fixture(scope="session", autouse=True)
def probe_cache(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The commands' default probe cache, in a temporary folder (never the user's ~/.cache)."""
    root = tmp_path_factory.mktemp("probe_cache")
    os.environ["MODELHASH_PROBE_CACHE"] = str(root)
    return root


@pytest.fixture(scope="session")
def library(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Path]:
    """Model folders by role; the root folder is `library["root"]`."""
    root = tmp_path_factory.mktemp("library")
    paths = build_library(root)
    paths["root"] = root
    return paths


@pytest.fixture(scope="session")
def ray_local():
    """A real local Ray with 2 CPUs, shared by the session's tests."""
    import ray

    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False)
    yield ray
    ray.shutdown()


@pytest.fixture(scope="session")
def demo_zoo(tmp_path_factory: pytest.TempPathFactory) -> dict:
    """The demo zoo `make run` builds (trained on digits), with its manifest."""
    from bench.zoo import build_demo_zoo

    root = tmp_path_factory.mktemp("zoo")
    manifest = build_demo_zoo(root, seed=0)
    originals = [m["name"] for m in manifest["models"] if m["original"] is None]
    return {"root": root, "models": manifest["models"], "originals": originals}
