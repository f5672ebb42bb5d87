"""What is concluded: one small rule per finding code. Rules read statistics, never the model.

Finding codes are a stable public vocabulary; each threshold is a named constant with where it comes
from. Other tools' thresholds for the same symptom are quoted for comparison.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Callable, Iterator
from dataclasses import asdict, dataclass, field
from typing import Any, Literal

from nnvitals import numbers
from nnvitals.probes import ACTIVATIONS, BOUNDED, LayerStats, ParamStats, PassStats

Severity = Literal["info", "warning", "error"]
SEVERITY_ORDER: dict[str, int] = {"error": 0, "warning": 1, "info": 2}

CODES = (
    "start-loss-high", "start-loss-low", "saturated-activations", "dead-units", "activation-scale",
    "vanishing-gradients", "exploding-gradients", "update-ratio", "bias-before-norm", "train-eval-mode",
    "nonfinite", "batchnorm-small-batch",
)

# A starting loss this many nats above ln(V) is an error rather than a warning: the logits are so
# spread that the first hundreds of steps only undo the initialisation (the lesson's naive net: +24.6).
START_LOSS_ERROR_EXCESS = 2.0
# Share of a tanh/sigmoid layer's outputs beyond +-0.97 (numbers.SATURATION_CUT). The lesson's healthy
# deep network sits at 1.7-2.8% per layer, its hand-tuned one-layer net at 3.5%, its naive one at 68.5%.
# Kaiming init for tanh gives a layer fed unit-variance inputs a pre-activation std of 5/3, which by
# design saturates 17-21% (the lesson's kaiming stage: 16.8%, and it trains well), so the warning starts
# above 25%; over half the layer is an error. (DeepDiagnosis flags > 50% of pre-activations beyond +-5;
# SageMaker Debugger uses +-9.5.)
SATURATION_WARNING = 0.25
SATURATION_ERROR = 0.50
# Dead units (saturated or inactive on every example of the batch): any is worth a warning; more than
# half of a layer is an error (TheDeepChecker's cut for dead activations).
DEAD_ERROR_SHARE = 0.5
# Growth of the forward signal's std across a chain of linear layers with no normalisation between
# them: 10x up or down means the initial weight scale is off by far more than sampling noise
# (gain/sqrt(fan-in) keeps it near 1x; PyTorch's default init shrinks a ReLU chain ~0.4x a layer).
# TheDeepChecker flags an activation std outside [0.5, 2] per layer.
SCALE_GROWTH_LIMIT = 10.0
# Ratio of the first to the last weight layer's gradient-to-weight ratio std(dW)/std(W): below 1/100
# the bottom of the network learns a hundred times slower than the top. (AUTOTRAINER uses 1e-3 and 70
# on gradient norms, which depend on layer size; this ratio does not.)
VANISHING_RATIO = 1e-2
EXPLODING_RATIO = 1e2
# log10(std(update) / std(weight)) per step: the lesson's rule of thumb is near -3; its deep network
# trains well near -2 at lr 0.1. Outside [-4, -1] (TheDeepChecker's band) updates are too timid or
# rewrite a tenth of the weight every step.
UPDATE_RATIO_LOW = -4.0
UPDATE_RATIO_HIGH = -1.0
UPDATE_RATIO_TARGET = -3.0
UPDATE_RATIO_WINDOW = 5  # Monitor: median over the last this-many sampled steps
# BatchNorm statistics from fewer examples than this are noisy enough to hurt (Wu & He 2018,
# "Group Normalization": BatchNorm's error rises steeply as the per-device batch drops below 16).
BATCHNORM_MIN_BATCH = 16


@dataclass(frozen=True)
class Finding:
    code: str
    severity: Severity
    where: str
    evidence: dict[str, Any]
    message: str
    fix: str

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class OutputFix:
    """A what-if the doctor measured: the output layer's weights scaled and its bias zeroed."""

    scale: list[str]  # parameters multiplied by `factor`
    zero: list[str]  # parameters set to zero
    factor: float
    logits_std: float
    logits_std_after: float
    loss_after: float


@dataclass
class Evidence:
    """What the rules read: the statistics of the latest pass and, for a Monitor, the earlier ones."""

    stats: PassStats
    loss: float | None = None  # the loss of the pass in `stats`, when known
    start_loss: float | None = None  # the loss before any training, when known (judged against ln(V))
    classes: int | None = None
    lr: float | None = None
    output_fix: OutputFix | None = None
    history: list[PassStats] = field(default_factory=list)  # earlier sampled passes, oldest first
    distributed: bool = False

    def layer(self, name: str | None) -> LayerStats | None:
        return next((lay for lay in self.stats.layers if lay.name == name), None)

    def param(self, name: str) -> ParamStats | None:
        return next((p for p in self.stats.params if p.name == name), None)


def _pct(x: float) -> str:
    return f"{100 * x:.1f}%"


def _gain_name(kind: str | None) -> str:
    """The numbers.gain table entry closest to an activation kind."""
    return {"tanh": "tanh", "sigmoid": "sigmoid", "relu": "relu", "leaky_relu": "leaky_relu", "selu": "selu",
            "gelu": "relu", "silu": "relu", "elu": "relu", "softplus": "relu"}.get(kind or "", "linear")


def _kaiming_fix(e: Evidence, weight: str, units: int, kind: str) -> str | None:
    """'scale W1 by 0.304 (std 1.00 -> 5/3/sqrt(30) = 0.304 ...)' for a weight feeding `units` units."""
    p = e.param(weight)
    if p is None or not p.std or not math.isfinite(p.std):
        return None
    fan_in = math.prod(p.shape) // units if units and math.prod(p.shape) % units == 0 else p.shape[-1]
    g_name = _gain_name(kind)
    target = numbers.fan_in_scale(fan_in, g_name)
    g_text = {"tanh": "5/3", "relu": "sqrt(2)", "linear": "1", "sigmoid": "1"}.get(
        g_name, f"{numbers.gain(g_name):.3g}")
    return (f"scale `{weight}` by {target / p.std:.3g} (its std {p.std:.3g} -> {g_text}/sqrt({fan_in}) = "
            f"{target:.3g}, Kaiming init for {kind})")


def start_loss(e: Evidence) -> Iterator[Finding]:
    loss = e.start_loss
    if loss is None or e.classes is None or e.classes < 2 or not math.isfinite(loss) or loss < 0:
        return
    v = numbers.judge_start_loss(loss, e.classes)
    if v.status == "healthy":
        return
    evidence: dict[str, Any] = {"loss": loss, "baseline": v.baseline, "excess": v.excess, "classes": e.classes}
    if v.status == "too-low":
        yield Finding("start-loss-low", "warning", "loss", evidence, v.message, v.fix)
        return
    fix = v.fix
    f = e.output_fix
    if f is not None:
        evidence.update(logits_std=f.logits_std)
        parts = [f"multiply {', '.join(f'`{n}`' for n in f.scale)} by {f.factor:g}"]
        if f.zero:
            parts.append(f"zero {', '.join(f'`{n}`' for n in f.zero)}")
        fix = (f"{' and '.join(parts)}: initial logits std {f.logits_std:.3g} -> {f.logits_std_after:.2g}, "
               f"starting loss {loss:.3g} -> {f.loss_after:.3g} (baseline {v.baseline:.2f} for "
               f"{e.classes} classes).")
    severity: Severity = "error" if v.excess > START_LOSS_ERROR_EXCESS else "warning"
    where = e.stats.output_name or (f.scale[0] if f is not None else "output")
    yield Finding("start-loss-high", severity, where, evidence, v.message, fix)


def saturated_activations(e: Evidence) -> Iterator[Finding]:
    for lay in e.stats.layers:
        if lay.saturated is None or lay.saturated <= SATURATION_WARNING:
            continue
        severity: Severity = "error" if lay.saturated > SATURATION_ERROR else "warning"
        cut = numbers.SATURATION_CUT
        d = numbers.tanh_gradient(math.atanh(cut)).local_derivative
        message = (f"{_pct(lay.saturated)} of the outputs of {_label(lay)} are beyond +-{cut} (in the flat tails), "
                   f"where the unit passes back under {_pct(d)} of its gradient: the weights feeding it "
                   "barely learn.")
        yield Finding("saturated-activations", severity, _where(lay),
                      {"saturated": lay.saturated, "std": lay.std, "mean": lay.mean, "threshold": SATURATION_WARNING},
                      message, _pre_activation_fix(e, lay))


def _where(lay: LayerStats) -> str:
    return f"{lay.name} ({lay.site})" if lay.site else lay.name


def _label(lay: LayerStats) -> str:
    """`3` (Tanh), `block.relu()` (F.relu at model.py:12): how a layer is named in a message."""
    return f"`{lay.name}` ({lay.op} at {lay.site})" if lay.site else f"`{lay.name}` ({lay.op})"


def _pre_activation_fix(e: Evidence, lay: LayerStats) -> str:
    """How to bring the pre-activation of `lay` back to unit spread."""
    source = e.layer(lay.input_from)
    if source is not None and source.kind == "norm":
        return (f"the pre-activation comes from `{source.name}` (normalised), so its learned gain is too "
                "large: check the gain's initialisation and the learning rate.")
    fixes = [f for f in (_kaiming_fix(e, w, lay.units, lay.kind) for w in lay.feeding[:1]) if f]
    fix = fixes[0] if fixes else f"initialise the weights feeding `{lay.name}` with std gain/sqrt(fan_in)"
    return f"{fix}; or normalise the pre-activation (BatchNorm/LayerNorm) before the {lay.kind}."


def dead_units(e: Evidence) -> Iterator[Finding]:
    for lay in e.stats.layers:
        if not lay.dead:
            continue
        share = lay.dead / lay.units
        severity: Severity = "error" if share > DEAD_ERROR_SHARE else "warning"
        batch = max(math.prod(lay.shape) // lay.units, 1)
        if lay.kind in BOUNDED:
            state = f"saturated (|t| > {numbers.DEAD_CUT})"
            fix = _pre_activation_fix(e, lay)
        else:
            state = "inactive (output <= 0)"
            fix = ("re-initialise the weights feeding it with Kaiming init (gain sqrt(2)), lower the learning rate, "
                   "or use a leaky variant (LeakyReLU, GELU) so a unit can come back.")
        message = (f"{lay.dead} of {lay.units} units of {_label(lay)} are {state} on every one of the {batch} "
                   "examples: they output but cannot learn.")
        yield Finding("dead-units", severity, _where(lay),
                      {"dead": lay.dead, "units": lay.units, "share": share, "examples": batch}, message, fix)


def _linear_chains(e: Evidence) -> list[list[LayerStats]]:
    """Runs of linear layers whose signal passes from one to the next through activations only."""
    by_name = {lay.name: lay for lay in e.stats.layers}
    previous: dict[str, str] = {}
    for lay in e.stats.layers:
        if lay.kind != "linear":
            continue
        src = by_name.get(lay.input_from or "")
        while src is not None and src.kind in ACTIVATIONS:
            src = by_name.get(src.input_from or "")
        if src is not None and src.kind == "linear":
            previous[lay.name] = src.name
    starts = [lay for lay in e.stats.layers if lay.kind == "linear" and lay.name not in previous]
    following = {v: k for k, v in previous.items()}
    chains = []
    for first in starts:
        chain = [first]
        while chain[-1].name in following:
            chain.append(by_name[following[chain[-1].name]])
        chains.append(chain)
    return chains


def activation_scale(e: Evidence) -> Iterator[Finding]:
    consumers = {lay.input_from: lay for lay in e.stats.layers if lay.input_from}
    for chain in _linear_chains(e):
        if len(chain) < 2 or chain[0].std <= 0 or not math.isfinite(chain[-1].std):
            continue
        growth = chain[-1].std / chain[0].std
        if 1 / SCALE_GROWTH_LIMIT <= growth <= SCALE_GROWTH_LIMIT:
            continue
        stds = {lay.name: round(lay.std, 4) for lay in chain}
        direction = "grows" if growth > 1 else "shrinks"
        per_layer = growth ** (1 / (len(chain) - 1))
        fixes = []
        for lay in chain:
            act = consumers.get(lay.name)
            kind = act.kind if act is not None and act.kind in ACTIVATIONS else "linear"
            fix = _kaiming_fix(e, f"{lay.name}.weight", lay.units, kind)
            if fix:
                fixes.append(fix)
        message = (f"The forward signal {direction} {growth:.3g}x across {len(chain)} linear layers with no "
                   f"normalisation between them (about {per_layer:.2f}x a layer): pre-activation std "
                   f"{chain[0].std:.3g} at `{chain[0].name}`, {chain[-1].std:.3g} at `{chain[-1].name}`.")
        fix_text = "; ".join(fixes) if fixes else "initialise each weight with std gain/sqrt(fan_in)"
        yield Finding("activation-scale", "warning", f"{chain[0].name} .. {chain[-1].name}",
                      {"growth": growth, "std": stds}, message,
                      f"{fix_text}; or add normalisation layers between them.")


def _weight_params(e: Evidence, hidden_only: bool = False, moving: bool = True) -> list[ParamStats]:
    """Weights of the layers that transform the signal, in the model's order: those of linear layers and
    those feeding a watched layer (no embeddings, no norms); `hidden_only` leaves out the output layer's,
    `moving` those whose gradient is zero."""
    feeding = {w for lay in e.stats.layers for w in lay.feeding}
    output = {n for n, _ in e.stats.output_params} if hidden_only else set()
    return [p for p in e.stats.params
            if len(p.shape) >= 2 and (p.module_kind == "linear" or p.name in feeding) and p.name not in output
            and p.grad_to_weight is not None and math.isfinite(p.grad_to_weight)
            and (p.grad_to_weight > 0 or not moving)]


def gradient_flow(e: Evidence) -> Iterator[Finding]:
    # The output layer is left out: right after a calm initialisation (its weights near zero) every
    # earlier layer gets a tiny gradient through it, which is intended and passes within steps.
    weights = _weight_params(e, hidden_only=True)
    if len(weights) < 2:
        return
    first, last = weights[0], weights[-1]
    assert first.grad_to_weight is not None and last.grad_to_weight is not None
    ratio = first.grad_to_weight / last.grad_to_weight
    evidence = {"ratio": ratio, "grad_to_weight": {p.name: p.grad_to_weight for p in weights}}
    if ratio < VANISHING_RATIO:
        yield Finding(
            "vanishing-gradients", "warning", first.name, evidence,
            f"`{first.name}` gets a gradient {1 / ratio:.3g}x weaker, relative to its weights, than `{last.name}` "
            f"(std(grad)/std(weight) {first.grad_to_weight:.2e} vs {last.grad_to_weight:.2e}): the first layers "
            "barely learn.",
            "look for saturated activations or shrinking signals upstream (see the other findings); initialise "
            "with gain/sqrt(fan_in), add normalisation layers, or use residual connections in deep stacks.")
    elif ratio > EXPLODING_RATIO:
        yield Finding(
            "exploding-gradients", "warning", first.name, evidence,
            f"`{first.name}` gets a gradient {ratio:.3g}x stronger, relative to its weights, than `{last.name}` "
            f"(std(grad)/std(weight) {first.grad_to_weight:.2e} vs {last.grad_to_weight:.2e}): the gradient "
            "grows on its way back through the layers.",
            "initialise with gain/sqrt(fan_in) (weights too large amplify the gradient at every layer), add "
            "normalisation, and clip the gradient norm (torch.nn.utils.clip_grad_norm_) while you fix it.")


def update_ratio(e: Evidence) -> Iterator[Finding]:
    passes = [*e.history[-(UPDATE_RATIO_WINDOW - 1):], e.stats] if e.history else [e.stats]
    # At initialisation a deliberately tiny output layer changes fast relative to itself: not a problem.
    at_init = e.start_loss is not None and not e.history
    for p in _weight_params(e, hidden_only=at_init, moving=False):
        values = [q.update_ratio for s in passes for q in s.params if q.name == p.name and q.update_ratio is not None]
        values = [v for v in values if not math.isnan(v)]
        if not values:
            continue
        ratio = statistics.median(values)
        if ratio == -math.inf:
            yield Finding("update-ratio", "warning", p.name, {"log10_ratio": ratio, "steps": len(values)},
                          f"`{p.name}` does not change at all: its gradient is zero.",
                          "look upstream of it for dead units or a detached path (.detach(), .item(), .data, "
                          "torch.no_grad) between it and the loss.")
            continue
        if UPDATE_RATIO_LOW <= ratio <= UPDATE_RATIO_HIGH:
            continue
        factor = 10 ** (UPDATE_RATIO_TARGET - ratio)
        how = "measured over the last steps" if e.history or len(values) > 1 or e.lr is None else \
            f"lr {e.lr:g} x std(grad) / std(weight), as for plain SGD"
        size = "too large: each step rewrites" if ratio > UPDATE_RATIO_HIGH else "too small: each step changes only"
        message = (f"Updates of `{p.name}` are {size} about {100 * 10 ** ratio:.2g}% of the weight "
                   f"(log10 update/weight = {ratio:.2f}, {how}; the rule of thumb is near {UPDATE_RATIO_TARGET:g}).")
        fix = (f"multiply the learning rate for `{p.name}` by about {factor:.2g} (towards log10 ratio "
               f"{UPDATE_RATIO_TARGET:g}), or check its initial scale.")
        yield Finding("update-ratio", "warning", p.name, {"log10_ratio": ratio, "steps": len(values)}, message, fix)


def bias_before_norm(e: Evidence) -> Iterator[Finding]:
    for linear, norm in e.stats.bias_before_norm:
        yield Finding(
            "bias-before-norm", "info", f"{linear}.bias", {"layer": linear, "norm": norm},
            f"`{linear}` adds a bias that `{norm}` removes again: BatchNorm subtracts the batch mean of every "
            "feature, so the bias has no effect and its gradient is zero.",
            f"construct `{linear}` with bias=False; `{norm}`'s own bias plays that role.")


# (gradients on, module in train mode) -> what it means and the fix, for the two wrong combinations
_MODE_MISTAKES = {
    (True, False): ("{names} {verb} in eval mode during a training step: BatchNorm then normalises with its "
                    "running statistics and stops updating them, and Dropout is off.",
                    "call model.train() before training steps (and model.eval() only around evaluation)."),
    (False, True): ("Inference under torch.no_grad() with {names} in train mode: each prediction depends on the "
                    "other examples of its batch, and the running statistics absorb the evaluation data.",
                    "call model.eval() before evaluating or predicting, and model.train() after."),
}


def train_eval_mode(e: Evidence) -> Iterator[Finding]:
    for (grad, training), (message, fix) in _MODE_MISTAKES.items():
        modules = sorted({ev.name for ev in e.stats.mode_events
                          if ev.grad_enabled == grad and ev.training == training})
        if modules:
            names = ", ".join(f"`{n}`" for n in modules[:5])
            yield Finding("train-eval-mode", "warning", modules[0], {"modules": modules},
                          message.format(names=names, verb="is" if len(modules) == 1 else "are"), fix)


def nonfinite(e: Evidence) -> Iterator[Finding]:
    s = e.stats
    bad_params = [p.name for p in s.params if p.nonfinite]
    loss_bad = e.loss is not None and not math.isfinite(e.loss)
    if s.inputs_nonfinite:
        yield Finding("nonfinite", "error", "input", {"loss": e.loss},
                      "The input batch already contains NaN or Inf.",
                      "clean the data (torch.isfinite(x).all()) or fix the preprocessing that produced it.")
    elif bad_params:
        yield Finding("nonfinite", "error", bad_params[0], {"parameters": bad_params},
                      f"Parameter{'s' if len(bad_params) > 1 else ''} {', '.join(bad_params[:5])} hold NaN/Inf: "
                      "an earlier update diverged.",
                      "restart from a checkpoint with a lower learning rate, gradient clipping, and a check for a "
                      "non-finite loss before each optimizer step.")
    elif s.first_nonfinite_forward is not None:
        where = s.first_nonfinite_forward
        yield Finding("nonfinite", "error", where, {"pass": "forward", "loss": e.loss},
                      f"NaN/Inf first appears in the forward pass at the output of `{where}`, whose inputs are "
                      "finite.",
                      f"look at what `{where}` computes: a division by a value near zero, log or sqrt of a "
                      "non-positive number, exp of a large number, or overflow in half precision.")
    elif loss_bad:
        yield Finding("nonfinite", "error", "loss", {"loss": e.loss},
                      "The model's output is finite but the loss is NaN/Inf: the loss function produced it.",
                      "check the loss for log(0) (use log_softmax/cross_entropy on logits, not log of "
                      "probabilities), division by a zero count, or targets out of range.")
    elif s.first_nonfinite_backward is not None:
        out_of, consumer = s.first_nonfinite_backward
        by = f" (in the backward of `{consumer}`, which consumes it)" if consumer else ""
        yield Finding("nonfinite", "error", consumer or out_of, {"pass": "backward", "gradient_at": out_of},
                      f"The forward pass and the loss are finite, but the gradient first becomes NaN/Inf at the "
                      f"output of `{out_of}`{by}.",
                      "look for an op whose derivative is infinite where it is evaluated (sqrt at 0, abs/norm at "
                      "0, pow with a fractional exponent, atan2), or clip the gradient.")
    else:
        bad = [lay.name for lay in s.layers if lay.nonfinite or lay.grad_nonfinite]
        if bad:
            yield Finding("nonfinite", "error", bad[0], {"layers": bad},
                          f"NaN/Inf values appear at {', '.join(bad[:5])}.",
                          "lower the learning rate and clip gradients; check the data for extreme values.")


def batchnorm_small_batch(e: Evidence) -> Iterator[Finding]:
    for name, batch in e.stats.batchnorm_batches.items():
        lay = e.layer(name)
        if batch >= BATCHNORM_MIN_BATCH or (lay is not None and lay.op == "SyncBatchNorm"):
            continue
        if e.distributed:
            fix = ("convert the model with torch.nn.SyncBatchNorm.convert_sync_batchnorm(model) so statistics are "
                   "taken over all processes' examples, or raise the per-process batch.")
            context = " per process"
        else:
            fix = "raise the batch size, or use GroupNorm/LayerNorm, which do not depend on the batch."
            context = ""
        yield Finding("batchnorm-small-batch", "warning", name, {"batch": batch, "minimum": BATCHNORM_MIN_BATCH},
                      f"`{name}` normalises over only {batch} examples{context}: its mean and variance estimates "
                      "are noisy, and every example's output depends strongly on its few batchmates.", fix)


RULES: tuple[Callable[[Evidence], Iterator[Finding]], ...] = (
    nonfinite, start_loss, saturated_activations, dead_units, activation_scale, gradient_flow, update_ratio,
    train_eval_mode, batchnorm_small_batch, bias_before_norm,
)


def diagnose(e: Evidence) -> list[Finding]:
    """Run every rule; findings sorted by severity (errors first), then in rule order."""
    found = [f for r in RULES for f in r(e)]
    return sorted(found, key=lambda f: SEVERITY_ORDER[f.severity])


def worst(findings: list[Finding]) -> Severity | None:
    return min((f.severity for f in findings), key=lambda s: SEVERITY_ORDER[s], default=None)


