"""Lightning: a Callback that runs an nnvitals Monitor inside `Trainer.fit`.

    from nnvitals.integrations.lightning import NNVitalsCallback

    trainer = lightning.Trainer(callbacks=[NNVitalsCallback(every=10)])
    trainer.fit(model, loader)

Needs the `lightning` package (`pip install nnvitals[lightning]`); the rest of nnvitals never imports it.
The Monitor samples every `every`-th optimizer step, counted by the trainer's global step (so it goes on
where a resumed run left off). Findings go, from rank zero only, to every logger of the trainer at the
end of each training epoch and of fitting: a count per finding code as metrics (`nnvitals/<code>`), and
the table as text where the logger takes text (TensorBoard; W&B's `log_text`). With a TensorBoardLogger
the Monitor also writes its per-layer scalars and histograms there on sampled steps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import lightning.pytorch as pl
import torch
from lightning.pytorch.loggers import TensorBoardLogger
from lightning.pytorch.utilities import rank_zero_warn
from torch import nn

from nnvitals.checks import CODES, Evidence, Finding, train_eval_mode
from nnvitals.doctor import Monitor
from nnvitals.integrations import tensorboard as tensorboard_output
from nnvitals.probes import ModeEvent, PassStats, is_batchnorm


class NNVitalsCallback(pl.Callback):
    """Watch a Lightning run with an nnvitals Monitor.

    every: sample every N-th optimizer step (the trainer's global step).
    plots: a folder, or True for `<trainer.log_dir>/nnvitals`: at the end of fitting rank zero writes the
        pictures there and hands them to the loggers that take images (TensorBoard, W&B).
    tensorboard: with a TensorBoardLogger, also write the Monitor's per-layer scalars and histograms.

    At the start of training it warns (a `train-eval-mode` finding and a Python warning on rank zero)
    when a BatchNorm or Dropout module is in eval mode: since Lightning 2.2 the trainer keeps the mode
    each submodule had, so a module left in eval mode trains in eval mode.
    """

    def __init__(self, every: int = 10, *, plots: str | Path | bool | None = None, tensorboard: bool = True):
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every must be a positive whole number of steps, got {every!r}")
        self.every = every
        self.plots = plots
        self.tensorboard = tensorboard
        self.monitor: Monitor | None = None
        self.start_findings: list[Finding] = []
        self.logged: list[Finding] = []  # what was last handed to the loggers
        self._seen = 0  # the trainer's global step when the Monitor last stepped
        self._state: dict[str, Any] | None = None  # from a checkpoint, until training starts
        self._writer: Any = None
        self._logged_step: int | None = None
        self._output_checked = False

    # -- the run -----------------------------------------------------------------------------------
    def on_train_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self.start_findings = eval_mode_findings(pl_module)
        for f in self.start_findings:
            rank_zero_warn(f"nnvitals {f.code}: {f.message} Fix: {f.fix}", category=UserWarning)
        self._writer = next((lg.experiment for lg in trainer.loggers if isinstance(lg, TensorBoardLogger)), None) \
            if self.tensorboard and trainer.is_global_zero else None
        # the Monitor writes its scalars and histograms there; the findings text is the callback's (_log)
        writer = _WithoutText(self._writer) if self._writer is not None else None
        self.monitor = Monitor(pl_module, every=self.every, tensorboard=writer)
        if self._state is not None:
            try:
                self.monitor.load_state_dict(self._state)
            except ValueError as e:
                rank_zero_warn(f"nnvitals: not resuming the checkpoint's Monitor ({e}); starting a fresh one",
                               category=UserWarning)
                self.monitor = Monitor(pl_module, every=self.every, tensorboard=writer)
            self._state = None
        self._seen = trainer.global_step
        self.monitor.seek(self._seen)
        self._logged_step = None
        self._output_checked = False
        self.monitor.__enter__()

    def on_train_batch_start(self, trainer: pl.Trainer, pl_module: pl.LightningModule, batch: Any,
                             batch_idx: int) -> None:
        # Under gradient accumulation only the micro-batch that completes the optimizer step is recorded.
        # The Monitor armed itself (hooks, parameters before the step) when it last stepped; it pauses for
        # the other micro-batches.
        monitor = self.monitor
        if monitor is None or not monitor.sampled(monitor.steps) or not pl_module.automatic_optimization:
            return
        if _completes_step(trainer, batch_idx):
            monitor.resume()
        else:
            monitor.pause()

    def on_train_batch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule, outputs: Any, batch: Any,
                           batch_idx: int) -> None:
        monitor = self.monitor
        advanced = trainer.global_step - self._seen
        if monitor is None or advanced <= 0:  # no optimizer step (accumulating)
            return
        loss = outputs.get("loss") if isinstance(outputs, dict) else outputs
        if pl_module.automatic_optimization and isinstance(loss, torch.Tensor | float) \
                and trainer.accumulate_grad_batches > 1:
            loss = loss * trainer.accumulate_grad_batches  # Lightning divided it by the accumulation
        recorded = monitor.sampled(monitor.steps)
        monitor.step(loss)  # once per batch, whatever the number of optimizer steps in it
        self._seen = trainer.global_step
        # The next batch covers the global steps [seen, seen + advanced) (more than one under manual
        # optimization with several optimizers): sampled when a multiple of `every` lies among them,
        # recorded under that step.
        multiple = -(-self._seen // self.every) * self.every
        label = multiple if multiple < self._seen + advanced else self._seen
        monitor.seek(label)  # differs with several optimizer steps a batch (manual optimization)
        if recorded and not self._output_checked:
            self._output_checked = True
            self._check_output_seen(loss)

    def _check_output_seen(self, loss: Any) -> None:
        """Warn once when the Monitor never saw the module's output: training_step did not call `self(x)`."""
        if loss is None or self.monitor is None:
            return
        try:
            report = self.monitor.report()
        except RuntimeError:  # nothing recorded
            return
        if report.stats.output_shape is None:
            rank_zero_warn(NOT_CALLED, category=UserWarning)

    def on_train_epoch_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        self._log(trainer)

    def on_train_end(self, trainer: pl.Trainer, pl_module: pl.LightningModule) -> None:
        if self.monitor is None:
            return
        self._log(trainer)
        self.monitor.close()
        if self.plots:
            # trainer.log_dir broadcasts from rank zero: every rank asks, or the others would wait forever
            folder = Path(trainer.log_dir or ".") / "nnvitals" if self.plots is True else Path(self.plots)
            if trainer.is_global_zero and self._has_samples():
                _log_pictures(trainer, self.monitor.save_plots(folder))

    def on_exception(self, trainer: pl.Trainer, pl_module: pl.LightningModule, exception: BaseException) -> None:
        if self.monitor is not None:
            self.monitor.close()

    # -- what it found -----------------------------------------------------------------------------
    @property
    def findings(self) -> list[Finding]:
        """The Monitor's findings at its latest sampled step, and those of the start of training."""
        found = self.monitor.findings() if self.monitor is not None and self._has_samples() else []
        seen = {(f.code, f.where) for f in found}
        return found + [f for f in self.start_findings if (f.code, f.where) not in seen]

    def _has_samples(self) -> bool:
        return self.monitor is not None and bool(self.monitor.history)

    def _log(self, trainer: pl.Trainer) -> None:
        """Metrics and the findings text, once per global step (the end of fitting follows the last epoch's)."""
        step = trainer.global_step
        if not trainer.is_global_zero or not trainer.loggers or self._logged_step == step:
            return
        self._logged_step = step
        findings = self.logged = self.findings
        metrics: dict[str, float] = {f"nnvitals/{code}": 0.0 for code in CODES}
        for f in findings:
            metrics[f"nnvitals/{f.code}"] += 1
        for severity in ("error", "warning"):
            metrics[f"nnvitals/{severity}s"] = float(sum(f.severity == severity for f in findings))
        for logger in trainer.loggers:
            logger.log_metrics(metrics, step=step)
            if isinstance(logger, TensorBoardLogger):
                tensorboard_output.write_findings(logger.experiment, step, findings)
            elif callable(log_text := getattr(logger, "log_text", None)):
                log_text(key="nnvitals/findings", columns=["severity", "code", "where", "finding", "fix"],
                                data=[[f.severity, f.code, f.where, f.message, f.fix] for f in findings], step=step)
            logger.save()

    # -- checkpoints -------------------------------------------------------------------------------
    def state_dict(self) -> dict[str, Any]:
        if self.monitor is not None:
            return {"monitor": self.monitor.state_dict()}
        return {"monitor": self._state} if self._state is not None else {}

    def load_state_dict(self, state_dict: dict[str, Any]) -> None:
        self._state = state_dict.get("monitor")


NOT_CALLED = ("nnvitals: training_step did not call the module itself (self(x)): activations called as functions "
              "and the starting loss are not checked")


def _completes_step(trainer: pl.Trainer, batch_idx: int) -> bool:
    """Whether this micro-batch ends with an optimizer step (automatic optimization)."""
    k = trainer.accumulate_grad_batches
    return k <= 1 or (batch_idx + 1) % k == 0 or batch_idx + 1 >= trainer.num_training_batches


class _WithoutText:
    """A SummaryWriter for the Monitor without its findings text: the callback writes that, at the global step."""

    def __init__(self, writer: Any):
        self._writer = writer

    def __getattr__(self, name: str) -> Any:
        return getattr(self._writer, name)

    def add_text(self, *args: Any, **kwargs: Any) -> None:
        pass


def eval_mode_findings(model: nn.Module) -> list[Finding]:
    """`train-eval-mode` for the BatchNorm and Dropout modules of `model` that are in eval mode."""
    events = [ModeEvent(name, type(m).__name__, training=False, grad_enabled=True)
              for name, m in model.named_modules()
              if not m.training and (is_batchnorm(m) or isinstance(m, nn.Dropout | nn.AlphaDropout))]
    return list(train_eval_mode(Evidence(PassStats([], [], mode_events=events)))) if events else []


def _log_pictures(trainer: pl.Trainer, paths: list[Path]) -> None:
    if not paths:
        return
    for logger in trainer.loggers:
        if isinstance(logger, TensorBoardLogger):
            from matplotlib.image import imread

            for path in paths:
                logger.experiment.add_image(f"nnvitals/{path.stem}", imread(path)[..., :3], trainer.global_step,
                                            dataformats="HWC")
            logger.experiment.flush()
        elif callable(log_image := getattr(logger, "log_image", None)):
            log_image(key="nnvitals", images=[str(p) for p in paths], step=trainer.global_step)
