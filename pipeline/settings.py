"""Settings read from the environment at call time (never at import); command-line flags win."""

from __future__ import annotations

import os
from dataclasses import dataclass, field


@dataclass(frozen=True, slots=True)
class Settings:
    """Where to find the hub, S3 and the Ray cluster. Secrets stay out of repr, logs and rows."""

    ray_address: str | None = None
    hf_endpoint: str | None = None
    aws_endpoint_url: str | None = None
    hf_token: str | None = field(default=None, repr=False)

    @classmethod
    def from_env(cls, **overrides: str | None) -> Settings:
        """Settings from `RAY_ADDRESS`, `HF_ENDPOINT`, `HF_TOKEN`, `AWS_ENDPOINT_URL`; non-None overrides win."""
        values = {
            "ray_address": os.environ.get("RAY_ADDRESS") or None,
            "hf_endpoint": os.environ.get("HF_ENDPOINT") or None,
            "aws_endpoint_url": os.environ.get("AWS_ENDPOINT_URL") or None,
            "hf_token": os.environ.get("HF_TOKEN") or None,
        }
        values.update({k: v for k, v in overrides.items() if v is not None})
        return cls(**values)
