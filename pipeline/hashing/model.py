"""Hash one model: open its checkpoint lazily, run a spec, account for the bytes and seconds it cost."""

from __future__ import annotations

import time
from dataclasses import dataclass

from pipeline.formats import open_model
from pipeline.hashing.spec import ModelCode, Spec
from pipeline.refs import ModelRef


@dataclass(frozen=True, slots=True)
class HashResult:
    """A model's codes and what they cost."""

    ref: ModelRef
    code: ModelCode
    format: str
    n_params: int
    bytes_read: int
    seconds: float


def hash_model(ref: ModelRef, spec: Spec) -> HashResult:
    """Codes of `ref` under `spec`.

    Raises:
        ModelhashError: the checkpoint is unreadable, unsafe or unsupported, or its weights cannot be hashed.
    """
    start = time.perf_counter()
    directory = open_model(ref.files)
    code = spec.compute(directory)
    return HashResult(
        ref=ref,
        code=code,
        format=directory.format,
        n_params=directory.n_params,
        bytes_read=directory.bytes_read,
        seconds=time.perf_counter() - start,
    )
