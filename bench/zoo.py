"""The demo model zoo: small digit classifiers and their copies, for `make run` to crawl and query.

Originals are trained with torch on scikit-learn's `load_digits` (it ships with the package: no
download). Each copy applies one thing a copier does (fine-tune, prune, fp16, renamed keys, another file
format), so the zoo holds both what a spec must match and what it must keep apart (a homolog: same
architecture and data, another seed). `zoo.json`, written last, records which folder derives from which.

    python -m bench.zoo OUT_DIR [--seed N] [--force]
"""

from __future__ import annotations

import argparse
import contextlib
import copy
import json
import shutil
import sys
import time
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from safetensors.torch import save_file
from sklearn.datasets import load_digits
from sklearn.model_selection import train_test_split
from torch import nn

from bench.cache import MANIFEST_NAME, is_complete, read_manifest, write_manifest
from pipeline.verify.archs import DigitsCNN, DigitsMLP

__all__ = [
    "ARCHS",
    "DigitsCNN",
    "DigitsMLP",
    "DigitsSplit",
    "accuracy",
    "build_demo_zoo",
    "fine_tune",
    "load_digits_split",
    "load_model",
    "make_model",
    "prune_magnitude",
    "rename_keys",
    "save_checkpoint",
    "state_dict_of",
    "to_fp16",
    "train_cnn",
    "train_mlp",
]

StateDict = dict[str, torch.Tensor]

# Bump when the recipe changes (architectures, epochs, copies), so cached zoos are rebuilt.
ZOO_VERSION = 1
SAFETENSORS_NAME = "model.safetensors"
BIN_NAME = "pytorch_model.bin"
RENAME_PREFIX = "module."


# ---------------------------------------------------------------------------------------------- data


@dataclass(frozen=True, slots=True)
class DigitsSplit:
    """Standardized 8x8 digits as flat float32 rows (N, 64) with int64 labels."""

    x_train: torch.Tensor
    y_train: torch.Tensor
    x_test: torch.Tensor
    y_test: torch.Tensor


def load_digits_split(test_size: float = 0.25, split_seed: int = 0) -> DigitsSplit:
    """The digits, split once and standardized with the training statistics.

    The split does not follow the zoo seed, so accuracies of every zoo are comparable.
    """
    x, y = load_digits(return_X_y=True)
    x_tr, x_te, y_tr, y_te = train_test_split(
        x.astype(np.float32), y, test_size=test_size, random_state=split_seed, stratify=y
    )
    mean = x_tr.mean(axis=0)
    std = x_tr.std(axis=0)
    std[std == 0] = 1.0  # corner pixels are always blank
    return DigitsSplit(
        x_train=torch.from_numpy((x_tr - mean) / std),
        y_train=torch.from_numpy(y_tr.astype(np.int64)),
        x_test=torch.from_numpy((x_te - mean) / std),
        y_test=torch.from_numpy(y_te.astype(np.int64)),
    )


# -------------------------------------------------------------------------------------------- models


ARCHS: dict[str, type[nn.Module]] = {"mlp": DigitsMLP, "cnn": DigitsCNN}
# Epochs that reach 97-99% test accuracy in a few seconds on one CPU thread.
_EPOCHS: dict[str, int] = {"mlp": 30, "cnn": 8}


def make_model(arch: str, seed: int) -> nn.Module:
    """A freshly initialized model of `arch`; the seed alone fixes its weights.

    Raises:
        ValueError: `arch` is not one of `ARCHS`.
    """
    if arch not in ARCHS:
        raise ValueError(f"unknown arch {arch!r}; expected one of {sorted(ARCHS)}")
    # A private RNG state: building a model must not shift the caller's random stream.
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        return ARCHS[arch]()


def load_model(arch: str, state_dict: Mapping[str, torch.Tensor], prefix: str = "") -> nn.Module:
    """A model of `arch` holding a checkpoint's weights, undoing a key prefix and a half-precision cast."""
    model = ARCHS[arch]()
    weights = {
        k.removeprefix(prefix): (v.float() if v.is_floating_point() else v) for k, v in state_dict.items()
    }
    model.load_state_dict(weights, strict=True)
    return model.eval()


# ------------------------------------------------------------------------------------------ training


def _train(
    model: nn.Module, data: DigitsSplit, *, seed: int, epochs: int, lr: float, subset: float = 1.0
) -> nn.Module:
    """Adam on cross-entropy in mini-batches of 64; `seed` fixes the subset and every shuffle."""
    gen = torch.Generator().manual_seed(seed)
    n = len(data.y_train)
    rows = torch.randperm(n, generator=gen)[: max(2, round(subset * n))]
    opt = torch.optim.Adam(model.parameters(), lr=lr)
    model.train()
    for _ in range(epochs):
        order = rows[torch.randperm(len(rows), generator=gen)]
        for batch in order.split(64):
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), data.y_train[batch]).backward()
            opt.step()
    return model.eval()


def train_mlp(data: DigitsSplit, seed: int, epochs: int = _EPOCHS["mlp"]) -> nn.Module:
    """An original MLP: init and data order both from `seed`, so two seeds give two homologs."""
    return _train(make_model("mlp", seed), data, seed=seed, epochs=epochs, lr=1e-3)


def train_cnn(data: DigitsSplit, seed: int, epochs: int = _EPOCHS["cnn"]) -> nn.Module:
    """An original CNN: init and data order both from `seed`."""
    return _train(make_model("cnn", seed), data, seed=seed, epochs=epochs, lr=1e-3)


def fine_tune(
    model: nn.Module, data: DigitsSplit, seed: int, epochs: int = 5, lr: float = 3e-4, subset: float = 0.6
) -> nn.Module:
    """A copier's fine-tune: all layers, a few epochs, small learning rate, another subset and shuffle.

    Returns a new model; `model` is left as it was.
    """
    return _train(copy.deepcopy(model), data, seed=seed, epochs=epochs, lr=lr, subset=subset)


@torch.no_grad()
def accuracy(model: nn.Module, data: DigitsSplit) -> float:
    """Test accuracy in [0, 1]."""
    model.eval()
    return float((model(data.x_test).argmax(dim=1) == data.y_test).float().mean())


# ------------------------------------------------------------------------------- copier's transforms


def state_dict_of(model: nn.Module) -> StateDict:
    """Detached, contiguous CPU copies of a model's tensors: safetensors refuses shared or strided ones."""
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def prune_magnitude(state_dict: Mapping[str, torch.Tensor], fraction: float) -> StateDict:
    """Zero the `fraction` smallest-magnitude entries of each weight matrix and kernel, tensor by tensor.

    Only floating tensors with two or more dimensions are pruned (what magnitude pruning targets);
    biases, BatchNorm vectors and buffers are copied as they are. Exactly round(fraction * numel)
    entries of each pruned tensor end up zero, ties broken by position.

    Raises:
        ValueError: `fraction` is outside [0, 1].
    """
    if not 0.0 <= fraction <= 1.0:
        raise ValueError(f"fraction must be in [0, 1], got {fraction}")
    out: StateDict = {}
    for name, tensor in state_dict.items():
        pruned = tensor.detach().clone().contiguous()
        if pruned.is_floating_point() and pruned.ndim >= 2:
            k = round(fraction * pruned.numel())
            flat = pruned.view(-1)
            flat[torch.argsort(flat.abs(), stable=True)[:k]] = 0
        out[name] = pruned
    return out


def to_fp16(state_dict: Mapping[str, torch.Tensor]) -> StateDict:
    """Floating tensors cast to float16 (saved as F16); integer buffers such as BN counters kept."""
    return {
        k: (v.detach().half() if v.is_floating_point() else v.detach().clone()).contiguous()
        for k, v in state_dict.items()
    }


def rename_keys(state_dict: Mapping[str, torch.Tensor], prefix: str = RENAME_PREFIX) -> StateDict:
    """Every key prefixed, as `nn.DataParallel` checkpoints are (`module.fc1.weight`)."""
    return {prefix + k: v.detach().clone().contiguous() for k, v in state_dict.items()}


def save_checkpoint(
    folder: Path, state_dict: Mapping[str, torch.Tensor], arch: str, fmt: str = "safetensors"
) -> Path:
    """Write one model folder: the checkpoint plus a `config.json` naming its architecture.

    Args:
        folder: the model folder, created if missing.
        state_dict: the tensors to save.
        arch: written as `model_type`, which the crawler reads as the architecture.
        fmt: "safetensors" (`model.safetensors`) or "torch_zip" (`pytorch_model.bin` via `torch.save`).

    Returns:
        The checkpoint's path.

    Raises:
        ValueError: unknown `fmt`.
    """
    folder.mkdir(parents=True, exist_ok=True)
    tensors = {k: v.detach().contiguous() for k, v in state_dict.items()}
    if fmt == "safetensors":
        path = folder / SAFETENSORS_NAME
        save_file(tensors, str(path))
    elif fmt == "torch_zip":
        path = folder / BIN_NAME
        torch.save(tensors, path)
    else:
        raise ValueError(f"unknown checkpoint format {fmt!r}")
    (folder / "config.json").write_text(json.dumps({"model_type": arch}) + "\n")
    return path


# --------------------------------------------------------------------------------------------- zoo


def _copies(model: nn.Module, data: DigitsSplit, seed: int) -> list[tuple[str, StateDict, str]]:
    """(kind, state dict, format) for every copy of one original; the kind is also the name suffix."""
    original = state_dict_of(model)
    tuned = state_dict_of(fine_tune(model, data, seed=seed + 1000))
    return [
        ("finetune", tuned, "safetensors"),
        ("prune30", prune_magnitude(original, 0.3), "safetensors"),
        ("fp16", to_fp16(original), "safetensors"),
        ("renamed", rename_keys(original, RENAME_PREFIX), "safetensors"),
        ("bin", original, "torch_zip"),
        ("ft-prune50", prune_magnitude(tuned, 0.5), "safetensors"),
    ]


@contextlib.contextmanager
def torch_threads(n: int) -> Iterator[None]:
    """Run torch on `n` CPU threads, then restore the caller's setting.

    The zoos train on one: CPU reductions may split differently with the thread count, so one thread makes
    the same bytes on any machine; on a busy 2-core box it is also faster than two threads fighting for cores.
    """
    threads = torch.get_num_threads()
    torch.set_num_threads(n)
    try:
        yield
    finally:
        torch.set_num_threads(threads)


def build_demo_zoo(out_dir: Path, seed: int = 0, force: bool = False) -> dict:
    """Build the demo zoo under `out_dir`, or return the one already there.

    Originals: `mlp-s{seed}`, its homolog `mlp-s{seed+1}` and `cnn-s{seed}`. The first and the last get
    six copies each: `-finetune`, `-prune30`, `-fp16`, `-renamed`, `-bin`, `-ft-prune50`.

    Args:
        out_dir: the zoo folder; one sub-folder per model, `zoo.json` beside them.
        seed: fixes every weight (same seed and torch version: the same bytes).
        force: rebuild even if `zoo.json` says a zoo with these parameters is complete.

    Returns:
        The manifest: `{"version", "params", "models": [{"name", "kind", "original", "arch", "seed",
        "format", "file", "n_params", "test_accuracy"}, ...]}`, also written to `out_dir/zoo.json`.
    """
    out_dir = Path(out_dir)
    params = {"zoo_version": ZOO_VERSION, "seed": seed}
    old = read_manifest(out_dir)
    if not force and is_complete(old, out_dir, params):
        print(f"{out_dir}: the zoo for seed {seed} is complete; nothing to do", flush=True)
        return old

    # Drop the manifest first, so a crash below never leaves a zoo that claims to be complete, and
    # the folders the old manifest named, so a changed seed leaves no strays for the crawler.
    (out_dir / MANIFEST_NAME).unlink(missing_ok=True)
    for entry in (old or {}).get("models", []):
        name = str(entry.get("name", ""))
        if name and "/" not in name and name not in (".", ".."):
            shutil.rmtree(out_dir / name, ignore_errors=True)
    out_dir.mkdir(parents=True, exist_ok=True)

    with torch_threads(1):
        models = _build(out_dir, seed)
    manifest = {"version": ZOO_VERSION, "params": params, "models": models}
    write_manifest(out_dir, manifest, indent=2)
    return manifest


def _build(out_dir: Path, seed: int) -> list[dict]:
    """Train, derive and save every model; returns the manifest's model entries."""
    data = load_digits_split()
    models: list[dict] = []

    def add(
        name: str, kind: str, original: str | None, arch: str, model_seed: int, sd: StateDict, fmt: str
    ) -> None:
        path = save_checkpoint(out_dir / name, sd, arch, fmt)
        prefix = RENAME_PREFIX if kind == "renamed" else ""
        acc = accuracy(load_model(arch, sd, prefix), data)
        models.append({
            "name": name, "kind": kind, "original": original, "arch": arch, "seed": model_seed,
            "format": fmt, "file": path.name, "n_params": sum(v.numel() for v in sd.values()),
            "test_accuracy": round(acc, 4),
        })
        print(f"  {name:<22} {kind:<10} acc {acc:.4f}", flush=True)

    for arch, model_seed, with_copies in (("mlp", seed, True), ("mlp", seed + 1, False), ("cnn", seed, True)):
        start = time.perf_counter()
        model = train_mlp(data, model_seed) if arch == "mlp" else train_cnn(data, model_seed)
        name = f"{arch}-s{model_seed}"
        print(f"{name}: trained in {time.perf_counter() - start:.1f} s", flush=True)
        add(name, "original", None, arch, model_seed, state_dict_of(model), "safetensors")
        if with_copies:
            for kind, state_dict, fmt in _copies(model, data, model_seed):
                add(f"{name}-{kind}", kind, name, arch, model_seed, state_dict, fmt)
    return models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.zoo", description="Build the demo model zoo.")
    parser.add_argument("out_dir", type=Path, help="zoo folder (one sub-folder per model, zoo.json)")
    parser.add_argument("--seed", type=int, default=0, help="seed of every weight (default 0)")
    parser.add_argument("--force", action="store_true", help="rebuild even if a complete zoo is there")
    return parser.parse_args(argv)


def main(args: argparse.Namespace) -> int:
    start = time.perf_counter()
    manifest = build_demo_zoo(args.out_dir, seed=args.seed, force=args.force)
    print(
        f"{len(manifest['models'])} models in {args.out_dir}, manifest {args.out_dir / MANIFEST_NAME} "
        f"({time.perf_counter() - start:.1f} s)"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
