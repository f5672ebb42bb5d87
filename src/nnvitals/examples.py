"""Built-in example models for `nnvitals check --example NAME`: the lesson's failures and their fixes.

Each example returns (model, inputs, targets): the lab's network of that stage, with its weights drawn
as in the lesson, and a batch of 32 three-character contexts over the 27-symbol vocabulary ('.' plus
a-z), drawn from a fixed seed, with the next character as target.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from nnvitals.lab import models

VOCAB, CONTEXT, BATCH = 27, 3, 32


def batch() -> tuple[torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(42)
    return torch.randint(0, VOCAB, (BATCH, CONTEXT), generator=g), torch.randint(0, VOCAB, (BATCH,), generator=g)


def stage(name: str) -> Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]:
    def make() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
        return (models.build(name, VOCAB, torch.Generator().manual_seed(models.LESSON_SEED)), *batch())
    return make


def deep_tanh_unscaled() -> tuple[nn.Module, torch.Tensor, torch.Tensor]:
    """Six tanh layers of 100 with unit-normal weights and no normalisation: saturation through depth."""
    torch.manual_seed(models.LESSON_SEED)
    sizes = [models.N_EMBD * CONTEXT] + [models.DEEP_HIDDEN] * (models.DEEP_LAYERS - 1) + [VOCAB]
    layers: list[nn.Module] = [nn.Embedding(VOCAB, models.N_EMBD), nn.Flatten()]
    for fan_in, fan_out in zip(sizes, sizes[1:], strict=False):
        linear = nn.Linear(fan_in, fan_out, bias=False)
        nn.init.normal_(linear.weight)
        layers += [linear, nn.Tanh()]
    last = layers.pop()  # no tanh after the output layer
    assert isinstance(last, nn.Tanh)
    with torch.no_grad():  # a calm start for the output layer, so saturation is the story
        layers[-1].weight.mul_(0.1)  # type: ignore[operator]
    return (nn.Sequential(*layers), *batch())


EXAMPLES: dict[str, Callable[[], tuple[nn.Module, torch.Tensor, torch.Tensor]]] = {
    "makemore-naive": stage("naive"),  # every weight unit normal: over-confident and saturated
    "makemore-fixed": stage("fix-tanh"),  # output x0.01 (bias 0), hidden x0.2 (bias x0.01)
    "deep-tanh-unscaled": deep_tanh_unscaled,
    "deep-tanh-batchnorm": stage("deep"),  # weights 1/sqrt(fan_in), BatchNorm before every tanh: healthy
}
