"""Sources: where models come from, by URI (`hf://org/name`, `s3://bucket/prefix`, or a plain path)."""

from __future__ import annotations

from collections.abc import Iterator

from pipeline.errors import SourceError
from pipeline.refs import ModelRef
from pipeline.sources import local

__all__ = ["list_models", "resolve_model", "source_name"]


def _scheme(uri: str) -> str:
    return uri.split("://", 1)[0] if "://" in uri else ""


def source_name(uri: str) -> str:
    """The `source` column value of models listed from `uri`."""
    scheme = _scheme(uri)
    if scheme in ("", "file"):
        return local.SOURCE
    raise SourceError(f"{uri}: {scheme}:// sources are not supported yet (local folders and files are)")


def list_models(uri: str) -> Iterator[ModelRef]:
    """Every model of a source."""
    source_name(uri)
    return local.list_models(uri.removeprefix("file://"))


def resolve_model(uri: str) -> ModelRef:
    """One model by URI, for `hash`, `query` and `compare`."""
    source_name(uri)
    return local.model_at(uri.removeprefix("file://"))
