"""Training a stage: plain SGD on minibatches of 32, checkpointed so an interruption loses nothing.

The minibatch indices come from the generator that drew the weights, exactly as one
`torch.randint(0, n, (32,), generator=g)` per step would draw them: drawing a block of steps at once
with `torch.randint(0, n, (steps, 32))` yields the same numbers in the same order, and saves a call and
two gathers per step. A checkpoint records the generator state at the start of the block the run is
in, so a resumed run redraws that block and carries on with the very same batches.

Speed without changing the arithmetic: one update for all parameters (`torch._foreach_add_`), no host
synchronisation except every LOG_EVERY steps for the progress display, gradients dropped (set to None)
rather than zeroed, so backward writes fresh ones without an extra pass, and for the one-layer network
its backward written out op for op (`MLP.sgd_step`), which skips autograd's graph.
"""

from __future__ import annotations

import io
import math
import signal
import threading
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from nnvitals.lab.data import Split, write_atomic

BATCH_SIZE = 32
FULL_STEPS = 200_000  # the lesson's run
QUICK_FRACTION = 10  # the quick profile runs a tenth of the steps, with the schedule scaled alike
PROFILES = ("quick", "full")
# Where the learning rate drops from 0.1 to 0.01, as a share of the run: half way for the one-layer
# network (100k of 200k), three quarters for the deep one (150k of 200k).
DECAY_SHARE = {"deep": 0.75}
DEFAULT_DECAY_SHARE = 0.5
CHUNK = 1000  # minibatch indices drawn this many steps at a time
CHECKPOINT_EVERY = 5000  # steps; a multiple of CHUNK
LOG_EVERY = 250  # steps between progress reports (each costs one host sync)
CHECKPOINT_FORMAT = 1


@dataclass(frozen=True)
class Schedule:
    """Plain SGD: learning rate `lr` for steps < decay_at, then `lr_after`."""

    steps: int
    decay_at: int
    lr: float = 0.1
    lr_after: float = 0.01

    def lr_at(self, step: int) -> float:
        return self.lr if step < self.decay_at else self.lr_after

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def schedule_for(stage: str, profile: str, steps: int | None = None) -> Schedule:
    """The lesson's schedule for a stage: 200,000 steps (full) or a tenth (quick), or `steps` if given."""
    if profile not in PROFILES:
        raise ValueError(f"unknown profile {profile!r}; the profiles are {', '.join(PROFILES)}")
    total = steps if steps is not None else FULL_STEPS if profile == "full" else FULL_STEPS // QUICK_FRACTION
    if total < 1:
        raise ValueError(f"the number of steps must be at least 1, got {total}")
    return Schedule(total, round(total * DECAY_SHARE.get(stage, DEFAULT_DECAY_SHARE)))


class StopFlag:
    """Set to ask a training loop to stop at the next step boundary (after saving a checkpoint)."""

    def __init__(self) -> None:
        self.requested = False

    def set(self) -> None:
        self.requested = True


@contextmanager
def stop_on_sigint(flag: StopFlag) -> Iterator[StopFlag]:
    """While inside, Ctrl-C sets `flag` instead of raising KeyboardInterrupt mid-step.

    Only the main thread can own signal handlers; elsewhere this does nothing.
    """
    if threading.current_thread() is not threading.main_thread():
        yield flag
        return
    previous = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: flag.set())
    try:
        yield flag
    finally:
        signal.signal(signal.SIGINT, previous)


class Interrupted(Exception):
    """Training stopped on request; a checkpoint holds everything needed to continue."""

    def __init__(self, step: int, checkpoint: Path | None):
        super().__init__(f"stopped at step {step}")
        self.step = step
        self.checkpoint = checkpoint


@dataclass
class Progress:
    """Where a run is: the step it will take next and what has been recorded so far."""

    step: int
    generator_state: torch.Tensor  # at the start of the block of steps that holds `step`
    losses: torch.Tensor  # one minibatch loss per step taken
    seconds: float  # training time so far
    monitor: dict[str, Any] | None = None  # the doctor's Monitor state (deep stage), see diagnose.Watch

    @classmethod
    def fresh(cls, generator: torch.Generator) -> Progress:
        return cls(0, generator.get_state(), torch.empty(0), 0.0)


def save_checkpoint(path: Path, model: nn.Module, schedule: Schedule, progress: Progress) -> None:
    """Everything needed to continue: model (parameters and BatchNorm buffers), optimizer, generator, step."""
    state = {
        "format": CHECKPOINT_FORMAT,
        "step": progress.step,
        "model": model.state_dict(),
        # Plain SGD keeps no state beyond its schedule and where in it the run is.
        "optimizer": {"kind": "sgd", "schedule": schedule.to_dict(), "lr": schedule.lr_at(progress.step)},
        "generator": progress.generator_state,
        "losses": progress.losses,
        "seconds": progress.seconds,
        "monitor": progress.monitor,
    }
    buffer = io.BytesIO()
    torch.save(state, buffer)
    write_atomic(path, buffer.getvalue())


def load_checkpoint(path: Path, model: nn.Module, schedule: Schedule) -> Progress:
    """Load a checkpoint into `model`; refuses one written for another schedule."""
    state = torch.load(path, map_location="cpu", weights_only=True)
    if state.get("format") != CHECKPOINT_FORMAT:
        raise ValueError(f"{path} is not a checkpoint this version of nnvitals can continue")
    if state["optimizer"]["schedule"] != schedule.to_dict():
        raise ValueError(f"{path} was written for another schedule ({state['optimizer']['schedule']})")
    model.load_state_dict(state["model"])
    return Progress(state["step"], state["generator"], state["losses"], state["seconds"], state["monitor"])


ProgressFn = Callable[[int, float], None]


def train(model: nn.Module, data: Split, generator: torch.Generator, schedule: Schedule, progress: Progress, *,
          checkpoint: Path | None = None, stop: StopFlag | None = None, on_progress: ProgressFn | None = None,
          monitor: Any = None) -> Progress:
    """Run SGD from `progress.step` to `schedule.steps`; returns the final progress (losses of every step).

    `generator` must be in the state of a fresh model's, just after the weights were drawn; it is set
    from `progress`. With `stop`, the loop checks the flag before each step; when it is set, a checkpoint
    is written and Interrupted raised. `monitor` (a diagnose.Watch, entered) is told of each step, and
    its state goes into every checkpoint.
    """
    stop = stop or StopFlag()
    # The one-layer network has its backward written out (bit-identical, no graph); a watched run needs
    # autograd, since the Monitor reads the gradients at every layer's output.
    sgd_step = getattr(model, "sgd_step", None) if monitor is None else None
    params = list(model.parameters())
    weights = [p.detach() for p in params]  # aliases updated in place, outside autograd
    X, Y = data.X, data.Y
    n = len(data)
    losses = torch.empty(schedule.steps)
    losses[: progress.step] = progress.losses[: progress.step]
    step = progress.step
    seconds = progress.seconds
    chunk_state = progress.generator_state
    generator.set_state(chunk_state)
    model.train()

    def snapshot(at: int) -> Progress:
        return Progress(at, chunk_state, losses[:at].clone(), seconds, None if monitor is None else monitor.state())

    started = time.perf_counter()
    while step < schedule.steps:
        chunk_start = step - step % CHUNK
        rows = min(CHUNK, schedule.steps - chunk_start)
        chunk_state = generator.get_state()
        ix = torch.randint(0, n, (rows, BATCH_SIZE), generator=generator)
        Xc, Yc = X[ix], Y[ix]
        recorded: list[torch.Tensor] = []
        for i in range(step - chunk_start, rows):
            if stop.requested:
                seconds += time.perf_counter() - started
                _record(losses, chunk_start + i - len(recorded), recorded)
                state = snapshot(chunk_start + i)
                if checkpoint is not None:
                    save_checkpoint(checkpoint, model, schedule, state)
                raise Interrupted(chunk_start + i, checkpoint)
            lr = schedule.lr_at(chunk_start + i)
            if sgd_step is not None:
                recorded.append(sgd_step(Xc[i], Yc[i], lr))
            else:
                loss = F.cross_entropy(model(Xc[i]), Yc[i])
                loss.backward()
                torch._foreach_add_(weights, [p.grad for p in params], alpha=-lr)  # type: ignore[misc]
                recorded.append(loss.detach())
                if monitor is not None:
                    monitor.step(recorded[-1])
                for p in params:
                    p.grad = None
            if on_progress is not None and (chunk_start + i + 1) % LOG_EVERY == 0:
                on_progress(chunk_start + i + 1, float(torch.stack(recorded[-LOG_EVERY:]).mean()))
        _record(losses, chunk_start + rows - len(recorded), recorded)
        step = chunk_start + rows
        if step % CHECKPOINT_EVERY == 0 or step == schedule.steps:
            now = time.perf_counter()
            seconds += now - started
            started = now
            # The next block starts from the generator as it is now.
            chunk_state = generator.get_state()
            if checkpoint is not None:
                save_checkpoint(checkpoint, model, schedule, snapshot(step))
    seconds += time.perf_counter() - started
    chunk_state = generator.get_state()
    final = snapshot(step)
    if on_progress is not None:
        on_progress(step, float(losses[max(0, step - LOG_EVERY): step].mean()) if step else math.nan)
    return final


def _record(losses: torch.Tensor, start: int, recorded: list[torch.Tensor]) -> None:
    if recorded:
        losses[start: start + len(recorded)] = torch.stack(recorded)
        recorded.clear()


@torch.no_grad()
def split_loss(model: nn.Module, X: torch.Tensor, Y: torch.Tensor, chunk: int = 65536) -> float:
    """Mean cross-entropy over a whole split in the model's current mode (eval: BatchNorm's running stats).

    Evaluated in slices to bound memory; in eval mode the slices do not interact.
    """
    if model.training:
        return float(F.cross_entropy(model(X), Y))
    total = 0.0
    for i in range(0, len(Y), chunk):
        total += float(F.cross_entropy(model(X[i: i + chunk]), Y[i: i + chunk], reduction="sum"))
    return total / len(Y)
