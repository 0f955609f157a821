"""Argument types and flags the commands share: a bad value is a one-line usage error (exit 2) before any
work starts, not a traceback after the models are hashed."""

from __future__ import annotations

import argparse
from collections.abc import Callable

from pipeline.hashing.registry import DEFAULT_SPEC, SPECS


def _number(kind: type[int] | type[float], least: float, strict: bool) -> Callable[[str], int | float]:
    name = f"{'positive' if strict else 'non-negative'} {'integer' if kind is int else 'number'}"

    def parse(text: str) -> int | float:
        try:
            value = kind(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not a {name}: {text!r}") from None
        if value != value or value < least or (strict and value == least):  # NaN fails too
            raise argparse.ArgumentTypeError(f"must be a {name}, got {text}")
        return value

    parse.__name__ = name  # argparse names the type in its messages
    return parse


positive_int = _number(int, 0, strict=True)
non_negative_int = _number(int, 0, strict=False)
positive_float = _number(float, 0.0, strict=True)
non_negative_float = _number(float, 0.0, strict=False)


def torch_device(text: str) -> str:
    """`cpu`, `cuda` or `cuda:N`, and a GPU only where torch sees one (a CPU build sees none)."""
    import torch

    try:
        device = torch.device(text)
    except RuntimeError:
        raise argparse.ArgumentTypeError(f"not a device: {text!r} (cpu, cuda or cuda:N)") from None
    if device.type not in ("cpu", "cuda"):
        raise argparse.ArgumentTypeError(f"unsupported device {text!r} (cpu, cuda or cuda:N)")
    if device.type == "cuda":
        count = torch.cuda.device_count() if torch.cuda.is_available() else 0
        if count == 0:
            raise argparse.ArgumentTypeError(f"{text}: torch sees no GPU here (a CPU build, or no device)")
        if device.index is not None and device.index >= count:
            raise argparse.ArgumentTypeError(f"{text}: torch sees {count} GPU(s), cuda:0 to cuda:{count - 1}")
    return text


MODEL_HELP = "a checkpoint file or a model folder, hf://org/name[@revision], or s3://bucket/prefix/model"


def add_spec(parser: argparse.ArgumentParser) -> None:
    """`--spec`: a short name or a full stored name (an index row's `spec`)."""
    others = ", ".join(name for name in SPECS if name != DEFAULT_SPEC)
    parser.add_argument("--spec", default=None,
                        help=f"hashing spec: {DEFAULT_SPEC} (default) or {others}, or a full spec name")
