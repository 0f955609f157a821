"""Index rows back to model URIs: what stage 2 loads to run the models stage 1 matched.

A row's identity names a model on the hub or on S3 by itself (`hf://org/name@revision`,
`s3://bucket/prefix`). A local row's `model_id` is relative to the folder its crawl listed, which the
crawl records in its run's commit record (`summary.root`, an absolute path), so the same row read from
another working directory still finds its model.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from pathlib import Path
from typing import Any

__all__ = ["crawled_root", "model_folder", "model_uri"]


def model_uri(source: str, model_id: str, revision: str | None = None, *, root: str | None = None) -> str | None:
    """The URI that loads an indexed model, or None when it cannot be told.

    Args:
        source: the row's `source` (`hf`, `s3`, `local`).
        model_id: the row's `model_id`.
        revision: the row's `revision`; pins a hub model to the commit that was hashed.
        root: for a local row, the absolute folder (or checkpoint file) its crawl listed.

    Returns:
        `hf://org/name@revision`, `s3://bucket/prefix`, or an absolute path; None for a local row without
        a root (an index written by something other than the crawl) or an unknown source.
    """
    if source == "hf":
        return f"hf://{model_id}@{revision}" if revision else f"hf://{model_id}"
    if source == "s3":
        return f"s3://{model_id}"
    if source != "local" or not root:
        return None
    top = Path(root)
    if top.is_file():  # a crawl of one checkpoint file: the model is that file (model_id is its name)
        return str(top)
    inner = top / model_id
    if not inner.exists() and top.name == model_id:  # the crawled folder itself was the model
        return str(top)
    return str(inner)


def crawled_root(summary: Mapping[str, Any]) -> str | None:
    """The absolute local folder a run listed, from its commit record's summary (`RunRecord.summary`).

    The crawl records it as `root`; older runs only as `source`, which counts when it is an absolute
    path. None for remote sources and runs that recorded no usable root.
    """
    root = summary.get("root")
    if isinstance(root, str) and root:
        return root
    source = summary.get("source")
    if isinstance(source, str) and source and "://" not in source.removeprefix("file://"):
        path = source.removeprefix("file://")
        return path if os.path.isabs(path) else None
    return None


def model_folder(uri: str | None) -> str | None:
    """A local model's identity on this machine: the real path of the folder that holds its checkpoint (the
    folder a crawl listed as the model, or a bare checkpoint file's own folder). None for remote URIs.

    Local `model_id`s are relative to whatever root was listed, so two different folders can share one and
    one model can have two (`mlp` crawled as a folder, `model.safetensors` given as its file): the folder
    tells them apart.
    """
    if not uri or "://" in uri.removeprefix("file://"):
        return None
    path = os.path.realpath(uri.removeprefix("file://"))
    return path if os.path.isdir(path) else os.path.dirname(path)
