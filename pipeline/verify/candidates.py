"""Stage 2 for one protected model and its stage-1 candidates: load it once, probe it once, judge each.

The unit of work of the sweep's stage 2 (one Ray task per protected model): the protected model is
loaded and its probe (core points, ddv pairs) built once, with its homolog references, if it has any,
loaded once to shape and calibrate it (a conferrable probe, `make_probe`); then every candidate is loaded,
judged by each method and dropped before the next one loads. Nothing here raises for a bad model: a
protected model that cannot load or run gives every candidate an `error` verdict saying so, a candidate
that cannot gives its own, a reference that cannot is reported in every verdict's evidence and skipped;
the sweep goes on either way.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from typing import Any

from pipeline.errors import ModelhashError
from pipeline.verify.behavior import ERROR, THRESHOLDS, Verdict, make_probe, verify_pair
from pipeline.verify.runnable import RunnableModel, load_runnable

__all__ = ["verify_candidates"]


def verify_candidates(
    source: str,
    suspects: Sequence[str],
    methods: Sequence[str] = ("agreement",),
    *,
    device: str = "cpu",
    references: Sequence[str] = (),
    **probe_options: Any,
) -> list[list[Verdict]]:
    """Judge every suspect against `source` by every method; never raises.

    Args:
        source: the protected model's URI (a path, `hf://org/name@rev`, `s3://bucket/prefix`).
        suspects: the candidates' URIs.
        methods: pair methods (`PAIR_METHODS`), in the order their verdicts are returned.
        device: where the models run ("cpu", "cuda").
        references: URIs of the protected model's homolog references (models its owner trained apart
            from it): they shape a conferrable probe and calibrate it (`make_probe`). Loaded once, dropped.
        probe_options: `make_probe` options (n, steps, seed, ...).

    Returns:
        One list per suspect, in order, of one Verdict per method, in order.
    """
    start = time.perf_counter()
    try:
        model = load_runnable(source, device=device)
        # The references shape a conferrable probe (and calibrate it): loaded for it, then dropped.
        loaded = {uri: _load_or_error(uri, device) for uri in references}
        probe = make_probe(model, references=loaded or None, **probe_options)
        del loaded  # the references' scores are kept, not their weights
    except Exception as exc:  # noqa: BLE001 -- every candidate gets the reason instead
        reason = f"protected model {source}: {_one_line(exc)}"
        seconds = time.perf_counter() - start
        return [[_failed(m, reason, source, s, seconds) for m in methods] for s in suspects]
    out = []
    for uri in suspects:
        began = time.perf_counter()
        suspect: RunnableModel | BaseException
        try:
            suspect = load_runnable(uri, device=device)
        except Exception as exc:  # noqa: BLE001 -- verify_pair turns it into an error verdict
            suspect = exc
        verdicts = [verify_pair(probe, suspect, method) for method in methods]
        seconds = time.perf_counter() - began
        out.append([_named(v, source, uri, seconds) for v in verdicts])
        del suspect  # one candidate's weights held at a time
    return out


def _load_or_error(uri: str, device: str) -> RunnableModel | BaseException:
    try:
        return load_runnable(uri, device=device)
    except Exception as exc:  # noqa: BLE001 -- make_probe reports it and skips it
        return exc


def _failed(method: str, reason: str, source: str, suspect: str, seconds: float) -> Verdict:
    cut = THRESHOLDS.get(method)
    return Verdict(method, None, ERROR, cut.as_dict() if cut else {}, reason=reason, source=source,
                   suspect=suspect, seconds=seconds)


def _one_line(exc: BaseException) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if isinstance(exc, ModelhashError) else f"{type(exc).__name__}: {text}"


def _named(verdict: Verdict, source: str, suspect: str, seconds: float) -> Verdict:
    """The pair as the sweep names it (URIs), and the time loading the suspect took included."""
    fields = {f: getattr(verdict, f) for f in Verdict.__dataclass_fields__}
    return Verdict(**{**fields, "source": source, "suspect": suspect, "seconds": seconds})
