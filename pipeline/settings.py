"""Settings read from the environment at call time (never at import); command-line flags win."""

from __future__ import annotations

import os
import re
from dataclasses import dataclass, field

# Environment variables whose values are secrets: a message that quotes one (a server echoing a header)
# must not carry it into a log line, an index row or a report.
SECRET_ENV = ("HF_TOKEN", "AWS_SECRET_ACCESS_KEY", "AWS_SESSION_TOKEN")
# Secrets by their shape, whoever's they are: bearer credentials, hub tokens, a URL's user:password.
_SECRET_SHAPES = re.compile(r"(?i)(bearer\s+)\S+|\bhf_[A-Za-z0-9]{8,}|(?<=://)[^/@\s]+:[^/@\s]*@")
REDACTED = "***"


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


def redact(text: str) -> str:
    """`text` with this process's secrets (SECRET_ENV's values) and anything shaped like a credential
    replaced by `***`. Every message that leaves for a log, a row or stderr goes through here: an error
    message can quote what a hostile or broken server echoed back, the Authorization header included."""
    for name in SECRET_ENV:
        value = os.environ.get(name)
        if value and len(value) >= 4:
            text = text.replace(value, REDACTED)
    return _SECRET_SHAPES.sub(lambda m: (m.group(1) or "") + REDACTED + ("@" if m.group(0).endswith("@") else ""), text)
