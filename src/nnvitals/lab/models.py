"""The networks of the lesson, one per stage, as modules the doctor can watch.

Stages naive to batchnorm are the same one-hidden-layer network (embedding, 200 tanh units, softmax
over the vocabulary) whose only difference is how its weights start; `deep` is six layers with
torch.nn.BatchNorm1d. All weights are drawn from one generator in the lesson's order (embedding, first
layer, its bias, output layer, its bias), so the same seed gives the same network as the notebook,
and that same generator then draws the minibatches.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnvitals import numbers

N_EMBD = 10
N_HIDDEN = 200  # the one-hidden-layer network
DEEP_HIDDEN = 100
DEEP_LAYERS = 6
LESSON_SEED = 2147483647


@dataclass(frozen=True)
class Stage:
    name: str
    title: str  # what changes, for people
    batchnorm: bool


STAGES: tuple[Stage, ...] = (
    Stage("naive", "all weights unit normal, as drawn", False),
    Stage("fix-softmax", "output layer scaled by 0.01, its bias zero: logits start near zero", False),
    Stage("fix-tanh", "also first layer x0.2 and its bias x0.01: tanh starts out of saturation", False),
    Stage("kaiming", "first layer x (5/3)/sqrt(fan-in) instead of x0.2: the tanh gain, not a guess", False),
    Stage("batchnorm", "kaiming, with a BatchNorm on the hidden pre-activation (and no first bias)", True),
    Stage("deep", "six linear layers, each followed by BatchNorm1d (and tanh, but the last)", True),
)
STAGE_NAMES = tuple(s.name for s in STAGES)


def stage(name: str) -> Stage:
    for s in STAGES:
        if s.name == name:
            return s
    raise ValueError(f"unknown stage {name!r}; the stages are {', '.join(STAGE_NAMES)}")


def standardize(x: torch.Tensor, correction: int, eps: float) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """xhat = (x - mean) / std over the batch (dim 0), std = sqrt(sum((x - mean)^2) / (n - correction) + eps);
    returns xhat and the batch's mean and std."""
    mean = x.mean(0)
    centred = x - mean
    var = centred.square().sum(0) / (x.shape[0] - correction)
    std = (var + eps).sqrt() if eps else var.sqrt()
    return centred / std, mean, std


def standardize_backward(g: torch.Tensor, xhat: torch.Tensor, std: torch.Tensor, dof: int) -> torch.Tensor:
    """dL/dx from g = dL/dxhat, derived once by hand (as in the lesson's backprop exercise) instead of
    through the eight small ops of the forward: (g - mean(g) - xhat * sum(g * xhat) / dof) / std."""
    return (g - g.mean(0) - xhat * ((g * xhat).sum(0) / dof)) / std


class _Standardize(torch.autograd.Function):
    """`standardize` with `standardize_backward` as its gradient (one autograd node, not eight). The
    batch mean and std come out too, for the running estimates (no gradient flows through them)."""

    @staticmethod
    def forward(ctx: Any, x: torch.Tensor, correction: int, eps: float) -> tuple[torch.Tensor, ...]:
        xhat, mean, std = standardize(x, correction, eps)
        ctx.save_for_backward(xhat, std)
        ctx.dof = x.shape[0] - correction
        ctx.mark_non_differentiable(mean, std)
        return xhat, mean, std

    @staticmethod
    def backward(ctx: Any, *grads: torch.Tensor) -> tuple[torch.Tensor | None, ...]:
        xhat, std = ctx.saved_tensors
        return standardize_backward(grads[0], xhat, std, ctx.dof), None, None


class BatchNorm(nn.Module):
    """BatchNorm written out, as in the lesson: y = gain * (x - mean) / std + bias over the batch.

    Training mode normalises with the batch's own mean and std and nudges running estimates towards
    them (running = (1 - momentum) * running + momentum * batch; the lesson uses momentum 0.001);
    evaluation mode uses the running estimates, so an example's output no longer depends on its batch.
    The lesson divides by the sample std (unbiased, no epsilon). With `unbiased=False` and an `eps`,
    std = sqrt(biased variance + eps), which is what torch.nn.BatchNorm1d divides by.
    `momentum=None` keeps a cumulative average instead, so one pass over a whole split in training
    mode leaves that split's exact statistics in the buffers (calibration).
    """

    running_mean: torch.Tensor
    running_std: torch.Tensor
    batches_seen: torch.Tensor

    def __init__(self, dim: int, momentum: float | None = 0.001, eps: float = 0.0, unbiased: bool = True):
        super().__init__()
        self.gain = nn.Parameter(torch.ones(dim))
        self.bias = nn.Parameter(torch.zeros(dim))
        self.register_buffer("running_mean", torch.zeros(dim))
        self.register_buffer("running_std", torch.ones(dim))
        self.register_buffer("batches_seen", torch.zeros((), dtype=torch.long))
        self.momentum = momentum
        self.eps = eps
        self.unbiased = unbiased

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if not self.training:
            return torch.addcmul(self.bias, x - self.running_mean, self.gain / self.running_std)
        xhat, mean, std = _Standardize.apply(x, self.correction, self.eps)
        self.track(mean, std)
        return torch.addcmul(self.bias, xhat, self.gain)

    @property
    def correction(self) -> int:
        return 1 if self.unbiased else 0

    @torch.no_grad()
    def track(self, mean: torch.Tensor, std: torch.Tensor) -> None:
        """Move the running estimates towards a training batch's mean and std."""
        if self.momentum is None:
            self.batches_seen += 1
            weight = 1.0 / float(self.batches_seen)
        else:
            weight = self.momentum
        self.running_mean.lerp_(mean, weight)
        self.running_std.lerp_(std, weight)

    def reset_running_stats(self) -> None:
        self.running_mean.zero_()
        self.running_std.fill_(1.0)
        self.batches_seen.zero_()

    def extra_repr(self) -> str:
        return f"{self.gain.shape[0]}, momentum={self.momentum}, eps={self.eps}, unbiased={self.unbiased}"


class MLP(nn.Module):
    """Embedding C, one hidden tanh layer (W1, b1 or a BatchNorm), output layer (W2, b2)."""

    def __init__(self, C: torch.Tensor, W1: torch.Tensor, b1: torch.Tensor | None, W2: torch.Tensor,
                 b2: torch.Tensor, batchnorm: bool):
        super().__init__()
        self.C = nn.Parameter(C)
        self.W1 = nn.Parameter(W1)
        self.b1 = nn.Parameter(b1) if b1 is not None else None
        self.bn = BatchNorm(W1.shape[1]) if batchnorm else None
        self.W2 = nn.Parameter(W2)
        self.b2 = nn.Parameter(b2)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        emb = self.C[x].flatten(1)  # (batch, block_size * n_embd)
        if self.bn is not None:
            hpre = self.bn(emb @ self.W1)  # BatchNorm's bias takes the place of b1
        else:
            assert self.b1 is not None
            hpre = torch.addmm(self.b1, emb, self.W1)
        h = torch.tanh(hpre)
        return torch.addmm(self.b2, h, self.W2)

    @torch.no_grad()
    def sgd_step(self, x: torch.Tensor, y: torch.Tensor, lr: float) -> torch.Tensor:
        """One training step (cross-entropy, plain SGD) with the backward pass written out; returns the loss.

        Each gradient is computed by the very op autograd would run for `forward` (the same aten
        backward functions, the same matrix products), so the weights come out bit for bit as with
        `loss.backward()` and `p -= lr * p.grad` (tested). What it saves is recording a graph and walking
        it: for a network this small that bookkeeping costs about as much as the arithmetic.
        """
        n = x.shape[0]
        emb = self.C[x].flatten(1)
        if self.bn is not None:
            lin = emb @ self.W1
            xhat, mean, std = standardize(lin, self.bn.correction, self.bn.eps)
            self.bn.track(mean, std)
            hpre = torch.addcmul(self.bn.bias, xhat, self.bn.gain)
        else:
            assert self.b1 is not None
            hpre = torch.addmm(self.b1, emb, self.W1)
        h = torch.tanh(hpre)
        logp = F.log_softmax(torch.addmm(self.b2, h, self.W2), 1)
        aten = torch.ops.aten
        loss, total = aten.nll_loss_forward(logp, y, None, 1, -100)  # 1: mean reduction
        dlogp = aten.nll_loss_backward(torch.ones_like(loss), logp, y, None, 1, -100, total)
        dlogits = aten._log_softmax_backward_data(dlogp, logp, 1, logp.dtype)
        dW2, db2 = h.t().mm(dlogits), dlogits.sum(0)
        dhpre = aten.tanh_backward(dlogits.mm(self.W2.t()), h)
        params: list[torch.Tensor]
        if self.bn is not None:
            dlin = standardize_backward(dhpre * self.bn.gain, xhat, std, n - self.bn.correction)
            params, grads = [self.bn.gain, self.bn.bias], [(dhpre * xhat).sum(0), dhpre.sum(0)]
        else:
            assert self.b1 is not None
            dlin = dhpre
            params, grads = [self.b1], [dhpre.sum(0)]
        dW1, demb = emb.t().mm(dlin), dlin.mm(self.W1.t())
        dC = torch.zeros_like(self.C).index_put_((x,), demb.view(*x.shape, -1), accumulate=True)
        params += [self.C, self.W1, self.W2, self.b2]
        grads += [dC, dW1, dW2, db2]
        torch._foreach_add_(params, grads, alpha=-lr)
        return loss


class DeepMLP(nn.Module):
    """Embedding, then Linear -> BatchNorm1d -> Tanh five times, then Linear -> BatchNorm1d."""

    def __init__(self, embedding: nn.Embedding, layers: list[nn.Module]):
        super().__init__()
        self.embedding = embedding
        self.layers = nn.Sequential(*layers)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layers(self.embedding(x).flatten(1))


def build(name: str, vocab_size: int, generator: torch.Generator, block_size: int = 3) -> nn.Module:
    """The network of a stage, its weights drawn from `generator` in the lesson's order and scaled."""
    st = stage(name)
    g = generator
    fan_in = N_EMBD * block_size
    if name == "deep":
        return _build_deep(vocab_size, g, block_size)
    C = torch.randn((vocab_size, N_EMBD), generator=g)
    W1 = torch.randn((fan_in, N_HIDDEN), generator=g)
    b1 = torch.randn(N_HIDDEN, generator=g)  # drawn even when BatchNorm replaces it, to keep the order
    W2 = torch.randn((N_HIDDEN, vocab_size), generator=g)
    b2 = torch.randn(vocab_size, generator=g)
    if name != "naive":
        W2 = W2 * 0.01  # near-zero logits: the first prediction is close to uniform
        b2 = b2 * 0
    if name == "fix-tanh":
        W1 = W1 * 0.2  # the lesson's hand-picked factor
        b1 = b1 * 0.01
    elif name in ("kaiming", "batchnorm"):
        W1 = W1 * numbers.fan_in_scale(fan_in, "tanh")
        b1 = b1 * 0.01
    return MLP(C, W1, None if st.batchnorm else b1, W2, b2, batchnorm=st.batchnorm)


def _build_deep(vocab_size: int, g: torch.Generator, block_size: int) -> DeepMLP:
    embedding = nn.Embedding(vocab_size, N_EMBD)
    with torch.no_grad():
        embedding.weight.copy_(torch.randn((vocab_size, N_EMBD), generator=g))
    sizes = [N_EMBD * block_size] + [DEEP_HIDDEN] * (DEEP_LAYERS - 1) + [vocab_size]
    layers: list[nn.Module] = []
    for i, (fan_in, fan_out) in enumerate(zip(sizes[:-1], sizes[1:], strict=True)):
        linear = nn.Linear(fan_in, fan_out, bias=False)  # BatchNorm's bias makes a linear bias redundant
        with torch.no_grad():
            # Drawn as (fan_in, fan_out) like the lesson, stored transposed as nn.Linear wants.
            linear.weight.copy_(torch.randn((fan_in, fan_out), generator=g).T / math.sqrt(fan_in))
        layers += [linear, nn.BatchNorm1d(fan_out)]
        if i < DEEP_LAYERS - 1:
            layers.append(nn.Tanh())
    last_norm = layers[-1]
    assert isinstance(last_norm, nn.BatchNorm1d)
    with torch.no_grad():
        last_norm.weight.mul_(0.1)  # a less confident start
    return DeepMLP(embedding, layers)


def norms(model: nn.Module) -> list[BatchNorm | nn.BatchNorm1d]:
    """The BatchNorm layers of a model, hand-written or torch's."""
    return [m for m in model.modules() if isinstance(m, BatchNorm | nn.BatchNorm1d)]


def calibrate(model: nn.Module, X: torch.Tensor) -> None:
    """Replace every BatchNorm's running statistics by those of the whole of X, in one pass.

    Each layer is set to a cumulative average and sees X as a single batch in training mode, so its
    buffers end up holding exactly the mean and spread of its own input over X, computed with the layers
    before it already normalised by theirs. Parameters are not touched; the model is left in eval mode.
    """
    saved = []
    for m in norms(model):
        saved.append(m.momentum)
        m.reset_running_stats()
        m.momentum = None
    model.train()
    with torch.no_grad():
        model(X)
    for m, momentum in zip(norms(model), saved, strict=True):
        m.momentum = momentum
    model.eval()


def count_parameters(model: nn.Module) -> int:
    return sum(p.numel() for p in model.parameters())


@torch.no_grad()
def sample(model: nn.Module, vocab_size: int, generator: torch.Generator, count: int = 20,
           block_size: int = 3, max_length: int = 50) -> list[list[int]]:
    """Draw `count` words symbol by symbol in eval mode until the end marker; returns symbol indices."""
    was_training = model.training
    model.eval()
    words = []
    for _ in range(count):
        context = [0] * block_size
        out: list[int] = []
        while len(out) < max_length:
            logits = model(torch.tensor([context]))
            ix = int(torch.multinomial(F.softmax(logits, dim=1), 1, generator=generator).item())
            if ix == 0:
                break
            out.append(ix)
            context = [*context[1:], ix]
        words.append(out)
    model.train(was_training)
    return words
