"""The verify job: is a suspect a pirated copy of a source model, a homolog, or unrelated? (stage 2)

Run as `modelhash verify SOURCE SUSPECT [SUSPECT ...]` or `python -m jobs.verify SOURCE SUSPECT`. Both
models run here (CPU by default, `--device cuda`): core points are built on the source once, then every
suspect is judged by each method, with the evidence printed. A suspect that cannot load or run gets an
`error` verdict with the reason; a source that cannot run is an error of the command (exit code 2).

`--reference PATH` (repeatable) names a homolog reference: a model the owner trained apart from the
source (same architecture and data, another seed). With three or more the probe is conferrable (`--probe`,
`pipeline.verify.behavior.make_probe`): its core points are those the source and its surrogates label
alike and the references do not; the surrogates are distilled from the source on the seeds, or named
with `--surrogate PATH` (copies the owner made). `--probe core` keeps DeepCore's own core points, and the
references then set per-source thresholds (`Calibration`), printed with their scores. `cluster` takes the
references as homolog anchors too. One that cannot load or run is reported and skipped.
"""

from __future__ import annotations

import argparse
import json
import time
from dataclasses import dataclass
from typing import Any

import numpy as np

from jobs.arguments import non_negative_int, positive_int, torch_device
from jobs.entry import job_main
from pipeline.errors import ModelhashError, VerifyError
from pipeline.verify.behavior import (
    METHODS,
    PAIR_METHODS,
    THRESHOLDS,
    Probe,
    Verdict,
    make_probe,
    verify_group,
    verify_pair,
)
from pipeline.verify.core_points import (
    CONFERRABLE_POINTS,
    CONFERRABLE_STEPS,
    CORE_POINTS,
    CORE_STEPS,
    TOKEN_POINTS,
    TOKEN_STEPS,
)
from pipeline.verify.probe_cache import PROBE_CACHE_HELP, cache_dir_option
from pipeline.verify.runnable import RunnableModel, load_runnable


@dataclass
class VerifyReport:
    """The source's probe and every verdict, suspect by suspect, method by method."""

    source: dict[str, Any]
    verdicts: list[Verdict]

    def to_json(self) -> str:
        return json.dumps({"source": self.source, "verdicts": [v.to_dict() for v in self.verdicts]}, indent=2)


def load_seeds(path: str | None) -> np.ndarray | None:
    """Seed inputs from a `.npy` file (no pickles): (N, *input shape) floats, or token ids."""
    if path is None:
        return None
    try:
        with open(path, "rb") as f:
            npy = f.read(6) == b"\x93NUMPY"  # np.load takes any other file for a pickle, and refuses it as one
        if npy:
            return np.load(path, allow_pickle=False)
    except (OSError, ValueError) as exc:
        raise VerifyError(f"{path}: cannot read seeds (a .npy array without pickles): {exc}") from exc
    raise VerifyError(f"{path}: not a .npy array (seeds are saved with numpy.save)")


def _load(uri: str, arch: str | None, device: str) -> RunnableModel | BaseException:
    try:
        return load_runnable(uri, arch=arch, device=device)
    except Exception as exc:  # noqa: BLE001 -- a suspect that cannot load gets an error verdict, not a crash
        return exc


def verify(
    source: str,
    suspects: list[str],
    *,
    methods: tuple[str, ...] = ("agreement",),
    seeds: np.ndarray | None = None,
    homologs: tuple[str, ...] = (),
    pirated: tuple[str, ...] = (),
    references: tuple[str, ...] = (),
    surrogates: tuple[str, ...] = (),
    probe_kind: str | None = None,
    arch: str | None = None,
    suspect_arch: str | None = None,
    n: int | None = None,
    steps: int | None = None,
    seed: int = 0,
    contrast: bool = False,
    device: str = "cpu",
    probe_cache: str | None = None,
    progress: bool = False,
) -> VerifyReport:
    """Build the source's probe once and judge every suspect by every method.

    `references`: homolog references' URIs (loaded with the source's `arch`). `probe_kind`: "conferrable"
    (the default with 3+ references: they and the `surrogates`, URIs, shape the core points) or "core"
    (DeepCore's core points; the references set per-source thresholds). `probe_cache`: a folder where a
    conferrable probe's core points are kept between runs (`pipeline.verify.probe_cache`); None: none.
    `progress`: a bar on stderr, where it is a terminal, while a conferrable probe is searched.

    Raises:
        ModelhashError: the source cannot be loaded or run (the suspects' and references' failures are
            verdicts and reported calibration failures).
    """
    model = load_runnable(source, arch=arch, device=device)
    refs = {uri: _load(uri, arch, device) for uri in references}
    given = [_reference(uri, arch, device) for uri in surrogates]
    probe = make_probe(model, seeds=seeds, n=n, steps=steps, seed=seed, contrast=contrast,
                       references=refs or None, surrogates=given or None,
                       conferrable=None if probe_kind is None else probe_kind == "conferrable", cache=probe_cache,
                       progress=progress)
    loaded = [_load(uri, suspect_arch, device) for uri in suspects]
    verdicts: list[Verdict] = []
    by_suspect: dict[int, list[Verdict]] = {i: [] for i in range(len(suspects))}
    for method in methods:
        if method == "cluster":
            anchors = {
                "homolog": [_reference(u, suspect_arch, device) for u in homologs]
                + [m for m in refs.values() if isinstance(m, RunnableModel)],
                "pirated": [_reference(u, suspect_arch, device) for u in pirated],
            }
            for i, v in enumerate(verify_group(probe, loaded, anchors)):
                by_suspect[i].append(_named(v, suspects[i]))
            continue
        for i, suspect in enumerate(loaded):
            by_suspect[i].append(_named(verify_pair(probe, suspect, method), suspects[i]))
    for i in range(len(suspects)):
        verdicts.extend(by_suspect[i])
    return VerifyReport(source=_describe(probe, source), verdicts=verdicts)


def _reference(uri: str, arch: str | None, device: str) -> RunnableModel:
    """A known homolog or copy (`cluster`), or a surrogate: one that cannot load is an error of the command."""
    try:
        return load_runnable(uri, arch=arch, device=device)
    except ModelhashError as exc:
        raise VerifyError(f"reference {uri} cannot be loaded: {exc}") from exc


def _named(verdict: Verdict, uri: str) -> Verdict:
    """The suspect as the user named it, when it never loaded far enough to have a name."""
    if verdict.suspect:
        return verdict
    fields = {f: getattr(verdict, f) for f in Verdict.__dataclass_fields__}
    return Verdict(**{**fields, "suspect": uri})


def _calibration(probe: Probe) -> dict[str, Any] | None:
    """The references' scores by reference, the per-source thresholds by method, the failures."""
    cal = probe.calibration
    if cal is None:
        return None
    names = list(dict.fromkeys(n for by in cal.scores.values() for n in by))
    return {
        "references": {n: {m: by[n] for m, by in cal.scores.items() if n in by} for n in names},
        "failed": dict(cal.failed),
        "thresholds": {m: t.as_dict() for m in cal.scores if (t := cal.thresholds(m)) is not None},
        "margins": dict(cal.margins),
        "seconds": round(cal.seconds, 3),
    }


def _describe(probe: Probe, uri: str) -> dict[str, Any]:
    model = probe.source
    domain = model.domain
    inputs = (
        f"tokens (vocabulary {domain.vocab}, {domain.shape[0]} per probe)" if domain.kind == "tokens"
        else f"continuous {tuple(domain.shape)}"
    )
    return {
        "uri": uri,
        "name": model.name,
        "arch": model.arch,
        "outputs": model.n_outputs,
        "inputs": inputs,
        "core_points": len(probe.core.labels) if probe.core is not None else 0,
        "source_confidence": round(float(probe.core.confidence.mean()), 4) if probe.core is not None else None,
        "ddv_pairs": len(probe.source_ddv),
        "probe_seconds": round(probe.seconds, 3),
        "notes": list(model.notes),
        "probe": probe.core.variant if probe.core is not None else "ddv only",
        "shaped_by": probe.shaped_by,
        "calibration": _calibration(probe),
    }


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """The verify job's flags, shared by `modelhash verify` and `python -m jobs.verify`."""
    parser.add_argument("source", help="the protected model (a folder, a checkpoint, hf://..., s3://...)")
    parser.add_argument("suspects", nargs="+", metavar="SUSPECT", help="the model(s) to judge")
    parser.add_argument(
        "--method", default="agreement", choices=[*METHODS, "all"],
        help="agreement (default), distance, ddv, cluster (needs 2+ suspects or --homolog), or all",
    )
    parser.add_argument("--seeds", default=None, help="seed inputs, a .npy array (e.g. test images or token ids)")
    parser.add_argument(
        "--reference", action="append", default=[], metavar="PATH",
        help="a homolog reference, trained apart from the source on its data (repeatable): it shapes a conferrable "
        "probe (or, with --probe core, sets per-source thresholds)",
    )
    parser.add_argument(
        "--surrogate", action="append", default=[], metavar="PATH",
        help="a copy of the source the owner made (distilled, extracted; repeatable) to shape a conferrable probe; "
        "default: four are distilled from the source on the seeds (soft and top-1 labels, two rounds)",
    )
    parser.add_argument(
        "--probe", default=None, choices=["conferrable", "core"],
        help="conferrable (the default with 3+ --reference) or core (DeepCore's core points)",
    )
    parser.add_argument("--homolog", action="append", default=[], help="cluster: a known homolog (repeatable)")
    parser.add_argument("--pirated", action="append", default=[], help="cluster: a known copy (repeatable)")
    parser.add_argument("--arch", default=None, help="the source's architecture (mlp, cnn, resnet, gpt, "
                        "torchvision:NAME, timm:NAME, hf) when config.json does not say")
    parser.add_argument("--suspect-arch", default=None, help="the suspects' architecture, likewise")
    parser.add_argument("--points", type=positive_int, default=None,
                        help=f"core points (default {CORE_POINTS}, {CONFERRABLE_POINTS} on a conferrable probe; "
                        f"{TOKEN_POINTS} for token models)")
    parser.add_argument("--steps", type=non_negative_int, default=None,
                        help=f"search steps (at most {CORE_STEPS} by default; {CONFERRABLE_STEPS} on a conferrable "
                        f"probe, {TOKEN_STEPS} for token models)")
    parser.add_argument("--seed", type=int, default=0, help="random seed of the probe (default 0)")
    parser.add_argument("--contrast", action="store_true", help="also report agreement on near-boundary points")
    parser.add_argument("--device", type=torch_device, default="cpu", help="cpu (default), cuda, cuda:N")
    parser.add_argument("--probe-cache", default=None, metavar="DIR", help=PROBE_CACHE_HELP)
    parser.add_argument("--json", action="store_true", help="one JSON object on stdout")
    parser.add_argument("--no-progress", action="store_true",
                        help="no progress bar on stderr while a conferrable probe is searched (none where stderr is "
                        "no terminal)")


def run(args: argparse.Namespace) -> VerifyReport:
    if args.method == "all":
        methods: tuple[str, ...] = PAIR_METHODS
        if len(args.suspects) > 1 or args.homolog or args.reference:
            methods = (*methods, "cluster")
    else:
        methods = (args.method,)
    return verify(
        args.source,
        list(args.suspects),
        methods=methods,
        seeds=load_seeds(args.seeds),
        homologs=tuple(args.homolog),
        pirated=tuple(args.pirated),
        references=tuple(args.reference),
        surrogates=tuple(args.surrogate),
        probe_kind=args.probe,
        arch=args.arch,
        suspect_arch=args.suspect_arch,
        n=args.points,
        steps=args.steps,
        seed=args.seed,
        contrast=args.contrast,
        device=args.device,
        probe_cache=cache_dir_option(args.probe_cache),
        progress=not args.no_progress,
    )


def _threshold_text(method: str, t: dict[str, Any]) -> str:
    if not t:
        return ""
    if method == "cluster":
        return f"pirated >= {t['pirated']}, unrelated: divergence from the source > {THRESHOLDS['distance'].unrelated}"
    if t["higher_is_closer"]:
        return f"pirated >= {t['pirated']:.4g}, unrelated < {t['unrelated']:.4g}"
    return f"pirated <= {t['pirated']:.4g}, unrelated > {t['unrelated']:.4g}"


def _evidence_text(evidence: dict[str, Any]) -> str:
    parts = []
    for key, value in evidence.items():
        if key == "calibration" and isinstance(value, dict):
            value = value["thresholds"] + (
                f" (margin {value['margin']} past the closest of {len(value['references'])} references)"
                if value["thresholds"] == "per source" else "")
            if "surrogates" in evidence["calibration"]:
                value += f" (shaped by {len(evidence[key]['references'])} references)"
        elif isinstance(value, dict):
            value = "; ".join(f"{k}: {', '.join(map(str, v)) or '-'}" for k, v in value.items())
        elif isinstance(value, list):
            value = " | ".join(", ".join(map(str, g)) if isinstance(g, list) else str(g) for g in value)
        parts.append(f"{key} {value}")
    return ", ".join(parts)


def format_report(report: VerifyReport) -> str:
    """A human-readable report: the probe, then each suspect's verdicts with their evidence."""
    s = report.source
    confidence = "" if s["source_confidence"] is None else f", mean confidence {s['source_confidence']:.3f}"
    lines = [
        f"source {s['name']} ({s['arch']}, {s['outputs']} outputs, {s['inputs']}): {s['core_points']} "
        f"{s['probe']} points{confidence}, {s['ddv_pairs']} ddv pairs, {s['probe_seconds']:.2f} s"
    ]
    lines += [f"  note: {note}" for note in s["notes"]]
    shaped = s.get("shaped_by")
    if shaped:
        lines.append(f"  conferrable probe: shaped by {len(shaped['references'])} references and "
                     f"{len(shaped['surrogates'])} surrogates ({', '.join(shaped['surrogates']) or 'none'})"
                     + (f"; read from the probe cache in {shaped['cached']}" if shaped.get("cached") else ""))
        lines += [f"  skipped: {name}: {why}" for name, why in shaped["skipped"].items()]
    cal = s.get("calibration")
    if cal:
        for name, scores in cal["references"].items():
            lines.append(f"  reference {name}: " + ", ".join(f"{m} {v:.4f}" for m, v in scores.items()))
        lines += [f"  reference {name}: skipped: {why}" for name, why in cal["failed"].items()]
        for method, t in cal["thresholds"].items():
            lines.append(f"  per-source thresholds, {method} (margin {cal['margins'][method]}): "
                         f"{_threshold_text(method, t)}")
        if not cal["thresholds"] and not shaped:
            lines.append("  no usable reference: the global thresholds judge")
    current = None
    for v in report.verdicts:
        if v.suspect != current:
            current = v.suspect
            lines.append(f"suspect {current}")
        if v.verdict == "error":
            lines.append(f"  {v.method:<10} {'error':<9}  {v.reason}")
            continue
        calibrated = "" if v.calibrated_score is None else f"  calibrated {v.calibrated_score:.3f}"
        lines.append(
            f"  {v.method:<10} {v.verdict:<9}  score {v.score:.4f}{calibrated}  "
            f"({_threshold_text(v.method, v.thresholds)})  {v.seconds:.2f} s"
        )
        lines.append(f"  {'':<10} {'':<9}  {_evidence_text(v.evidence)}")
    return "\n".join(lines)


def command(args: argparse.Namespace) -> int:
    """Run the verification and print it (text, or JSON with --json): `modelhash verify` and this module's main."""
    start = time.perf_counter()
    report = run(args)
    if args.json:
        print(report.to_json())
    else:
        print(format_report(report))
        print(f"{time.perf_counter() - start:.2f} s in all")
    return 0


def main(argv: list[str] | None = None) -> int:
    return job_main("jobs.verify", __doc__.splitlines()[0], add_arguments, command, argv)


if __name__ == "__main__":
    raise SystemExit(main())
