"""Small real checkpoints that tests write: a model, its copies, unrelated models and bad inputs."""

from __future__ import annotations

import json
from pathlib import Path

import torch
from safetensors.torch import save_file


def mlp_state(seed: int, widths: tuple[int, ...] = (64, 256, 128, 10)) -> dict[str, torch.Tensor]:
    """A randomly initialised MLP's state dict (nn.Linear layout), deterministic from `seed`."""
    torch.manual_seed(seed)
    layers = [torch.nn.Linear(a, b) for a, b in zip(widths, widths[1:], strict=False)]
    net = torch.nn.Sequential(*[m for layer in layers for m in (layer, torch.nn.ReLU())][:-1])
    return {f"net.{k}": v.detach().clone() for k, v in net.state_dict().items()}


def save_model(folder: Path, state: dict[str, torch.Tensor], fmt: str = "safetensors", arch: str = "mlp") -> Path:
    """Write `state` as a one-file model folder with a config.json; returns the folder."""
    folder.mkdir(parents=True, exist_ok=True)
    state = {k: v.contiguous() for k, v in state.items()}
    if fmt == "safetensors":
        save_file(state, str(folder / "model.safetensors"))
    else:
        torch.save(state, folder / "pytorch_model.bin")
    (folder / "config.json").write_text(json.dumps({"model_type": arch}))
    return folder


def build_library(root: Path) -> dict[str, Path]:
    """A tiny source: an original, four copies, two unrelated models and four bad models."""
    base = mlp_state(0)
    paths = {
        "orig": save_model(root / "orig", base),
        "fp16": save_model(root / "copies" / "fp16", {k: v.half() for k, v in base.items()}),
        "renamed": save_model(root / "copies" / "renamed", {f"module.{k}": v for k, v in base.items()}),
        "bin": save_model(root / "copies" / "bin", base, fmt="bin"),
        "noisy": save_model(
            root / "copies" / "noisy",
            {k: v + 0.02 * v.std() * torch.randn_like(v) for k, v in base.items()},
        ),
        "other1": save_model(root / "other1", mlp_state(1)),
        "other2": save_model(root / "other2", mlp_state(2, (64, 200, 100, 10))),
    }
    nan_state = {k: v.clone() for k, v in base.items()}
    nan_state["net.0.weight"][3, 5] = float("nan")
    paths["nan"] = save_model(root / "bad" / "nan", nan_state)
    truncated = root / "bad" / "truncated"
    save_model(truncated, base)
    data = (truncated / "model.safetensors").read_bytes()
    (truncated / "model.safetensors").write_bytes(data[: len(data) // 2])
    paths["truncated"] = truncated
    empty = root / "bad" / "nocheckpoint"
    empty.mkdir(parents=True)
    (empty / "config.json").write_text("{}")
    (empty / "README.md").write_text("weights were never uploaded")
    paths["nocheckpoint"] = empty
    lying = root / "bad" / "lying"
    lying.mkdir(parents=True)
    header = json.dumps({"w": {"dtype": "F32", "shape": [100000, 100000], "data_offsets": [0, 40000000000]}})
    (lying / "model.safetensors").write_bytes(len(header).to_bytes(8, "little") + header.encode() + b"\0" * 64)
    paths["lying"] = lying
    return paths


COPIES = ("fp16", "renamed", "bin", "noisy")
UNRELATED = ("other1", "other2")
BAD = ("nan", "truncated", "nocheckpoint", "lying")
