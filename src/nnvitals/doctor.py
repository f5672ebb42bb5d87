"""check(model, inputs, targets) for one batch; Monitor for a training run; the Report they give."""

from __future__ import annotations

import base64
import collections
import html
import json
import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn
from torch.optim.optimizer import register_optimizer_step_pre_hook

from nnvitals import numbers
from nnvitals.checks import UPDATE_RATIO_WINDOW, Evidence, Finding, OutputFix, diagnose, worst
from nnvitals.integrations import tensorboard as tensorboard_output
from nnvitals.probes import (
    HookSet,
    LayerStats,
    ParamStats,
    PassStats,
    RawPass,
    Recorder,
    Snapshot,
    is_main_process,
    world_size,
)

LossFn = Callable[[Any, Any], torch.Tensor]
# The what-if fix for an over-confident output scales the logits by the power of ten that brings their std
# closest to this:
# logits of std 0.1 cost about 0.1^2/2 = 0.005 nats over ln(V).
TARGET_LOGIT_STD = 0.1


@dataclass
class Report:
    """What the doctor found: the statistics of a pass, the findings drawn from them, and pictures."""

    stats: PassStats
    findings: list[Finding]
    loss: float | None = None
    classes: int | None = None
    history: list[dict[str, Any]] = field(default_factory=list)  # Monitor: one row per sampled step

    @property
    def layers(self) -> list[LayerStats]:
        return self.stats.layers

    @property
    def params(self) -> list[ParamStats]:
        return self.stats.params

    @property
    def baseline(self) -> float | None:
        return numbers.baseline_loss(self.classes) if self.classes and self.classes >= 2 else None

    @property
    def ok(self) -> bool:
        """True when there is no warning or error (info findings are allowed)."""
        return worst(self.findings) in (None, "info")

    def codes(self) -> list[str]:
        return [f.code for f in self.findings]

    def to_dict(self) -> dict[str, Any]:
        return {
            "loss": self.loss,
            "classes": self.classes,
            "baseline": self.baseline,
            "ok": self.ok,
            "findings": [f.to_dict() for f in self.findings],
            "layers": [lay.to_dict() for lay in self.layers],
            "params": [p.to_dict() for p in self.params],
            "history": self.history,
        }

    def to_json(self) -> str:
        """Strict JSON: NaN and infinities become the strings "nan", "inf" and "-inf"."""
        return json.dumps(_strict(self.to_dict()), indent=2)

    def save_plots(self, directory: str | Path) -> list[Path]:
        """Write the report's pictures as PNG files into `directory`; returns their paths."""
        from nnvitals import plots

        return plots.save_all(self, Path(directory))

    def _repr_html_(self) -> str:
        from nnvitals import plots

        rows = "".join(
            f"<tr><td>{html.escape(f.severity)}</td><td><code>{html.escape(f.code)}</code></td>"
            f"<td>{html.escape(f.where)}</td><td>{html.escape(f.message)}<br><b>fix:</b> {html.escape(f.fix)}</td></tr>"
            for f in self.findings) or "<tr><td colspan=4>No findings: the numbers look healthy.</td></tr>"
        layer_rows = "".join(
            f"<tr><td>{html.escape(lay.name)}</td><td>{html.escape(lay.op)}</td><td>{lay.mean:+.3f}</td>"
            f"<td>{lay.std:.3f}</td><td>{_pct(lay.saturated)}</td><td>{'' if lay.dead is None else lay.dead}</td>"
            f"<td>{'' if lay.grad_std is None else f'{lay.grad_std:.2e}'}</td></tr>" for lay in self.layers)
        head = ""
        if self.loss is not None:
            head = f"<p>loss {self.loss:.4f}"
            if self.baseline is not None:
                head += f" (uniform baseline {self.baseline:.2f} for {self.classes} classes)"
            head += "</p>"
        images = "".join(
            f'<img alt="{name}" style="max-width:100%" src="data:image/png;base64,'
            f'{base64.b64encode(png).decode()}">' for name, png in plots.render_all(self))
        return (f"<div><h3>nnvitals report</h3>{head}<table><tr><th>severity</th><th>code</th><th>where</th>"
                f"<th>finding</th></tr>{rows}</table><table><tr><th>layer</th><th>op</th><th>mean</th><th>std</th>"
                f"<th>saturated</th><th>dead</th><th>grad std</th></tr>{layer_rows}</table>{images}</div>")


def _pct(x: float | None) -> str:
    return "" if x is None else f"{100 * x:.1f}%"


def _strict(o: Any) -> Any:
    if isinstance(o, float) and not math.isfinite(o):
        return str(o)
    if isinstance(o, dict):
        return {k: _strict(v) for k, v in o.items()}
    if isinstance(o, list | tuple):
        return [_strict(v) for v in o]
    return o



def _arguments(inputs: Any) -> tuple[tuple[Any, ...], dict[str, Any]]:
    """A batch's inputs as the model's arguments: a tensor, a tuple/list of them, or a dict of keywords."""
    if isinstance(inputs, Mapping):
        return (), dict(inputs)
    if isinstance(inputs, tuple | list):
        return tuple(inputs), {}
    return (inputs,), {}


def _classification(out: Any, targets: Any, loss_fn: LossFn | None) -> int | None:
    """The number of classes when the loss is a cross-entropy over the output's last dimension."""
    ce = loss_fn is None or loss_fn is F.cross_entropy or isinstance(loss_fn, nn.CrossEntropyLoss)
    if ce and isinstance(out, torch.Tensor) and out.is_floating_point() and out.dim() >= 2 \
            and isinstance(targets, torch.Tensor) and not targets.is_floating_point():
        return int(out.shape[-1])
    return None


def default_loss(out: torch.Tensor, targets: torch.Tensor) -> torch.Tensor:
    """Cross-entropy over the last dimension's classes (any leading dimensions are examples)."""
    if not isinstance(out, torch.Tensor) or not isinstance(targets, torch.Tensor):
        raise TypeError(f"the default loss (cross-entropy) needs a tensor of logits and a tensor of targets; the "
                        f"model returned {type(out).__name__}: pass loss_fn(output, targets) for anything else")
    if targets.is_floating_point() and targets.shape == out.shape:
        return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1, out.shape[-1]))
    return F.cross_entropy(out.reshape(-1, out.shape[-1]), targets.reshape(-1))


def _rng_states() -> tuple[torch.Tensor, list[torch.Tensor] | None]:
    cuda = torch.cuda.get_rng_state_all() if torch.cuda.is_available() and torch.cuda.is_initialized() else None
    return torch.get_rng_state(), cuda


def _set_rng_states(states: tuple[torch.Tensor, list[torch.Tensor] | None]) -> None:
    torch.set_rng_state(states[0])
    if states[1] is not None:
        torch.cuda.set_rng_state_all(states[1])


def _output_fix(model: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any], targets: Any, out: torch.Tensor,
                loss_fn: LossFn, stats: PassStats, rng: tuple[torch.Tensor, list[torch.Tensor] | None]
                ) -> OutputFix | None:
    """Measure, without touching the model, what scaling the output layer would do to the start."""
    scale = [n for n, role in stats.output_params if role == "scale"]
    zero = [n for n, role in stats.output_params if role == "zero"]
    if not scale:
        return None
    logits_std = float(out.detach().float().std())
    if not math.isfinite(logits_std) or logits_std <= 0:
        return None
    factor = min(1.0, 10 ** round(math.log10(TARGET_LOGIT_STD / logits_std)))
    params = dict(model.named_parameters())
    swapped = {n: params[n].detach() * factor for n in scale}
    swapped.update({n: torch.zeros_like(params[n]) for n in zero})
    _set_rng_states(rng)
    with torch.no_grad():
        new_out = torch.func.functional_call(model, swapped, args, kwargs)
        loss_after = float(loss_fn(new_out, targets))
    return OutputFix(scale, zero, factor, logits_std, float(new_out.float().std()), loss_after)


def check(model: nn.Module, inputs: Any, targets: Any, loss_fn: LossFn | None = None, *,
          lr: float | None = None, at_init: bool = True) -> Report:
    """Diagnose `model` from one forward and backward pass on a batch.

    inputs: a tensor, a tuple of positional inputs, or a dict of keyword inputs.
    loss_fn(output, targets): default cross-entropy over the output's last dimension.
    lr: the learning rate, to judge the update-to-data ratio as for plain SGD.
    at_init: judge the loss against the uniform baseline (set False for a model already trained).

    The model is left exactly as found: parameters, buffers, existing gradients, train/eval modes and
    the global random states are restored, and every hook is removed, also when the model raises.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    fn: LossFn = loss_fn if loss_fn is not None else default_loss
    saved_params = {n: p.detach().clone() for n, p in model.named_parameters()}
    saved_buffers = {n: b.detach().clone() for n, b in model.named_buffers()}
    saved_grads = {n: p.grad for n, p in model.named_parameters()}  # set aside, so backward cannot touch them
    saved_modes = {m: m.training for m in model.modules()}
    rng = _rng_states()
    recorder = Recorder(model, functions=True, trace_all=True)
    try:
        for p in model.parameters():
            p.grad = None
        recorder.attach()
        with torch.enable_grad():
            args, kwargs = _arguments(inputs)
            out = model(*args, **kwargs)
            loss = fn(out, targets)
            if not isinstance(loss, torch.Tensor) or loss.numel() != 1:
                raise TypeError("the loss function must return a single-element tensor")
            if loss.requires_grad:
                loss.backward()
        stats = recorder.collect(lr=lr).stats()
        recorder.detach()
        loss_value = float(loss.detach())
        classes = _classification(out, targets, loss_fn)
        fix = None
        if classes is not None and at_init and math.isfinite(loss_value) \
                and numbers.judge_start_loss(loss_value, classes).status == "too-high":
            _restore_buffers(model, saved_buffers)
            fix = _output_fix(model, args, kwargs, targets, out, fn, stats, rng)
    finally:
        recorder.detach()
        with torch.no_grad():
            for n, p in model.named_parameters():
                p.copy_(saved_params[n])
                p.grad = saved_grads[n]
        _restore_buffers(model, saved_buffers)
        for m, mode in saved_modes.items():
            m.training = mode
        _set_rng_states(rng)
    evidence = Evidence(stats, loss=loss_value, start_loss=loss_value if at_init else None, classes=classes,
                        lr=lr, output_fix=fix, distributed=world_size() > 1)
    return Report(stats, diagnose(evidence), loss_value, classes)


def _restore_buffers(model: nn.Module, saved: dict[str, torch.Tensor]) -> None:
    with torch.no_grad():
        for n, b in model.named_buffers():
            if n in saved:
                b.copy_(saved[n])


class Monitor:
    """Watches a training run: statistics on every `every`-th step, next to nothing in between.

        with nnvitals.Monitor(model, every=10) as mon:
            for x, y in batches:
                loss = F.cross_entropy(model(x), y)
                opt.zero_grad(); loss.backward(); opt.step()
                mon.step(loss)          # once per optimizer step; the loss is optional
        print(mon.findings())

    Hooks are attached only for sampled steps. Training with and without a Monitor gives bit-identical
    parameters: the hooks copy what they see and change nothing. A sampled step costs its device work
    and one transfer; the numbers are read into statistics only when findings, history or plots are
    asked for (or, with `tensorboard=` a SummaryWriter or a folder, written there on every sampled step,
    with the findings as text when the Monitor closes).

    The update ratio compares the weights after the step with a copy taken before it: on the sampled step,
    just before the first `torch.optim` optimizer holding some of the model's parameters steps, once the
    Monitor has seen one do so on a sampled step (else, as for hand-written updates, at the step before).
    """

    HISTORY_LIMIT = 2048  # sampled steps kept; beyond it every other older one is dropped

    def __init__(self, model: nn.Module, every: int = 10, *, tensorboard: Any = None):
        if not isinstance(model, nn.Module):
            raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive whole number of steps, got {every!r}")
        self.model = model
        self.every = every
        self.steps = 0  # optimizer steps seen so far
        self._quiet_to = 0  # step() has nothing to do but count until `steps` reaches this (see step)
        self._recorder = Recorder(model, functions=True)
        # (step, loss, numbers) per sampled step; numbers are read (and become a history row) when asked
        self._passes: list[tuple[int, Any, RawPass | PassStats]] = []
        self._recent: collections.deque[RawPass | PassStats] = collections.deque(maxlen=UPDATE_RATIO_WINDOW)
        self._rows: dict[int, dict[str, Any]] = {}
        self._before: Snapshot | None = None
        # The weights' copy for an update is taken as late as it can be (see the class's docstring): a copy
        # at the step before costs that step a pass over all weights and pushes the run's data out of the caches.
        self._late_copy = False  # whether an optimizer of the model was seen stepping on the last sampled step
        self._stepped = False  # whether one has stepped since the hook below was registered
        self._optimizer_hook: HookSet | None = None  # the process-wide optimizer pre-hook, made on first use
        self._watching_optimizers = False  # whether it is in place (while a sample is armed)
        self._start_loss: Any = None
        self._functions_checked = False
        self._entered = False
        self._writer = None
        if tensorboard is not None:
            self._writer = tensorboard_output.open_writer(tensorboard)

    def __enter__(self) -> Monitor:
        self._entered = True
        self._arm()
        return self

    def __exit__(self, *exc: object) -> None:
        self._entered = False
        self._quiet_to = 0
        self._recorder.detach()
        self._watch_optimizers(False)
        if self._writer is not None and self._recent and is_main_process():
            tensorboard_output.write_findings(self._writer, self._passes[-1][0], self.findings())

    def close(self) -> None:
        self.__exit__()

    def sampled(self, step: int) -> bool:
        return step % self.every == 0

    def _arm(self, before: Snapshot | None = None) -> None:
        """Attach the hooks for a sampled step and see that the weights are copied before its update (`before`:
        that copy, already taken), else detach."""
        if self.steps % self.every == 0:  # (sampled(), inline: this runs on every step that arms or disarms)
            self._recorder.attach()
            self._before = before
            if before is None:
                self._watch_optimizers(True)
                if not self._late_copy:
                    self._before = self._recorder.snapshot_params()
        elif self._recorder.attached:
            self._recorder.detach()
            self._before = None
            self._watch_optimizers(False)

    def _watch_optimizers(self, on: bool) -> None:
        """Register (or remove) the process-wide hook that copies the weights as an optimizer is about to step."""
        if on == self._watching_optimizers:
            return
        self._watching_optimizers = on
        if not on:
            assert self._optimizer_hook is not None
            self._optimizer_hook.remove()
            return
        self._stepped = False
        if self._optimizer_hook is None:
            self._optimizer_hook = HookSet([register_optimizer_step_pre_hook(self._optimizer_stepping)])
        else:
            self._optimizer_hook.insert()

    def _optimizer_stepping(self, optimizer: Any, args: Any, kwargs: Any) -> None:
        """An optimizer is about to step: if it holds some of the model's parameters, the first time in the step
        the weights are copied, as they are before their update."""
        if self._stepped:
            return
        ours = self._recorder.param_names  # (by id; the model's optimizer usually holds its first one first)
        if any(any(map(ours.__contains__, map(id, group["params"]))) for group in optimizer.param_groups):
            self._stepped = True
            if self._before is None:
                self._before = self._recorder.snapshot_params()

    def pause(self) -> None:
        """Record nothing until `resume()` (e.g. the micro-batches of gradient accumulation that do not end
        an optimizer step); the weights kept for the next update ratio stay as they are."""
        self._recorder.detach()
        self._quiet_to = 0

    def resume(self) -> None:
        """Record again, if the current step is a sampled one."""
        if self._entered and self.sampled(self.steps):
            self._recorder.attach()
        self._quiet_to = 0

    def seek(self, step: int) -> None:
        """Count the next optimizer step as `step` (a trainer that takes several optimizer steps a batch)."""
        if step != self.steps:
            self.steps = step
            self._quiet_to = 0
            if self._entered:
                self._arm()

    def step(self, loss: torch.Tensor | float | None = None) -> None:
        """Call once after each optimizer step. On sampled steps this moves the statistics to the host (one
        transfer; from a GPU without waiting for it: the numbers are waited for when read)."""
        if self.steps < self._quiet_to:  # most steps: neither sampled nor the one before a sampled one
            self.steps += 1
            return
        if not self._entered:
            raise RuntimeError("use the Monitor as a context manager: `with nnvitals.Monitor(model) as mon:`")
        recorder = self._recorder
        before = None  # the weights' copy for the next step, when that one is sampled too
        if recorder.attached and self.steps % self.every == 0:
            next_sampled = (self.steps + 1) % self.every == 0
            raw = recorder.collect(before=self._before, snapshot=next_sampled)
            if self._watching_optimizers:  # learned: where to copy the weights for the next sample
                self._late_copy = self._stepped
                self._watch_optimizers(False)
            before = recorder.snapshot if next_sampled else None
            # keep the loss as it is (a tensor is read with the rest, when asked): no extra host sync here
            kept = loss.detach() if isinstance(loss, torch.Tensor) else loss
            if self.steps == 0:
                self._start_loss = kept
            if raw.chunks or raw.params:
                if self._passes:
                    self._passes[-1][2].drop_maps()
                self._passes.append((self.steps, kept, raw))
                self._recent.append(raw)
                if self._writer is not None and is_main_process():  # one writer for all ranks
                    tensorboard_output.write_step(self._writer, self.steps, raw.stats(), _as_float(kept))
                if len(self._passes) > self.HISTORY_LIMIT:
                    self._passes = [*self._passes[:-1:2], self._passes[-1]]
                    steps_kept = {step for step, _, _ in self._passes}
                    self._rows = {k: v for k, v in self._rows.items() if k in steps_kept or k < self._passes[0][0]}
            if not self._functions_checked and raw.chunks:
                # Watching activation functions costs a little on every op; keep it only if the model has any
                # (re-attached below without the hooks that tracked which module called a function).
                recorder.functions = recorder.found_functions
                self._functions_checked = True
                recorder.detach()
        self.steps += 1
        if recorder.attached or self.steps % self.every == 0:  # else nothing to arm or disarm
            self._arm(before)
        if not recorder.attached:  # nothing but counting until the step before the next sampled one
            self._quiet_to = self.steps + (-self.steps - 1) % self.every

    @property
    def history(self) -> list[dict[str, Any]]:
        """One row per sampled step: loss, per-layer mean/std/saturation/dead/grad std, per-weight ratios."""
        for step, loss, raw in self._passes:
            if step not in self._rows:
                self._rows[step] = _history_row(step, raw.stats(), _as_float(loss))
        return [self._rows[step] for step in sorted(self._rows)]

    def state_dict(self) -> dict[str, Any]:
        """Everything needed to continue watching after a restart, as plain data (for a checkpoint)."""
        return {"every": self.every, "steps": self.steps, "start_loss": _as_float(self._start_loss),
                "history": self.history, "recent": [r.stats().to_dict() for r in self._recent],
                "last_loss": _as_float(self._passes[-1][1]) if self._passes else None}

    def load_state_dict(self, state: dict[str, Any]) -> None:
        """Continue from `state_dict()`: the same step count, history and findings as before the restart."""
        if state["every"] != self.every:
            raise ValueError(f"the saved Monitor sampled every {state['every']} steps, this one every {self.every}")
        self.steps = state["steps"]
        self._quiet_to = 0
        self._start_loss = state["start_loss"]
        self._rows = {row["step"]: row for row in state["history"]}
        recent = [PassStats.from_dict(d) for d in state["recent"]]
        self._recent.clear()
        self._recent.extend(recent)
        last_step = state["history"][-1]["step"] if state["history"] else 0
        self._passes = [(last_step, state["last_loss"], recent[-1])] if recent else []
        if self._entered:
            self._arm()

    def report(self) -> Report:
        """The latest sampled step's statistics with the findings drawn from them and the earlier ones."""
        if not self._recent:
            raise RuntimeError("no sampled step has been recorded yet: call mon.step() after a training step")
        latest = self._recent[-1].stats()
        start = _as_float(self._start_loss)
        classes = latest.output_shape[-1] if latest.output_shape and len(latest.output_shape) >= 2 else None
        loss = _as_float(self._passes[-1][1])
        evidence = Evidence(latest, loss=loss, start_loss=start, classes=classes if start is not None else None,
                            history=[r.stats() for r in list(self._recent)[:-1]], distributed=world_size() > 1)
        return Report(latest, diagnose(evidence), loss, evidence.classes, self.history)

    def findings(self) -> list[Finding]:
        return self.report().findings

    def save_plots(self, directory: str | Path) -> list[Path]:
        """The report's pictures; under torch.distributed only rank 0 writes them (others get [])."""
        return self.report().save_plots(directory) if is_main_process() else []


def _as_float(value: Any) -> float | None:
    return None if value is None else float(value)


def _history_row(step: int, stats: PassStats, loss: float | None) -> dict[str, Any]:
    return {
        "step": step,
        "loss": loss,
        "layers": {lay.name: {"mean": lay.mean, "std": lay.std, "saturated": lay.saturated, "dead": lay.dead,
                              "grad_std": lay.grad_std} for lay in stats.layers},
        "params": {p.name: {"update_ratio": p.update_ratio, "grad_to_weight": p.grad_to_weight}
                   for p in stats.params},
    }

