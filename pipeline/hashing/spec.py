"""What every hashing spec provides: a name that pins its parameters, a code length, calibrated thresholds."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar, Protocol

from pipeline.formats.directory import TensorDirectory

VERDICT_COPY = "copy"
VERDICT_RELATED = "related"
VERDICT_UNRELATED = "unrelated"


@dataclass(frozen=True, slots=True)
class Thresholds:
    """Hamming distances (in bits, inclusive) at or below which two codes are called copy / related."""

    copy: int
    related: int

    def verdict(self, distance: int) -> str:
        if distance <= self.copy:
            return VERDICT_COPY
        if distance <= self.related:
            return VERDICT_RELATED
        return VERDICT_UNRELATED


@dataclass(frozen=True, slots=True)
class ModelCode:
    """A model's codes under one spec: the whole-model code and per-block `parts`."""

    spec: str
    code: bytes
    parts: tuple[tuple[str, bytes], ...]


class Spec(Protocol):
    """A hash algorithm at one version and parameter set; codes of different specs are never compared."""

    name: str  # e.g. "nts-v1:bits=256,keep=0.5": version and parameters, stored with every row
    bits: int
    thresholds: Thresholds
    uses_gpu: ClassVar[bool]  # whether crawl tasks should ask a GPU-equipped cluster for a GPU share

    def compute(self, directory: TensorDirectory) -> ModelCode:
        """Codes for the model behind `directory`; raises HashingError when it cannot be hashed."""
        ...
