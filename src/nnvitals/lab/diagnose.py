"""The doctor's view of a stage: nnvitals.check at initialisation and at the end, Monitor during training.

The lab measures nothing of its own here: histograms, saturation and update ratios come from the
doctor, and this module only keeps the parts the lab's summary and report show.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from torch import nn

import nnvitals
from nnvitals.doctor import Report

MONITOR_EVERY = 100  # steps between the Monitor's samples in the deep stage


def examine(model: nn.Module, inputs: torch.Tensor, targets: torch.Tensor, directory: Path, *,
            lr: float, at_init: bool) -> dict[str, Any]:
    """One doctor's check on a minibatch (the model is left as it was); pictures go into `directory`."""
    report = nnvitals.check(model, inputs, targets, lr=lr, at_init=at_init)
    return summarise(report, report.save_plots(directory))


class Watch:
    """The doctor's Monitor over a training run, whose state travels in the lab's checkpoints.

    The state is the Monitor's own `state_dict()`, kept as JSON text (plain numbers, which a
    weights-only torch.load accepts), so a continued run ends with the findings and history an
    uninterrupted one gives.
    """

    def __init__(self, model: nn.Module, saved: dict[str, Any] | None = None):
        self.monitor = nnvitals.Monitor(model, every=MONITOR_EVERY)
        if saved is not None:
            self.monitor.load_state_dict(json.loads(saved["json"]))

    def __enter__(self) -> Watch:
        self.monitor.__enter__()
        return self

    def __exit__(self, *exc: object) -> None:
        self.monitor.__exit__(*exc)

    def step(self, loss: torch.Tensor) -> None:
        self.monitor.step(loss)

    def state(self) -> dict[str, Any]:
        return {"json": json.dumps(self.monitor.state_dict(), default=_plain)}

    def conclude(self, directory: Path) -> dict[str, Any]:
        """The Monitor's findings over the run and its pictures (with the update-to-data ratio history)."""
        report = self.monitor.report()
        return summarise(report, report.save_plots(directory))


def _plain(o: Any) -> Any:
    if hasattr(o, "item") and getattr(o, "ndim", 0) == 0:  # numpy and torch scalars
        return o.item()
    if hasattr(o, "tolist"):
        return o.tolist()
    if isinstance(o, tuple | set):
        return list(o)
    raise TypeError(f"cannot save {type(o).__name__} in a checkpoint")


def summarise(report: Report, plots: list[Path]) -> dict[str, Any]:
    tanh = [lay for lay in report.layers if lay.kind == "tanh" and lay.saturated is not None]
    counts = [_count(lay.shape) for lay in tanh]
    saturation = (sum(c * (lay.saturated or 0.0) for c, lay in zip(counts, tanh, strict=True)) / sum(counts)
                  if tanh and sum(counts) else None)
    return {
        "loss": report.loss,
        "codes": report.codes(),
        "findings": [f.to_dict() for f in report.findings],
        "saturation": saturation,
        "tanh_layers": [{"name": lay.name, "mean": lay.mean, "std": lay.std, "saturated": lay.saturated,
                         "dead": lay.dead, "grad_std": lay.grad_std} for lay in tanh],
        "plots": [str(p) for p in plots],
    }


def _count(shape: tuple[int, ...]) -> int:
    n = 1
    for s in shape:
        n *= s
    return n
