"""Purpose-built models: one per finding code, and the healthy ones that must raise no warning."""

import math

import torch
from torch import nn


def batch(n=32, vocab=27, context=3, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(0, vocab, (n, context), generator=g), torch.randint(0, vocab, (n,), generator=g)


def features(n=32, dim=20, classes=10, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(n, dim, generator=g), torch.randint(0, classes, (n,), generator=g)


def mlp(widths, act=nn.Tanh, weight_std=None, bias=True, norm=False, classes=10):
    """Linear layers of the given widths with `act` between them (and BatchNorm before it if norm)."""
    torch.manual_seed(0)
    layers = []
    for i, (a, b) in enumerate(zip(widths, [*widths[1:], classes], strict=False)):
        lin = nn.Linear(a, b, bias=bias)
        if weight_std is not None:
            nn.init.normal_(lin.weight, std=weight_std(a))
        layers.append(lin)
        if i < len(widths) - 1:
            if norm:
                layers.append(nn.BatchNorm1d(b))
            layers.append(act())
    return nn.Sequential(*layers)


def healthy_cnn():
    torch.manual_seed(0)
    model = nn.Sequential(
        nn.Conv2d(3, 16, 3, padding=1, bias=False), nn.BatchNorm2d(16), nn.ReLU(),
        nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(), nn.MaxPool2d(2),
        nn.Conv2d(32, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32), nn.ReLU(),
        nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(32, 10),
    )
    g = torch.Generator().manual_seed(1)
    return model, torch.randn(32, 3, 16, 16, generator=g), torch.randint(0, 10, (32,), generator=g)


class TransformerClassifier(nn.Module):
    def __init__(self, vocab=50, width=64, classes=5):
        super().__init__()
        torch.manual_seed(0)
        self.embed = nn.Embedding(vocab, width)
        layer = nn.TransformerEncoderLayer(width, nhead=4, dim_feedforward=128, dropout=0.1, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, num_layers=2, enable_nested_tensor=False)
        self.head = nn.Linear(width, classes)

    def forward(self, tokens):
        return self.head(self.encoder(self.embed(tokens)).mean(1))


def healthy_transformer():
    g = torch.Generator().manual_seed(1)
    return TransformerClassifier(), torch.randint(0, 50, (32, 16), generator=g), torch.randint(0, 5, (32,), generator=g)


def healthy_deep_tanh():
    from nnvitals.examples import EXAMPLES

    return EXAMPLES["deep-tanh-batchnorm"]()


class FunctionalTanh(nn.Module):
    """Activations applied as functions inside forward, the lesson's way."""

    def __init__(self, w_std=1.0):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(20, 50)
        self.fc2 = nn.Linear(50, 10)
        nn.init.normal_(self.fc1.weight, std=w_std)

    def forward(self, x):
        return self.fc2(torch.tanh(self.fc1(x)))


class DeadUnits(nn.Module):
    """Units 0-4 of a tanh layer pinned at +1 and units 0-2 of a ReLU layer pinned at 0, for every example."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc1 = nn.Linear(20, 30)
        self.act1 = nn.Tanh()
        self.fc2 = nn.Linear(30, 30)
        self.act2 = nn.ReLU()
        self.out = nn.Linear(30, 10)
        with torch.no_grad():
            self.fc1.bias[:5] = 20.0
            self.fc2.bias[:3] = -100.0
            self.fc2.bias[3:] = 1.0  # the others stay active on most examples

    def forward(self, x):
        return self.out(self.act2(self.fc2(self.act1(self.fc1(x)))))


class LeakyTarget(nn.Module):
    """Sees the answer: its input carries the target in column 0."""

    def __init__(self, classes=10):
        super().__init__()
        self.scale = nn.Parameter(torch.tensor(20.0))
        self.classes = classes

    def forward(self, x):
        return nn.functional.one_hot(x[:, 0], self.classes).float() * self.scale


class Log(nn.Module):
    def forward(self, x):
        return torch.log(x)




def nan_forward_model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(20, 20), nn.Tanh(), Log(), nn.Linear(20, 10))


class ZeroThenSqrt(nn.Module):
    """Finite forward, infinite gradient: sqrt at exactly zero."""

    def __init__(self):
        super().__init__()
        torch.manual_seed(0)
        self.fc = nn.Linear(20, 10)
        self.gate = nn.Linear(20, 10)

    def forward(self, x):
        return self.fc(x) + torch.sqrt(self.gate(x) * 0)


def kaiming_std(fan_in):
    return (5 / 3) / math.sqrt(fan_in)
