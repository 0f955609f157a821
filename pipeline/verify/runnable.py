"""Models that run: a checkpoint (local, `hf://`, `s3://`) read through the formats layer and built into a
torch module that maps a batch of inputs to one vector of outputs per input.

Architectures, by what the checkpoint's `config.json` says (or an explicit `arch`):
- the zoo's (`pipeline.verify.archs`, `model_type` mlp / cnn / resnet / gpt), sized from the weights'
  shapes (hidden widths, folded BatchNorm, a new head with another number of classes);
- torchvision and timm models by name (`arch="torchvision:resnet18"`, `"timm:resnet18"`, or timm's own
  config.json `{"architecture": "resnet18"}`), when those packages are installed and import;
- Hugging Face transformers from a full config.json (`model_type` known to transformers, class chosen by
  `architectures`): sequence and image classifiers, causal and masked language models (outputs at the last
  position), and bare encoders (mean-pooled hidden states, an embedding: only `ddv` compares those).
  Custom code (`auto_map`, `trust_remote_code`) is never run.

The weights are never unpickled with code: every tensor comes from `pipeline.formats.open_model`, the
same reader stage 1 hashes with. Whatever cannot run ends as a VerifyError that says why.
"""

from __future__ import annotations

import json
import posixpath
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, Literal

import numpy as np
import torch
from torch import nn

from pipeline.blobs import open_reader
from pipeline.errors import ModelhashError, VerifyError
from pipeline.formats import open_model
from pipeline.formats.directory import FLOAT_DTYPES
from pipeline.refs import ModelRef
from pipeline.verify import archs

__all__ = ["InputDomain", "RunnableModel", "load_runnable", "read_config", "read_state_dict"]

StateDict = dict[str, torch.Tensor]

# Refuse to materialise more than this many parameters (float32 on CPU: 4 bytes each).
MAX_PARAMS = 2_000_000_000
CONFIG_MAX_BYTES = 1 << 20
# Token models are probed with sequences of at most this many tokens: enough context to shape the next
# token's distribution, short enough for a verified pair to take seconds on a CPU.
PROBE_TOKENS = 32
# Key prefixes a wrapper adds (DataParallel `module.`, Lightning or a training harness `model.`).
_WRAPPER_PREFIXES = ("module.", "model.")
_IDENTIFIER = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
_EXTRA = "pip install 'modelhash[verify]'"


@dataclass(frozen=True, slots=True)
class InputDomain:
    """What a model takes, one example at a time.

    `continuous`: float tensors of `shape`, values of about `scale` (a standard deviation: standardized
    inputs have 1.0), within [low, high] when bounded. `tokens`: int64 ids below `vocab`, sequences of
    `shape[0]` tokens (the probe length; the model accepts up to `context`).
    """

    kind: Literal["continuous", "tokens"]
    shape: tuple[int, ...]
    scale: float = 1.0
    low: float | None = None
    high: float | None = None
    vocab: int = 0
    context: int = 0

    def mismatch(self, other: InputDomain) -> str | None:
        """Why one set of inputs cannot probe both models, or None when it can."""
        if self.kind != other.kind:
            return f"input kinds differ ({self.kind} vs {other.kind})"
        if self.kind == "tokens":
            if self.vocab != other.vocab:
                return f"vocabularies differ ({self.vocab} vs {other.vocab} tokens)"
            return None
        if self.shape != other.shape:
            return f"input shapes differ ({_shape(self.shape)} vs {_shape(other.shape)})"
        return None

    def common(self, other: InputDomain) -> InputDomain:
        """The domain both accept (token models: the shorter probe length)."""
        if self.kind == "tokens" and other.shape[0] < self.shape[0]:
            return other
        return self


class RunnableModel:
    """A model in eval mode on one device: inputs in, one output vector per input.

    `outputs` is "labels" for a classifier or language model (logits over `n_outputs` classes or tokens)
    and "embedding" for a bare encoder (a feature vector: label-based methods do not apply).
    """

    def __init__(
        self,
        module: nn.Module,
        domain: InputDomain,
        n_outputs: int,
        *,
        name: str,
        arch: str,
        outputs: Literal["labels", "embedding"] = "labels",
        device: str | torch.device = "cpu",
        batch_size: int = 256,
        notes: tuple[str, ...] = (),
    ) -> None:
        self.device = torch.device(device)
        self.module = module.to(self.device).eval()
        for p in self.module.parameters():
            p.requires_grad_(False)
        self.domain = domain
        self.n_outputs = n_outputs
        self.name = name
        self.arch = arch
        self.outputs = outputs
        self.batch_size = batch_size
        self.notes = notes

    def __repr__(self) -> str:
        return f"RunnableModel({self.name!r}, arch={self.arch!r}, outputs={self.n_outputs}, {self.domain})"

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs (N, n_outputs) for one batch, with autograd (continuous inputs: core-point search)."""
        return self.module(x.to(self.device))

    def logits(self, x: torch.Tensor) -> torch.Tensor:
        """Outputs (N, n_outputs) as float32 on this model's device, batched, without autograd.

        Raises:
            VerifyError: the model fails on the inputs or returns NaN or infinite values.
        """
        if self.domain.kind == "tokens":
            x = x[:, : self.domain.context] if self.domain.context else x
        out = []
        with torch.no_grad():
            for batch in x.split(self.batch_size):
                try:
                    y = self.module(batch.to(self.device))
                except (RuntimeError, ValueError, IndexError, TypeError) as exc:
                    raise VerifyError(f"{self.name}: fails to run: {_one_line(exc)}") from exc
                out.append(y.float())
        y = torch.cat(out) if out else torch.zeros(0, self.n_outputs, device=self.device)
        bad = int((~torch.isfinite(y)).any(dim=1).sum())
        if bad:
            raise VerifyError(f"{self.name}: non-finite outputs (NaN or inf) on {bad} of {len(y)} inputs")
        return y

    def probs(self, x: torch.Tensor) -> torch.Tensor:
        """Softmax of `logits` (N, n_outputs)."""
        return torch.softmax(self.logits(x), dim=1)


# ------------------------------------------------------------------------------------------- reading


def read_state_dict(ref: ModelRef, *, max_params: int = MAX_PARAMS) -> StateDict:
    """Every tensor of a model's checkpoint as CPU torch tensors; half floats widened to float32.

    One reader for local, hub and S3 checkpoints (`pipeline.formats.open_model`), whose torch reader
    never executes pickled code.

    Raises:
        ModelhashError: the checkpoint is unreadable, unsafe or unsupported (FormatError, BlobError, ...).
        VerifyError: it is too large to run here, or a tensor's dtype cannot be decoded.
    """
    directory = open_model(ref.files)
    if directory.n_params > max_params:
        raise VerifyError(f"{ref.model_id}: {directory.n_params:,} parameters, above {max_params:,} to run here")
    state: StateDict = {}
    for name in directory:
        entry = directory[name]
        array = np.array(directory.read(name))  # a writable copy: torch refuses read-only buffers
        tensor = torch.from_numpy(array)
        state[name] = tensor.float() if entry.dtype in FLOAT_DTYPES else tensor
    return state


def read_config(ref: ModelRef) -> dict[str, Any] | None:
    """The model's config.json (beside its checkpoint, at the model's root), or None if it has none."""
    if not ref.files:
        return None
    first = ref.files[0]
    root = first.uri[: -len(first.name)] if first.uri.endswith(first.name) else posixpath.dirname(first.uri) + "/"
    try:
        reader = open_reader(root + "config.json")
        if reader.size > CONFIG_MAX_BYTES:
            raise VerifyError(f"{ref.model_id}: config.json is {reader.size} bytes, above {CONFIG_MAX_BYTES}")
        config = json.loads(reader.read(0, reader.size).decode("utf-8"))
    except VerifyError:
        raise
    except (ModelhashError, OSError, ValueError):
        return None
    return config if isinstance(config, dict) else None


def load_runnable(
    model: str | ModelRef,
    *,
    arch: str | None = None,
    device: str | torch.device = "cpu",
    config: Mapping[str, Any] | None = None,
) -> RunnableModel:
    """Build a model that runs from a URI or a ModelRef.

    Args:
        model: a path, `hf://org/name[@rev]`, `s3://bucket/prefix`, or a resolved ModelRef.
        arch: overrides what config.json says: a zoo `model_type` (mlp, cnn, resnet, gpt),
            `torchvision:NAME`, `timm:NAME`, or `hf` (the config.json is a transformers config).
        device: where it runs ("cpu", "cuda", "cuda:1").
        config: the config to use instead of reading the model's config.json.

    Raises:
        ModelhashError: the model cannot be resolved or its checkpoint read (SourceError, FormatError, ...).
        VerifyError: the architecture is unknown or unavailable here, or the weights do not fit it.
    """
    from pipeline.sources import resolve_model

    ref = resolve_model(model) if isinstance(model, str) else model
    if ref.error:
        raise VerifyError(f"{ref.model_id}: {ref.error}")
    cfg = dict(config) if config is not None else (read_config(ref) or {})
    if cfg.get("model_type") is None and ref.arch:
        cfg["model_type"] = ref.arch
    try:
        family, name = _choose(arch, cfg, ref.model_id)
    except VerifyError:
        open_model(ref.files)  # a checkpoint that cannot even be opened says so: that is its first fault
        raise
    state = read_state_dict(ref)
    built = _BUILDERS[family](name, state, cfg, ref.model_id)
    return RunnableModel(
        built.module, built.domain, built.n_outputs, name=ref.model_id, arch=built.arch,
        outputs=built.outputs, device=device, notes=built.notes,
    )


def _choose(arch: str | None, cfg: Mapping[str, Any], model_id: str) -> tuple[str, str]:
    """(family, name): which builder, and the architecture's name within it."""
    if arch:
        family, _, name = arch.partition(":")
        if family in ("torchvision", "timm") and name:
            return family, name
        if arch in archs.ARCHITECTURES:
            return "zoo", arch
        if arch == "hf":
            return "hf", str(cfg.get("model_type") or "")
        raise VerifyError(
            f"{model_id}: unknown arch {arch!r} (expected one of {', '.join(sorted(archs.ARCHITECTURES))}, "
            "torchvision:NAME, timm:NAME or hf)"
        )
    model_type = cfg.get("model_type")
    if isinstance(model_type, str) and model_type in archs.ARCHITECTURES:
        return "zoo", model_type
    if isinstance(cfg.get("architecture"), str):  # timm writes {"architecture": "resnet18", ...}
        return "timm", cfg["architecture"]
    if isinstance(model_type, str):
        return "hf", model_type
    why = "config.json names no model_type" if cfg else "no config.json beside the checkpoint"
    raise VerifyError(f"{model_id}: no architecture: {why} (pass an arch)")


@dataclass(frozen=True, slots=True)
class _Built:
    module: nn.Module
    domain: InputDomain
    n_outputs: int
    arch: str
    outputs: Literal["labels", "embedding"] = "labels"
    notes: tuple[str, ...] = ()


# ------------------------------------------------------------------------------------------- the zoo


_DIGITS = InputDomain("continuous", (64,), scale=1.0)


def _strip_wrappers(state: StateDict) -> StateDict:
    """Undo `module.` / `model.` prefixes that every key carries."""
    changed = True
    while changed and state:
        changed = False
        for prefix in _WRAPPER_PREFIXES:
            if all(k.startswith(prefix) for k in state):
                state = {k.removeprefix(prefix): v for k, v in state.items()}
                changed = True
    return state


def _shape_of(state: StateDict, key: str, model_id: str, ndim: int) -> tuple[int, ...]:
    if key not in state:
        raise VerifyError(f"{model_id}: no tensor {key!r} (keys: {_few(state)})")
    shape = tuple(state[key].shape)
    if len(shape) != ndim:
        raise VerifyError(f"{model_id}: {key} has shape {_shape(shape)}, expected {ndim} dimensions")
    return shape


def _build_zoo(name: str, state: StateDict, cfg: Mapping[str, Any], model_id: str) -> _Built:
    state = _strip_wrappers(state)
    folded = "conv1.bias" in state
    module: nn.Module
    domain = _DIGITS
    if name == "mlp":
        h1 = _shape_of(state, "fc1.weight", model_id, 2)[0]
        h2 = _shape_of(state, "fc2.weight", model_id, 2)[0]
        classes = _shape_of(state, "fc3.weight", model_id, 2)[0]
        module = archs.DigitsMLP(hidden=(h1, h2))
        module.fc3 = nn.Linear(h2, classes)
    elif name == "cnn":
        c1 = _shape_of(state, "conv1.weight", model_id, 4)[0]
        c2 = _shape_of(state, "conv2.weight", model_id, 4)[0]
        classes = _shape_of(state, "fc.weight", model_id, 2)[0]
        module = archs.DigitsCNN(folded=folded, channels=(c1, c2))
        module.fc = nn.Linear(module.fc.in_features, classes)
    elif name == "resnet":
        classes = _shape_of(state, "fc.weight", model_id, 2)[0]
        module = archs.DigitsResNet(folded=folded)
        module.fc = nn.Linear(module.fc.in_features, classes)
    else:  # gpt
        vocab, d = _shape_of(state, "transformer.wte.weight", model_id, 2)
        ctx = _shape_of(state, "transformer.wpe.weight", model_id, 2)[0]
        layers = len({k.split(".")[2] for k in state if k.startswith("transformer.h.")})
        head = _shape_of(state, "score.weight", model_id, 2)[0] if "score.weight" in state else 0
        heads = int(cfg.get("n_head", 4))
        if vocab != 256 or d % heads:
            raise VerifyError(f"{model_id}: gpt needs a 256-byte vocabulary and width divisible by {heads} heads")
        module = archs.TinyGPT(d=d, layers=layers, heads=heads, ctx=ctx, head=head)
        module = _LastPosition(module)
        classes = head or vocab
        domain = InputDomain("tokens", (min(ctx, PROBE_TOKENS),), vocab=vocab, context=ctx)
        state = {f"inner.{k}": v for k, v in state.items()}
    _load_strict(module, state, model_id)
    return _Built(module, domain, classes, name, notes=("folded BatchNorm",) if folded and name != "mlp" else ())


class _LastPosition(nn.Module):
    """A sequence model's outputs at the last position: the next token's (or the sequence's) logits."""

    def __init__(self, inner: nn.Module) -> None:
        super().__init__()
        self.inner = inner

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.inner(x)[:, -1]


def _load_strict(module: nn.Module, state: StateDict, model_id: str) -> None:
    expected = module.state_dict()
    for key, tensor in state.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise VerifyError(
                f"{model_id}: {key} has shape {_shape(tuple(tensor.shape))}, the architecture needs "
                f"{_shape(tuple(expected[key].shape))}"
            )
    # A BatchNorm's step counter does not change what the model computes; older checkpoints lack it.
    missing = sorted(k for k in set(expected) - set(state) if not k.endswith("num_batches_tracked"))
    unexpected = sorted(set(state) - set(expected))
    if missing or unexpected:
        raise VerifyError(
            f"{model_id}: weights do not fit the architecture"
            + (f"; missing {len(missing)}: {_few(missing)}" if missing else "")
            + (f"; unexpected {len(unexpected)}: {_few(unexpected)}" if unexpected else "")
        )
    module.load_state_dict({k: v.to(expected[k].dtype) for k, v in state.items()}, strict=False)


# ---------------------------------------------------------------------------------- torchvision, timm


def _import(package: str) -> Any:
    import importlib

    try:
        return importlib.import_module(package)
    except ImportError:
        raise VerifyError(f"{package} is not installed: {_EXTRA}") from None
    except Exception as exc:  # a broken install (a wheel built for another torch) raises anything at import
        raise VerifyError(f"{package} does not import here: {_one_line(exc)}") from exc


def _classes_from_head(state: StateDict, module: nn.Module) -> int | None:
    """The number of classes the checkpoint's last linear layer has, when it is in the checkpoint."""
    last = [name for name, m in module.named_modules() if isinstance(m, nn.Linear)]
    if last and f"{last[-1]}.weight" in state:
        return int(state[f"{last[-1]}.weight"].shape[0])
    return None


def _build_vision(
    family: str, make: Callable[..., nn.Module], name: str, state: StateDict, size: tuple[int, ...], model_id: str
) -> _Built:
    state = _strip_wrappers(state)
    try:
        module = make()
        classes = _classes_from_head(state, module)
        if classes is not None:
            module = make(num_classes=classes)
    except VerifyError:
        raise
    except Exception as exc:  # an unknown name, or a constructor failing on its arguments
        raise VerifyError(f"{model_id}: cannot build {family}:{name}: {_one_line(exc)}") from exc
    _load_strict(module, state, model_id)
    n_outputs = int(classes if classes is not None else _probe_outputs(module, size))
    return _Built(module, InputDomain("continuous", size, scale=1.0), n_outputs, f"{family}:{name}")


def _probe_outputs(module: nn.Module, size: tuple[int, ...]) -> int:
    with torch.no_grad():
        return int(module.eval()(torch.zeros(1, *size)).shape[-1])


def _build_torchvision(name: str, state: StateDict, cfg: Mapping[str, Any], model_id: str) -> _Built:
    tv = _import("torchvision")
    size = tuple(int(s) for s in cfg.get("input_size", (3, 224, 224)))

    def make(**kwargs: Any) -> nn.Module:
        return tv.models.get_model(name, weights=None, **kwargs)

    return _build_vision("torchvision", make, name, state, size, model_id)


def _build_timm(name: str, state: StateDict, cfg: Mapping[str, Any], model_id: str) -> _Built:
    timm = _import("timm")
    pretrained_cfg = cfg.get("pretrained_cfg") or {}
    size = tuple(int(s) for s in pretrained_cfg.get("input_size", cfg.get("input_size", (3, 224, 224))))

    def make(**kwargs: Any) -> nn.Module:
        return timm.create_model(name, pretrained=False, **kwargs)

    return _build_vision("timm", make, name, state, size, model_id)


# ------------------------------------------------------------------------------------------ transformers


# The head an `architectures` class name ends with -> what its outputs are.
_HF_HEADS = (
    ("ForSequenceClassification", "sequence"),
    ("ForImageClassification", "image"),
    ("ForCausalLM", "causal"),
    ("LMHeadModel", "causal"),
    ("ForMaskedLM", "masked"),
)


class _HFOutputs(nn.Module):
    """A transformers model as inputs -> one vector per input."""

    def __init__(self, model: nn.Module, head: str) -> None:
        super().__init__()
        self.model = model
        self.head = head

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.head == "image":
            return self.model(pixel_values=x).logits
        out = self.model(input_ids=x)
        if self.head == "sequence":
            return out.logits
        if self.head in ("causal", "masked"):
            return out.logits[:, -1]
        return out.last_hidden_state.mean(dim=1)


def _build_hf(model_type: str, state: StateDict, cfg: Mapping[str, Any], model_id: str) -> _Built:
    transformers = _import("transformers")
    from transformers import CONFIG_MAPPING, PreTrainedModel

    if model_type not in CONFIG_MAPPING:
        raise VerifyError(
            f"{model_id}: model_type {model_type!r} is neither a zoo architecture nor one transformers knows "
            "(custom code is never run)"
        )
    clean = {k: v for k, v in cfg.items() if k not in ("auto_map", "trust_remote_code", "model_type")}
    try:
        config = CONFIG_MAPPING[model_type].from_dict(clean)
    except Exception as exc:
        raise VerifyError(f"{model_id}: invalid {model_type} config: {_one_line(exc)}") from exc
    names = [a for a in cfg.get("architectures") or () if isinstance(a, str)]
    cls, head = None, "embedding"
    for candidate in names:
        found = getattr(transformers, candidate, None) if _IDENTIFIER.fullmatch(candidate) else None
        if isinstance(found, type) and issubclass(found, PreTrainedModel):
            cls = found
            head = next((h for suffix, h in _HF_HEADS if candidate.endswith(suffix)), "embedding")
            break
    try:
        if cls is None:
            model = transformers.AutoModel.from_config(config, trust_remote_code=False)
        else:
            model = cls(config)
    except Exception as exc:
        raise VerifyError(f"{model_id}: cannot build {names[0] if names else model_type}: {_one_line(exc)}") from exc
    notes = _load_hf_state(model, state, model_id)
    if head == "image":
        size = (int(getattr(config, "num_channels", 3)), int(config.image_size), int(config.image_size))
        domain = InputDomain("continuous", size, scale=1.0)
    else:
        vocab = int(getattr(config, "vocab_size", 0) or 0)
        ctx = int(next((getattr(config, k) for k in ("max_position_embeddings", "n_positions", "n_ctx")
                        if isinstance(getattr(config, k, None), int)), PROBE_TOKENS))
        if vocab <= 0:
            raise VerifyError(f"{model_id}: config has no vocab_size; cannot feed it tokens")
        domain = InputDomain("tokens", (min(ctx, PROBE_TOKENS),), vocab=vocab, context=ctx)
    wrapped = _HFOutputs(model, head)
    with torch.no_grad():
        probe = torch.zeros(1, *domain.shape, dtype=torch.float32 if head == "image" else torch.long)
        try:
            n_outputs = int(wrapped.eval()(probe).shape[-1])
        except Exception as exc:
            raise VerifyError(f"{model_id}: fails to run: {_one_line(exc)}") from exc
    outputs: Literal["labels", "embedding"] = "embedding" if head == "embedding" else "labels"
    return _Built(wrapped, domain, n_outputs, f"hf:{type(model).__name__}", outputs=outputs, notes=notes)


def _load_hf_state(model: nn.Module, state: StateDict, model_id: str) -> tuple[str, ...]:
    """Load `state` into a transformers model, matching key prefixes; missing weights are an error.

    A weight tied to a loaded one (an LM head tied to the embedding) is not missing; unexpected keys
    (a pooler the class does not use) are noted.
    """
    expected = model.state_dict()
    base = getattr(model, "base_model_prefix", "") or ""
    transforms: list[Callable[[str], str]] = [lambda k: k]
    for prefix in (*_WRAPPER_PREFIXES, "module.model.", f"{base}." if base else None):
        if prefix:
            transforms.append(lambda k, p=prefix: k.removeprefix(p))
    if base:
        transforms.append(lambda k, p=base: f"{p}.{k}")
    best = max(transforms, key=lambda t: len({t(k) for k in state} & set(expected)))
    mapped = {best(k): v for k, v in state.items()}
    if not set(mapped) & set(expected):
        raise VerifyError(f"{model_id}: no checkpoint tensor matches the architecture's names ({_few(state)})")
    for key, tensor in mapped.items():
        if key in expected and expected[key].shape != tensor.shape:
            raise VerifyError(
                f"{model_id}: {key} has shape {_shape(tuple(tensor.shape))}, the config needs "
                f"{_shape(tuple(expected[key].shape))}"
            )
    params = dict(model.named_parameters(remove_duplicate=False))
    loaded = {id(params[k]) for k in mapped if k in params}
    missing = [
        k for k in expected
        if k not in mapped and not (k in params and id(params[k]) in loaded) and not k.endswith("num_batches_tracked")
    ]
    if missing:
        raise VerifyError(
            f"{model_id}: checkpoint lacks {len(missing)} tensors the architecture needs: {_few(missing)}"
        )
    unexpected = sorted(set(mapped) - set(expected))
    model.load_state_dict({k: v.to(expected[k].dtype) for k, v in mapped.items() if k in expected}, strict=False)
    return (f"ignored {len(unexpected)} unexpected tensors: {_few(unexpected)}",) if unexpected else ()


_BUILDERS: dict[str, Callable[[str, StateDict, Mapping[str, Any], str], _Built]] = {
    "zoo": _build_zoo,
    "torchvision": _build_torchvision,
    "timm": _build_timm,
    "hf": _build_hf,
}


# ------------------------------------------------------------------------------------------- helpers


def _shape(shape: tuple[int, ...]) -> str:
    return "(" + ", ".join(str(s) for s in shape) + ")"


def _few(names: Any, limit: int = 4) -> str:
    names = sorted(names)
    return ", ".join(names[:limit]) + (f" and {len(names) - limit} more" if len(names) > limit else "")


def _one_line(exc: BaseException, limit: int = 300) -> str:
    text = " ".join(str(exc).split()) or type(exc).__name__
    return text if len(text) <= limit else text[: limit - 3] + "..."
