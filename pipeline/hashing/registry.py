"""The specs modelhash knows, by short name and by full name (as stored in index rows)."""

from __future__ import annotations

from pipeline.errors import SpecMismatchError
from pipeline.hashing.nts import NTSSpec
from pipeline.hashing.spec import Spec
from pipeline.hashing.wsig import WSigSpec

SPECS: dict[str, Spec] = {"nts": NTSSpec(), "wsig": WSigSpec()}
DEFAULT_SPEC = "wsig"


def get_spec(name: str | None = None) -> Spec:
    """A spec by short name (`nts`) or full stored name (`nts-v1:bits=256,keep=0.5`); None: the default."""
    if name is None:
        return SPECS[DEFAULT_SPEC]
    if name in SPECS:
        return SPECS[name]
    for spec in SPECS.values():
        if spec.name == name:
            return spec
    known = ", ".join(f"{short} ({spec.name})" for short, spec in SPECS.items())
    raise SpecMismatchError(f"unknown spec {name!r}; known specs: {known}")
