"""Conferrable core points on disk, keyed by everything that made them.

A conferrable probe costs tens of seconds on a CPU (the surrogates' distillation and the search: the
verify zoo's small CNNs about 25 s on one thread), once per protected model; verifying a pair with it costs
milliseconds. A nightly sweep of a stable protected set, or
the tenth "who copied this model?" about the same model, should pay the search once. The key is a digest
of what decides the points: the source's and each reference's and given surrogate's weights (the tensors'
bytes, not their paths), the seeds, the probe's options, and the source text of the modules that compute
them (any change to the search or the surrogates makes a new key, never a stale hit).

Entries are safetensors files (tensors and a JSON string of metadata: nothing is unpickled), written to a
temporary name and renamed, so a crashed or concurrent writer leaves no half entry. An entry that cannot be
read (truncated, hand-edited, another format) is a miss: it is logged, recomputed and overwritten.
"""

from __future__ import annotations

import dataclasses
import functools
import hashlib
import importlib.metadata
import inspect
import json
import logging
import os
import tempfile
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors import SafetensorError, safe_open
from safetensors.torch import save_file

from pipeline.verify import core_points as _core_points_module
from pipeline.verify import surrogates as _surrogates_module
from pipeline.verify.core_points import CorePoints
from pipeline.verify.runnable import RunnableModel

__all__ = ["PROBE_CACHE_HELP", "ProbeCache", "cache_dir_option", "default_probe_cache_dir", "model_digest"]

log = logging.getLogger(__name__)

CACHE_FORMAT = 1
ENV = "MODELHASH_PROBE_CACHE"


def default_probe_cache_dir() -> Path:
    """`$MODELHASH_PROBE_CACHE`, else `$XDG_CACHE_HOME/modelhash/probes` (~/.cache when unset)."""
    if os.environ.get(ENV):
        return Path(os.environ[ENV]).expanduser()
    return Path(os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache") / "modelhash" / "probes"


def cache_dir_option(value: str | None) -> str | None:
    """The folder a `--probe-cache` flag names: None (not given) is the default folder, `off` is none."""
    if value is None:
        return str(default_probe_cache_dir())
    return None if value.strip().lower() in ("off", "none", "") else value


PROBE_CACHE_HELP = ("where conferrable probes are kept between runs, keyed by the models' weights, the seeds "
                    f"and the options (default: ${ENV}, else ~/.cache/modelhash/probes); off: none")


def model_digest(model: RunnableModel) -> str:
    """What the model computes, as bytes: architecture, input domain, outputs, and every tensor's name,
    dtype, shape and values (parameters and buffers, such as BatchNorm statistics)."""
    h = hashlib.sha256()
    h.update(json.dumps([model.arch, model.outputs, model.n_outputs, dataclasses.asdict(model.domain)]).encode())
    for name, tensor in model.module.state_dict().items():
        t = tensor.detach().to("cpu").contiguous()
        h.update(f"{name}|{t.dtype}|{tuple(t.shape)}".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes() if t.numel() else b"")
    return h.hexdigest()


@functools.cache
def _code_digest() -> str:
    """The source text of the search and the surrogates: a change to either invalidates every entry (where
    the source is not installed, the package's version stands in for it)."""
    try:
        text = inspect.getsource(_core_points_module) + inspect.getsource(_surrogates_module)
    except (OSError, TypeError):
        text = "modelhash " + importlib.metadata.version("modelhash")
    return hashlib.sha256(text.encode()).hexdigest()


class ProbeCache:
    """Conferrable core points by key in one folder (made on first write)."""

    def __init__(self, root: str | os.PathLike[str]) -> None:
        self.root = Path(root).expanduser()

    def __repr__(self) -> str:
        return f"ProbeCache({str(self.root)!r})"

    def key(
        self,
        source: RunnableModel,
        references: Sequence[RunnableModel],
        surrogates: Sequence[RunnableModel] | None,
        seeds: torch.Tensor | np.ndarray | None,
        options: dict[str, Any],
    ) -> str:
        """The entry's name. `surrogates` None: the library distils them (from the source and the seeds,
        deterministically), so they add nothing to the key."""
        seeds_digest = None
        if seeds is not None:
            array = np.ascontiguousarray(seeds.detach().cpu().numpy() if isinstance(seeds, torch.Tensor) else seeds)
            seeds_digest = hashlib.sha256(f"{array.dtype}|{array.shape}|".encode() + array.tobytes()).hexdigest()
        material = {
            "format": CACHE_FORMAT,
            "code": _code_digest(),
            "torch": torch.__version__.split("+")[0],
            "source": model_digest(source),
            "references": [model_digest(m) for m in references],
            "surrogates": None if surrogates is None else [model_digest(m) for m in surrogates],
            "seeds": seeds_digest,
            "options": options,
        }
        return hashlib.sha256(json.dumps(material, sort_keys=True, default=str).encode()).hexdigest()

    def _path(self, key: str) -> Path:
        return self.root / f"{key}.safetensors"

    def get(self, key: str) -> tuple[CorePoints, dict[str, Any]] | None:
        """The points and the metadata stored with them, or None (absent, or unreadable: logged)."""
        path = self._path(key)
        if not path.is_file():
            return None
        try:
            with safe_open(path, framework="pt") as fh:
                tensors = {name: fh.get_tensor(name) for name in ("inputs", "labels", "confidence")}
                meta = json.loads((fh.metadata() or {})["probe"])
            core = CorePoints(inputs=tensors["inputs"], labels=tensors["labels"], confidence=tensors["confidence"],
                              variant=str(meta["variant"]), seconds=float(meta["seconds"]))
        except (OSError, SafetensorError, ValueError, KeyError, TypeError) as exc:
            log.warning("probe cache entry %s is unreadable (%s): recomputing it", path, exc)
            return None
        return core, meta.get("extra", {})

    def put(self, key: str, core: CorePoints, extra: dict[str, Any]) -> Path | None:
        """Store the points (atomically: a temporary file renamed over the entry). A cache that cannot be
        written to is logged and skipped: the probe in hand is as good, the next query searches again."""
        try:
            return self._write(key, core, extra)
        except OSError as exc:
            log.warning("probe cache %s cannot store an entry (%s): the probe is not kept", self.root, exc)
            return None

    def _write(self, key: str, core: CorePoints, extra: dict[str, Any]) -> Path:
        self.root.mkdir(parents=True, exist_ok=True)
        meta = {"variant": core.variant, "seconds": core.seconds, "extra": extra}
        tensors = {"inputs": core.inputs.detach().cpu().contiguous(), "labels": core.labels.detach().cpu().contiguous(),
                   "confidence": core.confidence.detach().cpu().contiguous()}
        fd, tmp = tempfile.mkstemp(dir=self.root, prefix=".probe-", suffix=".tmp")
        os.close(fd)
        try:
            save_file(tensors, tmp, metadata={"probe": json.dumps(meta)})
            os.replace(tmp, self._path(key))
        finally:
            if os.path.exists(tmp):
                os.unlink(tmp)
        return self._path(key)
