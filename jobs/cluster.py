"""Connecting to Ray: the cluster at an address, or a local one started for this run."""

from __future__ import annotations

import logging
import os
from typing import Any

import ray

from pipeline.retry import CONNECTIONS_ENV, RATE_ENV
from pipeline.settings import Settings


def connect(address: str | None) -> None:
    """Join the cluster at `address` (`auto`, `ray://...`, `host:port`), or start a local Ray.

    Does nothing when this process is already connected (tests, `ray job submit` drivers). With no
    address the local Ray is always a new one: a bare `ray.init()` would join whatever cluster this machine
    started last (another user's job, a test run), which the CLI promises not to do.
    """
    if ray.is_initialized():
        return
    if address:
        ray.init(address=address, logging_level=logging.WARNING, log_to_driver=False)
    else:
        # A local Ray for this run: no dashboard, quiet workers; crawl output is our own progress bar.
        ray.init(address="local", logging_level=logging.WARNING, log_to_driver=False, include_dashboard=False)


def cluster_cpus() -> int:
    """CPUs of the cluster now (at least 1)."""
    return max(1, int(ray.cluster_resources().get("CPU", 1)))


def cluster_has_gpus() -> bool:
    return ray.cluster_resources().get("GPU", 0) > 0


def task_options() -> dict[str, Any]:
    """Options for tasks that read models: the driver's hub and S3 endpoints (every task reads from where
    the listing came from) and request caps. Credentials are not sent: each node's environment has them."""
    settings = Settings.from_env()
    endpoints = {"HF_ENDPOINT": settings.hf_endpoint, "AWS_ENDPOINT_URL": settings.aws_endpoint_url}
    env_vars = {k: v for k, v in endpoints.items() if v}
    env_vars.update({k: os.environ[k] for k in (RATE_ENV, CONNECTIONS_ENV) if os.environ.get(k)})
    return {"runtime_env": {"env_vars": env_vars}} if env_vars else {}
