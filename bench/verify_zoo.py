"""The verification benchmark's model library: copies a weight hash cannot show, and the homologs a
behavioural check must keep apart from them (DeepCore's setting).

Digit classifiers (`mlp`, `cnn`, `resnet`, the quality zoo's architectures and recipes), trained here on
one CPU thread, deterministic from the seed. Per architecture, several originals (seeds); for each one:
- pirated, weights kept: fine-tuned short and long, magnitude-pruned 50% and 80%, fine-tune + prune 50%
  + int8 (the quality zoo's recipes), and `prune80-ft`: pruned 80% then fine-tuned with the pruned weights
  held at zero, as a copier restores the accuracy plain pruning costs (ResNet and CNN fall towards chance);
- pirated, no weights kept: `distill`, a fresh model of the same architecture trained on the original's
  soft labels (temperature `T`); `distill-xarch`, the same with a student of another architecture; and
  `extract`, a fresh model trained on the original's top-1 labels alone (label-only queries).
  The attacker's queries are its own inputs: the training inputs with no labels, noisy copies of them and
  mixtures of two (mixup); never the test split, which is kept for the verifier (`seeds.npy`).
Shared by the originals of one architecture:
- homologs: more seeds on the same data (`homolog-seed`), and the architecture trained on each of two
  disjoint halves of the training data (`homolog-half`);
- unrelated, same architecture: trained for another labelling, "is the digit 5 or more?"
  (`task-ge5`, ten outputs of which two are trained), and on labels shuffled across the training rows
  (`task-shuffled`, no signal).

`zoo.json` rows: `name`, `arch`, `lineage` (the original a pirated copy derives from; an original's own
name; null for shared homologs and unrelated models), `relation` ("original", "pirated", "homolog",
"unrelated"), `kind`, `seed`, `accuracy` (digits test accuracy; `task-ge5` on its own task), `file`.
`comparisons(manifest)` turns that into the pairs to verify (source original, suspect, relation, kind).

    python -m bench.verify_zoo [OUT_DIR] [--size full|tiny] [--seed N] [--force]
"""

from __future__ import annotations

import argparse
import sys
import time
from collections.abc import Callable
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from bench.cache import parse_zoo_args
from bench.numerics import build_zoo
from bench.quality_zoo import (
    _digits_model,
    _fine_tunes,
    _save,
    _train_digits,
    _train_original,
    int8,
    prune,
    state_dict_of,
)
from bench.zoo import DigitsSplit, load_digits_split
from pipeline.verify.surrogates import student_loss

__all__ = ["DEFAULT_DIR", "KINDS", "SIZES", "build_verify_zoo", "comparisons", "load_zoo_model"]

ZOO_VERSION = 1
SEEDS_NAME = "seeds.npy"
DEFAULT_DIR = Path(__file__).with_name(".cache") / "verify_zoo"

PIRATED_KINDS = ("ft-short", "ft-long", "prune50", "prune80", "prune80-ft", "ft-prune-int8", "distill", "distill-xarch",
                 "extract")
HOMOLOG_KINDS = ("homolog-seed", "homolog-half", "homolog-copy")
UNRELATED_KINDS = ("other-arch", "task-ge5", "task-shuffled")
KINDS = PIRATED_KINDS + HOMOLOG_KINDS + UNRELATED_KINDS
# Model kinds with no weights of the original in them.
FRESH_KINDS = ("distill", "distill-xarch", "extract")

SIZES: dict[str, dict] = {
    # originals per arch, extra same-data seeds per arch, epoch scale
    "full": {"archs": {"mlp": 3, "cnn": 3, "resnet": 3}, "extra_seeds": 3, "scale": 1.0},
    "tiny": {"archs": {"mlp": 2, "cnn": 1}, "extra_seeds": 1, "scale": 0.2},
}
XARCH = {"mlp": "cnn", "cnn": "mlp", "resnet": "mlp"}  # a cross-architecture student of each teacher
TEMPERATURE = 4.0  # distillation's soft-label temperature
_EPOCHS = {"mlp": 30, "cnn": 8, "resnet": 8}  # the originals' (quality zoo's) epochs on the training split
_QUERY_NOISE = 0.5  # std of the attacker's noisy copies, in standardized pixel units


# ---------------------------------------------------------------------------------------- attacker


def attacker_inputs(data: DigitsSplit, seed: int) -> torch.Tensor:
    """The inputs a copier queries the victim with: the training inputs (unlabelled), a noisy copy of
    each and a mixup of random pairs; 3x the training split, never a test input."""
    gen = torch.Generator().manual_seed(seed)
    x = data.x_train
    noisy = x + _QUERY_NOISE * torch.randn(x.shape, generator=gen)
    lam = torch.empty(len(x), 1).uniform_(0.2, 0.8, generator=gen)
    mixed = lam * x + (1 - lam) * x[torch.randperm(len(x), generator=gen)]
    return torch.cat([x, noisy, mixed])


@torch.no_grad()
def _victim_outputs(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return model.eval()(x)


def _train_on(model: nn.Module, x: torch.Tensor, target: torch.Tensor, *, seed: int, epochs: int, lr: float,
              soft: bool) -> nn.Module:
    """Adam in batches of 64 on (x, target): target logits distilled at TEMPERATURE (soft), or labels."""
    gen = torch.Generator().manual_seed(seed)
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    teacher = F.log_softmax(target / TEMPERATURE, dim=1) if soft else target
    for _ in range(max(1, epochs)):
        for batch in torch.randperm(len(x), generator=gen).split(64):
            opt.zero_grad()
            student_loss(model(x[batch]), teacher[batch], soft=soft, temperature=TEMPERATURE).backward()
            opt.step()
    return model.eval()


def _fresh(arch: str, seed: int) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return _digits_model(arch)


def _student(teacher: nn.Module, arch: str, queries: torch.Tensor, *, seed: int, scale: float,
             soft: bool) -> nn.Module:
    """A fresh `arch` model trained on the teacher's outputs on `queries` (a third of the original's
    epochs: the query set is three times the training split)."""
    target = _victim_outputs(teacher, queries)
    if not soft:
        target = target.argmax(dim=1)
    return _train_on(_fresh(arch, seed), queries, target, seed=seed, epochs=round(_EPOCHS[arch] * scale / 3),
                     lr=1e-3, soft=soft)


def _masked_fine_tune(arch: str, sd: dict, data: DigitsSplit, *, seed: int, scale: float) -> nn.Module:
    """Fine-tune a pruned state dict, its zeroed weights kept at zero (their gradients masked: Adam then
    never moves them)."""
    model = _digits_model(arch)
    model.load_state_dict(sd, strict=True)
    for p in model.parameters():
        if p.ndim >= 2:
            mask = (p.detach() != 0).float()
            p.register_hook(lambda g, m=mask: g * m)
    return _train_digits(model, data, seed=seed, epochs=round(5 * scale), lr=1e-3, subset=0.6)


# ------------------------------------------------------------------------------------------- build


@torch.no_grad()
def _accuracy(model: nn.Module, data: DigitsSplit, ge5: bool = False) -> float:
    y = (data.y_test >= 5).long() if ge5 else data.y_test
    return round(float((model.eval()(data.x_test).argmax(1) == y).float().mean()), 4)


def build_verify_zoo(out_dir: Path = DEFAULT_DIR, size: str = "full", seed: int = 0, force: bool = False,
                     log: Callable[[str], None] = print) -> dict:
    """Build the verification benchmark's library under `out_dir` (or return the complete one there).

    Returns:
        The manifest `{"version", "params", "seeds", "models": [{"name", "arch", "lineage", "relation",
        "kind", "seed", "accuracy", "file"}], "seconds"}`, also in `out_dir/zoo.json`. `seeds` names the
        `.npy` file of the digits test split (float32 (N, 64), standardized), inputs the verifier may use.

    Raises:
        ValueError: an unknown size.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    return build_zoo("bench.verify_zoo", out_dir, version=ZOO_VERSION, size=size, seed=seed, force=force,
                     build=lambda folder: _build(folder, SIZES[size], seed, log), extra={"seeds": SEEDS_NAME},
                     extra_files=(SEEDS_NAME,))


def _build(out_dir: Path, cfg: dict, seed: int, log: Callable[[str], None]) -> list[dict]:
    data = load_digits_split()
    np.save(out_dir / SEEDS_NAME, data.x_test.numpy().astype(np.float32))
    scale = cfg["scale"]
    models: list[dict] = []

    def add(name: str, arch: str, lineage: str | None, relation: str, kind: str, model: nn.Module | None,
            model_seed: int, sd: dict | None = None, ge5: bool = False) -> None:
        sd = state_dict_of(model) if sd is None else sd
        if model is None:  # a transformed state dict: its accuracy from a model holding it
            model = _digits_model(arch)
            model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
        path = _save(out_dir / name, sd, arch, "safetensors")
        models.append({"name": name, "arch": arch, "lineage": lineage, "relation": relation, "kind": kind,
                       "seed": model_seed, "accuracy": _accuracy(model, data, ge5), "file": path.name})

    for arch, n_originals in cfg["archs"].items():
        t0 = time.perf_counter()
        for i in range(n_originals):
            s = seed + i
            name = f"{arch}-s{s}"
            original = _train_original(arch, s, data, None, scale)
            add(name, arch, name, "original", "original", original, s)
            tuned = _fine_tunes(arch, original, s, data, None, ("ft-short", "ft-long"), scale)
            sd = state_dict_of(original)
            add(f"{name}-ft-short", arch, name, "pirated", "ft-short", tuned["ft-short"], s)
            add(f"{name}-ft-long", arch, name, "pirated", "ft-long", tuned["ft-long"], s)
            add(f"{name}-prune50", arch, name, "pirated", "prune50", None, s, prune(sd, 0.5))
            add(f"{name}-prune80", arch, name, "pirated", "prune80", None, s, prune(sd, 0.8))
            add(f"{name}-prune80-ft", arch, name, "pirated", "prune80-ft",
                _masked_fine_tune(arch, prune(sd, 0.8), data, seed=s * 100 + 49, scale=scale), s)
            add(f"{name}-ft-prune-int8", arch, name, "pirated", "ft-prune-int8", None, s,
                int8(prune(state_dict_of(tuned["ft-short"]), 0.5)))
            queries = attacker_inputs(data, s * 100 + 50)
            for kind, student_arch, soft, k in (("distill", arch, True, 51), ("distill-xarch", XARCH[arch], True, 52),
                                                ("extract", arch, False, 53)):
                ss = s * 100 + k
                student = _student(original, student_arch, queries, seed=ss, scale=scale, soft=soft)
                add(f"{name}-{kind}", student_arch, name, "pirated", kind, student, ss)
        for j in range(cfg["extra_seeds"]):
            s = seed + 10 + j
            add(f"{arch}-h{s}", arch, None, "homolog", "homolog-seed", _train_original(arch, s, data, None, scale), s)
        half = len(data.y_train) // 2
        order = torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(seed + 20))
        for part, rows in (("a", order[:half]), ("b", order[half:])):
            s = seed + 20 + (part == "b")
            split = DigitsSplit(data.x_train[rows], data.y_train[rows], data.x_test, data.y_test)
            # Twice the epochs on half the data: the same number of steps as an original.
            model = _train_digits(_fresh(arch, s), split, seed=s, epochs=round(2 * _EPOCHS[arch] * scale), lr=1e-3)
            add(f"{arch}-half{part}", arch, None, "homolog", "homolog-half", model, s)
        s = seed + 30
        model = _train_digits(_fresh(arch, s), data, seed=s, epochs=round(_EPOCHS[arch] * scale), lr=1e-3,
                              labels=(data.y_train >= 5).long())
        add(f"{arch}-task-ge5", arch, None, "unrelated", "task-ge5", model, s, ge5=True)
        s = seed + 31
        shuffled = data.y_train[torch.randperm(len(data.y_train), generator=torch.Generator().manual_seed(s))]
        model = _train_digits(_fresh(arch, s), data, seed=s, epochs=round(_EPOCHS[arch] * scale), lr=1e-3,
                              labels=shuffled)
        add(f"{arch}-task-shuffled", arch, None, "unrelated", "task-shuffled", model, s)
        log(f"{arch}: {sum(m['arch'] == arch for m in models)} models in {time.perf_counter() - t0:.1f} s")
    return models


# ------------------------------------------------------------------------------------------- pairs


def comparisons(manifest: dict) -> list[tuple[dict, dict, str, str]]:
    """The pairs the benchmark verifies: (source original, suspect, relation, kind), per original.

    - pirated: every model whose lineage is the source (its kind);
    - homolog: models of the source's architecture outside its lineage: other originals and extra seeds
      (`homolog-seed`), the half-data models (`homolog-half`), and other lineages' copies of that
      architecture (`homolog-copy`: same architecture and data, never derived from the source);
    - unrelated: other architectures' originals (`other-arch`: the same data, trained apart) and every
      other-task model (`task-ge5`, `task-shuffled`).
    """
    models = manifest["models"]
    pairs = []
    for src in models:
        if src["relation"] != "original":
            continue
        for m in models:
            if m is src:
                continue
            if m["lineage"] == src["name"]:
                pairs.append((src, m, "pirated", m["kind"]))
            elif m["relation"] == "unrelated":
                pairs.append((src, m, "unrelated", m["kind"]))
            elif m["arch"] == src["arch"]:
                kind = {"original": "homolog-seed", "pirated": "homolog-copy"}.get(m["relation"], m["kind"])
                pairs.append((src, m, "homolog", kind))
            elif m["relation"] == "original":
                pairs.append((src, m, "unrelated", "other-arch"))
    return pairs


def load_zoo_model(root: Path, row: dict) -> nn.Module:
    """A zoo model as an `nn.Module` in eval mode (for checks; the benchmark loads through `verify`)."""
    from safetensors.torch import load_file

    model = _digits_model(row["arch"])
    model.load_state_dict(load_file(str(Path(root) / row["name"] / row["file"])), strict=True)
    return model.eval()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_zoo_args("python -m bench.verify_zoo", __doc__.splitlines()[0], DEFAULT_DIR, SIZES, argv)


def main(args: argparse.Namespace) -> int:
    m = build_verify_zoo(args.out_dir, args.size, args.seed, args.force, log=lambda s: print(s, flush=True))
    print(f"{len(m['models'])} models in {args.out_dir} (built in {m['seconds']} s)")
    rows = [m2 for m2 in m["models"]]
    width = max(len(r["name"]) for r in rows)
    for r in rows:
        print(f"  {r['name']:<{width}}  {r['relation']:<9}  {r['kind']:<14}  acc {r['accuracy']:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
