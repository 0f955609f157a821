"""A local folder as a source: every folder under the root that holds a checkpoint is one model.

Identity (DESIGN.md): `model_id` is the folder's path relative to the root (the root's own name when the
root itself is the model); `revision` is a digest of the files' names, sizes and mtimes, so an unchanged
folder is skipped without reading a byte of weights.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator
from pathlib import Path

from pipeline.errors import NoCheckpointError, SourceError
from pipeline.refs import CHECKPOINT_SUFFIXES, FileRef, ModelRef, as_text, files_revision, is_checkpoint_name

SOURCE = "local"
CONFIG_MAX_BYTES = 1 << 20


def list_models(
    root: str | os.PathLike[str], *, unchanged: Callable[[str, str], bool] | None = None, **filters: object
) -> Iterator[ModelRef]:
    """Every model under `root` (a path or `file://` URI), in sorted path order.

    Listing a folder is cheap, so `unchanged` (see `pipeline.sources.list_models`) is not needed here.

    A folder with checkpoint files is a model; so is a leaf folder with files but no checkpoint we can
    read (it yields a ModelRef with no files, which becomes an `error` row: nothing is silently dropped).
    """
    if any(v is not None for v in filters.values()):
        raise SourceError(f"filters ({', '.join(sorted(filters))}) apply to hub listings, not to a local folder")
    top = Path(os.fspath(root).removeprefix("file://"))
    if top.is_file():
        yield model_at(top)
        return
    if not top.is_dir():
        raise SourceError(f"{top}: no such file or folder")
    for folder, subdirs, names in os.walk(top):
        subdirs[:] = sorted(d for d in subdirs if not d.startswith("."))
        visible = sorted(n for n in names if not n.startswith("."))
        path = Path(folder)
        if _checkpoint_files(path, visible) or (visible and not subdirs and path != top):
            yield _folder_model(path, _model_id(top, path), visible)


def model_at(path: str | os.PathLike[str]) -> ModelRef:
    """One model: a checkpoint file (its architecture from a config.json beside it, as for its folder), or a
    folder that holds one (its name is the model id)."""
    path = Path(os.fspath(path).removeprefix("file://"))
    if as_text(str(path)) != str(path):
        raise SourceError(f"{as_text(str(path))}: the path is not valid UTF-8 (shown escaped); rename it")
    if path.is_file():
        if not is_checkpoint_name(path.name):
            raise NoCheckpointError(f"{path}: not a checkpoint (expected {', '.join(CHECKPOINT_SUFFIXES)})")
        files = (_file_ref(path),)
        return ModelRef(SOURCE, path.name, _revision(files), files, arch=_arch(path.parent / "config.json"))
    if not path.is_dir():
        raise SourceError(f"{path}: no such file or folder")
    names = sorted(n for n in os.listdir(path) if not n.startswith("."))
    ref = _folder_model(path, path.resolve().name, names)
    if not ref.files:
        hint = ""
        if any(_checkpoint_files(Path(folder), files) for folder, _, files in _walk_some(path)):
            hint = f"; its sub-folders hold models: index them with `modelhash crawl {path} --index INDEX`"
        shown = ", ".join(names[:8]) + (", ..." if len(names) > 8 else "") if names else "nothing"
        raise NoCheckpointError(f"{path}: no checkpoint in folder (found: {shown}){hint}")
    return ref


def _walk_some(top: Path, limit: int = 1000) -> Iterator[tuple[str, list[str], list[str]]]:
    """The first `limit` folders under `top`, for a hint: a mistaken root may hold a whole hub mirror."""
    for count, entry in enumerate(os.walk(top)):
        if count == limit:
            return
        yield entry


def _model_id(top: Path, path: Path) -> str:
    rel = path.relative_to(top).as_posix()
    return top.resolve().name if rel == "." else rel


def _folder_model(path: Path, model_id: str, names: list[str]) -> ModelRef:
    if any(as_text(n) != n for n in (model_id, *names)):  # an index row cannot hold the name: say so in one
        return ModelRef(SOURCE, as_text(model_id), "", (), error=f"{as_text(str(path))}: a file or folder name "
                        "is not valid UTF-8 (shown escaped); rename it to index this model")
    files = tuple(_file_ref(path / n) for n in _checkpoint_files(path, names))
    described = files + tuple(_file_ref(path / n) for n in names if n == "config.json")
    return ModelRef(SOURCE, model_id, _revision(described), files, arch=_arch(path / "config.json"))


def _checkpoint_files(path: Path, names: list[str]) -> list[str]:
    """Every checkpoint file of a folder; the format reader picks which to read (safetensors first)."""
    return [n for n in names if is_checkpoint_name(n) and (path / n).is_file()]


def _file_ref(path: Path) -> FileRef:
    return FileRef(name=path.name, size=path.stat().st_size, uri=str(path.resolve()))


def _revision(files: tuple[FileRef, ...]) -> str:
    return files_revision((f.name, f.size, str(os.stat(f.uri).st_mtime_ns)) for f in files)


def _arch(config: Path) -> str | None:
    """`model_type` from a small config.json, when there is one."""
    try:
        if config.stat().st_size > CONFIG_MAX_BYTES:
            return None
        value = json.loads(config.read_text()).get("model_type")
    except (OSError, ValueError, AttributeError, RecursionError):  # RecursionError: JSON nested past the stack
        return None
    return value if isinstance(value, str) else None
