"""The arithmetic of the lesson, in plain Python (no torch).

Every number the doctor, the lab and the study material show about a starting loss, a tanh unit or an
initial weight scale is computed here, so they always agree.
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass
from typing import Literal

# A start-loss verdict is "healthy" inside this band around the uniform baseline ln(V).
# Logits of small spread s cost about s^2/2 nats above ln(V) (second-order expansion of the
# log-sum-exp), so an excess of 0.5 nats corresponds to a logit spread of about 1: beyond it the
# softmax is already confidently guessing before any training. The lesson's fixed networks start
# 0.02-0.03 above the baseline, its naive one 24.6 above.
START_LOSS_HIGH_MARGIN = 0.5
# Random weights cannot know which class is right, so a loss clearly *below* ln(V) at the start means
# the model is told the answer (a target leaking into the input), the loss is reduced wrongly, or the
# class count is not what you think. Batch noise near the baseline is a few hundredths of a nat.
START_LOSS_LOW_MARGIN = 0.25

# A tanh output beyond +-0.97 counts as saturated (the lesson's cut; 1 - 0.97^2 = 0.059, so such a unit
# passes back under 6% of its gradient). A unit beyond +-0.99 on every example of a batch is dead.
SATURATION_CUT = 0.97
DEAD_CUT = 0.99

Status = Literal["healthy", "too-high", "too-low"]


def baseline_loss(num_classes: int) -> float:
    """Cross-entropy of a uniform guess over V classes: -ln(1/V) = ln(V) nats."""
    if isinstance(num_classes, bool) or not isinstance(num_classes, int):
        raise TypeError(f"num_classes must be an integer, got {num_classes!r}")
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    return math.log(num_classes)


def logit_spread_excess(spread: float) -> float:
    """Approximate loss above ln(V) from logits with standard deviation `spread`: about spread^2 / 2."""
    return spread * spread / 2


@dataclass(frozen=True)
class StartLossVerdict:
    classes: int
    loss: float
    baseline: float
    excess: float
    status: Status
    message: str
    fix: str

    def to_dict(self) -> dict[str, object]:
        return asdict(self)


def judge_start_loss(loss: float, num_classes: int) -> StartLossVerdict:
    """Judge a loss measured before training against the uniform baseline ln(V).

    healthy:  ln(V) - 0.25 <= loss <= ln(V) + 0.5 (see START_LOSS_*_MARGIN for why)
    too-high: over-confident logits at initialisation
    too-low:  the model already "knows" the answer, which an untrained model cannot
    """
    base = baseline_loss(num_classes)
    if not math.isfinite(loss):
        raise ValueError(f"loss must be a finite number, got {loss!r}")
    if loss < 0:
        raise ValueError(f"a cross-entropy loss cannot be negative, got {loss!r}")
    excess = loss - base
    where = f"{loss:.4g} against the uniform baseline ln({num_classes}) = {base:.2f}"
    if excess > START_LOSS_HIGH_MARGIN:
        spread = math.sqrt(2 * excess) if excess < 2 else None
        spread_note = f" (as if the logits were spread with std ~{spread:.1f})" if spread else ""
        return StartLossVerdict(
            num_classes, loss, base, excess, "too-high",
            f"Starting loss {where}: {excess:.2f} nats too high{spread_note}. The untrained model is "
            "confidently wrong: its logits are large and spread, and softmax turns them into confident "
            "guesses that cross-entropy punishes hard.",
            "Shrink the output layer's initial weights (for example by 0.01) and set its bias to zero, "
            "so the initial logits are near zero and the prediction is near uniform.",
        )
    if excess < -START_LOSS_LOW_MARGIN:
        return StartLossVerdict(
            num_classes, loss, base, excess, "too-low",
            f"Starting loss {where}: {-excess:.2f} nats below what an untrained model can reach. "
            "Random weights cannot know the answer.",
            "Check for the target leaking into the input, a loss reduced the wrong way (sum vs mean, "
            "wrong dimension), or a number of classes different from the one you expect.",
        )
    return StartLossVerdict(
        num_classes, loss, base, excess, "healthy",
        f"Starting loss {where}: within the expected band (-{START_LOSS_LOW_MARGIN}, "
        f"+{START_LOSS_HIGH_MARGIN} nats), as an untrained model that knows nothing should be.",
        "Nothing to fix.",
    )


@dataclass(frozen=True)
class TanhGradient:
    preactivation: float
    output: float
    local_derivative: float
    fraction_passed: float

    def to_dict(self) -> dict[str, float]:
        return asdict(self)


def tanh_gradient(preactivation: float) -> TanhGradient:
    """t = tanh(x); dt/dx = 1 - t^2, the share of the incoming gradient that backprop passes through."""
    if not math.isfinite(preactivation):
        raise ValueError(f"pre-activation must be a finite number, got {preactivation!r}")
    t = math.tanh(preactivation)
    d = 1.0 - t * t
    return TanhGradient(preactivation, t, d, d)


# Recommended gains, as in torch.nn.init.calculate_gain: the factor that keeps the spread of a signal
# steady through a layer followed by that non-linearity (He et al. 2015; Saxe et al. for tanh's 5/3).
_GAINS: dict[str, float] = {
    "linear": 1.0,
    "identity": 1.0,
    "conv1d": 1.0,
    "conv2d": 1.0,
    "conv3d": 1.0,
    "conv_transpose1d": 1.0,
    "conv_transpose2d": 1.0,
    "conv_transpose3d": 1.0,
    "sigmoid": 1.0,
    "tanh": 5.0 / 3.0,
    "relu": math.sqrt(2.0),
    "selu": 3.0 / 4.0,
}


def gain(nonlinearity: str, param: float | None = None) -> float:
    """Recommended init gain for a non-linearity; `param` is leaky_relu's negative slope (default 0.01)."""
    name = nonlinearity.lower()
    if name == "leaky_relu":
        slope = 0.01 if param is None else float(param)
        return math.sqrt(2.0 / (1.0 + slope * slope))
    if name in _GAINS:
        return _GAINS[name]
    known = ", ".join(sorted([*_GAINS, "leaky_relu"]))
    raise ValueError(f"unknown non-linearity {nonlinearity!r}; known: {known}")


def fan_in_scale(fan_in: int, nonlinearity: str = "tanh", param: float | None = None) -> float:
    """Kaiming/He std for weights feeding `nonlinearity`: gain / sqrt(fan_in)."""
    if fan_in < 1:
        raise ValueError(f"fan_in must be at least 1, got {fan_in}")
    return gain(nonlinearity, param) / math.sqrt(fan_in)


def predicted_output_std(fan_in: int, input_std: float, weight_std: float) -> float:
    """Std of y = W x for independent zero-mean inputs and weights: sqrt(fan_in) * weight_std * input_std.

    A 1000x1000 layer with unit-normal weights turns unit inputs into outputs of std sqrt(1000) ~ 31.6.
    """
    if fan_in < 1:
        raise ValueError(f"fan_in must be at least 1, got {fan_in}")
    return math.sqrt(fan_in) * weight_std * input_std


def saturation_cut_for(kind: str) -> tuple[float, float]:
    """The (low, high) output values beyond which a bounded activation counts as saturated.

    tanh uses +-0.97; sigmoid(x) = (1 + tanh(x/2)) / 2, so the matching cut is (1 +- 0.97) / 2.
    """
    if kind == "tanh":
        return (-SATURATION_CUT, SATURATION_CUT)
    if kind == "sigmoid":
        return ((1 - SATURATION_CUT) / 2, (1 + SATURATION_CUT) / 2)
    raise ValueError(f"no saturation cut for {kind!r}: only tanh and sigmoid saturate")
