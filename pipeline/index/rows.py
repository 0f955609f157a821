"""Index rows (SCHEMA) from a hashed model or from the reason it could not be hashed."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

from pipeline.hashing.model import HashResult
from pipeline.index.schema import STATUS_DUPLICATE, STATUS_ERROR, STATUS_OK
from pipeline.refs import ModelRef, as_text
from pipeline.settings import redact

MAX_ERROR_CHARS = 500


def _identity(ref: ModelRef, spec: str) -> dict[str, Any]:
    return {
        "source": ref.source,
        "model_id": ref.model_id,
        "revision": ref.revision,
        "files": [{"name": f.name, "size": f.size, "sha256": f.sha256, "etag": f.etag} for f in ref.files],
        "arch": ref.arch,
        "license": ref.license,
        "declared_base": list(ref.declared_base),
        "spec": spec,
        "indexed_at": datetime.now(UTC),
    }


def ok_row(result: HashResult) -> dict[str, Any]:
    """The row of a hashed model."""
    return {
        **_identity(result.ref, result.code.spec),
        "format": result.format,
        "n_params": result.n_params,
        "code": result.code.code,
        "parts": [{"name": name, "code": code} for name, code in result.code.parts],
        "bytes_read": result.bytes_read,
        "seconds": result.seconds,
        "status": STATUS_OK,
        "error": None,
        "duplicate_of": None,
    }


def error_row(ref: ModelRef, spec: str, reason: str, seconds: float = 0.0) -> dict[str, Any]:
    """The row of a model that could not be hashed: the reason, one line, so the crawl goes on."""
    # A message may quote an undecodable name, or a secret a server echoed back.
    line = as_text(redact(" ".join(reason.split())))
    return {
        **_identity(ref, spec),
        "format": None,
        "n_params": None,
        "code": None,
        "parts": [],
        "bytes_read": None,
        "seconds": seconds,
        "status": STATUS_ERROR,
        "error": line[:MAX_ERROR_CHARS],
        "duplicate_of": None,
    }


def duplicate_row(ref: ModelRef, original: dict[str, Any]) -> dict[str, Any]:
    """The row of a model whose checkpoint files are byte-identical (by sha256) to `original`'s.

    It carries the original's codes, so queries find it, and reads no weights.
    """
    return {
        **_identity(ref, original["spec"]),
        **{k: original[k] for k in ("format", "n_params", "code", "parts")},
        "bytes_read": 0,
        "seconds": 0.0,
        "status": STATUS_DUPLICATE,
        "error": None,
        "duplicate_of": f"{original['source']}:{original['model_id']}",
    }
