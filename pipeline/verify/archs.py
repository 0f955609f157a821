"""Small reference architectures that `verify` can run: the benchmark zoo's and the demo's models.

A checkpoint names its architecture in `config.json` (`model_type`); these are the ones whose code lives
here rather than in torchvision, timm or transformers. Key names follow torchvision (ResNet) and Hugging
Face GPT-2 (`transformer.h.N.attn.c_attn`, transposed `Conv1D`), so the hashing specs see the layouts the
hub holds. `folded` variants carry BatchNorm folded into the convolutions (conv bias, no BN).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["ARCHITECTURES", "Conv1D", "DigitsCNN", "DigitsMLP", "DigitsResNet", "TinyGPT"]


class DigitsMLP(nn.Module):
    """64 -> 256 -> 128 -> 10 with ReLU: ~51k weights, enough for a 256-segment hash."""

    def __init__(self, hidden: tuple[int, int] = (256, 128)) -> None:
        super().__init__()
        self.fc1 = nn.Linear(64, hidden[0])
        self.fc2 = nn.Linear(hidden[0], hidden[1])
        self.fc3 = nn.Linear(hidden[1], 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc3(F.relu(self.fc2(F.relu(self.fc1(x)))))


class DigitsCNN(nn.Module):
    """conv 1->32, BN, ReLU, conv 32->96, BN, ReLU, 2x2 max-pool, linear -> 10: ~44k weights.

    Convolutions carry no bias, as usual before BatchNorm; `folded`: BN folded into the convs. Takes the
    same flat (N, 64) rows as the MLP, so one input set probes both.
    """

    def __init__(self, folded: bool = False, channels: tuple[int, int] = (32, 96)) -> None:
        super().__init__()
        c1, c2 = channels
        self.conv1 = nn.Conv2d(1, c1, 3, padding=1, bias=folded)
        self.bn1 = nn.Identity() if folded else nn.BatchNorm2d(c1)
        self.conv2 = nn.Conv2d(c1, c2, 3, padding=1, bias=folded)
        self.bn2 = nn.Identity() if folded else nn.BatchNorm2d(c2)
        self.fc = nn.Linear(c2 * 4 * 4, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x.reshape(-1, 1, 8, 8)
        x = F.relu(self.bn1(self.conv1(x)))
        x = F.relu(self.bn2(self.conv2(x)))
        return self.fc(F.max_pool2d(x, 2).flatten(1))


class _Block(nn.Module):
    def __init__(self, cin: int, cout: int, stride: int, folded: bool) -> None:
        super().__init__()
        bn = (lambda c: nn.Identity()) if folded else nn.BatchNorm2d
        self.conv1 = nn.Conv2d(cin, cout, 3, stride, 1, bias=folded)
        self.bn1 = bn(cout)
        self.conv2 = nn.Conv2d(cout, cout, 3, 1, 1, bias=folded)
        self.bn2 = bn(cout)
        self.downsample = (
            nn.Sequential(nn.Conv2d(cin, cout, 1, stride, bias=folded), bn(cout)) if stride != 1 or cin != cout
            else None
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        return F.relu(out + (self.downsample(x) if self.downsample is not None else x))


class DigitsResNet(nn.Module):
    """A small ResNet (torchvision names): stem 16, two blocks of 16, two of 32 (stride 2), fc -> 10."""

    def __init__(self, folded: bool = False) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(1, 16, 3, padding=1, bias=folded)
        self.bn1 = nn.Identity() if folded else nn.BatchNorm2d(16)
        self.layer1 = nn.Sequential(_Block(16, 16, 1, folded), _Block(16, 16, 1, folded))
        self.layer2 = nn.Sequential(_Block(16, 32, 2, folded), _Block(32, 32, 1, folded))
        self.fc = nn.Linear(32, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x.reshape(-1, 1, 8, 8))))
        x = self.layer2(self.layer1(x))
        return self.fc(x.mean(dim=(2, 3)))


class Conv1D(nn.Module):
    """GPT-2's linear layer: weight (in, out), y = x @ W + b."""

    def __init__(self, nin: int, nout: int) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.randn(nin, nout) * 0.02)
        self.bias = nn.Parameter(torch.zeros(nout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x @ self.weight + self.bias


class _GPTBlock(nn.Module):
    def __init__(self, d: int, heads: int) -> None:
        super().__init__()
        self.heads = heads
        self.ln_1 = nn.LayerNorm(d)
        self.attn = nn.Module()
        self.attn.c_attn = Conv1D(d, 3 * d)
        self.attn.c_proj = Conv1D(d, d)
        self.ln_2 = nn.LayerNorm(d)
        self.mlp = nn.Module()
        self.mlp.c_fc = Conv1D(d, 4 * d)
        self.mlp.c_proj = Conv1D(4 * d, d)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        b, t, d = x.shape
        q, k, v = self.attn.c_attn(self.ln_1(x)).split(d, dim=2)
        q, k, v = (z.view(b, t, self.heads, d // self.heads).transpose(1, 2) for z in (q, k, v))
        y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        x = x + self.attn.c_proj(y.transpose(1, 2).reshape(b, t, d))
        return x + self.mlp.c_proj(F.gelu(self.mlp.c_fc(self.ln_2(x))))


class TinyGPT(nn.Module):
    """GPT-2 layout (`transformer.wte`, `h.N.attn.c_attn` ...), byte vocabulary, head tied to `wte`.

    `head`: size of a new classification head (`score`, as HF's GPT2ForSequenceClassification) replacing
    the language-model head; 0 keeps the tied head.
    """

    def __init__(self, d: int = 64, layers: int = 2, heads: int = 4, ctx: int = 64, head: int = 0) -> None:
        super().__init__()
        self.transformer = nn.Module()
        self.transformer.wte = nn.Embedding(256, d)
        self.transformer.wpe = nn.Embedding(ctx, d)
        self.transformer.h = nn.ModuleList([_GPTBlock(d, heads) for _ in range(layers)])
        self.transformer.ln_f = nn.LayerNorm(d)
        nn.init.normal_(self.transformer.wte.weight, std=0.02)
        nn.init.normal_(self.transformer.wpe.weight, std=0.01)
        self.score = nn.Linear(d, head, bias=False) if head else None

    def forward(self, idx: torch.Tensor) -> torch.Tensor:
        tr = self.transformer
        x = tr.wte(idx) + tr.wpe(torch.arange(idx.shape[1], device=idx.device))
        for block in tr.h:
            x = block(x)
        x = tr.ln_f(x)
        return self.score(x) if self.score is not None else x @ tr.wte.weight.T


# model_type (config.json) -> the class; the zoo writes these names.
ARCHITECTURES: dict[str, type[nn.Module]] = {
    "mlp": DigitsMLP, "cnn": DigitsCNN, "resnet": DigitsResNet, "gpt": TinyGPT,
}
