"""Canonical tensor names and order, shared by every spec.

A copier who saves through `nn.DataParallel` (`module.` prefix) or a wrapper (`model.`) or who switches
between `.bin` and `.safetensors` (which sorts keys) must not change the code: specs see tensors under
names with the common wrapper prefix removed, in natural order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pipeline.formats.directory import FLOAT_DTYPES, TensorDirectory, TensorEntry

_DIGITS = re.compile(r"(\d+)")


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that puts `layers.2` before `layers.10`."""
    return tuple(int(p) if p.isdigit() else p for p in _DIGITS.split(name))


def strip_common_prefix(names: Iterable[str]) -> dict[str, str]:
    """Map each name to itself less the leading dotted components that *all* names share."""
    names = list(names)
    split = [n.split(".") for n in names]
    depth = 0
    # Keep at least one component per name: a lone tensor keeps its last component.
    while split and all(len(s) > depth + 1 for s in split) and len({s[depth] for s in split}) == 1:
        depth += 1
    return {n: ".".join(s[depth:]) for n, s in zip(names, split, strict=True)}


def weight_matrices(directory: TensorDirectory, min_numel: int = 2) -> list[tuple[str, TensorEntry]]:
    """Floating tensors of two or more dimensions (linear and conv weights), canonically named and ordered.

    Biases, norms and scalars carry little identity and are the first things a copier changes.
    """
    chosen = {
        name: entry
        for name, entry in directory.items()
        if entry.dtype in FLOAT_DTYPES and len(entry.shape) >= 2 and entry.numel >= min_numel
    }
    canonical = strip_common_prefix(chosen)
    return sorted(((canonical[n], e) for n, e in chosen.items()), key=lambda item: natural_key(item[0]))


def block_of(canonical_name: str) -> str:
    """The top-level block a tensor belongs to (`layer1.0.conv1.weight` -> `layer1`)."""
    return canonical_name.split(".", 1)[0]
