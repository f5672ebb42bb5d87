"""Built-in example models for `nnvitals check --example NAME`: the lesson's failures and their fixes.

Each example returns (model, inputs, targets): a batch of 32 three-character contexts over a 27-symbol
vocabulary ('.' plus a-z), drawn from a fixed seed, with the next character as target.
"""

from __future__ import annotations

import math
from collections.abc import Callable

import torch
from torch import nn

VOCAB, CONTEXT, EMBED, HIDDEN, BATCH = 27, 3, 10, 200, 32
SEED = 2147483647


class OneHiddenLayer(nn.Module):
    """The lesson's character MLP: embed 3 characters, one tanh layer of 200 units, 27 logits."""

    def __init__(self, w1_scale: float = 1.0, b1_scale: float = 1.0, w2_scale: float = 1.0, b2_scale: float = 1.0):
        super().__init__()
        g = torch.Generator().manual_seed(SEED)
        self.C = nn.Parameter(torch.randn(VOCAB, EMBED, generator=g))
        self.W1 = nn.Parameter(torch.randn(EMBED * CONTEXT, HIDDEN, generator=g) * w1_scale)
        self.b1 = nn.Parameter(torch.randn(HIDDEN, generator=g) * b1_scale)
        self.W2 = nn.Parameter(torch.randn(HIDDEN, VOCAB, generator=g) * w2_scale)
        self.b2 = nn.Parameter(torch.randn(VOCAB, generator=g) * b2_scale)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.tanh(self.C[x].flatten(1) @ self.W1 + self.b1)
        return h @ self.W2 + self.b2


def deep_tanh(scaled: bool, batchnorm: bool, depth: int = 6, width: int = 100) -> nn.Sequential:
    """Embedding, `depth` bias-free Linear layers with tanh between them; optionally BatchNorm before each tanh."""
    torch.manual_seed(SEED)
    sizes = [EMBED * CONTEXT] + [width] * (depth - 1) + [VOCAB]
    layers: list[nn.Module] = [nn.Embedding(VOCAB, EMBED), nn.Flatten()]
    for i, (fan_in, fan_out) in enumerate(zip(sizes, sizes[1:], strict=False)):
        linear = nn.Linear(fan_in, fan_out, bias=False)
        nn.init.normal_(linear.weight, std=(5 / 3) / math.sqrt(fan_in) if scaled else 1.0)
        layers.append(linear)
        last = i == depth - 1
        if batchnorm:
            layers.append(nn.BatchNorm1d(fan_out))
        if not last:
            layers.append(nn.Tanh())
    last_weight = layers[-1].weight
    assert isinstance(last_weight, torch.Tensor)
    with torch.no_grad():  # a calm start: the last layer (BatchNorm gain or Linear weight) x0.1
        last_weight.mul_(0.1)
    return nn.Sequential(*layers)


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=g), torch.randint(0, VOCAB, (BATCH,), generator=g)


def makemore_naive() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The lesson's one-hidden-layer network with every weight unit normal: over-confident and saturated."""
    return (OneHiddenLayer(), *batch())


def makemore_fixed() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The same network with the lesson's fixes: output layer x0.01 (bias 0), hidden layer x0.2 (bias x0.01)."""
    return (OneHiddenLayer(w1_scale=0.2, b1_scale=0.01, w2_scale=0.01, b2_scale=0.0), *batch())


def deep_tanh_unscaled() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Six tanh layers of 100 with unit-normal weights and no normalisation: saturation through depth."""
    return (deep_tanh(scaled=False, batchnorm=False), *batch())


def deep_tanh_batchnorm() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """The lesson's deep network: weights gain/sqrt(fan_in), BatchNorm before every tanh. Healthy."""
    return (deep_tanh(scaled=True, batchnorm=True), *batch())


EXAMPLES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]] = {
    "makemore-naive": makemore_naive,
    "makemore-fixed": makemore_fixed,
    "deep-tanh-unscaled": deep_tanh_unscaled,
    "deep-tanh-batchnorm": deep_tanh_batchnorm,
}
