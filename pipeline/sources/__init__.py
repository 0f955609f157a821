"""Sources: where models come from, by URI (`hf://org/name`, `s3://bucket/prefix`, or a plain path).

Every source module offers the same verbs: `SOURCE` (the `source` column value), `list_models(uri, ...)`
yielding ModelRefs, and `model_at(uri)` resolving one model. Remote sources are imported on first use.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from types import ModuleType
from typing import Any

from pipeline.errors import SourceError
from pipeline.refs import ModelRef

__all__ = ["list_models", "resolve_model", "source_name"]


def _module(uri: str) -> ModuleType:
    scheme = uri.split("://", 1)[0] if "://" in uri else ""
    if scheme in ("", "file"):
        from pipeline.sources import local

        return local
    if scheme == "hf":
        from pipeline.sources import hf

        return hf
    if scheme == "s3":
        from pipeline.sources import s3

        return s3
    raise SourceError(f"{uri}: {scheme}:// sources are not supported (use hf://, s3:// or a local path)")


def source_name(uri: str) -> str:
    """The `source` column value of models listed from `uri`."""
    return _module(uri).SOURCE


def list_models(
    uri: str, *, unchanged: Callable[[str, str], bool] | None = None, **filters: Any
) -> Iterator[ModelRef]:
    """Every model of a source; `filters` (author, search, limit) narrow a hub listing.

    `unchanged(model_id, revision)` tells a source which models the index holds already: a hub source
    then yields them without fetching their file metadata (the caller skips them anyway).
    """
    return _module(uri).list_models(uri, unchanged=unchanged, **filters)


def resolve_model(uri: str) -> ModelRef:
    """One model by URI, for `hash`, `query` and `compare`."""
    return _module(uri).model_at(uri)
