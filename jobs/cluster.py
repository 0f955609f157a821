"""Connecting to Ray: the cluster at an address, or a local one started for this run."""

from __future__ import annotations

import logging

import ray


def connect(address: str | None) -> None:
    """Join the cluster at `address` (`auto`, `ray://...`, `host:port`), or start a local Ray.

    Does nothing when this process is already connected (tests, `ray job submit` drivers).
    """
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        # A local Ray for this run: no dashboard, quiet workers; crawl output is our own progress bar.
        ray.init(logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)


def cluster_cpus() -> int:
    """CPUs of the cluster now (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0
