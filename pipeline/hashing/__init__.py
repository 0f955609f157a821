"""Hashing specs: a tensor directory in, 256-bit model codes (and per-block codes) out."""

from pipeline.hashing.registry import DEFAULT_SPEC, SPECS, get_spec
from pipeline.hashing.spec import ModelCode, Spec, Thresholds

__all__ = ["DEFAULT_SPEC", "SPECS", "ModelCode", "Spec", "Thresholds", "get_spec"]
