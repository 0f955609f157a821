"""A local hub of real checkpoints for the hub tests: repositories written with the checkpoints helpers."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from checkpoints import mlp_state, save_model

from pipeline.retry import RetryPolicy

TOKEN = "hf_TestTokenThatMustNeverLeak0123456789"
# Retries without the production backoff, so that fault tests stay fast.
FAST = RetryPolicy(attempts=8, base_delay=0.01, max_delay=0.05)


def write_repo(
    root: Path,
    repo_id: str,
    *,
    seed: int = 0,
    fmt: str = "safetensors",
    widths: tuple[int, ...] = (64, 256, 128, 10),
    meta: dict[str, Any] | None = None,
) -> Path:
    """A hub repository `root/<org>/<name>` holding one checkpoint, a config.json and optional metadata."""
    folder = save_model(root / repo_id, mlp_state(seed, widths), fmt=fmt)
    if meta is not None:
        (folder / ".hub.json").write_text(json.dumps(meta))
    return folder


def build_hub(root: Path) -> dict[str, Path]:
    """Eight repositories, in id order: weights in both formats, a 4 MiB one, gated, none, declared bases."""
    repos = {
        "acme/big": write_repo(root, "acme/big", seed=7, widths=(1024, 1024)),
        "acme/bin": write_repo(root, "acme/bin", seed=0, fmt="bin"),
        "acme/m0": write_repo(
            root, "acme/m0", seed=0, meta={"license": "apache-2.0", "lastModified": "2020-01-01T00:00:00.000Z"}
        ),
        "acme/m1": write_repo(root, "acme/m1", seed=1),
        "acme/m2": write_repo(root, "acme/m2", seed=2),
        "other/gated": write_repo(
            root, "other/gated", seed=3, meta={"gated": True, "license": "mit", "base_model": "acme/m0"}
        ),
        "zzz/tuned": write_repo(
            root,
            "zzz/tuned",
            seed=4,
            meta={"license": "mit", "base_model": ["acme/m1", "acme/m2"], "lastModified": "2099-01-01T00:00:00.000Z"},
        ),
    }
    empty = root / "other" / "noweights"
    empty.mkdir(parents=True)
    (empty / "README.md").write_text("weights were never uploaded\n")
    (empty / "config.json").write_text(json.dumps({"model_type": "mlp"}))
    repos["other/noweights"] = empty
    return dict(sorted(repos.items()))
