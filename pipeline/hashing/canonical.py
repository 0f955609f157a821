"""Canonical tensor names and order, shared by every spec.

A copier who saves through `nn.DataParallel` (`module.` prefix) or a wrapper (`model.`) or who switches
between `.bin` and `.safetensors` (which sorts keys) must not change the code: specs see tensors under
names with the common wrapper prefix removed, in natural order.
"""

from __future__ import annotations

import re
from collections.abc import Iterable

from pipeline.formats.directory import FLOAT_DTYPES, TensorDirectory, TensorEntry

# ASCII digits only: str.isdigit is also true of '²' or '①', which int() refuses, and `\d` takes any script's.
_DIGITS = re.compile(r"([0-9]+)")


def natural_key(name: str) -> tuple[object, ...]:
    """Sort key that puts `layers.2` before `layers.10`."""
    # split() with a group alternates text and digit runs: every odd part is a run of ASCII digits.
    return tuple(int(p) if i % 2 else p for i, p in enumerate(_DIGITS.split(name)))


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


# ----------------------------------------------------------------------------- layouts and roles
# Shared by specs that look at layers as linear maps (wsig): which tensors are stored transposed, which
# read the residual stream of a transformer, which read the hidden units of the layer before them.

_CONV1D = re.compile(r"(^|\.)(attn\.c_attn|attn\.q_attn|attn\.c_proj|mlp\.c_fc|mlp\.c_proj)\.weight$")
_FUSED_QKV = re.compile(r"(^|\.)attn\.c_attn\.weight$")
_EMBEDDING = re.compile(r"(embed|(^|\.)wte\.|(^|\.)wpe\.|position|token_type|tok_embeddings|(^|\.)shared\.weight)")
# Layers whose input is a transformer's residual stream (or a pooled stream): query, key, value, fused
# qkv, MLP up/gate, pooler, and heads.
_STREAM_IN = re.compile(
    r"(^|\.)(query|key|value|q_proj|k_proj|v_proj|q|k|v|c_attn|in_proj|qkv|wqkv|w_pack|query_key_value|"
    r"intermediate\.dense|c_fc|up_proj|gate_proj|gate_up_proj|fc1|w1|w3|wi|wi_0|wi_1|dense_h_to_4h|"
    r"pooler\.dense|classifier|score|lm_head)(\.weight)?$",
    re.IGNORECASE,
)
_ATTENTION = re.compile(r"(attn|attention|q_proj|query)", re.IGNORECASE)
# Order of roles inside one block, so that a layer follows the one whose hidden units it reads
# (safetensors sorts keys, which puts `o_proj` before `v_proj` and `_depthwise_conv` before `_expand_conv`).
_ROLE_RANK = [
    (re.compile(r"(query|q_proj|\.q$|c_attn\.q|c_attn$)", re.IGNORECASE), 0),
    (re.compile(r"(key|k_proj|\.k$|c_attn\.k)", re.IGNORECASE), 1),
    (re.compile(r"(value|v_proj|\.v$|c_attn\.v)", re.IGNORECASE), 2),
    (re.compile(r"(attention\.output|o_proj|out_proj|attn\.c_proj)", re.IGNORECASE), 3),
    (re.compile(r"(gate_proj|w1|wi_0)", re.IGNORECASE), 4),
    (re.compile(r"(intermediate|up_proj|c_fc|fc1|w3|wi_1|dense_h_to_4h|_expand_conv|conv_pw)", re.IGNORECASE), 5),
    (re.compile(r"(_depthwise_conv|conv_dw)", re.IGNORECASE), 6),
    (re.compile(r"(_se_reduce|se\.conv_reduce)", re.IGNORECASE), 7),
    (re.compile(r"(_se_expand|se\.conv_expand)", re.IGNORECASE), 8),
    (re.compile(r"(output\.dense|down_proj|mlp\.c_proj|fc2|w2|dense_4h_to_h|_project_conv|conv_pwl)",
                re.IGNORECASE), 9),
]


def is_transposed(canonical_name: str) -> bool:
    """GPT-2's `Conv1D` layers store their weight as (in, out), not (out, in)."""
    return bool(_CONV1D.search(canonical_name))


def is_fused_qkv(canonical_name: str) -> bool:
    """GPT-2's `c_attn`: query, key and value stacked along the output axis (after transposing)."""
    return bool(_FUSED_QKV.search(canonical_name))


def is_embedding(canonical_name: str) -> bool:
    """Token, position and type embeddings: lookup tables, not maps between layers."""
    return bool(_EMBEDDING.search(canonical_name))


def reads_stream(canonical_name: str) -> bool:
    """True for a transformer layer that reads the residual stream (q, k, v, MLP up/gate, pooler, heads)."""
    return bool(_STREAM_IN.search(canonical_name.removesuffix(".weight")))


def looks_like_transformer(canonical_names: Iterable[str]) -> bool:
    return any(_ATTENTION.search(n) for n in canonical_names)


def part_of(canonical_name: str) -> str:
    """The repeated block a tensor belongs to: the name up to its first numeric component
    (`h.3.mlp.c_fc.weight` -> `h.3`, `layer1.0.conv1.weight` -> `layer1.0`), else its first component."""
    parts = canonical_name.split(".")
    for i, p in enumerate(parts[:-1]):
        if p.isdigit():
            return ".".join(parts[: i + 1])
    return parts[0]


_STEM = re.compile(r"(^|[._])(stem|embed)", re.IGNORECASE)
_HEAD = re.compile(r"^(_?fc|classifier|head|lm_head|score|pooler)(\.|$)", re.IGNORECASE)


def layer_order_key(canonical_name: str) -> tuple[object, ...]:
    """Order in which data flows: stem first, heads last, blocks in natural order, and inside a block
    the known roles in order (q, k, v, o, gate, up, depthwise, down), others by name."""
    module = canonical_name.rpartition(".")[0]
    stage = 0 if _STEM.search(canonical_name) else 2 if _HEAD.search(canonical_name) else 1
    rank = next((r for pattern, r in _ROLE_RANK if pattern.search(module)), 100)
    return (stage, natural_key(part_of(canonical_name)), rank, natural_key(canonical_name))
